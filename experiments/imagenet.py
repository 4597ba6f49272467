"""Plain vs residual networks on ImageNet: He et al. 2015, Fig. 4 and Table 2.

The paper's first case: on ImageNet, plain-34 has a higher *training* error than
plain-18 throughout training (degradation), while ResNet-34 trains better than
ResNet-18, and far better than plain-34 (Table 2, top-1 val error, 10-crop: plain-18
27.94, plain-34 28.54, ResNet-18 27.88, ResNet-34 25.03).

Method (Sec. 3.4, the `paper` preset). The image's shorter side resized to a random
length in [256, 480], a random 224x224 crop or its mirror, the per-pixel mean
subtracted, Krizhevsky's colour augmentation (`--augment resnet`). BatchNorm after
every convolution, before the activation; He initialisation; no dropout. SGD with
batch 256, momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 "when the error
plateaus", up to 60x10^4 iterations: here at the fixed epochs 30, 60 and 90 of
fb.resnet.torch's recipe (docs/deviations.md). ResNets with projection shortcuts
only where the dimensions change (option B). Test: single centre crop during training,
and the 10-crop test at the end (Table 2's). The global batch stays 256 however many
devices and hosts share it.

The claims (Fig. 4's) are about optimisation, and `claims` in results.json checks them
on the final training errors averaged over seeds: plain-34 trains worse than
plain-18; ResNet-34 no worse than ResNet-18 (within 1 point); ResNet-34 far better
than plain-34 (by more than 3 points).

Presets: `paper` (above, on imagenet2012 or an ImageFolder with train/ and val/),
`quick` (the CPU's, below), `smoke` (seconds, for tests), `auto` (paper on a GPU/TPU,
quick on a CPU).

The `quick` preset asks Fig. 4's question where a 2-core CPU can answer it in 20
minutes: fit imagenet_sample's 1,000 images (one per class) at 32x32 pixels, each
epoch the same centre view (no augmentation: every net could in principle reach zero
training error), 900 iterations at batch 32 (29 passes), lr 0.02 divided by 10 at 700,
2 seeds, the nets in parallel processes, one per core. Its training error is the error
on all 1,000 images with the final weights. Its record, the claims holding or not, is
in docs/results.md.

Many hosts: every process runs the same command with `--distributed` (TPU pods,
SLURM) or `--coordinator-address/--num-processes/--process-id`; the nets train one
after another over all devices of all hosts, each process reading its share of every
global batch; only process 0 writes results and plots. README "ImageNet on many hosts".

    python -m experiments.imagenet [--preset auto|paper|quick|smoke]
        [--depths 18 34 50 101 152] [--seeds N] [--data imagenet2012|PATH|arrayrecord:DIR]
        [--out DIR] [--set KEY=VALUE ...] [--distributed | --coordinator-address ...]
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from cnn_jax.files import write_atomic
from cnn_jax.evaluate import evaluate
from cnn_jax.experiment import (Context, Experiment, Net, Report, compare, imagenet_nets,
                                mean_std, nets_in, plot_curves, record, sweep, train_config,
                                training_error)
from cnn_jax.train import TrainConfig


# ------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class Preset:
    plain: tuple          # depths of plain nets (the paper has plain-18 and plain-34)
    residual: tuple       # depths of ResNets
    seeds: int = 1
    ten_crop: bool = True  # the 10-crop test at the end (Table 2)
    data: str = "imagenet2012"
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields


EPOCH = 5_005  # iterations of batch 256 in one pass over ImageNet's 1,281,167 images

# Sec. 3.4 as training fields: 60x10^4 iterations at batch 256 (120 epochs), lr 0.1
# divided by 10 at epochs 30, 60, 90 (docs/deviations.md); scale augmentation with
# colour; bfloat16 compute (parameters float32).
PAPER = dict(steps=600_000, batch=256, lr=0.1, milestones=(30 * EPOCH, 60 * EPOCH, 90 * EPOCH),
             augment="resnet", image_size=224, normalise="per_pixel", dtype="bfloat16",
             log_every=500, eval_every=EPOCH, checkpoint_every=EPOCH, eval_batch=1_000,
             steps_per_call=1, eval_subset=0)

PRESETS = {
    "paper": Preset(plain=(18, 34), residual=(18, 34), train=PAPER),
    # Fig. 4's optimisation claim at CPU scale (module docstring): fit 1,000 images
    "quick": Preset(plain=(18, 34), residual=(18, 34), seeds=2, ten_crop=False,
                    data="imagenet_sample",
                    train={**PAPER, "steps": 900, "batch": 32, "lr": 0.02, "milestones": (700,),
                           "augment": "center", "image_size": 32, "dtype": "float32",
                           "log_every": 30, "eval_every": 300, "checkpoint_every": 300,
                           "eval_batch": 500}),
    "smoke": Preset(plain=(18,), residual=(18,), data="imagenet_sample",
                    train={**PAPER, "steps": 4, "batch": 16, "milestones": (10**9,),
                           "image_size": 32, "dtype": "float32", "log_every": 2,
                           "eval_every": 2, "checkpoint_every": 2, "eval_batch": 64,
                           "eval_subset": 64}),
}



def fig4_claims(runs: list[dict]) -> list[dict]:
    """Fig. 4 as numbers, on mean final training errors: plain-34 trains worse than
    plain-18; ResNet-34 far better than plain-34 (3 points); ResNet-34 no worse than
    ResNet-18 (within 1 point). Those the trained nets cannot decide are left out."""
    found = [compare(runs, "plain_deeper_trains_worse",
                     "plain-34 trains worse than plain-18 (degradation)", "plain34", "plain18",
                     0.0),
             compare(runs, "resnet_beats_plain", "ResNet-34 trains far better than plain-34",
                     "plain34", "resnet34", 3.0),
             compare(runs, "resnet_deeper_no_worse", "ResNet-34 trains no worse than ResNet-18",
                     "resnet18", "resnet34", 1.0, no_worse=True)]
    return [c for c in found if c is not None]


# Table 2: top-1 error (%) on ImageNet val, 10-crop testing
PAPER_TOP1 = {"plain18": 27.94, "plain34": 28.54, "resnet18": 27.88, "resnet34": 25.03}


def nets_for(preset: Preset, depths: Optional[list[int]] = None) -> list[Net]:
    """The preset's nets, or both families at `depths` (plain nets where the paper has
    them: 18 and 34)."""
    if depths:
        return imagenet_nets([d for d in depths if d in (18, 34)], depths)
    return imagenet_nets(preset.plain, preset.residual)


def run_config(net: Net, preset: Preset, seed: int, out: Path, *, data=None, data_dir=None,
               workers=None) -> TrainConfig:
    """One net's run: the paper's recipe (Sec. 3.4), then the preset's training fields."""
    return train_config(preset, model=net.name, data=data or preset.data, data_dir=data_dir,
                        seed=seed, momentum=0.9, weight_decay=1e-4, schedule="paper",
                        workers=workers, out=str(out), progress=False)


