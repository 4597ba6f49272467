"""python -m cnn_jax.train --model NAME --data DATASET --steps N --batch B --seed S
                           --out DIR [--checkpoint-every K] [...] [--set SECTION.FIELD=VALUE ...]

Trains any registry model on any dataset source with the standard outputs in --out:
config.json, metrics.jsonl, results.json (with `final_params_digest`) and orbax
checkpoints. Re-running the same command resumes from the last checkpoint.

Every option is a field of the recipe (cnn_jax.train.config), listed below by section
with what it does: data, model, optimiser, schedule, evaluation, run. `--set
section.field=value` (or its flat name: `--set lr=0.05`) sets any of them too.
"""
from __future__ import annotations

import argparse
import sys

from cnn_jax.accelerator import warn_if_unused
from cnn_jax.errors import BadInput, exit_on_bad_input
from cnn_jax.recipe import add_arguments, default_of, flat_name, literal, parse_value
from cnn_jax.train import distributed
from cnn_jax.train.config import RENAMED, SECTIONS, TrainConfig, locate
from cnn_jax.train.loop import train

MULTI = {"model_options": "--option", "optimizer_options": "--optimizer-option"}


def build_parser() -> argparse.ArgumentParser:
    """One option per field of the recipe, its help from the field's declaration."""
    p = argparse.ArgumentParser(prog="python -m cnn_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    aliases = {new: old for old, new in RENAMED.items()}   # --conv-grad for --conv-kernels
    for section, kind in SECTIONS.items():
        add_arguments(p.add_argument_group(section), kind, MULTI, aliases, f"{section}.")
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="set any field by section.field or flat name, e.g. --set "
                        "schedule.lr=0.05 optimiser.name=adamw")
    distributed.add_arguments(p)
    return p


def parse_options(items, flag: str = "--option") -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInput(f"{flag} must be KEY=VALUE, got {item!r}")
        out[key] = literal(value)
    return out


def parse_set(items) -> dict:
    """--set KEY=VALUE ...: each value read as its field's own type."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise BadInput(f"--set {item!r}: expected KEY=VALUE")
        _, f = locate(key)
        try:
            out[flat_name(f)] = parse_value(text, default_of(f))
        except ValueError:
            raise BadInput(f"--set {item!r}: {text!r} is not a "
                           f"{type(default_of(f)).__name__}") from None
    return out


def config_of(args: argparse.Namespace) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k not in distributed.FLAGS + ("set",)}
    for name, flag in MULTI.items():
        values[name] = parse_options(values[name], flag)
    return TrainConfig(**{**values, **parse_set(args.set)})


@exit_on_bad_input
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    distributed.initialize(args)
    warn_if_unused()  # a GPU or TPU beside a CPU-only jax: say so before training
    cfg = config_of(args)
    results = train(cfg, command="python -m cnn_jax.train " + " ".join(
        sys.argv[1:] if argv is None else argv))
    split = results["eval_split"]
    print(f"done: {results['steps']} steps, train error {results['final_train_error']:.4f}, "
          f"{split} error {results[f'final_{split}_error']:.4f} on {results['eval_data']}, "
          f"digest {results['final_params_digest'][:16]}"
          + (f", {results['skipped_images']} unreadable file(s) left out"
             if results.get("skipped_images") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
