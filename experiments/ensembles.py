"""Ensembles and multi-crop testing: how much do several networks and several views
of each test image buy, and what do they cost?

Method. N ResNets of one depth trained with the main experiment's recipe from seeds
0..N-1 (taken from a finished `plain_vs_resnet` sweep with `--runs DIR`, or trained
here). Each network's softmax on each of 10 views of every test image is computed
once (four corners and the centre of the 4-pixel padded image, each mirrored; see
`cnn_jax.evaluate`); the ensemble of k networks with v views predicts the argmax of
the mean of its k x v softmaxes. For every k the error is averaged over all C(N, k)
choices of networks (with its standard deviation), so the curve does not depend on
which seeds come first. The cost is measured, not derived: images/s of the compiled
k-network, v-view forward pass on a fixed batch.

Presets: `paper` (5 ResNet-20s, the full 64k-iteration recipe: a GPU run), `quick`
(5 ResNet-20s from the main experiment's CPU preset, errors on a fixed stratified
1,000-image test subset), `smoke` (tests), `auto` (paper on an accelerator, quick on
a CPU). Evidence: docs/results.md.

    python -m experiments.ensembles [--preset auto|paper|quick|smoke] [--runs DIR]
        [--model resnet20] [--members N] [--out DIR] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from cnn_jax.train.sweep import add_seeds_together, choose_preset, guard_out, run_all

# ------------------------------------------------------------------ configuration
VIEWS = (1, 2, 10)


@dataclasses.dataclass(frozen=True)
class Preset:
    main_preset: str        # the plain_vs_resnet preset the members are trained with
    members: int
    test_subset: int = 0    # >0: a fixed stratified subset of the test set
    timing_batch: int = 100
    data: str = "cifar10"


PRESETS = {
    "paper": Preset("paper", members=5),
    "quick": Preset("quick", members=5, test_subset=1_000),
    "smoke": Preset("smoke", members=2, timing_batch=8),
}


def member_runs(args, preset: Preset, out: Path) -> list[Path]:
    """The members' run folders: found in --runs, or trained into out/nets/."""
    if args.runs:
        found = sorted(Path(args.runs, "nets").glob(f"{args.model}-seed*"),
                       key=lambda p: int(p.name.rsplit("seed", 1)[1]))
        found = [p for p in found if (p / "results.json").exists()]
        if len(found) < 2:
            raise ValueError(f"--runs {args.runs}: found {len(found)} finished "
                             f"{args.model} run(s) under nets/; an ensemble needs at least 2 "
                             f"(run the main experiment with --seeds N)")
        return found[:args.members or len(found)]
    from experiments import plain_vs_resnet as main_experiment
    main = main_experiment.PRESETS[preset.main_preset]
    depth = int(args.model.removeprefix("resnet"))
    recipe = argparse.Namespace(data=args.data, data_dir=args.data_dir, val=False,
                                dtype="float32", workers=args.workers)
    n = args.members or preset.members
    configs = [main_experiment.run_config(args.model, depth, main, seed, recipe,
                                          out / "nets" / f"{args.model}-seed{seed}")
               for seed in range(n)]
    run_all(configs, args.command, [f"{args.model} seed {s}" for s in range(n)],
            together=args.seeds_together)
    return [Path(c.out) for c in configs]