# ------------------------------------------------------------------ the sweep
def records(nets: list[Net], preset: Preset, seeds: int, out: Path, command: str, *,
            processes: Optional[int] = None, **recipe) -> list[dict]:
    """Train (or re-read) every net for `seeds` seeds (cnn_jax.experiment.sweep), then
    (`preset.ten_crop`) test each with 10 crops; one record per net and seed. Many
    hosts: every process trains every net, over all devices."""
    if jax.process_count() > 1:
        processes = 1  # the hosts train each net together
    trained = sweep(nets, lambda net, seed, folder: run_config(net, preset, seed, folder,
                                                               **recipe),
                    seeds, out, command, processes=processes)
    return [record_of(net, seed, cfg, res, preset.ten_crop) for net, seed, cfg, res in trained]


def record_of(net: Net, seed: int, cfg: TrainConfig, res: dict, ten_crop: bool) -> dict:
    """One net's line of results.json: its training and test errors (top-1, top-5),
    the split they were measured on, its curves, and the 10-crop test."""
    split = res["eval_split"]
    r = {**record(net, seed, cfg, res),
         "final_train_top5_error": res["final_train_top5_error"],
         # a dataset with only train/ (imagenet_sample): its "test" is the training set
         "test_split": split,
         "final_test_top1_error": res[f"final_{split}_top1_error"],
         "final_test_top5_error": res[f"final_{split}_top5_error"]}
    if ten_crop:  # every process: each scores its rows of the split, the counts summed
        r.update(ten_crop_test(cfg, split, res["final_params_digest"]))
    return r


def ten_crop_test(cfg: TrainConfig, split: str, digest: str) -> dict:
    """Table 2's test: corners and centre of the image at shorter side 256, mirrored,
    softmax averaged (cnn_jax.evaluate), on every process, each its rows; kept in the
    run's folder for its final parameters, so a re-run does not test again (process 0
    decides for all, so that all or none evaluate)."""
    kept = Path(cfg.run.out) / f"ten_crop_{split}.json"
    saved = None
    if jax.process_index() == 0 and kept.exists():
        saved = json.loads(kept.read_text())
        saved = saved if saved.get("final_params_digest") == digest else None
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(
            np.int32(saved is None)):
        saved = json.loads(kept.read_text())
    if saved is not None:
        return {**saved["errors"], "ten_crop_test_images": saved["n_examples"]}
    ten = evaluate([cfg.run.out], views=10, split="train" if split == "train_set" else split,
                   workers=cfg.run.workers)
    errors = {"ten_crop_test_top1_error": ten["top1_error"],
              "ten_crop_test_top5_error": ten["top5_error"]}
    if jax.process_index() == 0:
        write_atomic(kept, json.dumps({"final_params_digest": digest, "errors": errors,
                                       "n_examples": ten["n_examples"],
                                       "scored": ten["scored"]}))
    return {**errors, "ten_crop_test_images": ten["n_examples"]}


