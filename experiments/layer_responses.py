"""Responses of the 3x3 layers, plain vs residual: He et al. 2015, Sec. 4.2, Fig. 7.

The claim. If the identity is close to optimal, a residual block only has to learn a
small correction, so "the residual functions might be generally closer to zero than
the non-residual functions": ResNets' layers respond less than their plain
counterparts, and the deeper the ResNet, the smaller each layer's response ("when
there are more layers, an individual layer of ResNets tends to modify the signal
less").

Method (Fig. 7). For trained plain and residual CIFAR-10 nets, the standard deviation
of every 3x3 layer's response, "the output of each 3x3 layer, after BN and before
other nonlinearity (ReLU/addition)", on test images with the running BN statistics;
one std per channel over images and positions, averaged over the layer's channels.
Plotted in layer order and sorted by magnitude, one line per net. `claims` in
results.json checks both findings on the mean std over layers.

The nets must be trained far enough that BatchNorm has settled. Presets:
- `paper`: the main experiment's `paper` nets (plain-20/56, ResNet-20/56/110), read
  from its output folder (`--runs`) and trained there if missing (a GPU's work).
- `quick` (a 2-core CPU, about 12 minutes): ResNet-20 and ResNet-56 are the released
  weights of ../shared/reference (akamaster's, trained 200 epochs on the lossless
  CIFAR-10; `released_weights`), measured as they are; plain-20 and plain-56, which
  nobody releases, are trained here on all 50k training images (crop + mirror, SGD
  lr 0.1 decayed to 0 by a cosine over 1,500 iterations at batch 32, so that BN's
  running statistics match the final weights). Without the reference weights the
  ResNets are trained here with the plain nets' recipe. Every net's origin is in the
  table.
- `smoke` (seconds, for tests), `auto`.

Evidence: docs/results.md records the `quick` run and whether it shows the claims.

    python -m experiments.layer_responses [--preset auto|paper|quick|smoke]
        [--runs DIR] [--seeds N] [--out DIR] [--data-dir DIR] [--set images=N ...]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from cnn_jax.data.dataset import subset
from cnn_jax.data.pipeline import eval_batches
from cnn_jax.experiment import (HE2015, Context, Experiment, Net, Report, claim, figure,
                                found_or_trained, he2015_cifar, mean_std, net_named,
                                train_config)
from cnn_jax.models.layers import ConvBN
from cnn_jax.train import TrainConfig
from cnn_jax.train.evaluator import evaluate
from cnn_jax.train.sweep import run_all
from cnn_jax.trained import load_trained, released_weights


# ------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class Preset:
    plain: tuple               # depths (plain-110 is not in Fig. 7: it "fails to converge")
    residual: tuple
    images: int                # test images the responses are measured on
    released: bool = False     # ResNets: the released weights where they exist
    data: str = "cifar10"
    # the nets not released: train["steps"] > 0 trains them here (here_config) with its
    # batch and lr; 0 takes the main experiment's nets of this preset
    train: dict = dataclasses.field(default_factory=lambda: dict(steps=0, batch=32, lr=0.1))


PRESETS = {
    "paper": Preset(plain=(20, 56), residual=(20, 56, 110), images=10_000),
    "quick": Preset(plain=(20, 56), residual=(20, 56), images=2_000, released=True,
                    train=dict(steps=1_500, batch=32, lr=0.1)),
    "smoke": Preset(plain=(8,), residual=(8, 14), images=64,
                    train=dict(steps=6, batch=16, lr=0.1)),
}


def here_config(net: Net, preset: Preset, seed: int, args, out: Path) -> TrainConfig:
    """A net trained here: all training images, crop + mirror, lr decayed to zero (a
    cosine), so that its BatchNorm statistics are those of its final weights."""
    model, options = net.model()
    steps = preset.train["steps"]
    return train_config(
        preset, model=model, model_options=options, data=args.data or preset.data,
        data_dir=args.data_dir, seed=seed, momentum=0.9, weight_decay=1e-4,
        schedule="cosine", crop_pad=4, flip=True, normalise="per_pixel",
        eval_subset=preset.images, log_every=max(1, steps // 20), eval_every=steps,
        checkpoint_every=max(1, steps // 3), eval_batch=500, workers=args.workers,
        out=str(out), progress=False)


# ------------------------------------------------------------------ the measurement
def layer_responses(source, images: int, data: Optional[str] = None, data_dir=None,
                    batch: int = 250) -> dict:
    """Per 3x3 layer of a trained net (a run folder or released weights; in layer
    order): the std of its response after BN, per channel over images and positions,
    averaged over channels. Test images of `data` (default: the run's dataset)."""
    net = load_trained(source)
    test = subset(net.split("test", data, data_dir), images)

    def is_3x3_bn(module, method):
        return (isinstance(module, nn.BatchNorm) and isinstance(module.parent, ConvBN)
                and module.parent.kernel == 3)

    def walk(tree, prefix=""):  # keeps the call (= layer) order
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}/")
            else:
                yield prefix.removesuffix("/bn/"), v[0]

    names: list = []   # layer order, recorded while tracing (jit sorts a dict's keys)

    @jax.jit
    def moments(variables, x, mask):
        _, state = net.apply(variables, x, capture_intermediates=is_3x3_bn,
                             mutable=["intermediates"])
        w = mask[:, None, None, None]
        names.clear()
        out = []
        for name, r in walk(state["intermediates"]):
            r = r.astype(jnp.float32)
            names.append(name)
            out.append((jnp.sum(w * r, (0, 1, 2)), jnp.sum(w * r * r, (0, 1, 2)),
                        jnp.sum(w) * r.shape[1] * r.shape[2]))
        return out

    sums = None
    for b in eval_batches(test, batch):
        m = moments(net.variables, b["image"], b["mask"].astype(np.float32))
        m = jax.tree.map(lambda v: np.asarray(v, np.float64), m)
        sums = m if sums is None else jax.tree.map(np.add, sums, m)
    std = [float(np.mean(np.sqrt(np.maximum(s2 / n - (s / n) ** 2, 0.0)))) for s, s2, n in sums]
    logits = jax.jit(lambda v, x: net.apply(v, x)[None])
    error = evaluate(lambda x: logits(net.variables, x), test, batch=batch).metrics[0]["error"]
    return {"layers": names, "std": std, "images": len(test), "test_error": error}


