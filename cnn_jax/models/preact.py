"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual
Networks", arXiv:1603.05027), CIFAR form.

The residual unit moves BatchNorm and ReLU in front of each convolution (Fig. 1b,
Fig. 4e: "full pre-activation"), so that nothing but the identity lies on the shortcut
path and after the addition: x_{l+1} = x_l + F(BN-ReLU(x_l)). The first unit takes its
activation right after the stem convolution, and the last one is followed by an extra
BN-ReLU before the pooling (Sec. 4.1). Depths 6n+2 as the original CIFAR ResNets: 16,
32, 64 filters on 32x32, 16x16 and 8x8 maps; ResNet-110 has 1.7M parameters (Table 2).
Error on CIFAR-10 (Table 2, 3): ResNet-110 6.37 %, ResNet-164 (bottleneck) 5.46 %,
ResNet-1001 4.92 %; this zoo has the basic (two 3x3) unit only.

Shortcuts where the dimensions grow follow the CIFAR ResNets of this zoo: option A
(zero-padded identity) by default, so that a comparison with them (experiments.
plain_vs_resnet --families resnet preact) changes the unit alone; `shortcut="B"` is a
1x1 projection of the pre-activated input (docs/deviations.md).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax.models.layers import (BN_EPSILON, BN_MOMENTUM, ProjectionShortcut,
                                   ZeroPadShortcut, he_fan_out, make_shortcut,
                                   require_min_size)
from cnn_jax.models.resnet import cifar_blocks_per_stage

# Tables 2-3 of the paper: CIFAR-10 test error (%) of its pre-activation ResNets with the
# basic unit this module builds (ResNet-110; the deeper ones are bottleneck nets)
PREACT_CIFAR_ERROR = {110: 6.37}


def bn_relu(x, train: bool, dtype, name: str):
    """BatchNorm then ReLU: the pre-activation in front of a convolution."""
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPSILON, dtype=dtype, name=name)(x)
    return nn.relu(x)


def conv3x3(features: int, strides: int, dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), (strides, strides), padding=[(1, 1), (1, 1)],
                   use_bias=False, kernel_init=he_fan_out, dtype=dtype, name=name)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut; nothing after the addition."""

    features: int
    strides: int = 1
    shortcut: Callable[..., nn.Module] = ZeroPadShortcut   # residual always: option A
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = bn_relu(x, train, self.dtype, "bn1")
        y = conv3x3(self.features, self.strides, self.dtype, "conv1")(a)
        y = conv3x3(self.features, 1, self.dtype, "conv2")(bn_relu(y, train, self.dtype, "bn2"))
        # a projection sees the pre-activated input, the identity the input itself
        source = a if issubclass(getattr(self.shortcut, "func", self.shortcut),
                                 ProjectionShortcut) else x
        return y + self.shortcut(self.features, strides=self.strides, dtype=self.dtype,
                                 name="shortcut")(source, train)


class CifarPreActResNet(nn.Module):
    """Pre-activation ResNet-(6n+2) for 32x32 inputs."""

    depth: int = 110
    num_classes: int = 10
    shortcut: Optional[str] = "A"
    widths: Sequence[int] = (16, 32, 64)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = cifar_blocks_per_stage(self.depth)
        require_min_size(x, 1, type(self).__name__)
        shortcut = make_shortcut(self.shortcut or "A")
        x = conv3x3(self.widths[0], 1, self.dtype, "stem")(x)
        for stage, width in enumerate(self.widths):
            for i in range(n):
                x = PreActBlock(width, 2 if stage > 0 and i == 0 else 1, shortcut,
                                dtype=self.dtype, name=f"stage{stage + 1}_block{i + 1}")(x, train)
        x = bn_relu(x, train, self.dtype, "final_bn")   # the last unit's extra activation
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)
