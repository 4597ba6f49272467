"""Pieces shared by several architectures: LRN, conv-BN-ReLU, residual shortcuts.

Everything here is a pure linen module or function on NHWC arrays.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.errors import BadInput

Dtype = Any

# He et al. 2015 initialise convolutions with N(0, 2 / (k*k*C_out)) (fan_out), as in
# their PReLU paper and in torchvision's `kaiming_normal_(mode="fan_out")`.
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# flax's BatchNorm momentum is the weight of the *old* running average:
# ra <- momentum * ra + (1 - momentum) * batch. momentum=0.9 equals PyTorch's 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def require_min_size(x: jax.Array, min_size: int, model: str) -> None:
    """Fail with a readable message instead of an XLA shape error deep inside the net."""
    if x.ndim != 4:
        raise ValueError(f"{model}: expected an NHWC batch of rank 4, got shape {x.shape}")
    h, w = x.shape[1], x.shape[2]
    if h < min_size or w < min_size:
        raise BadInput(
            f"{model}: input {h}x{w} is too small; the architecture needs at least "
            f"{min_size}x{min_size} (NHWC input, got shape {tuple(x.shape)})"
        )


class LocalResponseNorm(nn.Module):
    """Local response normalisation across channels (Krizhevsky et al. 2012, Sec. 3.3).

        b[c] = a[c] / (k + alpha * sum_{j=c-n/2}^{c+n/2} a[j]^2) ** beta

    `alpha` multiplies the plain sum as in the paper. PyTorch's and Caffe's LRN divide
    alpha by n; pass alpha/n here to match them.
    """

    size: int = 5  # n
    k: float = 2.0
    alpha: float = 1e-4
    beta: float = 0.75

    @nn.compact
    def __call__(self, x):
        half = self.size // 2
        sum_sq = jax.lax.reduce_window(
            jnp.square(x.astype(jnp.float32)), 0.0, jax.lax.add,
            window_dimensions=(1, 1, 1, self.size), window_strides=(1, 1, 1, 1),
            padding=((0, 0), (0, 0), (0, 0), (half, half)),
        )
        return (x / (self.k + self.alpha * sum_sq) ** self.beta).astype(x.dtype)


class ConvBN(nn.Module):
    """Convolution (no bias) -> BatchNorm -> optional ReLU: the unit of every ResNet.

    Inside the training loop's steps and every inference path the convolution may run
    on other kernels (oneDNN's, or XLA's with a product-based kernel gradient): the
    same function, other rounding; cnn_jax.train.conv_kernels says which, and when."""

    features: int
    kernel: int = 3
    strides: int = 1
    relu: bool = True
    zero_init_scale: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        pad = self.kernel // 2
        x = nn.Conv(self.features, (self.kernel, self.kernel), (self.strides, self.strides),
                    padding=[(pad, pad), (pad, pad)], use_bias=False,
                    kernel_init=he_fan_out, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, dtype=self.dtype,
                         scale_init=nn.initializers.zeros if self.zero_init_scale
                         else nn.initializers.ones, name="bn")(x)
        return nn.relu(x) if self.relu else x


# ---------------------------------------------------------------- shortcuts
# A shortcut maps the block input x to the shape of the residual branch's output.
# He et al. 2015, Sec. 3.3 / 4.1: option A pads the identity with zeros when the
# dimensions grow (no parameters); option B projects with a 1x1 convolution only when
# they grow; option C projects always.


class ZeroPadShortcut(nn.Module):
    """Option A: identity, subsampled by striding and padded with zero channels."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.strides > 1:
            x = x[:, :: self.strides, :: self.strides, :]
        extra = self.features - x.shape[-1]
        if extra > 0:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return x