# ------------------------------------------------------------------ measurement
def all_probabilities(group, test) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of every member on every view: [M, N, 10, K], and the labels [N]."""
    from tqdm.auto import tqdm
    from cnn_jax.evaluate import view_probabilities
    probs, labels = [], []
    with tqdm(total=len(test), unit="img", desc=f"{len(group.members)} nets x 10 views") as bar:
        for b in view_probabilities([group], test, 10, batch=250):
            keep = b["mask"] > 0
            probs.append(b["probs"][:, keep])
            labels.append(b["label"][keep])
            bar.update(int(keep.sum()))
    return np.concatenate(probs, axis=1), np.concatenate(labels)


def ensemble_errors(probs: np.ndarray, labels: np.ndarray, k: int, views: int) -> list[float]:
    """Error of every k-member ensemble with `views` views (ten-crop order: the
    centre is view 4, its mirror view 9)."""
    chosen = {1: [4], 2: [4, 9], 10: list(range(10))}[views]
    per_member = probs[:, :, chosen].mean(axis=2)               # [M, N, K]
    return [float(np.mean(np.argmax(per_member[list(c)].mean(0), -1) != labels))
            for c in itertools.combinations(range(len(probs)), k)]


def images_per_second(group, k: int, images: np.ndarray, views: int, repeats: int = 3) -> float:
    """Measured rate of the compiled forward pass of the group's first k networks on
    `views` views of `images` (views cut on the host, as in evaluation)."""
    import jax
    from cnn_jax.evaluate import make_views
    stacked = jax.tree.map(lambda x: x[:k], group.stacked)

    def once():
        v = make_views(images, views, group.train_shape[0], group.crop_pad)
        jax.block_until_ready(group.forward(stacked, v.reshape(-1, *v.shape[2:])))
    once()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return len(images) / float(np.median(times))


# ------------------------------------------------------------------ outputs
def table(rows: list[dict], note: str) -> str:
    lines = ["| networks | views | test error (%) | ensembles averaged | images/s |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        std = f" ± {100 * r['error_std']:.2f}" if r["ensembles"] > 1 else ""
        lines.append(f"| {r['models']} | {r['views']} | {100 * r['error']:.2f}{std} | "
                     f"{r['ensembles']} | {r['images_per_s']:,.0f} |")
    return "\n".join(lines + ["", note])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (ax, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v, colour in zip(VIEWS, ("tab:blue", "tab:orange", "tab:green")):
        rs = [r for r in rows if r["views"] == v]
        k = [r["models"] for r in rs]
        err = np.array([100 * r["error"] for r in rs])
        std = np.array([100 * r["error_std"] for r in rs])
        ax.errorbar(k, err, yerr=std, marker="o", capsize=3, color=colour, label=f"{v} view(s)")
        cost.plot([r["images_per_s"] for r in rs], err, "o-", color=colour, label=f"{v} view(s)")
    ax.set_xlabel("networks in the ensemble")
    ax.set_ylabel("test error (%)")
    ax.set_xticks(sorted({r["models"] for r in rows}))
    cost.set_xscale("log")
    cost.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    cost.set_xlabel("inference images/s (measured)")
    for a in (ax, cost):
        a.grid(alpha=0.3, which="both")
        a.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.ensembles",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    p.add_argument("--runs", default=None,
                   help="a plain_vs_resnet --out folder with several seeds of --model")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--members", type=int, default=None, help="N (default: the preset's)")
    p.add_argument("--out", default=None, help="default runs/ensembles-<preset>")
    p.add_argument("--data", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=None)
    add_seeds_together(p)
    args = p.parse_args(argv)
    args.command = " ".join([
        "python -m experiments.ensembles", *(sys.argv[1:] if argv is None else argv)])
    if args.members is not None and args.members < 2:
        p.error("--members must be at least 2")
    import re
    if not re.fullmatch(r"resnet\d+|plain\d+", args.model):
        p.error(f"--model must be a CIFAR resnetN or plainN, got {args.model!r}")
    preset_name, why = choose_preset(args.preset)
    preset = PRESETS[preset_name]
    print(f"preset {preset_name} ({why})", file=sys.stderr)
    out = Path(args.out or f"runs/ensembles-{preset_name}")
    recipe = {"preset": preset_name, **dataclasses.asdict(preset), "model": args.model,
              "members": args.members, "runs": args.runs, "data": args.data}

    from cnn_jax import data as data_lib
    from cnn_jax.train.inputs import subset
    from cnn_jax.train.loop import ConfigMismatch, NonFiniteLoss, hardware, versions
    try:
        guard_out(out, recipe)
        runs = member_runs(args, preset, out)
        first = json.loads((runs[0] / "config.json").read_text())["config"]
        data = args.data or first["data"]
        test = subset(data_lib.load(data, "test", data_dir=args.data_dir or first["data_dir"]),
                      preset.test_subset)
        from cnn_jax.evaluate import build_groups, load_member
        groups = build_groups([load_member(r) for r in runs], args.data_dir)
        if len(groups) != 1:
            raise ValueError("the members differ in architecture or input recipe")
        probs, labels = all_probabilities(groups[0], test)
        timing_images = np.asarray(test.images[:preset.timing_batch])
        from tqdm.auto import tqdm
        rows = []
        combos = [(k, v) for k in range(1, len(runs) + 1) for v in VIEWS]
        for k, v in tqdm(combos, desc="ensemble sizes x views: error and speed"):
            errs = ensemble_errors(probs, labels, k, v)
            rate = images_per_second(groups[0], k, timing_images, v)
            rows.append({"models": k, "views": v, "error": float(np.mean(errs)),
                         "error_std": float(np.std(errs)), "ensembles": len(errs),
                         "images_per_s": rate})
    except (data_lib.DataError, ConfigMismatch, NonFiniteLoss, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    hw = hardware()
    note = (f"Data: {data}" + (" (the local JPEG re-encoded copy)" if data == "cifar10" else "")
            + f", {len(labels):,} test images" + (" (a fixed stratified subset)"
                                                  if preset.test_subset else "")
            + f". Members: {len(runs)} x {args.model}, seeds 0..{len(runs) - 1}, "
            f"{'from ' + args.runs if args.runs else 'the main experiment preset ' + repr(preset.main_preset)}. "
            f"Error: mean ± std over all choices of k networks. images/s: measured, batch "
            f"of {preset.timing_batch}, on {hw['device']} ({hw['backend']}). "
            f"Command: `{args.command}`.")
    results = {"preset": preset_name, "preset_reason": why, "recipe": recipe,
               "command": args.command, "versions": versions(), "hardware": hw,
               "members": [str(r) for r in runs],
               "single_model_errors": ensemble_errors(probs, labels, 1, 1),
               "n_examples": int(len(labels)), "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(rows, note) + "\n")
    plot(rows, out / "ensembles.png",
         f"{args.model} ensembles on {data} ({len(labels):,} test images), preset {preset_name}")
    print(table(rows, note))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'ensembles.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
