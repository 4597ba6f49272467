"""Plain vs residual networks on CIFAR-10: He et al. 2015, Fig. 6 and Table 6.

The degradation problem: stacking more 3x3 layers onto a plain net makes its
*training* error higher, not lower; the same nets with identity shortcuts (option A)
get better as they deepen.

Method (Sec. 4.2, the `paper` preset). Inputs 32x32 with the per-pixel mean
subtracted. 6n+2 weighted layers: a 3x3 conv, then 2n layers on each of the 32x32,
16x16 and 8x8 maps with 16, 32, 64 filters, global average pooling, a 10-way fc.
Weight decay 1e-4, momentum 0.9, He initialisation, BatchNorm, no dropout. Batch
128, learning rate 0.1, divided by 10 at 32k and 48k iterations, stop at 64k.
Training augmentation: 4 pixels padded on each side, a random 32x32 crop of the
padded image or its mirror. Test: the single 32x32 view. ResNet-110 warms up at 0.01
until the training error is below 80 %. Train on all 50k images (`--val` holds out
5k for model selection instead) and report the test error at the end of training.

Presets: `paper` (above), `quick` (a CPU-sized run that still shows the ordering),
`smoke` (seconds, for tests), `auto` (paper on a GPU/TPU, quick on a CPU).

Evidence: docs/results.md records the `quick` preset's run on a 2-core CPU and the
`paper` preset's plain-20 and ResNet-20 on one H200 (ResNet-20: 12.49 % test error).
Our CIFAR-10 copy is a JPEG re-encoding: compare with the paper's errors only as such.

    python -m experiments.plain_vs_resnet [--preset auto|paper|quick|smoke]
        [--depths 20 32 44 56 110] [--seeds N [--seeds-together]] [--out DIR]
        [--data-dir DIR] [--val]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from cnn_jax.train.sweep import add_seeds_together, choose_preset, guard_out, mean_std

# ------------------------------------------------------------------ configuration
PAPER_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}  # Table 6


@dataclasses.dataclass(frozen=True)
class Preset:
    plain: tuple          # depths of plain nets
    residual: tuple       # depths of ResNets
    steps: int
    batch: int
    lr: float = 0.1
    milestones: tuple = (32_000, 48_000)
    warmup_110: bool = True
    log_every: int = 100
    eval_every: int = 1_000
    checkpoint_every: int = 2_000
    eval_batch: int = 1_000
    steps_per_call: int = 1
    data: str = "cifar10"


PRESETS = {
    "paper": Preset(plain=(20, 32, 44, 56), residual=(20, 32, 44, 56, 110), steps=64_000,
                    batch=128, steps_per_call=10),
    # A 2-core CPU trains ResNet-56 at about 50 images/s: a few hundred iterations of
    # the shallowest and deepest nets of each family, the constant first phase of
    # the paper's schedule, the test set read once at the end.
    "quick": Preset(plain=(20, 56), residual=(20, 56), steps=200, batch=32,
                    milestones=(10**9,), log_every=20, eval_every=200,
                    checkpoint_every=50, eval_batch=250),
    "smoke": Preset(plain=(8, 14), residual=(8, 14), steps=6, batch=16,
                    milestones=(10**9,), log_every=2, eval_every=3, checkpoint_every=3,
                    eval_batch=500),
}


def nets_for(preset: Preset, depths: Optional[list[int]]) -> list[tuple[str, int, bool]]:
    """(name, depth, residual) for every net of the sweep."""
    from cnn_jax.models.resnet import cifar_blocks_per_stage
    if depths:
        for d in depths:
            try:
                cifar_blocks_per_stage(d)
            except ValueError as e:
                raise ValueError(f"--depths: {e}") from None
        plain, residual = [d for d in depths if d <= 110], list(depths)
    else:
        plain, residual = preset.plain, preset.residual
    return ([(f"plain{d}", d, False) for d in sorted(plain)] +
            [(f"resnet{d}", d, True) for d in sorted(residual)])


def run_config(name: str, depth: int, preset: Preset, seed: int, args, out: Path):
    from cnn_jax.train import TrainConfig
    return TrainConfig(
        model=name, data=args.data or preset.data, data_dir=args.data_dir,
        holdout=5_000 if args.val else 0, steps=preset.steps, batch=preset.batch, seed=seed,
        lr=preset.lr, momentum=0.9, weight_decay=1e-4, schedule="paper",
        milestones=preset.milestones,
        warmup_lr=0.01 if depth >= 110 and preset.warmup_110 else 0.0,
        crop_pad=4, flip=True, normalise="per_pixel", dtype=args.dtype,
        steps_per_call=preset.steps_per_call, log_every=preset.log_every,
        eval_every=preset.eval_every, checkpoint_every=preset.checkpoint_every,
        eval_batch=preset.eval_batch, workers=args.workers, out=str(out), progress=False)


# ------------------------------------------------------------------ the sweep
def recipe_for(preset_name: str, preset: Preset, args) -> dict:
    """What an output folder's nets were trained with (guarded by `guard_out`)."""
    return {"preset": preset_name, **dataclasses.asdict(preset),
            "data": args.data or preset.data, "val": args.val, "dtype": args.dtype}


