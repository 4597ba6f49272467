"""Plain vs residual networks on CIFAR-10: He et al. 2015, Fig. 6 and Table 6.

The degradation problem: stacking more 3x3 layers onto a plain net makes its
*training* error higher, not lower; the same nets with identity shortcuts (option A)
get better as they deepen.

Method (Sec. 4.2, the `paper` preset). Inputs 32x32 with the per-pixel mean
subtracted. 6n+2 weighted layers: a 3x3 conv, then 2n layers on each of the 32x32,
16x16 and 8x8 maps with 16, 32, 64 filters, global average pooling, a 10-way fc.
Weight decay 1e-4, momentum 0.9, He initialisation, BatchNorm, no dropout. Batch
128 on two GPUs, so BatchNorm's statistics over 64 images (`bn_group=64`; `--set
bn_group=0` for the whole batch), learning rate 0.1, divided by 10 at 32k and 48k iterations, stop at 64k.
Training augmentation: 4 pixels padded on each side, a random 32x32 crop of the
padded image or its mirror. Test: the single 32x32 view. ResNet-110 warms up at 0.01
until the training error is below 80 %. Train on all 50k images (`--val` holds out
5k for model selection instead) and report the test error at the end of training.

The claim (Fig. 6) is about optimisation, and `claims` in results.json checks it on
the final training errors, averaged over seeds: the deepest plain net trains worse
than the shallowest by more than 5 points; the deepest ResNet ends more than 10
points below the plain net of its depth; and it is no worse than the shallowest
ResNet (within 1 point).

Presets: `paper` (above), `quick` (what a CPU can show in minutes, below), `smoke`
(seconds, for tests), `auto` (paper on a GPU/TPU, quick on a CPU).

Any families of the zoo's CIFAR table compare the same way (`--families plain resnet
preact`: He et al. 2016's pre-activation ResNets beside the paper's two), trained
alike: the plain family at the preset's plain depths, every residual family at its
residual depths; the table, the plot (a panel per family) and the claims name each
net, and each residual family gets Fig. 6's two claims of its own.

The `quick` preset tests the same claim on a task a 2-core CPU can finish: fit a
fixed, stratified 1,000-image subset of the training set (100 per class), with no
augmentation, so that every net could in principle reach zero training error; plain
and residual nets of 20 and 56 layers (exactly the zoo's), 600 iterations at batch 32
(19 passes), lr 0.01 divided by 10 at 450 (the paper's 0.1 at batch 32 is too violent
a start for 56 layers: docs/results.md), 2 seeds, the nets trained in parallel
processes, one per core. Its training error is the error on the whole subset with the
final weights; its test error (on 1,000 test images) measures memorisation, not
generalisation, and is reported only as such.

Evidence: docs/results.md records the `quick` preset's runs on a 2-core CPU (seeds
0-4, both CPU kernels) and the `paper` preset's plain-20 and ResNet-20 on one H200.
Our CIFAR-10 copy is a JPEG re-encoding: compare with the paper's errors only as such.

    python -m experiments.plain_vs_resnet [--preset auto|paper|quick|smoke]
        [--families plain resnet preact] [--depths 20 32 44 56 110]
        [--seeds N [--seeds-together]] [--out DIR] [--data-dir DIR] [--val]
        [--set KEY=VALUE ...]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

from cnn_jax.experiment import (HE2015, Context, Experiment, Net, Report, cifar_nets, compare,
                                he2015_cifar, plot_curves, record, sweep, table)
from cnn_jax.models import CIFAR_FAMILIES
from cnn_jax.train import TrainConfig


# ------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class Preset:
    plain: tuple          # depths of plain nets
    residual: tuple       # depths of every residual family's nets
    seeds: int = 1
    warmup_110: bool = True
    augment: bool = True        # 4-pixel pad + random crop + mirror
    data: str = "cifar10"
    families: tuple = ("plain", "resnet")   # of the zoo's CIFAR table (--families)
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields (HE2015)


PRESETS = {
    "paper": Preset(plain=(20, 32, 44, 56), residual=(20, 32, 44, 56, 110),
                    train=HE2015["paper"]),
    # The optimisation claim at CPU scale (module docstring): fit 1,000 images.
    "quick": Preset(plain=(20, 56), residual=(20, 56), seeds=2, augment=False,
                    train=HE2015["quick"]),
    "smoke": Preset(plain=(8, 14), residual=(8, 14), train=HE2015["smoke"]),
}


def fig6_claims(runs: list[dict], families: tuple, shallow: int, deep: int,
                family_of=lambda f, d: Net(f, d)) -> list[dict]:
    """Fig. 6's claims on the final training errors averaged over seeds, by net name:
    the deepest plain net trains worse than the shallowest by more than 5 points
    (degradation); for every residual family, its deepest net ends more than 10 points
    below the plain net of its depth, and no worse (within 1 point) than its
    shallowest (residual learning). Those the trained nets cannot decide are left out."""
    if shallow == deep:   # one depth: nothing to compare
        return []
    plain_deep, plain_shallow = family_of("plain", deep), family_of("plain", shallow)
    found = [compare(runs, "plain_deeper_trains_worse",
                     "the deeper plain net trains worse (degradation)", plain_deep.name,
                     plain_shallow.name, 5.0) if "plain" in families else None]
    for f in (f for f in families if f != "plain"):
        d, s, key = family_of(f, deep), family_of(f, shallow), "resnet" if f == "resnet" else f
        found += [compare(runs, f"{key}_beats_plain", f"the deep {d.label.rsplit('-', 1)[0]} "
                          f"trains far better than the plain net of its depth", plain_deep.name,
                          d.name, 10.0),
                  compare(runs, f"{key}_deeper_no_worse", f"the deeper "
                          f"{d.label.rsplit('-', 1)[0]} trains no worse than the shallower "
                          f"(residual learning)", s.name, d.name, 1.0, no_worse=True)]
    return [c for c in found if c is not None]


def nets_for(preset: Preset, depths: Optional[list[int]] = None) -> list[Net]:
    """Every net of the sweep: the preset's families, the plain one at its plain depths
    and the residual ones at its residual depths, or every family at `depths` (plain
    nets up to 110)."""
    if depths:
        return cifar_nets(preset.families, depths)
    cifar_nets(preset.families, ())   # an unknown family: refused by name
    return [Net(f, d) for f in CIFAR_FAMILIES if f in preset.families
            for d in sorted(preset.plain if f == "plain" else preset.residual)]


def run_config(net: Net, preset: Preset, seed: int, out: Path, *, data=None, data_dir=None,
               workers=None, val: bool = False) -> TrainConfig:
    """One net's run: the paper's recipe (Sec. 4.2), then the preset's training fields."""
    return he2015_cifar(net, preset.train, seed, out, data=data or preset.data,
                        data_dir=data_dir, workers=workers, augment=preset.augment,
                        warmup_110=preset.warmup_110, val=val)


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    args, preset, seeds = ctx.args, ctx.preset, ctx.seeds
    nets = nets_for(preset, args.depths)
    trained = sweep(nets, lambda net, seed, out: run_config(
        net, preset, seed, out, data=args.data, data_dir=args.data_dir, workers=args.workers,
        val=args.val), seeds, ctx.out, ctx.command, together=args.seeds_together,
                    processes=args.processes)
    runs = [record(*t) for t in trained]
    cfg = trained[0][2]   # the recipe every net shares
    data = args.data or preset.data
    subset = (f"training error: the error on the whole fixed {cfg.data.train_subset:,}-image "
              f"training subset with the final weights (no augmentation: an optimisation "
              f"test; the test error, on {cfg.data.eval_subset:,} test images, measures what "
              f"memorising it gives, not the paper's generalisation)"
              if cfg.data.train_subset else "")
    scored = runs[0].get("scored") or data
    jpeg = data == "cifar10" and "official files" not in scored
    note = (f"Data: {data}" + (" (a JPEG re-encoded copy: errors are not comparable one to "
                               "one with the paper's lossless CIFAR-10)" if jpeg else "") +
            f"; test errors on {scored}. Preset `{ctx.preset_name}`: {cfg.schedule.steps} "
            f"iterations at batch {cfg.optimiser.batch}, lr {cfg.schedule.lr} (the paper: 64k "
            f"at 128, lr 0.1)" + (f"; {subset}" if subset else "") +
            ". Final errors after the last iteration" + (
                "" if cfg.data.train_subset else
                f" (training: the last {cfg.run.log_every} iterations' batches)") +
            f", single view; mean ± std over seeds 0..{seeds - 1}. Command: `{ctx.command}`.")
    what = "training errors" + (f" on the {cfg.data.train_subset:,}-image subset"
                                if cfg.data.train_subset else "")
    title = (f"{data}, preset {ctx.preset_name}: {cfg.schedule.steps} iterations, batch "
             f"{cfg.optimiser.batch}, lr {cfg.schedule.lr}, seeds {seeds}" +
             (f"; training error on a fixed {cfg.data.train_subset:,}-image subset"
              if cfg.data.train_subset else ""))
    depths = sorted({n.depth for n in nets})
    return Report(
        results={"runs": runs},
        table=table(runs, note, paper_column=not cfg.data.train_subset),
        claims=fig6_claims(runs, preset.families, depths[0], depths[-1]),
        heading=f"Fig. 6's claims, on the final {what} (mean of {seeds} seed(s)):",
        plot=lambda path: plot_curves(
            runs, path, title, test_curves=not cfg.data.train_subset,
            milestones=cfg.schedule.milestones,
            titles={"plain": "plain networks", "resnet": "ResNets (option A)",
                    "preact": "pre-activation ResNets (He et al. 2016)"}))


def add_arguments(p) -> None:
    p.add_argument("--families", nargs="+", default=None, choices=list(CIFAR_FAMILIES),
                   help="the families of the zoo's CIFAR table to compare (default: the "
                        "preset's, plain resnet as the paper)")
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help="6n+2 depths for every family (plain nets up to 110)")
    p.add_argument("--val", action="store_true",
                   help="hold out 5k training images for model selection")


def recipe(ctx: Context) -> dict:
    """What an output folder's nets were trained with (its guard); the families only
    where they are not the paper's two (folders written before them keep resuming)."""
    nets_for(ctx.preset, ctx.args.depths)  # bad --depths or families: refused before the folder
    found = ctx.recipe(val=ctx.args.val)
    if tuple(found.get("families", ())) == Preset.families:
        found.pop("families")
    return found


EXPERIMENT = Experiment("plain_vs_resnet", __doc__, PRESETS, run, figure="curves.png",
                        add_arguments=add_arguments, recipe=recipe, set_by=("families",))
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
