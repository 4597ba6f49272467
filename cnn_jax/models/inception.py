"""GoogLeNet (Szegedy et al. 2014, "Going Deeper with Convolutions", Table 1, Fig. 2-3).

The Inception module runs four branches in parallel on the same input and
concatenates them along channels: 1x1; 1x1 reduce -> 3x3; 1x1 reduce -> 5x5;
3x3 max pool -> 1x1 projection. The 1x1 "reduce" layers are what make the 3x3 and
5x5 branches affordable (`experiments.bottleneck_cost`).

    conv 7x7/2, 64 -> max 3x3/2 -> LRN -> conv 1x1, 64 -> conv 3x3, 192 -> LRN
    -> max 3x3/2 -> 3a 3b -> max 3x3/2 -> 4a 4b 4c 4d 4e -> max 3x3/2 -> 5a 5b
    -> avg 7x7 -> dropout 0.4 -> linear -> softmax

Two auxiliary classifiers on 4a and 4d (Sec. 5) exist only in training; their
losses are added with weight 0.3. Here they are computed when `train=True` and
returned through `sow("intermediates", "aux_logits", ...)`; the main output is
always the final classifier's logits. Top-5 error of one model, one crop: 10.07 %
(Table 3).

`GoogLeNetTorchvision` is the variant torchvision ships, so its trained weights can
be used here (cnn_jax.models.convert): BatchNorm (eps 1e-3) after every convolution
and no bias, no LRN, the "5x5" branch with a 3x3 kernel (a discrepancy torchvision
keeps for its weights), ceil-mode max pools, a 2x2 pool before 5a, dropout 0.2, and
auxiliary heads pooling adaptively to 4x4 with a 2048 -> 1024 fc; 6,624,904
parameters without the auxiliary heads.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.models.layers import (BN_MOMENTUM, LocalResponseNorm, adaptive_avg_pool,
                                   max_pool_ceil, require_min_size)

# Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj
TABLE1 = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}

AUX_LOSS_WEIGHT = 0.3


class ConvReLU(nn.Module):
    features: int
    kernel: int = 1
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (self.kernel, self.kernel), self.strides,
                               padding="SAME", dtype=self.dtype, name="conv")(x))


class InceptionBlock(nn.Module):
    """Fig. 2(b): Inception module with dimension reductions."""

    c1x1: int
    c3x3_reduce: int
    c3x3: int
    c5x5_reduce: int
    c5x5: int
    pool_proj: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cbr = lambda f, k, name: ConvReLU(f, k, dtype=self.dtype, name=name)
        b1 = cbr(self.c1x1, 1, "1x1")(x)
        b2 = cbr(self.c3x3, 3, "3x3")(cbr(self.c3x3_reduce, 1, "3x3_reduce")(x))
        b3 = cbr(self.c5x5, 5, "5x5")(cbr(self.c5x5_reduce, 1, "5x5_reduce")(x))
        b4 = cbr(self.pool_proj, 1, "pool_proj")(
            nn.max_pool(x, (3, 3), (1, 1), padding="SAME"))
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxClassifier(nn.Module):
    """Sec. 5: avg pool 5x5/3 -> 1x1 conv 128 -> fc 1024 -> dropout 0.7 -> linear."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.avg_pool(x, (5, 5), (3, 3))
        x = ConvReLU(128, 1, dtype=self.dtype, name="conv")(x)
        x = nn.relu(nn.Dense(1024, dtype=self.dtype, name="fc")(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.7, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)


class GoogLeNet(nn.Module):
    num_classes: int = 1000
    aux_logits: bool = True
    dropout: float = 0.4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        # With the auxiliary heads, 4a's output must fit their 5x5 pool.
        require_min_size(x, 65 if self.aux_logits else 1, "googlenet")
        lrn = LocalResponseNorm(size=5, k=1.0, alpha=1e-4 / 5, beta=0.75, name="lrn")  # Caffe's LRN
        pool = lambda y: nn.max_pool(y, (3, 3), (2, 2), padding="SAME")
        inception = lambda name: InceptionBlock(*TABLE1[name], dtype=self.dtype,
                                                name=f"inception_{name}")
        aux = lambda name: AuxClassifier(self.num_classes, dtype=self.dtype, name=name)
        with_aux = self.aux_logits and (train or self.is_initializing())

        x = ConvReLU(64, 7, 2, dtype=self.dtype, name="conv1")(x)
        x = lrn(pool(x))
        x = ConvReLU(64, 1, dtype=self.dtype, name="conv2_reduce")(x)
        x = ConvReLU(192, 3, dtype=self.dtype, name="conv2")(x)
        x = pool(lrn(x))
        x = inception("3b")(inception("3a")(x))
        x = pool(x)
        x = inception("4a")(x)
        if with_aux:
            self.sow("intermediates", "aux_logits", aux("aux1")(x, train).astype(jnp.float32))
        x = inception("4d")(inception("4c")(inception("4b")(x)))
        if with_aux:
            self.sow("intermediates", "aux_logits", aux("aux2")(x, train).astype(jnp.float32))
        x = pool(inception("4e")(x))
        x = inception("5b")(inception("5a")(x))
        x = jnp.mean(x, axis=(1, 2))  # the 7x7 average pool on 224x224 input
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x).astype(jnp.float32)


