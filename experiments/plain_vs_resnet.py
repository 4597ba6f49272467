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
        [--depths 20 32 44 56 110] [--seeds N [--seeds-together]] [--out DIR]
        [--data-dir DIR] [--val] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np

from cnn_jax.errors import BadInput
from cnn_jax.experiment import (Context, Experiment, Report, claim, figure, guard_out,
                                mean_std, recipe_of, train_config)
from cnn_jax.models.resnet import PAPER_CIFAR_ERROR, cifar_blocks_per_stage
from cnn_jax.train import TrainConfig
from cnn_jax.train.sweep import curve, run_all


# ------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class Preset:
    plain: tuple          # depths of plain nets
    residual: tuple       # depths of ResNets
    seeds: int = 1
    warmup_110: bool = True
    augment: bool = True        # 4-pixel pad + random crop + mirror
    data: str = "cifar10"
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields (below)


# Sec. 4.2 as training fields: 64k iterations at batch 128, lr 0.1 divided by 10 at 32k
# and 48k; train_subset > 0 trains on (and reports the training error of) a fixed
# stratified subset, eval_subset > 0 tests on one; bn_group > 0: BatchNorm statistics
# per group of this many images.
PAPER = dict(steps=64_000, batch=128, lr=0.1, milestones=(32_000, 48_000), train_subset=0,
             eval_subset=0, log_every=100, eval_every=1_000, checkpoint_every=2_000,
             eval_batch=1_000, steps_per_call=1, bn_group=0, dtype="float32")

PRESETS = {
    # Batch 128 "on two GPUs": BatchNorm saw 64 images per GPU (docs/deviations.md)
    "paper": Preset(plain=(20, 32, 44, 56), residual=(20, 32, 44, 56, 110),
                    train={**PAPER, "steps_per_call": 10, "bn_group": 64}),
    # The optimisation claim at CPU scale (module docstring): fit 1,000 images.
    "quick": Preset(plain=(20, 56), residual=(20, 56), seeds=2, augment=False,
                    train={**PAPER, "steps": 600, "batch": 32, "lr": 0.01, "milestones": (450,),
                           "train_subset": 1_000, "eval_subset": 1_000, "log_every": 25,
                           "eval_every": 600, "checkpoint_every": 200, "eval_batch": 500}),
    "smoke": Preset(plain=(8, 14), residual=(8, 14),
                    train={**PAPER, "steps": 6, "batch": 16, "milestones": (10**9,),
                           "log_every": 2, "eval_every": 3, "checkpoint_every": 3,
                           "eval_batch": 500}),
}

# Fig. 6 as numbers: (name, statement, threshold in points) on mean final training errors
CLAIMS = (
    ("plain_deeper_trains_worse", "the deeper plain net trains worse (degradation)", 5.0),
    ("resnet_beats_plain", "the deep ResNet trains far better than the plain net of its "
                           "depth", 10.0),
    ("resnet_deeper_no_worse", "the deeper ResNet trains no worse than the shallower "
                               "(residual learning)", 1.0),
)


@dataclasses.dataclass(frozen=True)
class Net:
    """A CIFAR net of the zoo: 6n+2 layers, with option A shortcuts or plain."""
    residual: bool
    depth: int

    @property
    def name(self) -> str:     # its folder and label: resnet56, plain56
        return f"{'resnet' if self.residual else 'plain'}{self.depth}"

    @property
    def label(self) -> str:
        return f"{'ResNet' if self.residual else 'plain'}-{self.depth}"

    def model(self) -> tuple[str, dict]:
        """The architecture as data (never a name parsed back: CIFAR ResNet-50 is not
        the ImageNet resnet50)."""
        return ("cifar_resnet" if self.residual else "cifar_plain"), {"depth": self.depth}