# ------------------------------------------------------------------ outputs
def table(runs: list[dict], note: str) -> str:
    """Table 2's shape: plain and ResNet side by side per depth, our top-1 / top-5
    errors (mean +- std over seeds) next to the paper's 10-crop top-1 val error."""
    lines = ["| layers | net | params | training error (%) | test top-1 (%) | "
             "test top-5 (%) | 10-crop top-1 (%) | paper: 10-crop top-1 val (%) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for first in sorted(nets_in(runs), key=lambda r: (r["depth"], r["residual"])):
        rs = [r for r in runs if r["name"] == first["name"]]
        pct = lambda key: (mean_std([100 * r[key] for r in rs])  # noqa: E731
                           if all(r.get(key) is not None for r in rs) else "-")
        paper = PAPER_TOP1.get(first["name"], "-")
        lines.append(f"| {first['depth']} | {first['label']} | {rs[0]['params'] / 1e6:.1f}M | "
                     f"{mean_std([training_error(r) for r in rs])} | "
                     f"{pct('final_test_top1_error')} | {pct('final_test_top5_error')} | "
                     f"{pct('ten_crop_test_top1_error')} | {paper} |")
    return "\n".join(lines + ["", note])


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    args, preset, seeds = ctx.args, ctx.preset, ctx.seeds
    runs = records(nets_for(preset, args.depths), preset, seeds, ctx.out, ctx.command,
                   processes=args.processes, data=args.data, data_dir=args.data_dir,
                   workers=args.workers)
    cfg = run_config(Net("resnet", 18, True), preset, 0, ctx.out)  # the recipe every net shares
    data = args.data or preset.data
    split = runs[0]["test_split"]
    on_train = split == "train_set"
    evaluated = ("the training images themselves (this dataset has no val/): memorisation, "
                 "not generalisation" if on_train else f"the {split} split") + \
        (f", {runs[0]['scored']}" if runs[0].get("scored") else "")
    images = f"{cfg.data.eval_subset:,} fixed" if cfg.data.eval_subset else "all"
    training = (f"the error on {images} training images with the final weights" if on_train
                else f"the last {cfg.run.log_every} iterations' training batches")
    drops = [m for m in cfg.schedule.milestones if m < cfg.schedule.steps]
    schedule = f"lr {cfg.schedule.lr}" + (f" divided by 10 at {', '.join(map(str, drops))}"
                                 if drops else "")
    note = (f"Data: {data}. Preset `{ctx.preset_name}`: {cfg.schedule.steps} iterations at batch "
            f"{cfg.optimiser.batch}, {schedule}, --augment {cfg.data.augment}, input "
            f"{cfg.data.image_size}x{cfg.data.image_size} (the paper: 60x10^4 at 256, lr 0.1, 224x224). "
            f"Training error: {training}; test errors on {evaluated}, centre crop; mean ± std "
            f"over seeds 0..{seeds - 1}. The paper's column is ImageNet val, 10-crop. "
            f"Command: `{ctx.command}`.")
    title = (f"{data}, preset {ctx.preset_name}: {cfg.schedule.steps} iterations, batch {cfg.optimiser.batch}, "
             f"lr {cfg.schedule.lr}, {cfg.data.image_size} px, seeds {seeds}")
    claims = fig4_claims(runs)
    return Report(
        results={"runs": runs},
        table=table(runs, note),
        claims=claims,
        heading=f"Fig. 4's claims, on the final training errors (mean of {seeds} seed(s)):",
        words="" if claims else "No claim of Fig. 4 is tested: they need plain and "
                                "residual nets of 18 and 34 layers.",
        # Fig. 4's shape is Fig. 6's, with option B
        plot=lambda path: plot_curves(
            runs, path, title, milestones=cfg.schedule.milestones,
            titles={"plain": "plain networks", "resnet": "ResNets (option B)"},
            ylabel="top-1 error (%)  -- dashed: training, solid: " +
                   ("training images" if on_train else split)))


def add_arguments(p) -> None:
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help="ResNet depths (18 34 50 101 152); plain nets at 18 and 34")


def recipe(ctx: Context) -> dict:
    """What an output folder's nets were trained with (its guard)."""
    nets_for(ctx.preset, ctx.args.depths)  # bad --depths: refused before the folder
    return ctx.recipe()


EXPERIMENT = Experiment("imagenet", __doc__, PRESETS, run, figure="curves.png",
                        add_arguments=add_arguments, recipe=recipe, multihost=True)
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
