"""`python -m cnn_jax.summary MODEL [--input HxWxC] [--json] [--option key=value ...]`

Per-layer output shape, parameters and multiply-accumulates of a registered model,
traced from the module itself (see `cnn_jax.cost`).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys

from cnn_jax import cost
from cnn_jax.errors import exit_on_bad_input
from cnn_jax.models import available, create_model, input_shape


def parse_input(text: str) -> tuple:
    try:
        dims = tuple(int(t) for t in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"--input must look like HxWxC with positive integers (e.g. 32x32x3); got {text!r}")
    return dims


def parse_option(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option must be key=value; got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


@exit_on_bad_input
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn_jax.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="one of: " + ", ".join(available()))
    p.add_argument("--input", type=parse_input, default=None,
                   help="HxWxC (default: the paper's input size for the model)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--option", type=parse_option, action="append", default=[],
                   help="model option, e.g. --option groups=2 --option batch_norm=True")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    model = create_model(args.model, num_classes=args.num_classes, **dict(args.option))
    shape = args.input or input_shape(args.model)
    result = cost.profile(model, shape, name=args.model)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(cost.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