# ------------------------------------------------------------------ torchvision's variant
class ConvBNReLU(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BN (eps 1e-3) -> ReLU."""

    features: int
    kernel: int = 1
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        pad = self.kernel // 2
        x = nn.Conv(self.features, (self.kernel, self.kernel), self.strides,
                    padding=[(pad, pad), (pad, pad)], use_bias=False, dtype=self.dtype,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-3,
                         dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


class InceptionBlockTorchvision(nn.Module):
    c1x1: int
    c3x3_reduce: int
    c3x3: int
    c5x5_reduce: int
    c5x5: int
    pool_proj: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        cbr = lambda f, k, name: ConvBNReLU(f, k, dtype=self.dtype, name=name)
        b1 = cbr(self.c1x1, 1, "branch1")(x, train)
        b2 = cbr(self.c3x3, 3, "branch2_1")(cbr(self.c3x3_reduce, 1, "branch2_0")(x, train), train)
        b3 = cbr(self.c5x5, 3, "branch3_1")(cbr(self.c5x5_reduce, 1, "branch3_0")(x, train), train)
        b4 = cbr(self.pool_proj, 1, "branch4_1")(max_pool_ceil(x, 3, 1, pad=1), train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxClassifierTorchvision(nn.Module):
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = ConvBNReLU(128, 1, dtype=self.dtype, name="conv")(adaptive_avg_pool(x, 4), train)
        # torch flattens channels first: C, H, W
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(1024, dtype=self.dtype, name="fc1")(x))
        x = nn.Dropout(0.7, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)


class GoogLeNetTorchvision(nn.Module):
    num_classes: int = 1000
    aux_logits: bool = False
    dropout: float = 0.2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        require_min_size(x, 15, "googlenet_torchvision")
        cbr = lambda f, k, name, s=1: ConvBNReLU(f, k, s, dtype=self.dtype, name=name)
        inception = lambda name: InceptionBlockTorchvision(*TABLE1[name], dtype=self.dtype,
                                                           name=f"inception{name}")
        aux = lambda name: AuxClassifierTorchvision(self.num_classes, dtype=self.dtype, name=name)
        with_aux = self.aux_logits and (train or self.is_initializing())

        x = max_pool_ceil(cbr(64, 7, "conv1", 2)(x, train), 3, 2)
        x = cbr(192, 3, "conv3")(cbr(64, 1, "conv2")(x, train), train)
        x = max_pool_ceil(x, 3, 2)
        x = inception("3b")(inception("3a")(x, train), train)
        x = inception("4a")(max_pool_ceil(x, 3, 2), train)
        if with_aux:
            self.sow("intermediates", "aux_logits", aux("aux1")(x, train).astype(jnp.float32))
        for name in ("4b", "4c", "4d"):
            x = inception(name)(x, train)
        if with_aux:
            self.sow("intermediates", "aux_logits", aux("aux2")(x, train).astype(jnp.float32))
        x = max_pool_ceil(inception("4e")(x, train), 2, 2)
        x = inception("5b")(inception("5a")(x, train), train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)
