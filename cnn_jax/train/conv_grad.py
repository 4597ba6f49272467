"""A faster kernel gradient for convolutions on CPUs (`TrainConfig.conv_grad`).

XLA's CPU backend computes a convolution's kernel gradient (a convolution with the
batch as the contracted dimension) several times slower than its forward pass; with
YNNPACK's convolutions (jaxlib's default) ResNet-20 at batch 128 spent ~2.4 s of a 2.7 s
step there on a 2-core CPU, and with Eigen's (cnn_jax.cpu_kernels) the operands are
transposed around it at high cost (docs/benchmarks.md). The same gradient written as
one matrix product per kernel tap,

    dW[i, j] = x_shifted(i, j)^T  @  dy        ([C_in, N*H*W] @ [N*H*W, C_out])

and accumulated over chunks of 8 images (so each slice and product stays in cache)
runs on XLA's dot kernels instead. The forward pass and the input gradient are
unchanged (XLA's own), so the function is the same; only the kernel gradient's
summation order differs (~1e-7 relative). `conv_grad="auto"` (the default) uses it
where JAX computes on the CPU and XLA's own kernels on GPUs and TPUs.

It is applied inside the train step by a method interceptor on `flax.linen.Conv`, so
models stay as written; grouped, dilated and unusually padded convolutions fall back
to XLA's path.
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding
from jax import lax

from cnn_jax.train.config import CONV_GRADS

CHUNK = 8  # images per accumulated kernel-gradient product
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul_grad(x, w, strides: tuple, padding: tuple):
    """`lax.conv_general_dilated` (NHWC, HWIO) whose kernel gradient is computed by
    matrix products."""
    return _conv(x, w, strides, padding)


def _forward(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _backward(strides, padding, residuals, dy):
    x, w = residuals
    dx = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)[1](dy)[0]  # XLA's own
    return dx, _kernel_grad(x, dy, w.shape, strides, padding).astype(w.dtype)


def _kernel_grad(x, dy, shape, strides, padding, chunk: int = CHUNK):
    """dW[i, j] = sum over images and positions of x_shifted(i, j) (x) dy, accumulated
    over chunks of `chunk` images so that each tap's slice and product stay in cache
    (4x faster than whole-batch products for 32x32x16 layers)."""
    kh, kw, cin, cout = shape
    (s0, s1), (oh, ow) = strides, dy.shape[1:3]
    extra = -x.shape[0] % chunk  # zero images add nothing to the sum
    xs = jnp.pad(x, ((0, extra), (0, 0), (0, 0), (0, 0))).reshape(-1, chunk, *x.shape[1:])
    dys = jnp.pad(dy, ((0, extra), (0, 0), (0, 0), (0, 0))).reshape(-1, chunk * oh * ow, cout)

    def add_chunk(acc, xd):
        xc, dc = xd
        xc = jnp.pad(xc, ((0, 0), padding[0], padding[1], (0, 0)))  # in cache, per chunk
        taps = [jnp.matmul(xc[:, i:i + s0 * (oh - 1) + 1:s0, j:j + s1 * (ow - 1) + 1:s1]
                           .reshape(-1, cin).T, dc, preferred_element_type=jnp.float32)
                for i in range(kh) for j in range(kw)]
        return acc + jnp.stack(taps), None

    acc = jnp.zeros((kh * kw, cin, cout), jnp.float32)  # bfloat16 steps sum in float32 too
    return lax.scan(add_chunk, acc, (xs, dys))[0].reshape(shape)


conv_matmul_grad.defvjp(_forward, _backward)


def _plain_2d(m: nn.Conv, x) -> bool:
    one = lambda v: v is None or v == 1 or tuple(v) == (1, 1)
    pad = canonicalize_padding(m.padding, 2)
    return (type(m) is nn.Conv and x.ndim == 4 and m.feature_group_count == 1
            and one(m.kernel_dilation) and one(m.input_dilation) and m.mask is None
            and m.shared_weights and m.conv_general_dilated is None
            and m.conv_general_dilated_cls is None
            and (pad in ("SAME", "VALID") if isinstance(pad, str)
                 else all(p >= 0 for lo_hi in pad for p in lo_hi)))


def resolve(conv_grad: str) -> str:
    """"auto" -> $CNN_JAX_CONV_GRAD if set (xla | matmul: e.g. to repeat a run recorded
    with the other kernels bit for bit), else "matmul" where JAX computes on the CPU and
    XLA's own kernels elsewhere."""
    if conv_grad != "auto":
        return conv_grad
    chosen = os.environ.get("CNN_JAX_CONV_GRAD", "")
    if chosen:
        if chosen not in CONV_GRADS[1:]:
            raise ValueError(f"CNN_JAX_CONV_GRAD must be xla or matmul; got {chosen!r}")
        return chosen
    return "matmul" if jax.default_backend() == "cpu" else "xla"


def matmul_conv_grads():
    """Context: inside it, plain 2-D `nn.Conv` calls use `conv_matmul_grad`."""
    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, nn.Conv) \
                or m.is_initializing() or not _plain_2d(m, args[0]):
            return next_fun(*args, **kwargs)
        kernel = m.get_variable("params", "kernel")
        bias = m.get_variable("params", "bias") if m.use_bias else None
        x, kernel, bias = promote_dtype(args[0], kernel, bias, dtype=m.dtype)
        strides = (m.strides, m.strides) if isinstance(m.strides, int) else \
            tuple(m.strides or (1, 1))
        padding = canonicalize_padding(m.padding, 2)
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
        y = conv_matmul_grad(x, kernel, strides, tuple(tuple(p) for p in padding))
        return y + bias.reshape(1, 1, 1, -1) if bias is not None else y
    return nn.intercept_methods(intercept)
