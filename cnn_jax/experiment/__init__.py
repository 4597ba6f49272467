"""What every experiment shares, written once, in three modules:

- `command`: the experiment's command line (--preset auto|NAME, --set, --out ...),
  presets any field can override, the guarded output folder, results.json / table.md /
  a PNG and the claims in words; its docstring is the contract an experiment file
  follows (`EXPERIMENT = Experiment(name, __doc__, PRESETS, run)`).
- `nets`: the nets experiments compare (`Net` by family and depth), He et al.'s CIFAR
  recipe, sweeps and records keyed by net name.
- `report`: tables, plots with a panel per family and claims comparing nets by name.

Experiments share only through this package, never by importing each other.
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
