"""AlexNet (Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep
Convolutional Neural Networks", Fig. 2 and Sec. 3-4).

    227x227x3 -> conv 11x11/4, 96 -> LRN -> max 3/2 -> conv 5x5, 256 -> LRN -> max 3/2
    -> conv 3x3, 384 -> conv 3x3, 384 -> conv 3x3, 256 -> max 3/2
    -> fc 4096 -> dropout -> fc 4096 -> dropout -> fc 1000

ReLU after every layer but the last. The paper says 224x224; the arithmetic of the
first layer needs 227 (see docs/deviations.md). `groups=2` reproduces the two-GPU
split: conv2, conv4 and conv5 see only the maps on their own GPU (60,965,224
parameters); the default single tower has 62,378,344. Top-1 / top-5 error of one net:
40.7 / 18.2 % (Table 2).

`AlexNetTorchvision` is the single-tower variant torchvision ships (after Krizhevsky
2014, "One weird trick for parallelizing convolutional neural networks"): 64, 192,
384, 256, 256 filters, no LRN, 224x224 input, an adaptive 6x6 average pool and dropout
before each hidden fc layer; 61,100,840 parameters. It exists so that torchvision's
trained weights can be used here (cnn_jax.models.convert).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.models.layers import LocalResponseNorm, adaptive_avg_pool, require_min_size

# Sec. 5: weights from N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden fc
# layers ("accelerates the early stages of learning by providing the ReLUs with
# positive inputs"), 0 elsewhere.
paper_weights = nn.initializers.normal(0.01)
ones, zeros = nn.initializers.ones, nn.initializers.zeros


class AlexNet(nn.Module):
    num_classes: int = 1000
    groups: int = 1
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        require_min_size(x, 67, "alexnet")

        def conv(features, kernel, bias, name, strides=1, groups=1):
            pad = "VALID" if kernel == 11 else "SAME"
            return nn.Conv(features, (kernel, kernel), strides, padding=pad,
                           feature_group_count=groups, kernel_init=paper_weights,
                           bias_init=bias, dtype=self.dtype, name=name)

        lrn = LocalResponseNorm(size=5, k=2.0, alpha=1e-4, beta=0.75, name="lrn")
        pool = lambda y: nn.max_pool(y, (3, 3), (2, 2))  # overlapping: z=3, s=2

        x = pool(lrn(nn.relu(conv(96, 11, zeros, "conv1", strides=4)(x))))
        x = pool(lrn(nn.relu(conv(256, 5, ones, "conv2", groups=self.groups)(x))))
        x = nn.relu(conv(384, 3, zeros, "conv3")(x))
        x = nn.relu(conv(384, 3, ones, "conv4", groups=self.groups)(x))
        x = pool(nn.relu(conv(256, 3, ones, "conv5", groups=self.groups)(x)))

        x = x.reshape(x.shape[0], -1)
        for i in (6, 7):
            x = nn.relu(nn.Dense(4096, kernel_init=paper_weights, bias_init=ones,
                                 dtype=self.dtype, name=f"fc{i}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, kernel_init=paper_weights, dtype=self.dtype,
                     name="fc8")(x)
        return x.astype(jnp.float32)


class AlexNetTorchvision(nn.Module):
    """torchvision's `alexnet`: conv 11x11/4 pad 2, 64 -> max 3/2 -> conv 5x5, 192 ->
    max 3/2 -> conv 3x3, 384 -> 256 -> 256 -> max 3/2 -> avg to 6x6 -> dropout -> fc
    4096 -> dropout -> fc 4096 -> fc."""

    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        require_min_size(x, 63, "alexnet_torchvision")
        conv = lambda f, k, name, s=1: nn.Conv(f, (k, k), s, padding=k // 2 if k != 11 else 2,
                                               dtype=self.dtype, name=name)
        pool = lambda y: nn.max_pool(y, (3, 3), (2, 2))
        x = pool(nn.relu(conv(64, 11, "conv1", 4)(x)))
        x = pool(nn.relu(conv(192, 5, "conv2")(x)))
        x = nn.relu(conv(384, 3, "conv3")(x))
        x = nn.relu(conv(256, 3, "conv4")(x))
        x = pool(nn.relu(conv(256, 3, "conv5")(x)))
        x = adaptive_avg_pool(x, 6).reshape(x.shape[0], -1)
        for i in (6, 7):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = nn.relu(nn.Dense(4096, dtype=self.dtype, name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(x).astype(jnp.float32)