def sweep(args, preset_name: str, preset: Preset, out: Path,
          nets: Optional[list] = None, together: bool = False) -> list[dict]:
    """Train (or re-read) every net of the sweep, or only `nets` [(name, depth,
    residual)], for args.seeds seeds (`together`: each net's seeds at once); one record
    per net and seed."""
    from cnn_jax.train.sweep import curve, run_all

    nets = nets or nets_for(preset, args.depths)
    jobs = [(name, depth, residual, seed) for seed in range(args.seeds)
            for name, depth, residual in nets]
    configs = [run_config(name, depth, preset, seed, args, out / "nets" / f"{name}-seed{seed}")
               for name, depth, residual, seed in jobs]
    results = run_all(configs, args.command,
                      [f"{name} seed {seed}" for name, _, _, seed in jobs],
                      together=together)
    split = "val" if args.val else "test"
    return [{
        "name": name, "depth": depth, "residual": residual, "params": res["params"],
        "seed": seed, "steps": res["steps"], "final_train_error": res["final_train_error"],
        "final_test_error": res["final_test_error"],
        **({"final_val_error": res["final_val_error"]} if args.val else {}),
        "curve": curve(Path(cfg.out), split),
        "wall_s": res["wall_s"], "img_per_s": res["img_per_s"],
        "hardware": res["hardware"], "conv_kernels": res.get("conv_kernels"),
        "run_dir": str(Path(cfg.out)),
    } for (name, depth, residual, seed), cfg, res in zip(jobs, configs, results)]