def nets_for(preset: Preset, depths: Optional[list[int]] = None) -> list[Net]:
    """Every net of the sweep: the preset's, or both families at `depths` (plain nets up
    to 110)."""
    if depths:
        for d in depths:
            try:
                cifar_blocks_per_stage(d)
            except BadInput as e:
                raise BadInput(f"--depths: {e}") from None
        plain, residual = [d for d in depths if d <= 110], list(depths)
    else:
        plain, residual = preset.plain, preset.residual
    return [Net(False, d) for d in sorted(plain)] + [Net(True, d) for d in sorted(residual)]


def run_config(net: Net, preset: Preset, seed: int, out: Path, *, data=None, data_dir=None,
               workers=None, val: bool = False) -> TrainConfig:
    """One net's run: the paper's recipe (Sec. 4.2), then the preset's training fields."""
    model, options = net.model()
    return train_config(
        preset, model=model, model_options=options, data=data or preset.data,
        data_dir=data_dir, holdout=5_000 if val else 0, seed=seed, momentum=0.9,
        weight_decay=1e-4, schedule="paper",
        warmup_lr=0.01 if net.depth >= 110 and preset.warmup_110 else 0.0,
        crop_pad=4 if preset.augment else 0, flip=preset.augment, normalise="per_pixel",
        eval_train_set=bool(preset.train.get("train_subset")), workers=workers,
        out=str(out), progress=False)


# ------------------------------------------------------------------ the sweep
def sweep(nets: list[Net], preset: Preset, seeds: int, out: Path, command: str, *,
          together: bool = False, processes: Optional[int] = None, **recipe) -> list[dict]:
    """Train (or re-read) every net for `seeds` seeds into out/nets/<net>-seed<k>, the
    deepest first (`together`: each net's seeds at once; `recipe`: run_config's data,
    data_dir, workers, val); one record per net and seed."""
    jobs = [(net, seed) for seed in range(seeds) for net in nets]
    configs = [run_config(net, preset, seed, out / "nets" / f"{net.name}-seed{seed}", **recipe)
               for net, seed in jobs]
    deepest_first = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].depth)
    results = run_all([configs[i] for i in deepest_first], command,
                      [f"{jobs[i][0].name} seed {jobs[i][1]}" for i in deepest_first],
                      together=together, processes=processes)
    results = [results[deepest_first.index(i)] for i in range(len(jobs))]
    split = "val" if recipe.get("val") else "test"
    return [{
        "name": net.name, "depth": net.depth, "residual": net.residual, "params": res["params"],
        "seed": seed, "steps": res["steps"], "final_train_error": res["final_train_error"],
        "final_train_set_error": res.get("final_train_set_error"),
        "final_test_error": res["final_test_error"],
        **({"final_val_error": res["final_val_error"]} if split == "val" else {}),
        "scored": res.get("eval_data"), "curve": curve(Path(cfg.run.out), split),
        "wall_s": res["wall_s"], "img_per_s": res["img_per_s"],
        "hardware": res["hardware"], "conv_kernels": res.get("conv_kernels"),
        "run_dir": str(Path(cfg.run.out)),
    } for (net, seed), cfg, res in zip(jobs, configs, results)]


# ------------------------------------------------------------------ the claims
def training_error(run: dict) -> float:
    """The claims' training error of a net, in %: on its whole training subset with the
    final weights where it trained on one (the quick preset), else the paper's: the
    error on the last iterations' training batches."""
    fit = run.get("final_train_set_error")
    return 100 * (fit if fit is not None else run["final_train_error"])