# ------------------------------------------------------------------ outputs
def by_net(records: list[dict]) -> dict:
    """name -> std per layer averaged over seeds."""
    nets: dict = {}
    for r in records:
        nets.setdefault(r["name"], []).append(r["std"])
    return {k: np.mean(v, axis=0) for k, v in nets.items()}


def check_claims(records: list[dict]) -> list[dict]:
    """Fig. 7's two findings on the mean std over each net's layers (and seeds)."""
    mean = {k: float(np.mean(v)) for k, v in by_net(records).items()}
    seeds = max(sum(r["name"] == k for r in records) for k in mean)
    plain = sorted(int(k[5:]) for k in mean if k.startswith("plain"))
    res = sorted(int(k[6:]) for k in mean if k.startswith("resnet"))
    out = []
    for d in (d for d in plain if d in res):
        a, b = mean[f"resnet{d}"], mean[f"plain{d}"]
        out.append(claim(f"residual_smaller_than_plain_{d}",
                         f"ResNet-{d}'s layers respond less than plain-{d}'s",
                         {f"ResNet-{d}": round(a, 3), f"plain-{d}": round(b, 3)},
                         f"ResNet-{d} < plain-{d} (mean std)", a < b, seeds))
    for shallow, deep in zip(res, res[1:]):
        a, b = mean[f"resnet{deep}"], mean[f"resnet{shallow}"]
        out.append(claim(f"deeper_resnet_smaller_{deep}",
                         f"the deeper ResNet-{deep}'s layers respond less than ResNet-{shallow}'s",
                         {f"ResNet-{deep}": round(a, 3), f"ResNet-{shallow}": round(b, 3)},
                         f"ResNet-{deep} < ResNet-{shallow} (mean std)", a < b, seeds))
    return out


def table(records: list[dict], note: str) -> str:
    lines = ["| net | where it comes from | 3x3 layers | mean std | median | max | "
             "test error (%) | seeds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    nets = by_net(records)
    order = sorted(nets, key=lambda k: (net_named(k).residual, net_named(k).depth))
    for name in order:
        v = nets[name]
        mine = [r for r in records if r["name"] == name]
        lines.append(f"| {name} | {mine[0]['origin']} | {len(v)} | {v.mean():.3f} | "
                     f"{np.median(v):.3f} | {v.max():.3f} | "
                     f"{mean_std([100 * r['test_error'] for r in mine])} | {len(mine)} |")
    return "\n".join(lines + ["", note])


def plot(records: list[dict], path: Path, title: str) -> None:
    """Fig. 7: std per layer in layer order (top) and sorted by magnitude (bottom)."""
    nets = by_net(records)
    depths = sorted({net_named(k).depth for k in nets})
    colours = dict(zip(depths, matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85,
                                                                         len(depths)))))
    with figure(path, title, 2, 1, figsize=(9, 7)) as axes:
        for name, v in sorted(nets.items()):
            net = net_named(name)
            style = dict(color=colours[net.depth], linestyle="-" if net.residual else "--",
                         linewidth=1.5, label=net.label)
            x = np.arange(1, len(v) + 1)
            axes[0].plot(x, v, **style)
            axes[1].plot(x, np.sort(v)[::-1], **style)
        axes[0].set_xlabel("layer index (original)")
        axes[1].set_xlabel("layer index (sorted by magnitude)")
        for ax in axes:
            ax.set_ylabel("std")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, ncol=2)