class ProjectionShortcut(nn.Module):
    """Options B and C: a strided 1x1 convolution with BN (identity if `only_if_needed`
    and the shapes already agree)."""

    features: int
    strides: int = 1
    only_if_needed: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.only_if_needed and self.strides == 1 and x.shape[-1] == self.features:
            return x
        return ConvBN(self.features, kernel=1, strides=self.strides, relu=False,
                      dtype=self.dtype, name="proj")(x, train)


def make_shortcut(option: Optional[str]) -> Optional[Callable[..., nn.Module]]:
    """'A', 'B' or 'C' -> a shortcut class; None -> no shortcut (a plain net)."""
    if option is None:
        return None
    option = option.upper()
    if option == "A":
        return ZeroPadShortcut
    if option == "B":
        return ProjectionShortcut
    if option == "C":
        return functools.partial(ProjectionShortcut, only_if_needed=False)
    raise BadInput(f"shortcut must be 'A', 'B', 'C' or None (plain); got {option!r}")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; `y = relu(F(x) + shortcut(x))`, or `relu(F(x))` when
    `shortcut` is None (the plain counterpart of Fig. 3 / Fig. 5 left)."""

    features: int
    strides: int = 1
    shortcut: Optional[Callable[..., nn.Module]] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = ConvBN(self.features, 3, self.strides, dtype=self.dtype)(x, train)
        y = ConvBN(self.features, 3, relu=False, dtype=self.dtype)(y, train)
        if self.shortcut is not None:
            y = y + self.shortcut(self.features, strides=self.strides,
                                  dtype=self.dtype, name="shortcut")(x, train)
        return nn.relu(y)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4) (Fig. 5 right). The stride sits on the 3x3
    convolution (torchvision's "v1.5"); `stride_in_1x1=True` puts it on the first 1x1
    as in the original Caffe models."""

    features: int  # bottleneck width; the block outputs 4 * features
    strides: int = 1
    shortcut: Optional[Callable[..., nn.Module]] = None
    stride_in_1x1: bool = False
    dtype: Dtype = jnp.float32
    expansion: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        y = ConvBN(self.features, 1, s1, dtype=self.dtype)(x, train)
        y = ConvBN(self.features, 3, s3, dtype=self.dtype)(y, train)
        y = ConvBN(self.features * self.expansion, 1, relu=False, dtype=self.dtype)(y, train)
        if self.shortcut is not None:
            y = y + self.shortcut(self.features * self.expansion, strides=self.strides,
                                  dtype=self.dtype, name="shortcut")(x, train)
        return nn.relu(y)


# ---------------------------------------------------------------- PyTorch-style pooling
# The torchvision variants (alexnet_torchvision, googlenet_torchvision) pool as PyTorch
# does, so that weights trained there compute the same function here.


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """PyTorch's `adaptive_avg_pool2d`: `size` x `size` bins, bin i covering
    [floor(i n / size), ceil((i + 1) n / size)) (neighbouring bins may overlap)."""
    def bins(n):
        return [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
    rows = [jnp.mean(x[:, a:b], axis=1, keepdims=True) for a, b in bins(x.shape[1])]
    x = jnp.concatenate(rows, axis=1)
    cols = [jnp.mean(x[:, :, a:b], axis=2, keepdims=True) for a, b in bins(x.shape[2])]
    return jnp.concatenate(cols, axis=2)


def max_pool_ceil(x: jax.Array, window: int, stride: int, pad: int = 0) -> jax.Array:
    """PyTorch's `max_pool2d(..., ceil_mode=True)`: the last window may hang over the
    bottom/right edge (padded with -inf) as long as it starts inside the input."""
    def extra(n):
        out = -(-(n + 2 * pad - window) // stride) + 1
        if (out - 1) * stride >= n + pad:
            out -= 1
        return max((out - 1) * stride + window - n - 2 * pad, 0)
    h_extra, w_extra = extra(x.shape[1]), extra(x.shape[2])
    return nn.max_pool(x, (window, window), (stride, stride),
                       padding=((pad, pad + h_extra), (pad, pad + w_extra)))
