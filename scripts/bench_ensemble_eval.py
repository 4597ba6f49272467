"""Ensemble evaluation: M networks of one architecture on one batch, three ways, in
one run: `vmap` over the stacked parameters (XLA turns each convolution into an
M-group convolution), `lax.map` over them (M ordinary convolutions inside one
compiled call; what `cnn_jax.evaluate` uses) and M separate jitted calls.

    python scripts/bench_ensemble_eval.py [--model resnet20] [--models 5] [--batch 250]
        [--repeats 5] [--json]

Prints forward passes per second (images x models / s) for each, median of repeats
after a compile-and-warm-up call, on random data resident on the device.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from cnn_jax.models import create_model, input_shape
    from cnn_jax.provenance import cpu_name

    model = create_model(args.model)
    shape = input_shape(args.model)
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape))))
    members = [init(jax.random.key(i)) for i in range(args.models)]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *members)
    images = jax.device_put(np.random.default_rng(0).normal(
        size=(args.batch, *shape)).astype(np.float32))

    def one(variables, x):
        return jax.nn.softmax(model.apply(variables, x, train=False))

    vmapped = jax.jit(jax.vmap(one, in_axes=(0, None)))
    mapped = jax.jit(lambda s, x: jax.lax.map(lambda v: one(v, x), s))
    single = jax.jit(one)
    ways = {"vmap": lambda: vmapped(stacked, images),
            "lax_map": lambda: mapped(stacked, images),
            "separate_calls": lambda: [single(m, images) for m in members]}

    rates, outputs = {}, {}
    for name, run in ways.items():
        outputs[name] = np.asarray(jnp.stack(run()) if name == "separate_calls" else run())
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - t)
        rates[name] = args.batch * args.models / statistics.median(times)
        print(f"{name:>15}: {rates[name]:10,.0f} forward passes/s", file=sys.stderr)
    agree = max(float(np.abs(outputs[k] - outputs["separate_calls"]).max()) for k in outputs)
    result = {"model": args.model, "models": args.models, "batch": args.batch,
              "forward_passes_per_s": rates, "lax_map_over_vmap": rates["lax_map"] / rates["vmap"],
              "max_abs_difference": agree, "backend": jax.default_backend(),
              "device": cpu_name() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind,
              "jax": jax.__version__, "python": platform.python_version()}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