# ------------------------------------------------------------------ the nets
def gather_nets(ctx: Context) -> list[dict]:
    """Every net of the preset and seed with where it comes from (`origin`) and its
    run folder or weights file (`source`), trained where needed."""
    args, preset, seeds = ctx.args, ctx.preset, ctx.seeds
    wanted = [Net("plain", d) for d in preset.plain] + [Net("resnet", d) for d in preset.residual]
    if not preset.train["steps"]:  # He et al.'s recipe of this preset: --runs' nets, or here
        train = {**HE2015[ctx.preset_name], **ctx.training_overrides}
        origin = (f"He et al.'s recipe, preset `{ctx.preset_name}` ({train['steps']} "
                  f"iterations at batch {train['batch']})")
        trained = found_or_trained(wanted, lambda net, seed, folder: he2015_cifar(
            net, train, seed, folder, data=args.data or preset.data, data_dir=args.data_dir,
            workers=args.workers), seeds, ctx.out, ctx.command, elsewhere=args.runs,
            processes=args.processes)
        return [{"name": net.name, "depth": net.depth, "residual": net.residual,
                 "seed": seed, "source": cfg.run.out,
                 "origin": origin + (" in --runs" if args.runs and str(cfg.run.out).startswith(
                     str(args.runs)) else ", trained here")}
                for net, seed, cfg, _ in trained]
    nets, todo = [], []
    for net in wanted:
        weights = released_weights(net.name) if preset.released and net.residual else None
        if weights is not None:  # one released net per depth: it stands for every seed
            nets.append({"name": net.name, "depth": net.depth, "residual": True, "seed": 0,
                         "source": str(weights),
                         "origin": f"released weights, trained 200 epochs on the lossless "
                                   f"CIFAR-10 (`{weights.name}`)"})
            continue
        for seed in range(seeds):
            cfg = here_config(net, preset, seed, args, ctx.out / "nets" / f"{net.name}-seed{seed}")
            todo.append((net.depth, cfg))
            nets.append({"name": net.name, "depth": net.depth, "residual": net.residual,
                         "seed": seed, "source": cfg.run.out,
                         "origin": f"trained here: {cfg.schedule.steps:,} iterations at batch "
                                   f"{cfg.optimiser.batch}, lr {cfg.schedule.lr} cosine to 0, crop + mirror"})
    run_all([cfg for _, cfg in sorted(todo, key=lambda t: -t[0])], ctx.command,
            processes=args.processes)  # the deepest first
    return nets


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    preset, data = ctx.preset, ctx.args.data or ctx.preset.data
    records = [{**net, **layer_responses(net["source"], preset.images, data, ctx.args.data_dir)}
               for net in gather_nets(ctx)]
    note = (f"Std of each 3x3 layer's response after BN (before ReLU/addition), per channel "
            f"over {preset.images:,} test images of {data} and positions, averaged over "
            f"channels (and seeds). Test error: on the same images, single view. "
            f"Command: `{ctx.command}`.")
    return Report(
        results={"images": preset.images, "nets": records}, table=table(records, note),
        claims=check_claims(records), heading="Fig. 7's claims, on the mean std over layers:",
        plot=lambda path: plot(records, path, f"std of 3x3 layer responses, preset "
                                              f"{ctx.preset_name}, {preset.images:,} test images"))


def add_arguments(p) -> None:
    p.add_argument("--runs", default=None,
                   help="paper preset: an output folder holding He et al.'s nets of this "
                        "preset (experiments.plain_vs_resnet's --out), read where they are; "
                        "nets missing there are trained here")


EXPERIMENT = Experiment("layer_responses", __doc__, PRESETS, run, figure="responses.png",
                        add_arguments=add_arguments)
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
