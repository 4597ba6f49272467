"""The kernels a step's convolutions and their gradients run on (`TrainConfig.conv_kernels`):
the same function, computed faster than XLA's own on CPUs.

XLA's CPU backend computes a convolution's kernel gradient (a convolution with the
batch as the contracted dimension) several times slower than its forward pass; with
YNNPACK's convolutions (jaxlib's default) ResNet-20 at batch 128 spent ~2.4 s of a 2.7 s
step there on a 2-core CPU, and with Eigen's (cnn_jax.cpu_kernels) the operands are
transposed around it at high cost (docs/benchmarks.md). The same gradient written as
one matrix product per kernel tap,

    dW[i, j] = x_shifted(i, j)^T  @  dy        ([C_in, N*H*W] @ [N*H*W, C_out])

and accumulated over chunks of 8 images (so each slice and product stays in cache)
runs on XLA's dot kernels instead. Elsewhere (where chunks would only add kernels)
`conv_kernels="matmul"` gathers the taps once into patches and computes one product,
`dW = patches^T @ dy` ([kh*kw*C_in, N*H*W] @ [N*H*W, C_out]), batched over seeds under
`vmap`. The forward pass and the input gradient are unchanged (XLA's own), so the
function is the same; only the kernel gradient's summation order differs (~1e-7
relative). `conv_kernels="auto"` (the default) uses them for float32 steps where JAX
computes on the CPU and oneDNN cannot run (below), XLA's own kernels elsewhere
(`resolve`).

Several seeds vmapped into one step (cnn_jax.train.steps.seeds_at_once) need a rule
of their own: vmap makes XLA's kernel gradient a grouped convolution, which cuDNN runs
group by group through a slow kernel. "seedwise" (what `resolve` makes of XLA's
kernels with seeds > 1) computes it as one plain convolution per seed instead
(docs/benchmarks.md: 0.74x -> 1.4x the throughput of one seed after another).

`conv_kernels="onednn"` goes further on CPUs: the forward pass and both gradients run on
oneDNN's kernels (cnn_jax.onednn), which "auto" picks wherever they can be built and
have kernels for the step's dtype (ResNet-20's float32 CPU step 1.6x faster than with
the chunks, docs/benchmarks.md CPU step 17).

It is applied by a method interceptor on `flax.linen.Conv`, so models stay as written;
`training_convolutions` and `inference_convolutions` below are where a step or an
inference pass enters it, and the table above them says what a Conv then computes.
"""
from __future__ import annotations

import contextlib
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding
from jax import lax

from cnn_jax import onednn
from cnn_jax.errors import BadInput
from cnn_jax.train.config import CONV_KERNELS

CHUNK = 8  # images per accumulated kernel-gradient product
# "auto"'s choice, when set (the second is the older name)
ENV_VARIABLES = ("CNN_JAX_CONV_KERNELS", "CNN_JAX_CONV_GRAD")
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_with_kernel_grad(x, w, strides: tuple, padding: tuple, form: int | str = CHUNK):
    """`lax.conv_general_dilated` (NHWC, HWIO) with its kernel gradient computed by
    matrix products over chunks of `form` images (an int), by one product of patches
    ("patches"), or by XLA's own convolution run seed by seed under vmap ("seedwise")."""
    return _conv(x, w, strides, padding)


def _forward(x, w, strides, padding, form):
    return _conv(x, w, strides, padding), (x, w)


def _backward(strides, padding, form, residuals, dy):
    x, w = residuals
    dx = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)[1](dy)[0]  # XLA's own
    if isinstance(form, int):
        dw = _kernel_grad(x, dy, w.shape, strides, padding, form)
    else:  # built once per layer shape (lru_cache), so the keys are tuples
        kernel_grad = {"patches": _patches_product, "seedwise": _seedwise}[form]
        dw = kernel_grad(tuple(w.shape), tuple(strides), tuple(map(tuple, padding)))(x, dy)
    return dx, dw.astype(w.dtype)


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


