"""Why a residual block is easy to add: it can fall back to the identity.

The argument (He et al. 2015, Sec. 3.1; the lecture's "residual blocks learn the
identity easily"). Append a block to a trained network. A residual block computes
a[l+2] = g(z[l+2] + a[l]); if weight decay shrinks its weights, z[l+2] -> 0 and, as
a[l] >= 0 after a ReLU, a[l+2] = g(a[l]) = a[l]: the block becomes the identity and
the network is no worse than before. A plain block has to *learn* the identity
through two convolutions, which is hard, so appending plain layers can hurt.

Method. Take a trained CIFAR-10 net (the main experiment's ResNet-20 by default:
`--base RUN` for any other run of this project), append k freshly initialised basic
blocks at the end of its last stage (64 filters, 8x8), residual (option A) or plain,
and train all of it briefly with weight decay; as a control, train the unchanged net
for the same steps. Report training error (a fixed subset of the training images,
no augmentation) and test error right after appending and after training, and for
each new block: the norm of its two convolution kernels, the mean |gamma| of its
last BN (the residual branch's output scale), and how far it is from the identity,
||a[l+2] - a[l]|| / ||a[l]|| on test images.

`claims` in results.json checks, over the seeds: the grown residual net ends no
worse than the control (within 0.5 points of test error), the grown plain net ends
worse than the grown residual one by more than the seeds' spread, and the residual
blocks end closer to the identity than the plain ones.

Presets: `quick` (a 2-core CPU, about 10 minutes: the base is the released ResNet-20
of ../shared/reference, trained 200 epochs on the lossless CIFAR-10, k = 3, every arm
200 iterations at batch 64 on all training images with crop + mirror, lr 0.01 decayed
by a cosine, 3 seeds; without the released weights, name a base with --base). From a
converged base the plain blocks' harm is small and transient: with 500 iterations per
arm they catch up with the residual ones, and at 200 their deficit (0.2-0.4 points)
is within the seeds' spread, so that claim is not shown on a CPU (docs/results.md).
`paper` (the main experiment's 64k-iteration ResNet-20 as the base, k = 3, 4,000
iterations per arm); `smoke` (seconds); `auto` (paper on a GPU/TPU, quick on a CPU).

Evidence: docs/results.md records the `quick` run.

    python -m experiments.identity_blocks [--preset auto|paper|quick|smoke]
        [--base RUN] [--seeds N [--seeds-together]] [--out DIR] [--data-dir DIR]
        [--set blocks=K steps=N ...]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

from cnn_jax.data.dataset import subset
from cnn_jax.data.keys import IMAGE
from cnn_jax.errors import BadInput
from cnn_jax.experiment import (HE2015, Context, Experiment, Net, Report, claim, figure,
                                he2015_cifar, mean_std, sweep, train_config)
from cnn_jax.models import create_model
from cnn_jax.models.layers import BasicBlock
from cnn_jax.train import TrainConfig
from cnn_jax.train.checkpoint import load_variables
from cnn_jax.train.evaluator import evaluate
from cnn_jax.train.inputs import model_input_shape, split_of, training_split
from cnn_jax.train.state import initial_variables
from cnn_jax.train.sweep import run_all
from cnn_jax.trained import REFERENCE_DIR, Trained, load_trained, released_weights

# ------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class Preset:
    base_depth: int      # the ResNet to grow (when no --base)
    released: bool       # the base: the released weights of resnet<base_depth>, else
                         # trained here with He et al.'s recipe of this preset
    blocks: int          # k blocks appended to the last stage
    seeds: int
    train_images: int    # the fixed training subset the training error is read on
    test_images: int     # 0: all
    # each arm's training fields: its steps, batch, lr, schedule ("constant", or "cosine"
    # from lr to 0) and a weight decay that pulls harder to zero than the paper's 1e-4
    train: dict = dataclasses.field(default_factory=dict)


PRESETS = {
    "paper": Preset(base_depth=20, released=False, blocks=3, seeds=2, train_images=10_000,
                    test_images=0, train=dict(steps=4_000, batch=128, lr=0.01,
                                              schedule="constant", weight_decay=5e-4)),
    "quick": Preset(base_depth=20, released=True, blocks=3, seeds=3, train_images=2_000,
                    test_images=5_000, train=dict(steps=200, batch=64, lr=0.01,
                                                  schedule="cosine", weight_decay=5e-4)),
    "smoke": Preset(base_depth=8, released=False, blocks=1, seeds=1, train_images=64,
                    test_images=64, train=dict(steps=4, batch=16, lr=0.1,
                                               schedule="constant", weight_decay=5e-4)),
}
ARMS = {"control": None, "residual": "A", "plain": None}  # arm -> the new blocks' shortcut


def base_config(base: Trained, data_dir, workers) -> TrainConfig:
    """The recipe the arms continue: the base run's own, or for released weights the
    paper's CIFAR recipe on the data they were trained on, fed as they were fed."""
    if base.config is not None:
        return base.config.replace(data_dir=data_dir or base.config.data.data_dir)
    return TrainConfig(model=base.model_name, model_options=dict(base.options), data="cifar10",
                       data_dir=data_dir, crop_pad=4, flip=True, normalise="source",
                       init_from=base.source, workers=workers)


