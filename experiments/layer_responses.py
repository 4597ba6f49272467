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
        [--runs DIR] [--seeds N] [--images N] [--out DIR] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.data import DataError, search_dirs
from cnn_jax.data.pipeline import eval_batches
from cnn_jax.models.layers import ConvBN
from cnn_jax.train import TrainConfig
from cnn_jax.train.inputs import subset
from cnn_jax.train.loop import ConfigMismatch, hardware, versions
from cnn_jax.train.sweep import (choose_preset, claim, claims_in_words, guard_out, mean_std,
                                 run_all)
from cnn_jax.trained import load_trained, released_weights

from experiments import plain_vs_resnet as main_experiment

# ------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class Preset:
    plain: tuple               # depths (plain-110 is not in Fig. 7: it "fails to converge")
    residual: tuple
    images: int                # test images the responses are measured on
    released: bool = False     # ResNets: the released weights where they exist
    steps: int = 0             # >0: nets not released are trained here (below); 0: the
    batch: int = 32            # main experiment's nets of this preset
    lr: float = 0.1
    data: str = "cifar10"


PRESETS = {
    "paper": Preset(plain=(20, 56), residual=(20, 56, 110), images=10_000),
    "quick": Preset(plain=(20, 56), residual=(20, 56), images=2_000, released=True,
                    steps=1_500, batch=32),
    "smoke": Preset(plain=(8,), residual=(8, 14), images=64, steps=6, batch=16),
}


