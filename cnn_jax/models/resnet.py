"""Residual networks and their plain counterparts (He et al. 2015, "Deep Residual
Learning for Image Recognition", arXiv:1512.03385).

CIFAR nets (Sec. 4.2): a 3x3 conv with 16 filters, then 3 stages of n blocks on
32x32, 16x16 and 8x8 maps with 16, 32, 64 filters, global average pooling and a
softmax: 6n+2 weighted layers. ResNet-20/32/44/56/110/1202 have 0.27/0.46/0.66/0.85/
1.7/19.4 M parameters and 8.75/7.51/7.17/6.97/6.43/7.93 % test error (Table 6).

ImageNet nets (Table 1): a 7x7/2 conv and 3x3/2 max pool, then conv2_x..conv5_x with
basic blocks (18, 34 layers) or bottlenecks (50, 101, 152), projection shortcuts where
the shape changes (option B), average pool and a 1000-way fc.

A plain net is the same stack with `shortcut=None`.

`extra_blocks=(0, 0, k)` appends k blocks at the end of a stage, named
`stage3_extra1..k` so that a trained net's variables still fit the rest
(experiments/identity_blocks.py); `extra_shortcut` makes them residual ('A') or
plain (None) whatever the rest of the net is.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.errors import BadInput
from cnn_jax.models.layers import (BasicBlock, Bottleneck, ConvBN, make_shortcut,
                                   require_min_size)

# Table 6 of the paper: test error (%) on CIFAR-10 of the nets it reports.
PAPER_CIFAR_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}


def cifar_blocks_per_stage(depth: int) -> int:
    """6n+2 layers -> n, or a readable error."""
    if depth < 8 or (depth - 2) % 6:
        raise BadInput(
            f"CIFAR ResNet/plain depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, "
            f"110, 1202, ...); got {depth}")
    return (depth - 2) // 6


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; `shortcut=None` gives the plain net."""

    depth: int = 20
    num_classes: int = 10
    shortcut: Optional[str] = "A"
    widths: Sequence[int] = (16, 32, 64)
    extra_blocks: Sequence[int] = ()        # per stage: blocks appended after the n
    extra_shortcut: Optional[str] = "A"     # ... residual ('A'/'B'/'C') or plain (None)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = cifar_blocks_per_stage(self.depth)
        require_min_size(x, 1, type(self).__name__)
        if len(self.extra_blocks) > len(self.widths) or any(k < 0 for k in self.extra_blocks):
            raise BadInput(f"extra_blocks: one count >= 0 per stage (at most "
                           f"{len(self.widths)}); got {tuple(self.extra_blocks)}")
        shortcut = make_shortcut(self.shortcut)
        x = ConvBN(self.widths[0], 3, dtype=self.dtype, name="stem")(x, train)
        for stage, width in enumerate(self.widths):
            for i in range(n):
                strides = 2 if stage > 0 and i == 0 else 1
                x = BasicBlock(width, strides, shortcut, dtype=self.dtype,
                               name=f"stage{stage + 1}_block{i + 1}")(x, train)
            extra = self.extra_blocks[stage] if stage < len(self.extra_blocks) else 0
            for j in range(extra):
                x = BasicBlock(width, 1, make_shortcut(self.extra_shortcut), dtype=self.dtype,
                               name=f"stage{stage + 1}_extra{j + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # global average pooling
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)


# depth -> (block, blocks per stage), Table 1.
IMAGENET_STAGES = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ImageNetResNet(nn.Module):
    """ResNet-18/34/50/101/152 (Table 1); `shortcut=None` gives plain-18/34 (Fig. 4)."""

    depth: int = 50
    num_classes: int = 1000
    shortcut: Optional[str] = "B"
    stride_in_1x1: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in IMAGENET_STAGES:
            raise BadInput(f"ImageNet ResNet depth must be one of "
                           f"{sorted(IMAGENET_STAGES)}; got {self.depth}")
        require_min_size(x, 1, type(self).__name__)
        block, stages = IMAGENET_STAGES[self.depth]
        shortcut = make_shortcut(self.shortcut)
        extra = {"stride_in_1x1": self.stride_in_1x1} if block is Bottleneck else {}

        x = ConvBN(64, 7, 2, dtype=self.dtype, name="conv1")(x, train)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(stages):  # conv2_x .. conv5_x
            width = 64 * 2 ** stage
            for i in range(blocks):
                strides = 2 if stage > 0 and i == 0 else 1
                x = block(width, strides, shortcut, dtype=self.dtype,
                          name=f"conv{stage + 2}_{i + 1}", **extra)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)
