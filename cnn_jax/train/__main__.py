"""python -m cnn_jax.train --model NAME --data DATASET --steps N --batch B --seed S
                           --out DIR [--checkpoint-every K] [...]

Trains any registry model on any dataset source with the standard outputs in --out:
config.json, metrics.jsonl, results.json (with `final_params_digest`) and orbax
checkpoints. Re-running the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

from cnn_jax.accelerator import warn_if_unused
from cnn_jax.errors import BadInput, exit_on_bad_input
from cnn_jax.train import distributed
from cnn_jax.train.config import RENAMED, TrainConfig
from cnn_jax.train.loop import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cnn_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    old_names = {new: old for old, new in RENAMED.items()}
    for f in dataclasses.fields(TrainConfig):
        # a renamed field keeps its old flag as an alias (--conv-grad for --conv-kernels)
        flags = ["--" + name.replace("_", "-") for name in (f.name, old_names.get(f.name))
                 if name]
        default = getattr(defaults, f.name)
        if f.name == "model_options":
            p.add_argument("--option", dest="model_options", action="append", default=[],
                           metavar="KEY=VALUE", help="model option, e.g. --option shortcut=B")
        elif isinstance(default, bool):
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "milestones":
            p.add_argument(*flags, type=int, nargs="+", default=list(default))
        elif default is None:
            p.add_argument(*flags, type=int if f.name == "workers" else str, default=None)
        else:
            p.add_argument(*flags, type=type(default), default=default,
                           help=f"default {default}")
    distributed.add_arguments(p)
    return p


def parse_options(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInput(f"--option must be KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


@exit_on_bad_input
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    distributed.initialize(args)
    warn_if_unused()  # a GPU or TPU beside a CPU-only jax: say so before training
    values = {k: v for k, v in vars(args).items() if k not in distributed.FLAGS}
    values["model_options"] = parse_options(values["model_options"])
    values["milestones"] = tuple(values["milestones"])
    cfg = TrainConfig(**values)
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
