"""Ensembles and multi-crop testing: how much do several networks and several views
of each test image buy, and what do they cost?

Method. N trained networks. Each network's softmax on each of 10 views of every test
image is computed once (four corners and the centre of the 4-pixel padded image, each
mirrored; see `cnn_jax.evaluate`); the ensemble of k networks with v views predicts
the argmax of the mean of its k x v softmaxes. For every k the error is averaged over
all C(N, k) choices of networks (with its standard deviation), so the curve does not
depend on which network comes first. The cost is measured, not derived: images/s of
the compiled forward passes of the first k networks with v views on a fixed batch.

`claims` in results.json: the ensemble of all N networks beats the best of them
alone (single view), and ten views beat one for a single network (mean over the
networks). Literature, for scale (ImageNet top-5 error): AlexNet 18.2 % for one net,
16.4 % for five (Krizhevsky et al. 2012, Table 2); GoogLeNet 10.07 % with one crop,
9.15 % with ten, 6.67 % for seven nets with 144 crops (Szegedy et al. 2015, Table 5).

Presets: `paper` (5 ResNet-20s of the main experiment's full 64k-iteration recipe,
seeds 0-4: a GPU run, or `--runs` of a multi-seed main experiment), `quick` (a 2-core
CPU, about 6 minutes: the two released networks of ../shared/reference, ResNet-20 and
ResNet-56 trained 200 epochs on the lossless CIFAR-10, on all 10,000 test images of
our copy; nothing is trained), `smoke` (tests), `auto` (paper on an accelerator, quick
on a CPU). Evidence: docs/results.md.

    python -m experiments.ensembles [--preset auto|paper|quick|smoke] [--runs DIR]
        [--model resnet20] [--members N] [--out DIR] [--data-dir DIR]
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import sys
import time
from pathlib import Path

import jax
import matplotlib.ticker
import numpy as np
from tqdm.auto import tqdm

from cnn_jax.data.dataset import subset
from cnn_jax.data.keys import IMAGE, LABEL, MASK
from cnn_jax.data.pipeline import eval_batches
from cnn_jax.errors import BadInput
from cnn_jax.evaluate import build_groups, ensemble_scores, load_member
from cnn_jax.experiment import (HE2015, Context, Experiment, Report, claim, figure, he2015_cifar,
                                net_named, sweep)
from cnn_jax.provenance import hardware
from cnn_jax.trained import REFERENCE_DIR, released_weights

# ------------------------------------------------------------------ configuration
VIEWS = (1, 2, 10)


@dataclasses.dataclass(frozen=True)
class Preset:
    members: int
    released: tuple = ()    # the members: these released networks (released_weights) ...
    main_preset: str = ""   # ... or --model trained here with He et al.'s recipe, this preset's
    test_subset: int = 0    # >0: a fixed stratified subset of the test set
    timing_batch: int = 100
    data: str = "cifar10"
    train: dict = dataclasses.field(default_factory=dict)  # over the main preset's (--set)


PRESETS = {
    "paper": Preset(members=5, main_preset="paper"),
    "quick": Preset(members=2, released=("resnet20", "resnet56")),
    "smoke": Preset(members=2, main_preset="smoke", timing_batch=8),
}


def member_sources(args, preset: Preset, out: Path, command: str = "") -> list[Path]:
    """The members: --runs' finished runs of --model, the preset's released networks,
    or --model trained here (out/nets/) with the main experiment's preset."""
    if args.runs:
        found = sorted(Path(args.runs, "nets").glob(f"{args.model}-seed*"),
                       key=lambda p: int(p.name.rsplit("seed", 1)[1]))
        found = [p for p in found if (p / "results.json").exists()]
        if len(found) < 2:
            raise BadInput(f"--runs {args.runs}: found {len(found)} finished "
                           f"{args.model} run(s) under nets/; an ensemble needs at least 2 "
                           f"(run the main experiment with --seeds N)")
        return found[:args.members or len(found)]
    if preset.released:
        found = [released_weights(name) for name in preset.released]
        if None in found:
            raise BadInput(f"the quick preset's members are the released "
                           f"{', '.join(preset.released)} (looked in $CNN_JAX_REFERENCE_DIR "
                           f"and {REFERENCE_DIR}), not all on this machine; pass --runs DIR "
                           f"(a main experiment run with --seeds N) instead")
        return found
    n = args.members or preset.members
    train = {**HE2015[preset.main_preset], **preset.train}
    trained = sweep([net_named(args.model)], lambda net, seed, folder: he2015_cifar(
        net, train, seed, folder, data=args.data or preset.data, data_dir=args.data_dir,
        workers=args.workers), n, out, command, together=args.seeds_together,
                    processes=args.processes)
    return [Path(cfg.run.out) for _, _, cfg, _ in trained]


