"""Data augmentation, one piece at a time: ResNet-20 on CIFAR-10.

The lecture's list, each setting adding one transformation to the previous one:

  none           the stored 32x32 images
  crop           4 pixels padded on each side, a random 32x32 crop (He et al. 2015)
  crop+mirror    ... or its horizontal mirror (the main experiment's recipe)
  +colour shift  ... plus a random offset per channel, uniform in [-20, 20] of 255
                 (the lecture's "R+20, G-20, B+20")
  +PCA colour    ... plus AlexNet's PCA lighting (Krizhevsky et al. 2012, Sec. 4.1):
                 multiples of the RGB principal components, alpha ~ N(0, 0.1)

Method. The same net, optimiser, iterations and seeds for every setting; only the
augmentation changes. Augmentation fights overfitting, so the experiment needs a net
that overfits: ResNet-20 on a small fixed training subset, trained until it fits it
without augmentation. Test error after the last iteration on all 10,000 test images,
mean ± std over seeds; beside it each net's error on its own (unaugmented) training
subset, and the host pipeline's images/s for each setting (grain, the training run's
worker count, batches drawn with no model attached): the cost the CPUs pay to feed
the accelerator.

`claims` in results.json: without augmentation the net fits its training subset
(below 5 % training error) while its test error stays far above: it overfits; crop +
mirror then lowers the test error by more than the seeds' spread. The colour settings'
effects on top of crop + mirror are reported with their spread (`effects`), whatever
they are: on 32x32 images they are not expected to help much.

Presets: `quick` (a 2-core CPU, about 12 minutes: a fixed 1,000-image stratified
subset, 100 per class, 800 iterations at batch 32 (26 passes), lr 0.02 decayed by a
cosine, weight decay 5e-4, 2 seeds, the runs in parallel processes), `paper` (all
50,000 training images, 64k iterations at batch 128 with the paper's schedule, 3
seeds: for a GPU), `smoke` (seconds), `auto`.

Evidence: docs/results.md records the `quick` run.

    python -m experiments.augmentation_ablation [--preset auto|paper|quick|smoke]
        [--settings ...] [--seeds N [--seeds-together]] [--out DIR] [--data-dir DIR]
        [--set KEY=VALUE ...]
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from cnn_jax.data.pipeline import train_dataset
from cnn_jax.experiment import (Context, Experiment, Report, claim, figure, mean_std,
                                train_config)
from cnn_jax.train.inputs import training_split
from cnn_jax.train.sweep import run_all

# ------------------------------------------------------------------ configuration
SETTINGS = {  # name -> TrainConfig fields; each adds one transformation to the last
    "none": dict(crop_pad=0, flip=False, colour_shift=0.0, pca_colour=False),
    "crop": dict(crop_pad=4, flip=False, colour_shift=0.0, pca_colour=False),
    "crop+mirror": dict(crop_pad=4, flip=True, colour_shift=0.0, pca_colour=False),
    "+colour shift": dict(crop_pad=4, flip=True, colour_shift=20.0, pca_colour=False),
    "+PCA colour": dict(crop_pad=4, flip=True, colour_shift=20.0, pca_colour=True),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    seeds: int
    test_subset: int = 0       # >0: a fixed stratified test subset
    model: str = "resnet20"
    pipeline_batches: int = 100
    data: str = "cifar10"
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields (below)


# He et al.'s CIFAR recipe; train_subset > 0: a fixed stratified training subset
PAPER = dict(steps=64_000, batch=128, lr=0.1, weight_decay=1e-4, schedule="paper",
             milestones=(32_000, 48_000), train_subset=0)

PRESETS = {
    "paper": Preset(seeds=3, train=PAPER),
    "quick": Preset(seeds=2, train={**PAPER, "steps": 800, "batch": 32, "lr": 0.02,
                                    "weight_decay": 5e-4, "schedule": "cosine",
                                    "train_subset": 1_000}),
    "smoke": Preset(seeds=1, test_subset=64, model="resnet8", pipeline_batches=3,
                    train={**PAPER, "steps": 3, "batch": 16, "schedule": "cosine",
                           "train_subset": 64}),
}


def run_config(setting: str, preset: Preset, seed: int, args, out: Path):
    steps = preset.train["steps"]
    return train_config(
        preset, model=preset.model, data=args.data or preset.data, data_dir=args.data_dir,
        eval_subset=preset.test_subset, seed=seed, momentum=0.9, normalise="per_pixel",
        **SETTINGS[setting], eval_train_set=bool(preset.train.get("train_subset")),
        log_every=max(1, steps // 20), eval_every=steps,
        checkpoint_every=max(1, min(2_000, steps // 2)), eval_batch=500,
        steps_per_call=10 if steps >= 10_000 else 1, workers=args.workers,
        out=str(out), progress=False)


def pipeline_rate(cfg, batches: int) -> float:
    """Images/s of the host pipeline alone for this run's augmentation."""
    it = iter(train_dataset(training_split(cfg), cfg.optimiser.batch, cfg.run.seed, cfg.run.workers))
    for _ in range(3):  # workers started, buffers full
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.optimiser.batch / (time.perf_counter() - start)


