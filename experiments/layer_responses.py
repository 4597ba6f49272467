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
Plotted in layer order and sorted by magnitude, one line per net.

The nets are the main experiment's (`python -m experiments.plain_vs_resnet`): read
from its output folder (`--runs`, default `runs/plain_vs_resnet-<preset>`), and the
missing ones trained there with its recipe, so `make run` followed by this reuses
those checkpoints. Presets: `paper` (plain-20/56, ResNet-20/56/110, all 10,000 test
images), `quick` (20 and 56 at the main experiment's CPU-sized recipe, 1,000 test
images; about 9 minutes on a 2-core CPU if nothing is trained yet, seconds if `make
run` ran), `smoke` (seconds, for tests), `auto`.

Evidence: docs/results.md records the `quick` run and says whether it shows the claim.

    python -m experiments.layer_responses [--preset auto|paper|quick|smoke]
        [--runs DIR] [--seeds N] [--images N] [--out DIR] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments import plain_vs_resnet as main_experiment

# ------------------------------------------------------------------ configuration
# depths of the nets in Fig. 7 (plain-110 is not in it: it "fails to converge")
DEPTHS = {"paper": {"plain": (20, 56), "resnet": (20, 56, 110)},
          "quick": {"plain": (20, 56), "resnet": (20, 56)},
          "smoke": {"plain": (8,), "resnet": (8, 14)}}
TEST_IMAGES = {"paper": 10_000, "quick": 1_000, "smoke": 64}


# ------------------------------------------------------------------ the measurement
def layer_responses(run_dir: Path, images: int, data_dir=None, batch: int = 250) -> dict:
    """Per 3x3 layer of a trained net (in layer order): the std of its response after
    BN, per channel over images and positions, averaged over channels."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from cnn_jax import data as data_lib
    from cnn_jax.data.pipeline import eval_batches
    from cnn_jax.evaluate import load_member
    from cnn_jax.models import create_model
    from cnn_jax.models.layers import ConvBN
    from cnn_jax.train.inputs import make_input_fn, make_normaliser, subset, training_arrays

    member = load_member(run_dir)
    cfg = member.config
    train = training_arrays(cfg, data_dir)
    to_input = make_input_fn(make_normaliser(cfg.normalise, train.images), cfg.resize)
    model = create_model(cfg.model, num_classes=len(train.classes), **cfg.model_options)
    test = subset(data_lib.load(cfg.data, "test", data_dir=data_dir or cfg.data_dir), images)

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
        _, state = model.apply(variables, to_input(x), train=False,
                               capture_intermediates=is_3x3_bn, mutable=["intermediates"])
        w = mask[:, None, None, None]
        names.clear()
        out = []
        for name, r in walk(state["intermediates"]):
            r = r.astype(jnp.float32)
            names.append(name)
            out.append((jnp.sum(w * r, (0, 1, 2)), jnp.sum(w * r * r, (0, 1, 2)),
                        jnp.sum(w) * r.shape[1] * r.shape[2]))
        return out

    variables = {k: v for k, v in member.variables.items() if v}
    sums = None
    for b in eval_batches(test, batch):
        m = moments(variables, b["image"], b["mask"].astype(np.float32))
        m = jax.tree.map(lambda v: np.asarray(v, np.float64), m)
        sums = m if sums is None else jax.tree.map(np.add, sums, m)
    std = [float(np.mean(np.sqrt(np.maximum(s2 / n - (s / n) ** 2, 0.0)))) for s, s2, n in sums]
    return {"layers": names, "std": std, "images": len(test)}


# ------------------------------------------------------------------ outputs
def by_net(records: list[dict]) -> dict:
    """name -> std per layer averaged over seeds."""
    nets: dict = {}
    for r in records:
        nets.setdefault(r["name"], []).append(r["std"])
    return {k: np.mean(v, axis=0) for k, v in nets.items()}


def claims(records: list[dict]) -> dict:
    """The paper's two findings, on the mean std over layers."""
    mean = {k: float(np.mean(v)) for k, v in by_net(records).items()}
    plain = sorted(int(k[5:]) for k in mean if k.startswith("plain"))
    res = sorted(int(k[6:]) for k in mean if k.startswith("resnet"))
    out: dict = {"mean_std": mean}
    pairs = {d: mean[f"resnet{d}"] < mean[f"plain{d}"] for d in plain if d in res}
    if pairs:
        out["residual_smaller_than_plain"] = all(pairs.values())
        out["residual_smaller_than_plain_by_depth"] = pairs
    if len(res) >= 2:
        means = [mean[f"resnet{d}"] for d in res]
        out["deeper_resnet_smaller"] = bool(all(a > b for a, b in zip(means, means[1:])))
    return out