def _seeds_first(kernel_grad, over_seeds):
    """`kernel_grad(x, dy)` whose `vmap` (over seeds) is `over_seeds(x, dy)`, called
    with the seed axis first on both (jax.custom_batching.custom_vmap)."""
    batched = jax.custom_batching.custom_vmap(kernel_grad)

    @batched.def_vmap
    def rule(axis_size, in_batched, x, dy):  # batched arguments arrive axis 0 first
        x, dy = (a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
                 for a, b in zip((x, dy), in_batched))
        return over_seeds(x, dy), True

    return batched


@functools.lru_cache(maxsize=None)
def _patches_product(shape, strides, padding):
    """dW = patches^T @ dy: the kh*kw shifted views side by side ([N, H, W, kh*kw*C_in],
    one fused gather), contracted with dy over images and positions in one product.
    Under `vmap` (seeds) the seed axis is moved to the front of x and dy before the
    gather, so the product is batched over it as cuBLAS wants; left to vmap's own rule,
    the seed axis of a convolution's output sits beside its channels and XLA would
    transpose the 9x larger patches instead (docs/benchmarks.md)."""
    kh, kw, cin, cout = shape
    s0, s1 = strides

    def product(x, dy):  # x [..., N, H, W, C_in], dy [..., N, oh, ow, C_out]
        oh, ow = dy.shape[-3:-1]
        xp = jnp.pad(x, ((0, 0),) * (x.ndim - 3) + (padding[0], padding[1], (0, 0)))
        patches = jnp.concatenate(
            [xp[..., i:i + s0 * (oh - 1) + 1:s0, j:j + s1 * (ow - 1) + 1:s1, :]
             for i in range(kh) for j in range(kw)], axis=-1)
        lead = x.shape[:-4]  # one contracted axis of images x positions, in memory order
        dw = jnp.einsum("...pk,...po->...ko", patches.reshape(*lead, -1, patches.shape[-1]),
                        dy.reshape(*lead, -1, cout), preferred_element_type=jnp.float32)
        return dw.reshape(*dw.shape[:-2], kh, kw, cin, cout)

    return _seeds_first(product, product)


@functools.lru_cache(maxsize=None)
def _seedwise(shape, strides, padding):
    """XLA's own kernel gradient; under `vmap` (seeds) one such convolution per seed,
    each as fast as a single run's, instead of the grouped convolution vmap would make
    of it, which cuDNN runs group by group through a slow kernel (docs/benchmarks.md)."""
    def kernel_grad(x, dy):
        conv = lambda w: _conv(x, w, strides, padding)
        return jax.linear_transpose(conv, jax.ShapeDtypeStruct(shape, x.dtype))(dy)[0]

    return _seeds_first(kernel_grad, lambda x, dy: jnp.stack(
        [kernel_grad(x[s], dy[s]) for s in range(x.shape[0])]))


conv_with_kernel_grad.defvjp(_forward, _backward)


def _plain_2d(m: nn.Conv, x) -> bool:
    one = lambda v: v is None or (v == 1 if isinstance(v, int) else tuple(v) == (1, 1))
    pad = canonicalize_padding(m.padding, 2)
    return (type(m) is nn.Conv and x.ndim == 4 and m.feature_group_count == 1
            and one(m.kernel_dilation) and one(m.input_dilation) and m.mask is None
            and m.shared_weights and m.conv_general_dilated is None
            and m.conv_general_dilated_cls is None
            and (pad in ("SAME", "VALID") if isinstance(pad, str)
                 else all(p >= 0 for lo_hi in pad for p in lo_hi)))