# ------------------------------------------------------------------ measurement
def all_probabilities(groups, test) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of every member (in the groups' order) on every view: [M, N, 10, K], and
    the labels [N]."""
    probs, labels = [], []
    members = sum(len(g.members) for g in groups)
    scores = ensemble_scores(groups)
    with tqdm(total=len(test), unit="img", desc=f"{members} nets x 10 views") as bar:
        for b in eval_batches(test, 250, views="10"):
            keep = b[MASK] > 0
            v = b[IMAGE]                                                  # [B, 10, ...]
            p = jax.nn.softmax(scores(v.reshape(-1, *v.shape[2:])), -1)   # [M, B*10, K]
            p = np.asarray(p).reshape(p.shape[0], *v.shape[:2], p.shape[-1])
            probs.append(p[:, keep])
            labels.append(b[LABEL][keep])
            bar.update(int(keep.sum()))
    return np.concatenate(probs, axis=1), np.concatenate(labels)


def ensemble_errors(probs: np.ndarray, labels: np.ndarray, k: int, views: int) -> list[float]:
    """Error of every k-member ensemble with `views` views (ten-crop order: the
    centre is view 4, its mirror view 9)."""
    chosen = {1: [4], 2: [4, 9], 10: list(range(10))}[views]
    per_member = probs[:, :, chosen].mean(axis=2)               # [M, N, K]
    return [float(np.mean(np.argmax(per_member[list(c)].mean(0), -1) != labels))
            for c in itertools.combinations(range(len(probs)), k)]


def images_per_second(groups, k: int, test, n: int, views: int, repeats: int = 3) -> float:
    """Measured rate of the compiled forward passes of the first k networks (in the
    groups' order) on `views` views of the first n images of `test` (views cut on the
    host, as in evaluation)."""
    parts, left = [], k
    for g in groups:  # the first k members: whole groups, then part of one
        take = min(left, len(g.members))
        if take:
            parts.append((g, jax.tree.map(lambda x, take=take: x[:take], g.stacked)))
        left -= take

    def once():
        for g, stacked in parts:
            v = test.eval_batch(np.arange(n), str(views))[IMAGE]
            jax.block_until_ready(g.forward(stacked, v.reshape(-1, *v.shape[-3:])))
    once()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return n / float(np.median(times))


def check_claims(probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """The ensemble of all members against its best member; ten views against one."""
    single = 100 * np.array(ensemble_errors(probs, labels, 1, 1))
    everything = 100 * ensemble_errors(probs, labels, len(probs), 1)[0]
    ten = 100 * np.array(ensemble_errors(probs, labels, 1, 10))
    n = len(probs)
    return [
        claim("ensemble_beats_its_best_member",
              f"the ensemble of all {n} networks beats the best of them alone (one view)",
              {f"ensemble of {n} (%)": round(everything, 2),
               "best single network (%)": round(single.min(), 2),
               "mean single network (%)": round(single.mean(), 2)},
              f"ensemble of {n} < best single network", everything < single.min(), n),
        claim("ten_views_beat_one",
              "ten views of each test image beat one (a single network, mean over the "
              "networks)",
              {"10 views (%)": round(ten.mean(), 2), "1 view (%)": round(single.mean(), 2)},
              "10 views < 1 view", ten.mean() < single.mean(), n)]


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
    with figure(path, title, 1, 2, figsize=(11, 4.2)) as (ax, cost):
        for v, colour in zip(VIEWS, ("tab:blue", "tab:orange", "tab:green")):
            rs = [r for r in rows if r["views"] == v]
            k = [r["models"] for r in rs]
            err = np.array([100 * r["error"] for r in rs])
            std = np.array([100 * r["error_std"] for r in rs])
            ax.errorbar(k, err, yerr=std, marker="o", capsize=3, color=colour,
                        label=f"{v} view(s)")
            cost.plot([r["images_per_s"] for r in rs], err, "o-", color=colour,
                      label=f"{v} view(s)")
        ax.set_xlabel("networks in the ensemble")
        ax.set_ylabel("test error (%)")
        ax.set_xticks(sorted({r["models"] for r in rows}))
        cost.set_xscale("log")
        cost.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        cost.set_xlabel("inference images/s (measured)")
        for a in (ax, cost):
            a.grid(alpha=0.3, which="both")
            a.legend()


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    args, preset = ctx.args, ctx.preset
    members = [load_member(r) for r in member_sources(args, preset, ctx.out, ctx.command)]
    data = args.data or members[0].data or preset.data
    test = subset(members[0].split("test", data, args.data_dir), preset.test_subset)
    groups = build_groups(members)
    names = [Path(m.source).name for g in groups for m in g.members]
    probs, labels = all_probabilities(groups, test)
    timing_images = min(preset.timing_batch, len(test))
    rows = []
    combos = [(k, v) for k in range(1, len(members) + 1) for v in VIEWS]
    for k, v in tqdm(combos, desc="ensemble sizes x views: error and speed"):
        errs = ensemble_errors(probs, labels, k, v)
        rows.append({"models": k, "views": v, "error": float(np.mean(errs)),
                     "error_std": float(np.std(errs)), "ensembles": len(errs),
                     "images_per_s": images_per_second(groups, k, test, timing_images, v)})
    hw = hardware()
    origin = ("from " + args.runs if args.runs else
              "released weights, trained 200 epochs on the lossless CIFAR-10"
              if preset.released else f"the main experiment preset {preset.main_preset!r}")
    note = (f"Data: {data}" + (" (the local JPEG re-encoded copy)" if data == "cifar10" else "")
            + f", {len(labels):,} test images" + (" (a fixed stratified subset)"
                                                  if preset.test_subset else "")
            + f". Members: {', '.join(names)} ({origin}). Single-network errors, one view: "
            + ", ".join(f"{n} {100 * e:.2f} %" for n, e in
                        zip(names, ensemble_errors(probs, labels, 1, 1)))
            + f". Error: mean ± std over all choices of k networks. images/s: measured for "
            f"the first k networks, batch of {preset.timing_batch}, on {hw['device']} "
            f"({hw['backend']}). Command: `{ctx.command}`.")
    return Report(
        results={"members": [m.source for g in groups for m in g.members],
                 "single_model_errors": ensemble_errors(probs, labels, 1, 1),
                 "n_examples": int(len(labels)), "rows": rows},
        table=table(rows, note), claims=check_claims(probs, labels),
        heading="Ensembles' and multi-crop testing's claims:",
        plot=lambda path: plot(rows, path, f"ensembles of {', '.join(names)} on {data} "
                                           f"({len(labels):,} test images), preset "
                                           f"{ctx.preset_name}"))


def add_arguments(p) -> None:
    p.add_argument("--runs", default=None,
                   help="a plain_vs_resnet --out folder with several seeds of --model")
    p.add_argument("--model", default="resnet20",
                   help="a CIFAR resnetN or plainN (with --runs, or trained here)")
    p.add_argument("--members", type=int, default=None, help="N (default: the preset's)")


def recipe(ctx: Context) -> dict:
    args = ctx.args
    if args.members is not None and args.members < 2:
        raise BadInput(f"--members must be at least 2, got {args.members}")
    if not re.fullmatch(r"resnet\d+|plain\d+", args.model):
        raise BadInput(f"--model must be a CIFAR resnetN or plainN, got {args.model!r}")
    if ctx.preset.train and (args.runs or ctx.preset.released):
        raise BadInput(f"--set {', '.join(ctx.preset.train)}: training fields, but the "
                       f"members are {'--runs' if args.runs else 'released weights'}: "
                       f"nothing is trained")
    return ctx.recipe(model=args.model, members=args.members, runs=args.runs, data=args.data)


EXPERIMENT = Experiment("ensembles", __doc__, PRESETS, run, figure="ensembles.png",
                        add_arguments=add_arguments, recipe=recipe)
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