def table(records: list[dict], summary: dict, note: str) -> str:
    lines = ["| net | 3x3 layers | mean std | median | max | seeds |",
             "|---|---:|---:|---:|---:|---:|"]
    nets = by_net(records)
    order = sorted(nets, key=lambda k: (k.startswith("resnet"), int(k.strip("plainresnet"))))
    for name in order:
        v = nets[name]
        seeds = sum(r["name"] == name for r in records)
        lines.append(f"| {name} | {len(v)} | {v.mean():.3f} | {np.median(v):.3f} | "
                     f"{v.max():.3f} | {seeds} |")
    lines.append("")
    for claim in ("residual_smaller_than_plain", "deeper_resnet_smaller"):
        if claim in summary:
            lines.append(f"- {claim.replace('_', ' ')}: {'yes' if summary[claim] else 'NO'}")
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


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    from cnn_jax.train.sweep import choose_preset, guard_out

    p = argparse.ArgumentParser(prog="python -m experiments.layer_responses",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *DEPTHS], default="auto")
    p.add_argument("--runs", default=None,
                   help="the main experiment's --out (default runs/plain_vs_resnet-<preset>); "
                        "nets missing there are trained there")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--images", type=int, default=None, help="test images (default per preset)")
    p.add_argument("--out", default=None, help="default runs/layer_responses-<preset>")
    p.add_argument("--data", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    args.command = " ".join(["python -m experiments.layer_responses",
                             *(sys.argv[1:] if argv is None else argv)])
    if args.seeds < 1:
        p.error("--seeds must be at least 1")

    preset_name, why = choose_preset(args.preset)
    print(f"preset {preset_name} ({why})", file=sys.stderr)
    preset = main_experiment.PRESETS[preset_name]
    runs = Path(args.runs or f"runs/plain_vs_resnet-{preset_name}")
    out = Path(args.out or f"runs/layer_responses-{preset_name}")
    images = args.images or TEST_IMAGES[preset_name]
    # the main experiment's own arguments, for its sweep
    main_args = argparse.Namespace(depths=None, seeds=args.seeds, data=args.data,
                                   data_dir=args.data_dir, val=False, dtype="float32",
                                   workers=args.workers, command=args.command)
    depths = DEPTHS[preset_name]
    nets = ([(f"plain{d}", d, False) for d in depths["plain"]] +
            [(f"resnet{d}", d, True) for d in depths["resnet"]])
    from cnn_jax.data import DataError
    from cnn_jax.train.loop import ConfigMismatch
    try:
        guard_out(runs, main_experiment.recipe_for(preset_name, preset, main_args))
        guard_out(out, {"preset": preset_name, "runs": str(runs), "images": images,
                        "seeds": args.seeds, "data": args.data or preset.data})
        trained = main_experiment.sweep(main_args, preset_name, preset, runs, nets)
        records = []
        for t in trained:
            r = layer_responses(Path(t["run_dir"]), images, args.data_dir)
            records.append({"name": t["name"], "depth": t["depth"], "residual": t["residual"],
                            "seed": t["seed"], "final_test_error": t["final_test_error"],
                            "run_dir": t["run_dir"], **r})
    except (DataError, ConfigMismatch, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    summary = claims(records)
    note = (f"Std of each 3x3 layer's response after BN (before ReLU/addition), per channel "
            f"over {images} test images and positions, averaged over channels and seeds. "
            f"Nets: `{runs}` (main experiment preset `{preset_name}`: {preset.steps} "
            f"iterations at batch {preset.batch}). Command: `{args.command}`.")
    from cnn_jax.train.loop import hardware, versions
    (out / "results.json").write_text(json.dumps({
        "preset": preset_name, "preset_reason": why, "command": args.command,
        "runs_dir": str(runs), "images": images, "versions": versions(),
        "hardware": hardware(), "claims": summary, "nets": records}, indent=1))
    (out / "table.md").write_text(table(records, summary, note) + "\n")
    plot(records, out / "responses.png",
         f"std of 3x3 layer responses, preset {preset_name}, {images} test images")
    print(table(records, summary, note))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'responses.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