def mean_train_errors(runs: list[dict]) -> dict:
    """(residual, depth) -> final training error in %, averaged over seeds."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["residual"], r["depth"]), []).append(training_error(r))
    return {k: float(np.mean(v)) for k, v in groups.items()}


def check_claims(runs: list[dict], claims: tuple = CLAIMS, name_of=None,
                 depths: Optional[tuple] = None) -> list[dict]:
    """Fig. 6's claims (`claims`, each named as in CLAIMS) on this run's mean final
    training errors, each with the numbers it was decided on; those the run's nets
    cannot test are left out. `depths`: the (shallow, deep) pair compared (default:
    the shallowest and deepest trained); `name_of(residual, depth)`: a net's name
    (default: this experiment's `label`)."""
    name_of = name_of or label
    err = mean_train_errors(runs)
    if depths is None:
        trained = sorted({d for _, d in err})
        if len(trained) < 2:
            return []
        depths = trained[0], trained[-1]
    shallow, deep = depths
    seeds = len({r["seed"] for r in runs})
    compare = {  # claim -> (a, b): the claim holds when a - b > threshold
        "plain_deeper_trains_worse": ((False, deep), (False, shallow)),
        "resnet_beats_plain": ((False, deep), (True, deep)),
        "resnet_deeper_no_worse": ((True, shallow), (True, deep)),
    }
    out = []
    for name, statement, points in claims:
        a, b = compare[name]
        if a not in err or b not in err:
            continue
        margin = err[a] - err[b]
        no_worse = name == "resnet_deeper_no_worse"  # b at most `points` above a
        out.append(claim(
            name, statement, {name_of(*a): round(err[a], 2), name_of(*b): round(err[b], 2)},
            f"{name_of(*b)} <= {name_of(*a)} + {points:g} points" if no_worse else
            f"{name_of(*a)} > {name_of(*b)} + {points:g} points",
            margin >= -points if no_worse else margin > points, seeds, unit=" %"))
    return out


def label(residual: bool, depth: int) -> str:
    return Net(residual, depth).label


# ------------------------------------------------------------------ outputs
def table(runs: list[dict], data_note: str, paper_column: bool = True) -> str:
    """Table 6's shape: method, layers, params, our errors (mean +- std), the paper's
    test error (`paper_column`: not beside a test error of another task)."""
    lines = ["| method | layers | params | ours: training error (%) | ours: test error (%) |" +
             (" paper: test error (%) |" if paper_column else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if paper_column else "")]
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["residual"], r["depth"]), []).append(r)
    for (residual, depth), rs in sorted(groups.items()):
        train = mean_std([training_error(r) for r in rs])
        test = mean_std(100 * np.array([r["final_test_error"] for r in rs]))
        paper = PAPER_CIFAR_ERROR.get(depth) if residual else None
        lines.append(f"| {'ResNet' if residual else 'plain'} | {depth} | "
                     f"{rs[0]['params'] / 1e6:.2f}M | {train} | {test} (n={len(rs)}) |" +
                     (f" {paper if paper is not None else '-'} |" if paper_column else ""))
    lines.append("")
    lines.append(data_note)
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str, test_curves: bool = True,
         milestones: tuple = (), residual_title: str = "ResNets (option A)",
         ylabel: Optional[str] = None) -> None:
    """Fig. 6 (and Fig. 4, experiments.imagenet): plain nets left, ResNets right;
    training error dashed (the mean over seeds, each seed faint), test error solid; the
    final error on a training subset as a star; learning-rate drops dotted."""
    depths = sorted({r["depth"] for r in runs})
    colours = dict(zip(depths, matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85,
                                                                         len(depths)))))
    with figure(path, title, 1, 2, figsize=(12, 4.5), sharey=True) as axes:
        for ax, residual in zip(axes, (False, True)):
            for depth in depths:
                rs = [r for r in runs if r["residual"] == residual and r["depth"] == depth]
                if rs:
                    curves(ax, rs, colours[depth], label(residual, depth), test_curves)
            for m in milestones:
                if m < max(r["curve"]["step"][-1] for r in runs):
                    ax.axvline(m, color="grey", linestyle=":", linewidth=1)
            ax.set_title("plain networks" if not residual else residual_title)
            ax.set_xlabel("iterations")
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0].set_ylabel(ylabel or ("error (%)  -- dashed: training, solid: test"
                                      if test_curves else "training error (%)"))


