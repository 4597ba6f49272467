"""One convolution layer at a time, ours against PyTorch, side by side in one run.

For each CIFAR ResNet layer shape (3x3, stride 1, "SAME": 32x32x16, 16x16x32, 8x8x64
at the batch given), float32 or bfloat16: the forward pass, the input gradient and
the kernel gradient: XLA's convolutions (the kernel gradient both as XLA's own and as
`cnn_jax.train.conv_kernels`' chunked products) and, where it can run, oneDNN's
(`cnn_jax.onednn`), each jitted alone on random inputs; with torch installed,
`torch.nn.functional.conv2d` and `aten.convolution_backward` on the same inputs
(channels_last, as many threads as JAX's CPU). Median of `--repeats` calls after one
warm-up. It splits the step's gap to PyTorch into the kernels' own share
(docs/benchmarks.md, CPU steps 11-17).

With `--winograd`, also the same layer as a Winograd convolution written in XLA ops
(F(2x2, 3x3) and F(4x4, 3x3), Lavin & Gray 2016: 2.25x and 4x fewer products, paid
for with input and output transforms): its forward pass, its input and kernel
gradients together (one VJP), and its largest error relative to XLA's convolution
(CPU step 14; not used by the train step).

    python scripts/bench_conv_layers.py --batch 128 --json

The last line is one JSON object: `layers` (per shape: ms for each variant; with
`--winograd`, also `winograd` per tile size: ms and the largest relative error),
`hardware`, `versions` (XLA_FLAGS included: they choose the CPU convolution library).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from cnn_jax.provenance import hardware, versions  # importing cnn_jax picks the CPU convolutions

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
    from cnn_jax import onednn
    from cnn_jax.train import conv_kernels

    pads, shape = ((1, 1), (1, 1)), tuple(w.shape)

    def three_passes(conv):  # forward pass, input gradient, kernel gradient: (fn, args)
        return {"forward": (conv, (x, w)),
                "input_grad": (lambda dy, w: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0],
                               (dy, w)),
                "kernel_grad": (lambda x, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0],
                                (x, dy))}

    xla = three_passes(lambda x, w: conv_kernels._conv(x, w, (1, 1), pads))
    fns = {"forward": xla["forward"], "input_grad": xla["input_grad"],
           "kernel_grad_xla": xla["kernel_grad"],
           "kernel_grad_chunks": (lambda x, dy: conv_kernels._kernel_grad(
               x, dy, shape, (1, 1), pads), (x, dy))}
    if onednn.available(x.dtype):  # the same three on oneDNN (CPU step 17)
        one = three_passes(lambda x, w: onednn.conv2d(x, w, (1, 1), pads))
        fns.update({f"onednn_{k}": v for k, v in one.items()})
    out = {}
    for name, (f, args) in fns.items():
        f = jax.jit(f)
        out[name] = median_ms(lambda: jax.block_until_ready(f(*args)), repeats)
    return out


# Winograd F(m x m, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A on (m+2)x(m+2) input tiles.
WINOGRAD = {
    2: dict(BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
            G=[[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
            AT=[[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: dict(BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
            G=[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
            AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]]),
}


def _combine(parts, matrix):
    """matrix @ parts for a small constant matrix, as sums XLA fuses (no dot)."""
    return [sum(c * p for c, p in zip(row, parts) if c) for row in matrix]


def winograd_conv(x, w, m: int):
    """3x3, stride 1, "SAME" convolution (NHWC, HWIO; H and W divisible by m) as
    (m+2)^2 matrix products [tiles, C_in] @ [C_in, C_out] between transforms."""
    import jax.numpy as jnp
    BT, G, AT = (WINOGRAD[m][k] for k in ("BT", "G", "AT"))
    a, (n, h, wd, cin), cout = m + 2, x.shape, w.shape[-1]
    th, tw = h // m, wd // m
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = _combine([xp[:, k:k + m * (th - 1) + 1:m] for k in range(a)], BT)
    v = [t for r in rows
         for t in _combine([r[:, :, k:k + m * (tw - 1) + 1:m] for k in range(a)], BT)]
    v = jnp.stack(v).reshape(a * a, n * th * tw, cin)
    g = jnp.asarray(G, w.dtype)
    u = jnp.einsum("ik,klcd,jl->ijcd", g, w, g).reshape(a * a, cin, cout)
    prod = jnp.matmul(v, u).reshape(a, a, n, th, tw, cout)
    y = jnp.stack([jnp.stack(_combine(list(r), AT)) for r in _combine(list(prod), AT)])
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, h, wd, cout)  # [m, m, n, th, tw] -> NHWC


def winograd(x, dy, w, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    from cnn_jax.train import conv_kernels

    reference = conv_kernels._conv(x, w, (1, 1), ((1, 1), (1, 1)))
    out = {}
    for m in WINOGRAD:
        conv = jax.jit(lambda x, w, m=m: winograd_conv(x, w, m))
        grads = jax.jit(lambda x, w, dy, m=m: jax.vjp(
            lambda x_, w_: winograd_conv(x_, w_, m), x, w)[1](dy))
        y = conv(x, w)
        out[f"f{m}"] = {
            "forward": median_ms(lambda: jax.block_until_ready(conv(x, w)), repeats),
            "input_and_kernel_grad": median_ms(
                lambda: jax.block_until_ready(grads(x, w, dy)), repeats),
            "max_rel_error": float(jnp.abs(y - reference).max() / jnp.abs(reference).max())}
    return out


def torch_reference(x, dy, w, repeats: int) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    dtype = getattr(torch, str(x.dtype))
    tensor = lambda a: torch.from_numpy(np.array(a, np.float32)).to(dtype)
    nchw = lambda a: tensor(a).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    xt, dyt = nchw(x), nchw(dy)
    wt = tensor(w).permute(3, 2, 0, 1).contiguous()
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
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--reference", choices=["none", "torch"], default="torch",
                   help="torch: also time PyTorch's kernels when it is installed")
    p.add_argument("--winograd", action="store_true",
                   help="also time Winograd F(2x2,3x3) and F(4x4,3x3) in XLA ops")
    p.add_argument("--json", action="store_true", help="only the JSON line")
    a = p.parse_args(argv)

    import jax
    layers = []
    for size, channels in SHAPES:
        kx, kdy, kw = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (a.batch, size, size, channels), a.dtype)
        dy = jax.random.normal(kdy, (a.batch, size, size, channels), a.dtype)
        w = (jax.random.normal(kw, (3, 3, channels, channels)) * 0.1).astype(a.dtype)
        row = {"layer": f"{size}x{size}x{channels}", "batch": a.batch, "dtype": a.dtype,
               "ours": ours(x, dy, w, a.repeats), "torch": None}
        if a.winograd:
            row["winograd"] = winograd(x, dy, w, a.repeats)
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