# ------------------------------------------------------------------ outputs
def check_claims(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(claims, effects): the regime and crop + mirror's benefit as claims; the colour
    settings' effects on top of crop + mirror, with their spread, as effects."""
    by = {r["setting"]: r for r in rows}
    test = {k: 100 * np.array(r["test_errors"]) for k, r in by.items()}
    claims, effects = [], []
    if "none" in by:
        fit = 100 * float(np.mean(by["none"]["train_errors"]))
        claims.append(claim(
            "overfits_without_augmentation",
            "without augmentation the net fits its training images but not the test images",
            {"training error (%)": round(fit, 2), "test error (%)": round(test["none"].mean(), 2)},
            "training error < 5 % and test error > training error + 20 points",
            fit < 5 and test["none"].mean() > fit + 20, len(test["none"])))
    if "none" in by and "crop+mirror" in by:
        gain = test["none"].mean() - test["crop+mirror"].mean()
        spread = max(float(np.ptp(test["none"])), float(np.ptp(test["crop+mirror"])))
        claims.append(claim(
            "crop_mirror_helps", "crop + mirror lowers the test error by more than the seeds' "
                                 "spread",
            {"none (%)": round(test["none"].mean(), 2),
             "crop+mirror (%)": round(test["crop+mirror"].mean(), 2),
             "seeds' spread (points)": round(spread, 2)},
            "none - crop+mirror > spread", gain > spread, len(test["none"])))
    for setting in ("+colour shift", "+PCA colour"):
        reference = "crop+mirror" if setting == "+colour shift" else "+colour shift"
        if setting in by and reference in by:
            effects.append({"setting": setting, "against": reference,
                            "test_error_change": round(test[setting].mean() -
                                                       test[reference].mean(), 2),
                            "spread": round(max(float(np.ptp(test[setting])),
                                                float(np.ptp(test[reference]))), 2)})
    return claims, effects


def table(rows: list[dict], note: str) -> str:
    lines = ["| augmentation | test error (%) | training error on its subset (%) | pipeline "
             "images/s |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {mean_std([100 * e for e in r['test_errors']])} "
                     f"(n={len(r['test_errors'])}) | "
                     f"{mean_std([100 * e for e in r['train_errors']])} | "
                     f"{r['pipeline_img_per_s']:,.0f} |")
    return "\n".join(lines + ["", note])


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Test error per setting (mean ± std, seeds as dots) and pipeline images/s."""
    x = np.arange(len(rows))
    test = [100 * np.array(r["test_errors"]) for r in rows]
    train = [100 * np.array(r["train_errors"]) for r in rows]
    with figure(path, title, 1, 2, figsize=(12, 4.2)) as (ax, bx):
        ax.bar(x - 0.2, [t.mean() for t in test], 0.4,
               yerr=[t.std(ddof=1) if len(t) > 1 else 0 for t in test],
               label="test", color="C1", capsize=3)
        ax.bar(x + 0.2, [t.mean() for t in train], 0.4, label="training (its subset)",
               color="C0")
        for i, t in enumerate(test):
            ax.plot(np.full(len(t), i - 0.2), t, "k.", markersize=4)
        ax.set_xticks(x, [r["setting"] for r in rows], rotation=15)
        ax.set_ylabel("error (%)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        bx.bar(x, [r["pipeline_img_per_s"] for r in rows], color="C2")
        bx.set_xticks(x, [r["setting"] for r in rows], rotation=15)
        bx.set_ylabel("host pipeline images/s")
        bx.grid(axis="y", alpha=0.3)


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    args, preset, seeds = ctx.args, ctx.preset, ctx.seeds
    jobs = [(s, seed) for seed in range(seeds) for s in args.settings]
    configs = [run_config(s, preset, seed, args, ctx.out / "nets" / f"{slug(s)}-seed{seed}")
               for s, seed in jobs]
    results = run_all(configs, ctx.command, [f"{s} seed {seed}" for s, seed in jobs],
                      together=args.seeds_together, processes=args.processes)
    rates = {s: pipeline_rate(configs[args.settings.index(s)], preset.pipeline_batches)
             for s in args.settings}
    rows = []
    for s in args.settings:
        mine = [(cfg, res) for (name, _), cfg, res in zip(jobs, configs, results) if name == s]
        rows.append({"setting": s, "augment": SETTINGS[s],
                     "test_errors": [res["final_test_error"] for _, res in mine],
                     "train_errors": [res.get("final_train_set_error", res["final_train_error"])
                                      for _, res in mine],
                     "final_test_error": float(np.mean([res["final_test_error"] for _, res in mine])),
                     "pipeline_img_per_s": rates[s],
                     "train_img_per_s": float(np.mean([res["img_per_s"] for _, res in mine])),
                     "run_dirs": [cfg.run.out for cfg, _ in mine]})
    data, cfg = args.data or preset.data, configs[0]  # every setting's recipe but its own
    note = (f"Data: {data}" + (" (the local JPEG re-encoded copy)" if data == "cifar10" else "") +
            f"; {preset.model}, {cfg.schedule.steps} iterations at batch {cfg.optimiser.batch}, lr "
            f"{cfg.schedule.lr} ({cfg.schedule.kind}), weight decay {cfg.optimiser.weight_decay}, seeds "
            f"0..{seeds - 1}" +
            (f", trained on a fixed {cfg.data.train_subset}-image subset" if cfg.data.train_subset else "") +
            (f", test error on a fixed {preset.test_subset}-image subset" if preset.test_subset else "") +
            f". Pipeline images/s: {preset.pipeline_batches} batches, workers "
            f"{configs[0].run.workers if configs[0].run.workers is not None else 'default'}, no model. "
            f"Command: `{ctx.command}`.")
    claims, effects = check_claims(rows)
    said = "\n".join(f"  {e['setting']} vs {e['against']}: test error "
                     f"{e['test_error_change']:+.2f} points (seeds' spread {e['spread']:.2f})"
                     for e in effects)
    return Report(
        results={"effects": effects, "settings": rows}, table=table(rows, note), claims=claims,
        heading=f"Augmentation's claims (mean of {seeds} seed(s)):",
        words=("The colour settings, on top of the previous one (reported, not claimed):\n"
               + said) if said else "",
        plot=lambda path: plot(rows, path, f"{preset.model} on {data}, preset "
                                           f"{ctx.preset_name}: one augmentation added at a time"))


def slug(setting: str) -> str:
    return setting.replace("+", "plus_").replace(" ", "_").strip("_")


def add_arguments(p) -> None:
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))


EXPERIMENT = Experiment("augmentation_ablation", __doc__, PRESETS, run,
                        figure="augmentation.png", add_arguments=add_arguments)
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