def resolve(kernels: str, seeds: int = 1, dtype="float32") -> str:
    """The convolution kernels a step uses: "xla", "matmul", "onednn" or, for XLA's own
    with several seeds vmapped, "seedwise" (one convolution per seed). "auto" ->
    $CNN_JAX_CONV_KERNELS (or its older name $CNN_JAX_CONV_GRAD) if set (e.g. to repeat
    a run recorded with other kernels bit for bit), else where JAX computes on the CPU
    "onednn" where oneDNN's convolutions can be built and have kernels for the dtype
    (cnn_jax.onednn), else "matmul" for float32 steps and XLA's own for bfloat16 ones
    (XLA computes its convolutions in float32 there, and its kernel gradient made
    ResNet-20's step 1.15-1.3x faster than the chunks, docs/benchmarks.md CPU step 16);
    XLA's own on GPUs and TPUs, seed by seed when several seeds train at once (1.2x
    faster than the patches' product for 5 ResNet-56 seeds on an H100). "onednn" where
    oneDNN cannot run raises cnn_jax.onednn.OnednnUnavailable saying why."""
    if kernels == "auto":
        variable, chosen = next(((v, os.environ[v]) for v in ENV_VARIABLES
                                 if os.environ.get(v)), ("", ""))
        if chosen and chosen not in CONV_KERNELS[1:]:
            raise BadInput(f"{variable} must be one of {', '.join(CONV_KERNELS[1:])}; "
                           f"got {chosen!r}")
        cpu = jax.default_backend() == "cpu"
        kernels = chosen or ("onednn" if cpu and onednn.available(dtype) else
                             "matmul" if cpu and jnp.dtype(dtype) == jnp.float32 else "xla")
    if kernels == "onednn":
        onednn.require(dtype, "--conv-kernels onednn (or CNN_JAX_CONV_KERNELS=onednn)")
    return "seedwise" if kernels == "xla" and seeds > 1 else kernels


def backend_form() -> int | str:
    """The products' form: chunks of images on CPUs (each product in cache), one
    product of patches elsewhere (fewer, larger kernels)."""
    return CHUNK if jax.default_backend() == "cpu" else "patches"


# ------------------------------------------------------------------ what a Conv computes
# The one place a step's kernel choice (`resolve`) is applied. Inside these contexts a
# plain 2-D nn.Conv computes the same function as written, on other kernels:
#
#   kernels     forward pass       input gradient     kernel gradient
#   "xla"       XLA's              XLA's              XLA's
#   "matmul"    XLA's              XLA's              products: chunks of 8 images (CPU),
#                                                     patches (accelerators)
#   "seedwise"  XLA's              XLA's              XLA's, one convolution per seed (vmap)
#   "onednn"    oneDNN's           oneDNN's           oneDNN's (CPU)
#
# Grouped, dilated and unusually padded convolutions keep XLA's path. The train step
# (cnn_jax.train.steps) enters `training_convolutions`, evaluation and every inference
# path (cnn_jax.trained.Trained.apply) `inference_convolutions`; results.json records
# the choice as `conv_kernels`.

def training_convolutions(kernels: str):
    """Context for a training step's forward and backward pass with `kernels`."""
    if kernels == "matmul":
        return kernel_grads()  # chunks on CPUs, patches elsewhere
    if kernels in ("seedwise", "onednn"):
        return kernel_grads(kernels)
    return contextlib.nullcontext()


def inference_convolutions(kernels: str):
    """Context for a forward pass alone (evaluation, inference) with a step's kernel
    choice: oneDNN's convolutions for "onednn"; the other choices change only
    gradients, so XLA's."""
    return kernel_grads("onednn") if kernels == "onednn" else contextlib.nullcontext()


def kernel_grads(form: int | str | None = None):
    """Context: inside it, plain 2-D `nn.Conv` calls use `conv_with_kernel_grad` in
    `form` (default: the products' backend_form()), or with form "onednn" oneDNN's
    convolutions (float32 and bfloat16 ones; others stay XLA's)."""
    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, nn.Conv) \
                or m.is_initializing() or not _plain_2d(m, args[0]):
            return next_fun(*args, **kwargs)
        kernel = m.get_variable("params", "kernel")
        bias = m.get_variable("params", "bias") if m.use_bias else None
        x, kernel, bias = promote_dtype(args[0], kernel, bias, dtype=m.dtype)
        if form == "onednn" and x.dtype not in onednn.DTYPES:
            return next_fun(*args, **kwargs)
        strides = (m.strides, m.strides) if isinstance(m.strides, int) else \
            tuple(m.strides or (1, 1))
        padding = canonicalize_padding(m.padding, 2)
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
        padding = tuple(tuple(p) for p in padding)
        y = onednn.conv2d(x, kernel, strides, padding) if form == "onednn" else \
            conv_with_kernel_grad(x, kernel, strides, padding, form or backend_form())
        return y + bias.reshape(1, 1, 1, -1) if bias is not None else y
    return nn.intercept_methods(intercept)
