"""One convolution layer at a time, ours against PyTorch, side by side in one run.

For each CIFAR ResNet layer shape (3x3, stride 1, "SAME": 32x32x16, 16x16x32, 8x8x64
at the batch given), float32: the forward pass, the input gradient and the kernel
gradient as the train step computes them (XLA's convolutions; the kernel gradient both
as XLA's own and as `cnn_jax.train.conv_grad`'s chunked products), each jitted alone
on random inputs; with torch installed, `torch.nn.functional.conv2d` and
`aten.convolution_backward` on the same inputs (channels_last, as many threads as
JAX's CPU). Median of `--repeats` calls after one warm-up. It splits the step's gap
to PyTorch into the kernels' own share (docs/benchmarks.md, CPU steps 11-13).

    python scripts/bench_conv_layers.py --batch 128 --json

The last line is one JSON object: `layers` (per shape: ms for each variant),
`hardware`, `versions` (XLA_FLAGS included: they choose the CPU convolution library).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from cnn_jax.train.loop import hardware, versions  # importing cnn_jax picks the CPU convolutions

SHAPES = ((32, 16), (16, 32), (8, 64))  # (height = width, channels) of ResNet's stages


def median_ms(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ours(x, dy, w, repeats: int) -> dict:
    import jax
    from cnn_jax.train import conv_grad

    pads, shape = ((1, 1), (1, 1)), tuple(w.shape)
    conv = lambda x, w: conv_grad._conv(x, w, (1, 1), pads)
    xla_dw = lambda x, dy: jax.linear_transpose(
        lambda w: conv(x, w), jax.ShapeDtypeStruct(shape, x.dtype))(dy)[0]
    fns = {"forward": (conv, (x, w)),
           "input_grad": (lambda dy, w: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0], (dy, w)),
           "kernel_grad_xla": (xla_dw, (x, dy)),
           "kernel_grad_chunks": (lambda x, dy: conv_grad._kernel_grad(
               x, dy, shape, (1, 1), pads), (x, dy))}
    out = {}
    for name, (f, args) in fns.items():
        f = jax.jit(f)
        out[name] = median_ms(lambda: jax.block_until_ready(f(*args)), repeats)
    return out


def torch_reference(x, dy, w, repeats: int) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    xt, dyt = nchw(x), nchw(dy)
    wt = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous()
    backward = lambda mask: torch.ops.aten.convolution_backward(
        dyt, xt, wt, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, mask)
    with torch.no_grad():
        return {"forward": median_ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1),
                                     repeats),
                "input_grad": median_ms(lambda: backward((True, False, False)), repeats),
                "kernel_grad": median_ms(lambda: backward((False, True, False)), repeats)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--reference", choices=["none", "torch"], default="torch",
                   help="torch: also time PyTorch's kernels when it is installed")
    p.add_argument("--json", action="store_true", help="only the JSON line")
    a = p.parse_args(argv)

    import jax
    layers = []
    for size, channels in SHAPES:
        kx, kdy, kw = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (a.batch, size, size, channels))
        dy = jax.random.normal(kdy, (a.batch, size, size, channels))
        w = jax.random.normal(kw, (3, 3, channels, channels)) * 0.1
        row = {"layer": f"{size}x{size}x{channels}", "batch": a.batch,
               "ours": ours(x, dy, w, a.repeats), "torch": None}
        if a.reference == "torch":
            try:
                row["torch"] = torch_reference(x, dy, w, a.repeats)
            except ImportError:
                pass
        layers.append(row)
        if not a.json:
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"layers": layers, "backend": jax.default_backend(),
                      "hardware": hardware(), "versions": versions(),
                      "command": "python scripts/bench_conv_layers.py " +
                                 " ".join(sys.argv[1:] if argv is None else argv)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
