"""The classic architectures side by side on CIFAR-10: LeNet -> AlexNet -> VGG ->
NiN -> GoogLeNet -> ResNet, each trained with one shared recipe, reported as
parameters, multiply-accumulates, training images/s and test error in one table.

Adaptations to 32x32 colour images (all stated again in the table):
  lenet5        as drawn in 1998, with C1 seeing 3 colour channels (32x32 input).
  alexnet       upsampled to 67x67 on the device, the smallest input its 11x11/4
                conv1 and three overlapping max-pools admit (final maps 1x1x256,
                so fc6 has 256 inputs instead of 9,216). Paper initialisation, no BN.
  vgg16_bn      VGG-16 (configuration D) with BatchNorm at 32x32: the five pools end
                at 1x1x512, so fc6 has 512 inputs instead of 25,088.
  nin           the authors' CIFAR-10 network, unchanged.
  googlenet     upsampled to 96x96 (as d2l does), auxiliary heads on in training
                with weight 0.3; final maps 3x3 before the global average pool.
  resnet20/56   He et al.'s CIFAR networks, unchanged.

Shared recipe: SGD with momentum 0.9, weight decay 5e-4, cosine schedule, random
crop of the 4-pixel padded image and horizontal flip, per-channel standardisation.
The learning rate is per net: 0.1 for the BatchNorm ResNets, 0.01 for AlexNet, VGG-16
(with BN: at 0.1 it diverges), NiN and GoogLeNet, as their papers, 0.05 for tanh LeNet.

Presets: `full` (30 epochs at batch 128 each: a GPU run), `quick` (a CPU-sized
run: a fraction of an epoch, where the table's cost columns are exact but the errors
only show how far each net gets on the same few thousand images), `smoke` (tests),
`auto` (full on an accelerator, quick on a CPU). Evidence: docs/results.md.

    python -m experiments.zoo_cifar [--preset auto|full|quick|smoke] [--nets ...]
        [--seeds N [--seeds-together]] [--out DIR] [--data-dir DIR] [--set KEY=VALUE ...]

Its nets train one at a time unless `--processes N`: the images/s column compares the
nets each on the whole machine.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from cnn_jax.data.sources import Decode, open_source
from cnn_jax.cost import profile
from cnn_jax.experiment import Context, Experiment, Report, figure, mean_std, train_config
from cnn_jax.models import create_model
from cnn_jax.train.inputs import model_input_shape
from cnn_jax.train.sweep import run_all

# ------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class Net:
    model: str
    lr: float
    options: dict = dataclasses.field(default_factory=dict)
    resize: int = 0          # upsample on the device to this size (0: native 32x32)
    adaptation: str = "unchanged"
    paper: str = ""


ZOO = {
    "lenet5": Net("lenet5", 0.05, adaptation="C1 sees 3 channels",
                  paper="LeCun et al. 1998"),
    "alexnet": Net("alexnet", 0.01, resize=67, adaptation="upsampled to 67x67; fc6 256 inputs",
                   paper="Krizhevsky et al. 2012"),
    # 0.01, not 0.1: at 0.1 and batch 32 its loss went 40 -> 2,700 -> NaN within 35
    # iterations (the three dense layers of 4,096); 0.01 is VGG's own rate (Sec. 3.1)
    "vgg16_bn": Net("vgg16", 0.01, {"batch_norm": True},
                    adaptation="with BatchNorm; fc6 512 inputs", paper="Simonyan & Zisserman 2015"),
    "nin": Net("nin", 0.01, paper="Lin et al. 2014"),
    "googlenet": Net("googlenet", 0.01, resize=96, adaptation="upsampled to 96x96",
                     paper="Szegedy et al. 2015"),
    "resnet20": Net("resnet20", 0.1, paper="He et al. 2015"),
    "resnet56": Net("resnet56", 0.1, paper="He et al. 2015"),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    test_subset: int = 0     # >0: a fixed stratified subset of the test set (CPU presets)
    seeds: int = 1
    data: str = "cifar10"
    train: dict = dataclasses.field(default_factory=dict)  # steps, batch and cadence


PRESETS = {
    "full": Preset(train=dict(steps=30 * 391, batch=128, log_every=100, eval_every=391 * 5,
                              checkpoint_every=391, eval_batch=1_000)),
    # A 2-core CPU trains VGG-16 at about 6 images/s: 50 iterations of 32 images each,
    # the error read on 1,000 test images (100 per class).
    "quick": Preset(test_subset=1_000, train=dict(steps=50, batch=32, log_every=10,
                                                  eval_every=50, checkpoint_every=25,
                                                  eval_batch=250)),
    "smoke": Preset(train=dict(steps=3, batch=8, log_every=1, eval_every=3,
                               checkpoint_every=3, eval_batch=100)),
}


def run_config(key: str, preset: Preset, seed: int, args, out: Path):
    net = ZOO[key]
    return train_config(
        preset, model=net.model, model_options=dict(net.options),
        data=args.data or preset.data, data_dir=args.data_dir, seed=seed, lr=net.lr,
        momentum=0.9, weight_decay=5e-4, schedule="cosine", crop_pad=4, flip=True,
        normalise="standard", resize=net.resize, eval_subset=preset.test_subset,
        workers=args.workers, out=str(out), progress=False)


def cost(key: str, image_shape: tuple, num_classes: int) -> dict:
    """Parameters and multiply-accumulates per image at the size the net is fed."""
    net = ZOO[key]
    shape = model_input_shape(image_shape, net.resize)
    c = profile(create_model(net.model, num_classes=num_classes, **net.options), shape)
    return {"input": "x".join(map(str, shape)), "params": c.params, "macs": c.macs}


# ------------------------------------------------------------------ outputs
def table(runs: list[dict], note: str) -> str:
    lines = ["| net | paper | input | adaptation | params | MACs | train images/s | "
             "test error (%) |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in runs:
        errs = [100 * s["final_test_error"] for s in r["seeds"]]
        lines.append(f"| `{r['name']}` | {r['paper']} | {r['input']} | {r['adaptation']} | "
                     f"{r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:,.1f}M | "
                     f"{r['img_per_s']:,.0f} | {mean_std(errs)} (n={len(errs)}) |")
    return "\n".join(lines + ["", note])


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Test error against multiply-accumulates per image (log), one point per net."""
    with figure(path, title, 1, 2, figsize=(12, 4.5)) as axes:
        for r in runs:
            err = 100 * r["final_test_error"]
            for ax, x in zip(axes, (r["macs"], r["params"])):
                ax.scatter(x, err, s=40)
                ax.annotate(r["name"], (x, err), textcoords="offset points", xytext=(5, 4),
                            fontsize=9)
        axes[0].set_xlabel("multiply-accumulates per image")
        axes[1].set_xlabel("parameters")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_ylabel("test error (%)")
            ax.grid(alpha=0.3, which="both")


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    args, preset, seeds = ctx.args, ctx.preset, ctx.seeds
    data = args.data or preset.data
    train = open_source(data, "train", data_dir=args.data_dir, decode=Decode())
    image_shape, num_classes = train.image_shape, len(train.classes)
    jobs = [(k, seed) for seed in range(seeds) for k in args.nets]
    configs = [run_config(k, preset, seed, args, ctx.out / "nets" / f"{k}-seed{seed}")
               for k, seed in jobs]
    results = run_all(configs, ctx.command, [f"{k} seed {s}" for k, s in jobs],
                      together=args.seeds_together, processes=args.processes or 1)
    runs = []
    for key in args.nets:
        per_seed = [{"seed": s, "final_test_error": res["final_test_error"],
                     "final_train_error": res["final_train_error"], "wall_s": res["wall_s"],
                     "img_per_s": res["img_per_s"], "run_dir": cfg.run.out}
                    for (k, s), cfg, res in zip(jobs, configs, results) if k == key]
        net = ZOO[key]
        runs.append({"name": key, "model": net.model, "options": net.options,
                     "paper": net.paper, "adaptation": net.adaptation, "lr": net.lr,
                     **cost(key, image_shape, num_classes),
                     "final_test_error": float(np.mean([s["final_test_error"] for s in per_seed])),
                     "img_per_s": float(np.median([s["img_per_s"] for s in per_seed])),
                     "seeds": per_seed})
    hw = results[0]["hardware"]
    steps, batch = configs[0].schedule.steps, configs[0].optimiser.batch
    note = (f"Data: {data}" + (" (the local JPEG re-encoded copy)" if data == "cifar10" else "")
            + f". Preset `{ctx.preset_name}`: {steps} iterations at batch {batch} "
            f"for every net (SGD momentum 0.9, weight decay 5e-4, cosine schedule, crop + "
            f"flip); seeds 0..{seeds - 1}; single-view test error after the last iteration on "
            + (f"a fixed stratified subset of {preset.test_subset:,} test images. "
               if preset.test_subset else "the whole test set. ") +
            f"Training images/s on {hw['device']} ({hw['backend']}), median over logging "
            f"windows. Command: `{ctx.command}`.")
    return Report(results={"runs": runs}, table=table(runs, note),
                  plot=lambda path: plot(runs, path, f"{data}, preset {ctx.preset_name}: "
                                                     f"{steps} iterations at batch "
                                                     f"{batch}"))


def add_arguments(p) -> None:
    p.add_argument("--nets", nargs="+", choices=list(ZOO), default=list(ZOO))


def recipe(ctx: Context) -> dict:
    fields = ("model", "lr", "options", "resize")
    return ctx.recipe(nets={k: {f: getattr(ZOO[k], f) for f in fields} for k in ctx.args.nets})


EXPERIMENT = Experiment("zoo_cifar", __doc__, PRESETS, run, figure="zoo.png",
                        auto=("full", "quick"), add_arguments=add_arguments, recipe=recipe)
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
