"""VGG (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", Table 1, configurations A, B, D, E).

Stacks of 3x3 "same" convolutions (stride 1, ReLU), a 2x2/2 max pool after each
stack, channels doubling 64 -> 128 -> 256 -> 512, then fc 4096 -> 4096 -> 1000 with
dropout 0.5 on the first two (Sec. 3.1). 224x224 input. VGG-11/13/16/19 have
132.86 / 133.05 / 138.36 / 143.67 M parameters; single-scale top-5 error 10.4 / 9.9 /
8.8 / 9.0 % (Table 3, D and E at scale 256-512 jitter train, 384 test: 8.1 / 8.0).

`batch_norm=True` inserts BatchNorm after every convolution (a later addition, not in
the paper; torchvision's `vgg*_bn`, whose convolutions keep their biases: so do ours,
for weight compatibility).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.errors import BadInput
from cnn_jax.models.layers import BN_EPSILON, BN_MOMENTUM, require_min_size

M = "M"  # max pool
CONFIGS = {
    11: (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),                    # A
    13: (64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),           # B
    16: (64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M),  # D
    19: (64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M,
         512, 512, 512, 512, M),                                                   # E
}


class VGG(nn.Module):
    depth: int = 16
    num_classes: int = 1000
    batch_norm: bool = False
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in CONFIGS:
            raise BadInput(f"VGG depth must be one of {sorted(CONFIGS)}; got {self.depth}")
        require_min_size(x, 32, f"vgg{self.depth}")
        conv_id = 0
        for layer in CONFIGS[self.depth]:
            if layer == M:
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            conv_id += 1
            x = nn.Conv(layer, (3, 3), padding="SAME", use_bias=True,  # kept under BN too, as torchvision does
                        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        dtype=self.dtype, name=f"conv{conv_id}")(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                                 epsilon=BN_EPSILON, dtype=self.dtype, name=f"bn{conv_id}")(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        for i in (1, 2):
            x = nn.relu(nn.Dense(4096, dtype=self.dtype, name=f"fc{i}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x).astype(jnp.float32)
