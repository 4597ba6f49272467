"""LeNet-5 on MNIST: LeCun, Bottou, Bengio & Haffner 1998, Sec. II-III.

Method. The 28x28 MNIST digits are centred in a 32x32 field (2 background pixels on
each side: "the largest characters ... in a 28x28 field" so that stroke end-points
can reach the centre of C3's receptive fields), and scaled so that the background is
-0.1 and the ink 1.175 (mean about 0, variance about 1). No distortions. Two nets:

  lenet5_classic  the paper's own: C3's partial connection table, trainable
                  subsampling, A tanh(S a) squashing, fixed RBF output codes;
                  60,000 trainable parameters; the paper's test error 0.95 %.
  lenet5          the textbook form (full C3, average pooling, tanh, a softmax
                  output layer): 61,706 parameters.

The paper trains 20 passes with stochastic diagonal Levenberg-Marquardt and a
stepped global rate; we use SGD with momentum 0.9 and a cosine schedule at batch
128, and softmax cross-entropy over the negated RBF distances for the classic net
(docs/deviations.md). The test error is read after the last pass.

Presets: `default` (lenet5 15 passes, lenet5_classic 10; about 9 minutes for both
nets on a 2-core CPU),
`paper` (20 passes, as in the paper), `smoke` (seconds, for tests).
Evidence: docs/results.md records the default run.

    python -m experiments.lenet_mnist [--preset default|paper|smoke] [--variants ...]
        [--seeds N [--seeds-together]] [--out DIR] [--data-dir DIR] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from cnn_jax.data.sources import Decode, open_source
from cnn_jax.cost import profile
from cnn_jax.experiment import (Context, Experiment, Report, claim, figure, mean_std,
                                train_config)
from cnn_jax.models import create_model
from cnn_jax.train.sweep import curve, run_all

# ------------------------------------------------------------------ configuration
PAPER_ERROR = {"lenet5_classic": 0.95}  # Sec. III.C, no distortions
TARGET_ERROR = 1.0                      # what the textbook net must reach here (%)


@dataclasses.dataclass(frozen=True)
class Recipe:
    lr: float
    weight_decay: float
    passes: float   # passes over the training set in the `default` preset


# Per-variant SGD settings. lenet5's lr and passes were chosen on a 10,000-image
# holdout of the training set (2 seeds; lr 0.05 -> 0.1 and 10 -> 15 passes each
# lowered the validation error, label smoothing 0.1 raised it), never on the test set.
RECIPES = {
    "lenet5": Recipe(lr=0.1, weight_decay=5e-4, passes=15),
    # the RBF "logits" are negated squared distances in the hundreds: a smaller step
    "lenet5_classic": Recipe(lr=0.01, weight_decay=0.0, passes=10),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    epochs: Optional[float]  # None: each variant's own recipe passes
    evals_per_epoch: int = 1
    logs_per_epoch: int = 5
    seeds: int = 1
    data: str = "mnist"
    # batch; steps > 0: this many iterations whatever the epochs (smoke), 0: the epochs'
    train: dict = dataclasses.field(default_factory=lambda: dict(batch=128, steps=0))


PRESETS = {
    "default": Preset(epochs=None),
    "paper": Preset(epochs=20),
    "smoke": Preset(epochs=0, evals_per_epoch=0, logs_per_epoch=0,
                    train=dict(batch=32, steps=4)),
}


def run_config(variant: str, preset: Preset, seed: int, args, out: Path, n_train: int):
    recipe = RECIPES[variant]
    steps_per_epoch = max(1, round(n_train / preset.train["batch"]))
    steps = preset.train["steps"] or max(1, round((preset.epochs or recipe.passes) *
                                                  steps_per_epoch))
    preset = dataclasses.replace(preset, train={**preset.train, "steps": steps})
    # smoke: log every iteration, evaluate every other one
    every = lambda per_epoch, smoke: steps_per_epoch // per_epoch if per_epoch else smoke
    return train_config(
        preset, model=variant, data=args.data or preset.data, data_dir=args.data_dir,
        seed=seed, lr=recipe.lr, momentum=0.9,
        weight_decay=recipe.weight_decay, schedule="cosine",
        input_pad=2, normalise="lecun", crop_pad=0, flip=False,
        log_every=max(1, every(preset.logs_per_epoch, 1)),
        eval_every=max(1, every(preset.evals_per_epoch, 2)),
        checkpoint_every=min(steps_per_epoch, steps), eval_batch=2_000, workers=args.workers,
        out=str(out), progress=False)


def count_train(data: str, data_dir) -> int:
    return len(open_source(data, "train", data_dir=data_dir, decode=Decode()))


def macs(variant: str) -> int:
    return profile(create_model(variant), (32, 32, 1)).macs


# ------------------------------------------------------------------ outputs
def table(runs: list[dict], note: str) -> str:
    lines = ["| network | params | MACs | ours: test error (%) | paper (%) | train images/s | wall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        errs = [100 * s["final_test_error"] for s in r["seeds"]]
        paper = PAPER_ERROR.get(r["name"])
        wall = sum(s["wall_s"] for s in r["seeds"]) / len(r["seeds"])
        lines.append(f"| `{r['name']}` | {r['params']:,} | {r['macs']:,} | "
                     f"{mean_std(errs)} (n={len(errs)}) | {paper if paper else '-'} | "
                     f"{r['img_per_s']:,.0f} | {wall / 60:.1f} min |")
    return "\n".join(lines + ["", note])


def plot(runs: list[dict], path: Path, steps_per_epoch: float, title: str) -> None:
    """Test error (solid) and training error (dashed) against passes, log scale."""
    with figure(path, title, figsize=(7, 4.5)) as ax:
        for r, colour in zip(runs, ("tab:blue", "tab:orange", "tab:green")):
            c = r["seeds"][0]["curve"]
            train = 100 * np.mean([s["curve"]["train_error"] for s in r["seeds"]], axis=0)
            test = 100 * np.mean([s["curve"]["test_error"] for s in r["seeds"]], axis=0)
            ax.plot(np.array(c["step"]) / steps_per_epoch, train, "--", color=colour,
                    linewidth=1)
            ax.plot(np.array(c["eval_step"]) / steps_per_epoch, test, "-o", color=colour,
                    markersize=3, label=f"{r['name']} (test)")
        if any(r["name"] in PAPER_ERROR for r in runs):
            ax.axhline(PAPER_ERROR["lenet5_classic"], color="grey", linestyle=":",
                       label="paper, LeNet-5: 0.95 %")
        ax.set_yscale("log")
        ax.set_xlabel("passes through the training set")
        ax.set_ylabel("error (%)  -- dashed: training, solid: test")
        ax.grid(alpha=0.3, which="both")
        ax.legend()


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    args, preset, seeds = ctx.args, ctx.preset, ctx.seeds
    data = args.data or preset.data
    n_train = count_train(data, args.data_dir)
    jobs = [(v, seed) for seed in range(seeds) for v in args.variants]
    configs = [run_config(v, preset, seed, args, ctx.out / "nets" / f"{v}-seed{seed}", n_train)
               for v, seed in jobs]
    results = run_all(configs, ctx.command, [f"{v} seed {s}" for v, s in jobs],
                      together=args.seeds_together, processes=args.processes)
    runs = []
    for variant in args.variants:
        per_seed = [{"seed": seed, "final_test_error": res["final_test_error"],
                     "final_train_error": res["final_train_error"], "wall_s": res["wall_s"],
                     "img_per_s": res["img_per_s"], "curve": curve(Path(cfg.run.out)),
                     "run_dir": cfg.run.out}
                    for (v, seed), cfg, res in zip(jobs, configs, results) if v == variant]
        params = next(res["params"] for (v, _), res in zip(jobs, results) if v == variant)
        errs = [s["final_test_error"] for s in per_seed]
        runs.append({"name": variant, "params": params, "macs": macs(variant),
                     "final_test_error": float(np.mean(errs)),
                     "final_test_error_std": float(np.std(errs, ddof=1)) if len(errs) > 1 else None,
                     "paper_test_error": (PAPER_ERROR[variant] / 100
                                          if variant in PAPER_ERROR else None),
                     "img_per_s": float(np.median([s["img_per_s"] for s in per_seed])),
                     "recipe": dataclasses.asdict(RECIPES[variant]), "seeds": per_seed})
    batch, steps = preset.train["batch"], preset.train["steps"]
    steps_per_epoch = n_train / batch
    passes = (f"{steps} iterations" if steps else f"{preset.epochs:g} passes"
              if preset.epochs else ", ".join(f"{v} {RECIPES[v].passes:g} passes"
                                             for v in args.variants))
    note = (f"Data: {data} ({n_train:,} training images), 28x28 padded to 32x32, no "
            f"distortions. Preset `{ctx.preset_name}`: {passes} at batch "
            f"{batch}, SGD momentum 0.9, cosine schedule; seeds 0..{seeds - 1}. "
            f"Test error after the last pass. Hardware: {results[0]['hardware']['device']} "
            f"({results[0]['hardware']['backend']}). Command: `{ctx.command}`.")
    claims = []
    if "lenet5" in args.variants:
        errs = [100 * s["final_test_error"] for s in next(r for r in runs
                                                           if r["name"] == "lenet5")["seeds"]]
        claims.append(claim("lenet5_at_most_1_percent",
                            "the textbook LeNet-5 reaches 1 % test error or less on MNIST",
                            {"lenet5 test error (%)": round(float(np.mean(errs)), 2)},
                            f"<= {TARGET_ERROR:g} %", np.mean(errs) <= TARGET_ERROR, seeds))
    return Report(
        results={"recipes": {v: dataclasses.asdict(RECIPES[v]) for v in args.variants},
                 "runs": runs},
        table=table(runs, note), claims=claims, heading="LeNet-5's claim:",
        plot=lambda path: plot(runs, path, steps_per_epoch,
                               f"LeNet-5 on {data}: {passes}, batch {batch}, "
                               f"{seeds} seed(s)"))


def add_arguments(p) -> None:
    p.add_argument("--variants", nargs="+", choices=list(RECIPES), default=list(RECIPES))


def recipe(ctx: Context) -> dict:
    return ctx.recipe(recipes={v: dataclasses.asdict(RECIPES[v]) for v in ctx.args.variants})


EXPERIMENT = Experiment("lenet_mnist", __doc__, PRESETS, run, figure="curves.png", auto=None,
                        add_arguments=add_arguments, recipe=recipe)
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