def arm_config(arm: str, base_cfg: TrainConfig, preset: Preset, seed: int, base: Path,
               out: Path, workers):
    """The base run's recipe continued from its weights, k blocks grown (or not), with
    the preset's training fields."""
    options = dict(base_cfg.model.options)
    if arm != "control":
        options.update(extra_blocks=(0, 0, preset.blocks), extra_shortcut=ARMS[arm])
    steps = preset.train["steps"]
    return train_config(
        preset, base_cfg, model_options=options, init_from=str(base), seed=seed,
        warmup_lr=0.0, eval_subset=preset.test_images, log_every=max(1, steps // 10),
        eval_every=steps, checkpoint_every=max(1, steps // 3), workers=workers,
        out=str(out), progress=False)


# ------------------------------------------------------------------ measurements
class Probe:
    """Errors and appended-block statistics of one trained arm's architecture (compiled
    once, for any variables of it: the arm's own at step 0 and after training)."""

    def __init__(self, net: Trained):
        grown = [i + 1 for i, k in enumerate(net.options.get("extra_blocks", ())) if k]
        stage = f"stage{grown[-1]}" if grown else None
        self.names: list = []  # the last stage's blocks in call order, seen while tracing

        def in_grown_stage(module, method):
            return isinstance(module, BasicBlock) and module.name.startswith(stage)

        def forward(variables, x):
            logits, st = net.apply(variables, x,
                                   capture_intermediates=in_grown_stage if stage else False,
                                   mutable=["intermediates"])
            blocks = st.get("intermediates", {})
            self.names[:] = list(blocks)
            return logits, [v["__call__"][0] for v in blocks.values()]

        self.forward = jax.jit(forward)

    def errors(self, variables: dict, splits: dict, batch: int = 500) -> dict:
        """Single-view error on each named split."""
        scores = lambda x: self.forward(variables, x)[0][None]  # noqa: E731
        return {name: evaluate(scores, split, batch=min(batch, len(split))).metrics[0]["error"]
                for name, split in splits.items()}

    def new_blocks(self, variables: dict, images) -> list[dict]:
        """Per appended block: its conv kernels' norm, the mean |gamma| of its last BN
        and its relative change of the signal ||out - in|| / ||in|| on `images`."""
        _, acts = self.forward(variables, np.asarray(images))
        stats = []
        for i, name in enumerate(self.names):
            if "_extra" not in name:
                continue
            a_in, a_out = np.asarray(acts[i - 1]), np.asarray(acts[i])
            p = variables["params"][name]
            kernels = [p[c]["conv"]["kernel"] for c in ("ConvBN_0", "ConvBN_1")]
            stats.append({
                "block": name,
                "kernel_norm": float(np.sqrt(sum(np.sum(np.square(k)) for k in kernels))),
                "last_bn_gamma": float(np.mean(np.abs(p["ConvBN_1"]["bn"]["scale"]))),
                "change": float(np.linalg.norm(a_out - a_in) / np.linalg.norm(a_in))})
        return stats


# ------------------------------------------------------------------ outputs
def table(rows: list[dict], note: str) -> str:
    lines = ["| arm | when | training error (%) | test error (%) | new blocks: kernel norm |"
             " last-BN mean abs(gamma) | change of the signal |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        for when in ("appended", "trained"):
            rs = [r for r in rows if r["arm"] == arm]
            if not rs:
                continue
            tr = mean_std([100 * r[when]["train_error"] for r in rs])
            te = mean_std([100 * r[when]["test_error"] for r in rs])
            blocks = [b for r in rs for b in r[when]["blocks"]]
            f = lambda key: f"{np.mean([b[key] for b in blocks]):.3f}" if blocks else "-"
            lines.append(f"| {arm} | {when} | {tr} | {te} | {f('kernel_norm')} | "
                         f"{f('last_bn_gamma')} | {f('change')} |")
    return "\n".join(lines + ["", note])


def plot(rows: list[dict], base_errors: dict, path: Path, title: str) -> None:
    """Errors before/after per arm (left); each new block's change of the signal (right)."""
    with figure(path, title, 1, 2, figsize=(12, 4.5)) as (ax, bx):
        arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
        x = np.arange(len(arms))
        for i, (when, split, hatch) in enumerate([("appended", "train_error", ""),
                                                  ("trained", "train_error", ""),
                                                  ("appended", "test_error", "//"),
                                                  ("trained", "test_error", "//")]):
            vals = [100 * np.mean([r[when][split] for r in rows if r["arm"] == a]) for a in arms]
            ax.bar(x + (i - 1.5) * 0.2, vals, 0.2, hatch=hatch, alpha=0.5 if when == "appended" else 1,
                   color="C0" if split == "train_error" else "C1",
                   label=f"{split.split('_')[0]}, {'just appended' if when == 'appended' else 'after training'}")
        ax.axhline(100 * base_errors["test_error"], color="C1", linestyle=":", label="base net, test")
        ax.axhline(100 * base_errors["train_error"], color="C0", linestyle=":", label="base net, train")
        ax.set_xticks(x, arms)
        ax.set_ylabel("error (%)")
        ax.set_ylim(0, 130)  # room for the legend above the bars
        ax.legend(fontsize=7, ncol=3, loc="upper center")
        for arm, colour in (("residual", "C2"), ("plain", "C3")):
            for when, style in (("appended", ":"), ("trained", "-")):
                per_block = [[b["change"] for b in r[when]["blocks"]] for r in rows if r["arm"] == arm]
                if per_block and per_block[0]:
                    v = np.mean(per_block, axis=0)
                    bx.plot(np.arange(1, len(v) + 1), v, style, marker="o", color=colour,
                            label=f"{arm}, {'just appended' if when == 'appended' else 'after training'}")
        bx.set_xticks(np.arange(1, max(len(r["trained"]["blocks"]) for r in rows) + 1))
        bx.set_xlabel("appended block")
        bx.set_ylabel("||a[l+2] - a[l]|| / ||a[l]||")
        bx.set_yscale("log")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)


# ------------------------------------------------------------------ the claims
def check_claims(rows: list[dict]) -> list[dict]:
    """The argument's three consequences, on the trained arms' test errors (in %, mean
    over seeds; a difference counts when it exceeds the seeds' spread) and the new
    blocks' change of the signal."""
    def errors(arm):
        return np.array([100 * r["trained"]["test_error"] for r in rows if r["arm"] == arm])

    def change(arm):
        return float(np.mean([b["change"] for r in rows if r["arm"] == arm
                              for b in r["trained"]["blocks"]]))

    control, residual, plain = errors("control"), errors("residual"), errors("plain")
    seeds = len(control)
    spread = max(float(np.ptp(e)) for e in (residual, plain))  # max - min over seeds
    return [
        claim("residual_no_worse_than_control",
              "appending residual blocks does not hurt: the grown net ends within 0.5 "
              "points of the unchanged net trained as long",
              {"residual (test error %)": round(residual.mean(), 2),
               "control (test error %)": round(control.mean(), 2)},
              "residual <= control + 0.5 points", residual.mean() <= control.mean() + 0.5,
              seeds),
        claim("plain_worse_than_residual",
              "appending plain blocks hurts: worse than appending residual ones, by more "
              "than the seeds' spread",
              {"plain (test error %)": round(plain.mean(), 2),
               "residual (test error %)": round(residual.mean(), 2),
               "seeds' spread (points)": round(spread, 2)},
              "plain - residual > spread", plain.mean() - residual.mean() > spread, seeds),
        claim("residual_blocks_closer_to_identity",
              "after training, the residual blocks change the signal less than the plain "
              "ones (||a[l+2] - a[l]|| / ||a[l]||)",
              {"residual": round(change("residual"), 3), "plain": round(change("plain"), 3)},
              "residual < plain", change("residual") < change("plain"), seeds),
    ]


# ------------------------------------------------------------------ main
def find_base(ctx: Context) -> Path:
    """--base, else the released weights (quick), else the ResNet of He et al.'s recipe
    at this preset (trained once, into out/base/)."""
    args, preset = ctx.args, ctx.preset
    if args.base:
        return Path(args.base)
    net = Net("resnet", preset.base_depth)
    if preset.released:
        weights = released_weights(net.name)
        if weights is None:
            raise BadInput(f"the {ctx.preset_name} preset grows the released {net.name}, "
                           f"which is not on this machine (looked in $CNN_JAX_REFERENCE_DIR "
                           f"and {REFERENCE_DIR}); pass --base RUN, a trained CIFAR ResNet run")
        return weights
    train = {**HE2015[ctx.preset_name], **ctx.training_overrides}
    [(_, _, cfg, _)] = sweep([net], lambda n, seed, folder: he2015_cifar(
        n, train, seed, folder, data=args.data or "cifar10", data_dir=args.data_dir,
        workers=args.workers), 1, ctx.out / "base", ctx.command, processes=args.processes)
    return Path(cfg.run.out)


# ------------------------------------------------------------------ the method
def run(ctx: Context) -> Report:
    args, preset, seeds = ctx.args, ctx.preset, ctx.seeds
    base = find_base(ctx)
    base_net = load_trained(base)
    if not base_net.model_name.startswith(("resnet", "plain", "cifar_")) or base_net.resize \
            or base_net.image_shape[:2] != (32, 32):
        raise BadInput(f"--base {base}: expected a CIFAR resnetN/plainN run, got "
                       f"{base_net.model_name!r}")
    base_cfg = base_config(base_net, args.data_dir, args.workers)
    data_dir = base_cfg.data.data_dir
    splits = {
        "train_error": subset(training_split(base_cfg, data_dir), preset.train_images),
        "test_error": subset(split_of(base_cfg, "test", data_dir), preset.test_images)}
    images = splits["test_error"].eval_batch(np.arange(min(500, len(splits["test_error"]))))[IMAGE]
    jobs = [(arm, seed) for seed in range(seeds) for arm in ARMS]
    configs = [arm_config(arm, base_cfg, preset, seed, base,
                          ctx.out / "arms" / f"{arm}-seed{seed}", args.workers)
               for arm, seed in jobs]
    appended = [appended_variables(cfg, base_net, base, splits["test_error"]) for cfg in configs]
    trained = run_all(configs, ctx.command, [f"{a} seed {s}" for a, s in jobs],
                      together=args.seeds_together, processes=args.processes)
    probes = {arm: Probe(load_trained(configs[jobs.index((arm, 0))].run.out)) for arm in ARMS}
    base_errors = probes["control"].errors(base_net.variables, splits)
    rows = []
    for (arm, seed), cfg, v0, res in zip(jobs, configs, appended, trained):
        v1 = load_variables(Path(cfg.run.out))
        rows.append({"arm": arm, "seed": seed, "run_dir": cfg.run.out,
                     "params": res["params"], "wall_s": res["wall_s"], **{
                         when: {**probes[arm].errors(v, splits),
                                "blocks": probes[arm].new_blocks(v, images)}
                         for when, v in (("appended", v0), ("trained", v1))}})
    origin = ("released weights, trained 200 epochs on the lossless CIFAR-10"
              if base_net.config is None else "a run of this project")
    arm = configs[0]  # every arm's recipe
    note = (f"Base: `{base}` ({base_net.model_name}, {origin}; on these images training "
            f"error {100 * base_errors['train_error']:.2f} %, test error "
            f"{100 * base_errors['test_error']:.2f} %). {preset.blocks} blocks appended to the "
            f"last stage; every arm trained {arm.schedule.steps} iterations at batch {arm.optimiser.batch}, "
            f"lr {arm.schedule.lr} ({arm.schedule.kind}), weight decay {arm.optimiser.weight_decay}, crop + "
            f"mirror, seeds 0..{seeds - 1}. Training error on a fixed "
            f"{len(splits['train_error']):,}-image training subset (no augmentation), test "
            f"error on {len(splits['test_error']):,} test images. Command: `{ctx.command}`.")
    return Report(
        results={"base": str(base), "base_errors": base_errors, "arms": rows},
        table=table(rows, note), claims=check_claims(rows),
        heading="The identity argument's claims (mean over seeds):",
        plot=lambda path: plot(rows, base_errors, path,
                               f"{preset.blocks} blocks appended to {base_net.model_name}: "
                               f"residual vs plain, preset {ctx.preset_name}, {seeds} seed(s)"))


def appended_variables(cfg: TrainConfig, base_net: Trained, base: Path, test) -> dict:
    """An arm's variables at step 0, as its training starts: the base net's, with fresh
    blocks where it grows (the control: the base net itself)."""
    if not cfg.model.options.get("extra_blocks"):
        return base_net.variables
    model = create_model(cfg.model.name, num_classes=base_net.num_classes, **cfg.model.options)
    shape = model_input_shape(test.image_shape, cfg.data.resize)
    return initial_variables(model, cfg.run.seed, shape, base_net.variables, str(base))


def add_arguments(p) -> None:
    p.add_argument("--base", default=None, help="a trained CIFAR resnet/plain run's --out or "
                   "weights file (default: per preset)")


def recipe(ctx: Context) -> dict:
    return ctx.recipe(base=ctx.args.base, data=ctx.args.data)


EXPERIMENT = Experiment("identity_blocks", __doc__, PRESETS, run, figure="identity_blocks.png",
                        add_arguments=add_arguments, recipe=recipe)
main = EXPERIMENT.main

if __name__ == "__main__":
    sys.exit(main())