def here_config(name: str, preset: Preset, seed: int, args, out: Path) -> TrainConfig:
    """A net trained here: all training images, crop + mirror, lr decayed to zero (a
    cosine), so that its BatchNorm statistics are those of its final weights."""
    return TrainConfig(
        model=name, data=args.data or preset.data, data_dir=args.data_dir, steps=preset.steps,
        batch=preset.batch, seed=seed, lr=preset.lr, momentum=0.9, weight_decay=1e-4,
        schedule="cosine", crop_pad=4, flip=True, normalise="per_pixel",
        eval_subset=preset.images, log_every=max(1, preset.steps // 20),
        eval_every=preset.steps, checkpoint_every=max(1, preset.steps // 3), eval_batch=500,
        workers=args.workers, out=str(out), progress=False)


# ------------------------------------------------------------------ the measurement
def layer_responses(source, images: int, data: Optional[str] = None, data_dir=None,
                    batch: int = 250) -> dict:
    """Per 3x3 layer of a trained net (a run folder or released weights; in layer
    order): the std of its response after BN, per channel over images and positions,
    averaged over channels. Test images of `data` (default: the run's dataset)."""
    net = load_trained(source)
    test = subset(net.arrays("test", data, data_dir), images)

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
    def moments(variables, x, labels, mask):
        logits, state = net.apply(variables, x, capture_intermediates=is_3x3_bn,
                                  mutable=["intermediates"])
        w = mask[:, None, None, None]
        names.clear()
        out = [(jnp.sum(mask * (jnp.argmax(logits, -1) != labels)),)]  # then one per layer
        for name, r in walk(state["intermediates"]):
            r = r.astype(jnp.float32)
            names.append(name)
            out.append((jnp.sum(w * r, (0, 1, 2)), jnp.sum(w * r * r, (0, 1, 2)),
                        jnp.sum(w) * r.shape[1] * r.shape[2]))
        return out

    sums = None
    for b in eval_batches(test, batch):
        m = moments(net.variables, b["image"], b["label"], b["mask"].astype(np.float32))
        m = jax.tree.map(lambda v: np.asarray(v, np.float64), m)
        sums = m if sums is None else jax.tree.map(np.add, sums, m)
    (wrong,), *layers = sums
    std = [float(np.mean(np.sqrt(np.maximum(s2 / n - (s / n) ** 2, 0.0)))) for s, s2, n in layers]
    return {"layers": names, "std": std, "images": len(test), "test_error": wrong / len(test)}


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
    order = sorted(nets, key=lambda k: (k.startswith("resnet"), int(k.strip("plainresnet"))))
    for name in order:
        v = nets[name]
        mine = [r for r in records if r["name"] == name]
        lines.append(f"| {name} | {mine[0]['origin']} | {len(v)} | {v.mean():.3f} | "
                     f"{np.median(v):.3f} | {v.max():.3f} | "
                     f"{mean_std([100 * r['test_error'] for r in mine])} | {len(mine)} |")
    return "\n".join(lines + ["", note])


def plot(records: list[dict], path: Path, title: str) -> None:
    """Fig. 7: std per layer in layer order (top) and sorted by magnitude (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = by_net(records)
    depths = sorted({int(k.strip("plainresnet")) for k in nets})
    colours = dict(zip(depths, plt.cm.viridis(np.linspace(0.0, 0.85, len(depths)))))
    fig, axes = plt.subplots(2, 1, figsize=(9, 7))
    for name, v in sorted(nets.items()):
        residual, depth = name.startswith("resnet"), int(name.strip("plainresnet"))
        style = dict(color=colours[depth], linestyle="-" if residual else "--", linewidth=1.5,
                     label=f"{'ResNet' if residual else 'plain'}-{depth}")
        x = np.arange(1, len(v) + 1)
        axes[0].plot(x, v, **style)
        axes[1].plot(x, np.sort(v)[::-1], **style)
    axes[0].set_xlabel("layer index (original)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ the nets
def gather_nets(args, preset_name: str, preset: Preset, out: Path, runs: Path) -> list[dict]:
    """Every net of the preset and seed with where it comes from (`origin`) and its
    run folder or weights file (`source`), trained where needed."""
    wanted = [(f"plain{d}", d, False) for d in preset.plain] + \
             [(f"resnet{d}", d, True) for d in preset.residual]
    if not preset.steps:  # the main experiment's nets, trained there if missing
        main_preset = main_experiment.PRESETS[preset_name]
        main_args = argparse.Namespace(depths=None, seeds=args.seeds, data=args.data,
                                       data_dir=args.data_dir, val=False, dtype="float32",
                                       workers=args.workers, command=args.command)
        guard_out(runs, main_experiment.recipe_for(preset_name, main_preset, main_args))
        origin = (f"the main experiment's `{preset_name}` preset ({main_preset.steps} "
                  f"iterations at batch {main_preset.batch})")
        return [{"name": t["name"], "depth": t["depth"], "residual": t["residual"],
                 "seed": t["seed"], "source": t["run_dir"], "origin": origin}
                for t in main_experiment.sweep(main_args, preset_name, main_preset, runs, wanted)]
    nets, todo = [], []
    for name, depth, residual in wanted:
        weights = released_weights(name) if preset.released and residual else None
        if weights is not None:  # one released net per depth: it stands for every seed
            nets.append({"name": name, "depth": depth, "residual": residual, "seed": 0,
                         "source": str(weights),
                         "origin": f"released weights, trained 200 epochs on the lossless "
                                   f"CIFAR-10 (`{weights.name}`)"})
            continue
        for seed in range(args.seeds):
            cfg = here_config(name, preset, seed, args, out / "nets" / f"{name}-seed{seed}")
            todo.append(cfg)
            nets.append({"name": name, "depth": depth, "residual": residual, "seed": seed,
                         "source": cfg.out,
                         "origin": f"trained here: {preset.steps:,} iterations at batch "
                                   f"{preset.batch}, lr {preset.lr} cosine to 0, crop + mirror"})
    deepest_first = sorted(todo, key=lambda c: -int(c.model.strip("plainresnet")))
    run_all(deepest_first, args.command, processes=args.processes)
    return nets


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.layer_responses",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    p.add_argument("--runs", default=None,
                   help="paper preset: the main experiment's --out (default "
                        "runs/plain_vs_resnet-paper); nets missing there are trained there")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--images", type=int, default=None, help="test images (default per preset)")
    p.add_argument("--out", default=None, help="default runs/layer_responses-<preset>")
    p.add_argument("--data", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--processes", type=int, default=None,
                   help="nets trained at once (default: one per core on a CPU)")
    args = p.parse_args(argv)
    args.command = " ".join(["python -m experiments.layer_responses",
                             *(sys.argv[1:] if argv is None else argv)])
    if args.seeds < 1:
        p.error("--seeds must be at least 1")

    preset_name, why = choose_preset(args.preset)
    print(f"preset {preset_name} ({why})", file=sys.stderr)
    preset = PRESETS[preset_name]
    if args.images:
        preset = dataclasses.replace(preset, images=args.images)
    runs = Path(args.runs or f"runs/plain_vs_resnet-{preset_name}")
    out = Path(args.out or f"runs/layer_responses-{preset_name}")
    data = args.data or preset.data
    try:
        search_dirs(args.data_dir)
        guard_out(out, {"preset": preset_name, **dataclasses.asdict(preset),
                        "seeds": args.seeds, "data": data})
        records = []
        for net in gather_nets(args, preset_name, preset, out, runs):
            records.append({**net, **layer_responses(net["source"], preset.images, data,
                                                     args.data_dir)})
    except (DataError, ConfigMismatch, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    claims = check_claims(records)
    note = (f"Std of each 3x3 layer's response after BN (before ReLU/addition), per channel "
            f"over {preset.images:,} test images of {data} and positions, averaged over "
            f"channels (and seeds). Test error: on the same images, single view. "
            f"Command: `{args.command}`.")
    words = claims_in_words(claims, "Fig. 7's claims, on the mean std over layers:")
    (out / "results.json").write_text(json.dumps({
        "preset": preset_name, "preset_reason": why, "command": args.command,
        "images": preset.images, "versions": versions(), "hardware": hardware(),
        "claims": claims, "nets": records}, indent=1))
    (out / "table.md").write_text(table(records, note) + "\n\n" + words + "\n")
    plot(records, out / "responses.png",
         f"std of 3x3 layer responses, preset {preset_name}, {preset.images:,} test images")
    print(table(records, note))
    print()
    print(words)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'responses.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
