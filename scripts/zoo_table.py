"""Print the zoo as a markdown table: parameters and multiply-accumulates of every
registered model at its paper's input size, traced through `cnn_jax.cost`.

    python scripts/zoo_table.py [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

from cnn_jax import cost
from cnn_jax.models import available, create_model, input_shape

EXTRA = [("alexnet", {"groups": 2}), ("googlenet", {"aux_logits": False}),
         ("vgg16", {"batch_norm": True}), ("resnet20", {"shortcut": "B"}),
         ("resnet50", {"stride_in_1x1": True})]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    p.add_argument("--skip", nargs="*", default=["resnet1202"],
                   help="names to leave out (resnet1202 takes a minute to trace)")
    args = p.parse_args(argv)
    rows = []
    for name, options in [(n, {}) for n in available() if n not in args.skip] + EXTRA:
        c = cost.profile(create_model(name, **options), input_shape(name), name=name)
        rows.append({"model": name, "options": options,
                     "input": "x".join(map(str, input_shape(name))),
                     "params": c.params, "inference_params": c.inference_params,
                     "macs": c.macs})
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| model | options | input | params | MACs |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"| `{r['model']}` | {opts} | {r['input']} | {r['params']:,} | {r['macs']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
