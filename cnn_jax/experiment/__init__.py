"""What every experiment shares, written once (cnn_jax.experiment.command): its command line, presets that any field
can override from it, the output folder (one recipe per folder; re-running resumes),
results.json / table.md / a PNG, and its claims checked and said in words.

An experiment file holds its method, its presets and its analysis:

    @dataclasses.dataclass(frozen=True)
    class Preset:                           # the recipe, as data: the experiment's own
        depths: tuple                       # knobs, and the training fields it sets
        train: dict = dataclasses.field(default_factory=dict)   # (TrainConfig's)
    PRESETS = {"paper": Preset(..., train=dict(steps=64_000, lr=0.1)), "smoke": ...}

    def run(ctx: Context) -> Report: ...    # the method: train, measure, compare

    EXPERIMENT = Experiment("plain_vs_resnet", __doc__, PRESETS, run, figure="curves.png")
    main = EXPERIMENT.main                  # python -m experiments.plain_vs_resnet

and the command line then takes, besides the experiment's own flags:

    --preset auto|NAME       auto: the accelerator preset on a GPU/TPU, the CPU one otherwise
    --set KEY=VALUE ...      a knob of the preset, or any training field (TrainConfig's),
                             e.g. --set steps=1000 lr=0.05 label_smoothing=0.1
    --out DIR                default runs/<name>-<preset>[-<overrides>]
    --data NAME --data-dir DIR --workers N --processes N
    --seeds N --seeds-together   (experiments that train several seeds)

Every run an experiment trains is `train_config(preset, ...)`: what the experiment
sets for that run, with the preset's training fields (its own, and --set's) on top,
so a training field set from the command line reaches every run's config.json. The
output folder is guarded with the preset's knobs and training fields as one flat
recipe (`recipe_of`): a folder trained with `--set label_smoothing=0.1` refuses the
same command without it, naming the key.

Bad input (a flag, a preset field, the data, the output folder) is a BadInput naming
it, exit status 2, and a refused command leaves no folder behind; any other error is
a bug and keeps its traceback.

Experiments share only through this package, never by importing each other: the nets
they compare and He et al.'s CIFAR recipe (`nets`), and the tables, plots and claims
that key nets by name (`report`).
"""
from cnn_jax.experiment.command import (PER_RUN, TRAIN_FIELDS, Context, Experiment,
                                        OutputInUse, Report, check_presets, choose_preset,
                                        claim, claims_in_words, figure, guard_out, knobs,
                                        mean_std, override, recipe_of, removed_if_refused,
                                        slug, train_config, training_key)
from cnn_jax.experiment.nets import (HE2015, Net, cifar_nets, found_or_trained, he2015_cifar,
                                     imagenet_nets, mean_train_errors, net_named, record, sweep,
                                     training_error)
from cnn_jax.experiment.report import compare, curves, nets_in, plot_curves, table

__all__ = ["PER_RUN", "TRAIN_FIELDS", "Context", "Experiment", "OutputInUse", "Report",
           "check_presets", "choose_preset", "claim", "claims_in_words", "figure",
           "guard_out", "knobs", "mean_std", "override", "recipe_of", "removed_if_refused",
           "slug", "train_config", "training_key", "HE2015", "Net", "cifar_nets",
           "found_or_trained", "he2015_cifar", "imagenet_nets", "mean_train_errors",
           "net_named", "record", "sweep",
           "training_error", "compare", "curves", "nets_in", "plot_curves", "table"]