# ------------------------------------------------------------------ outputs
def table(runs: list[dict], data_note: str) -> str:
    """Table 6's shape: method, layers, params, our error (mean +- std), the paper's."""
    lines = ["| method | layers | params | ours: test error (%) | paper (%) | difference |",
             "|---|---:|---:|---:|---:|---:|"]
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["residual"], r["depth"]), []).append(r)
    for (residual, depth), rs in sorted(groups.items()):
        errs = 100 * np.array([r["final_test_error"] for r in rs])
        ours = mean_std(errs)
        paper = PAPER_ERROR.get(depth) if residual else None
        diff = f"{errs.mean() - paper:+.2f}" if paper is not None else "-"
        lines.append(f"| {'ResNet' if residual else 'plain'} | {depth} | "
                     f"{rs[0]['params'] / 1e6:.2f}M | {ours} (n={len(errs)}) | "
                     f"{paper if paper is not None else '-'} | {diff} |")
    lines.append("")
    lines.append(data_note)
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Fig. 6: plain nets left, ResNets right; training error dashed, test solid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    depths = sorted({r["depth"] for r in runs})
    colours = dict(zip(depths, plt.cm.viridis(np.linspace(0.0, 0.85, len(depths)))))
    for ax, residual in zip(axes, (False, True)):
        for depth in depths:
            rs = [r for r in runs if r["residual"] == residual and r["depth"] == depth]
            if not rs:
                continue
            c, label = colours[depth], f"{'ResNet' if residual else 'plain'}-{depth}"
            steps = np.array(rs[0]["curve"]["step"])
            train = 100 * np.mean([r["curve"]["train_error"] for r in rs], axis=0)
            ax.plot(steps, train, "--", color=c, linewidth=1)
            key = "val_error" if "val_error" in rs[0]["curve"] else "test_error"
            evals = 100 * np.mean([r["curve"][key] for r in rs], axis=0)
            ax.plot(rs[0]["curve"]["eval_step"], evals, "-o" if len(evals) < 4 else "-",
                    color=c, linewidth=2, markersize=4, label=label)
        ax.set_title("plain networks" if not residual else "ResNets (option A)")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)  -- dashed: training, solid: test")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def degradation_summary(runs: list[dict]) -> dict:
    """The paper's qualitative claims, checked on this run's final training errors."""
    def mean_train(name):
        e = [r["final_train_error"] for r in runs if r["name"] == name]
        return float(np.mean(e)) if e else None
    out = {}
    plain = sorted({r["depth"] for r in runs if not r["residual"]})
    res = sorted({r["depth"] for r in runs if r["residual"]})
    if len(plain) >= 2:
        shallow, deep = mean_train(f"plain{plain[0]}"), mean_train(f"plain{plain[-1]}")
        out["plain_deeper_trains_worse"] = deep > shallow
        out["plain_train_error"] = {plain[0]: shallow, plain[-1]: deep}
    if len(res) >= 2:
        shallow, deep = mean_train(f"resnet{res[0]}"), mean_train(f"resnet{res[-1]}")
        out["resnet_deeper_no_worse"] = deep <= shallow
        out["resnet_train_error"] = {res[0]: shallow, res[-1]: deep}
    return out


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.plain_vs_resnet",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help="6n+2 depths for both families (plain nets up to 110)")
    p.add_argument("--seeds", type=int, default=1)
    add_seeds_together(p)
    p.add_argument("--out", default=None, help="default runs/plain_vs_resnet-<preset>")
    p.add_argument("--data", default=None, help="dataset (default cifar10)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--val", action="store_true",
                   help="hold out 5k training images for model selection")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    args.command = " ".join([
        "python -m experiments.plain_vs_resnet", *(sys.argv[1:] if argv is None else argv)])
    if args.seeds < 1:
        p.error("--seeds must be at least 1")

    preset_name, why = choose_preset(args.preset)
    preset = PRESETS[preset_name]
    print(f"preset {preset_name} ({why})", file=sys.stderr)
    out = Path(args.out or f"runs/plain_vs_resnet-{preset_name}")
    recipe = recipe_for(preset_name, preset, args)
    try:
        nets_for(preset, args.depths)
        guard_out(out, recipe)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from cnn_jax.data import DataError
    from cnn_jax.train.loop import ConfigMismatch, NonFiniteLoss, versions
    try:
        runs = sweep(args, preset_name, preset, out, together=args.seeds_together)
    except (DataError, ConfigMismatch, NonFiniteLoss, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    data = args.data or preset.data
    note = (f"Data: {data}" + (" (the local JPEG re-encoded copy: errors are not comparable "
                                "one to one with the paper's lossless CIFAR-10)"
                                if data == "cifar10" else "") +
            f". Preset `{preset_name}`: {preset.steps} iterations at batch {preset.batch}"
            f" (the paper: 64k at 128). Final test error after the last iteration, "
            f"single view. Command: `{args.command}`.")
    summary = degradation_summary(runs)
    results = {"preset": preset_name, "preset_reason": why, "recipe": recipe,
               "command": args.command, "versions": versions(),
               "hardware": runs[0]["hardware"] if runs else None,
               "claims": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(runs, note) + "\n")
    plot(runs, out / "curves.png",
         f"{data}, preset {preset_name}: {preset.steps} iterations, batch "
         f"{preset.batch}, seeds {args.seeds}")
    print(table(runs, note))
    for claim, value in summary.items():
        if isinstance(value, bool):
            print(f"{claim}: {'yes' if value else 'NO'}")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
