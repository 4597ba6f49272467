"""Why 1x1 convolutions matter: the cost of a 5x5 convolution with and without a 1x1
bottleneck (the arithmetic behind GoogLeNet's "reduce" layers, Szegedy et al. 2014).

Input 28x28x192, output 28x28x32, "same" padding:
  direct       5x5 conv, 192 -> 32 channels           28*28*32 * 5*5*192 = 120,422,400 MACs
  bottleneck   1x1 conv, 192 -> 16, then 5x5, 16 -> 32  2,408,448 + 10,035,200 = 12,443,648

Both counts come from the real flax modules through `cnn_jax.cost`; both are then
jitted and timed on the current backend (median of repeats, compilation excluded),
and the measured speed-up is printed next to the counted one (9.7x).

    python -m experiments.bottleneck_cost [--batch 32] [--repeats 20] [--json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import flax.linen as nn

from cnn_jax import cost

INPUT = (28, 28, 192)


class Direct(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(32, (5, 5), padding="SAME", name="conv5x5")(x))


class WithBottleneck(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (1, 1), name="reduce1x1")(x))
        return nn.relu(nn.Conv(32, (5, 5), padding="SAME", name="conv5x5")(x))


def time_forward(model: nn.Module, batch: int, repeats: int) -> float:
    """Median milliseconds of one jitted forward pass on a random batch."""
    key_x, key_p = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (batch, *INPUT))
    params = model.init(key_p, x[:1])
    fwd = jax.jit(model.apply)
    fwd(params, x).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fwd(params, x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bottleneck_cost")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be positive")

    direct = cost.profile(Direct(), INPUT, name="direct 5x5")
    bottleneck = cost.profile(WithBottleneck(), INPUT, name="1x1 bottleneck + 5x5")
    direct_ms = time_forward(Direct(), args.batch, args.repeats)
    bottleneck_ms = time_forward(WithBottleneck(), args.batch, args.repeats)

    result = {
        "input": list(INPUT),
        "direct_macs": direct.macs,
        "bottleneck_macs": bottleneck.macs,
        "bottleneck_layer_macs": [r.macs for r in bottleneck.layers if r.macs],
        "counted_ratio": direct.macs / bottleneck.macs,
        "direct_ms": direct_ms,
        "bottleneck_ms": bottleneck_ms,
        "measured_speedup": direct_ms / bottleneck_ms,
        "batch": args.batch,
        "repeats": args.repeats,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    print(f"{'':<24} {'MACs per image':>16} {'ms per batch of ' + str(args.batch):>22}")
    print(f"{'direct 5x5':<24} {direct.macs:>16,} {direct_ms:>22.3f}")
    print(f"{'1x1 bottleneck + 5x5':<24} {bottleneck.macs:>16,} {bottleneck_ms:>22.3f}")
    print(f"counted ratio {result['counted_ratio']:.2f}x, measured speed-up "
          f"{result['measured_speedup']:.2f}x on {result['backend']} ({result['device']})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