def curves(ax, rs: list[dict], colour, name: str, test_curves: bool) -> None:
    """One net's curves over its seeds."""
    steps = np.array(rs[0]["curve"]["step"])
    train = 100 * np.array([r["curve"]["train_error"] for r in rs])
    for seed_curve in train if len(rs) > 1 else ():
        ax.plot(steps, seed_curve, "--", color=colour, linewidth=0.6, alpha=0.35)
    ax.plot(steps, train.mean(0), "--", color=colour, linewidth=1.5,
            label=f"{name} training" if not test_curves else None)
    if rs[0].get("final_train_set_error") is not None:
        ax.plot(steps[-1], np.mean([training_error(r) for r in rs]), "*", color=colour,
                markersize=11, markeredgecolor="k", label=f"{name}: final, whole subset")
    if test_curves:
        key = "val_error" if "val_error" in rs[0]["curve"] else "test_error"
        evals = 100 * np.mean([r["curve"][key] for r in rs], axis=0)
        ax.plot(rs[0]["curve"]["eval_step"], evals, "-o" if len(evals) < 4 else "-",
                color=colour, linewidth=2, markersize=4, label=name)


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    args, preset = ctx.args, ctx.preset
    seeds = ctx.seeds
    runs = sweep(nets_for(preset, args.depths), preset, seeds, ctx.out, ctx.command,
                 together=args.seeds_together, processes=args.processes, data=args.data,
                 data_dir=args.data_dir, workers=args.workers, val=args.val)
    cfg = run_config(Net(True, 20), preset, 0, ctx.out)   # the recipe every net shares
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
            f"; test errors on {scored}" +
            f". Preset `{ctx.preset_name}`: {cfg.schedule.steps} iterations at batch {cfg.optimiser.batch}, "
            f"lr {cfg.schedule.lr} (the paper: 64k at 128, lr 0.1)" + (f"; {subset}" if subset else "") +
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
    return Report(
        results={"runs": runs},
        table=table(runs, note, paper_column=not cfg.data.train_subset),
        claims=check_claims(runs),
        heading=f"Fig. 6's claims, on the final {what} (mean of {seeds} seed(s)):",
        plot=lambda path: plot(runs, path, title, test_curves=not cfg.data.train_subset,
                               milestones=cfg.schedule.milestones))


def add_arguments(p) -> None:
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help="6n+2 depths for both families (plain nets up to 110)")
    p.add_argument("--val", action="store_true",
                   help="hold out 5k training images for model selection")


def recipe(ctx: Context) -> dict:
    """What an output folder's nets were trained with (its guard)."""
    nets_for(ctx.preset, ctx.args.depths)  # bad --depths: refused before the folder
    return ctx.recipe(val=ctx.args.val)


def preset_with(preset_name: str, train: Optional[dict] = None) -> Preset:
    """This experiment's preset `preset_name`, with training fields `train` set on it
    (another experiment's --set, so that the nets it asks for are trained as it says)."""
    preset = PRESETS[preset_name]
    return dataclasses.replace(preset, train={**preset.train, **(train or {})})


def trained_nets(nets: list[Net], preset_name: str, out: Path, command: str, *,
                 seeds: int = 1, data=None, train: Optional[dict] = None,
                 **recipe) -> list[dict]:
    """Other experiments' way to this one's nets: `nets` of preset `preset_name` (with
    training fields `train` set) trained (or re-read) in this experiment's output
    folder `out`, guarded as its own command guards it (`recipe`: data_dir, workers,
    processes)."""
    preset = preset_with(preset_name, train)
    guard_out(out, recipe_of(preset_name, preset, data, val=False))
    return sweep(nets, preset, seeds, out, command, data=data, **recipe)


EXPERIMENT = Experiment("plain_vs_resnet", __doc__, PRESETS, run, figure="curves.png",
                        add_arguments=add_arguments, recipe=recipe)
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
