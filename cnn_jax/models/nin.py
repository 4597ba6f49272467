"""Network in Network (Lin, Chen & Yan 2014, arXiv:1312.4400), CIFAR-10 form.

Three "mlpconv" layers, each a spatial convolution followed by two 1x1 convolutions:
a small multilayer perceptron applied at every pixel. The last 1x1 layer has one map
per class and global average pooling replaces the fully connected classifier
(Sec. 3.2). Widths follow the authors' released CIFAR-10 model (192-160-96,
192-192-192, 192-192-10); dropout 0.5 after the first two blocks. Test error on
CIFAR-10: 10.41 % without augmentation, 8.81 % with (Table 1).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.models.layers import require_min_size


class MLPConv(nn.Module):
    """k x k convolution, then 1x1 convolutions (a per-pixel MLP), each with ReLU."""

    features: Sequence[int]
    kernel: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            k = self.kernel if i == 0 else 1
            x = nn.Conv(f, (k, k), padding="SAME",
                        kernel_init=nn.initializers.normal(0.05), dtype=self.dtype)(x)
            x = nn.relu(x)
        return x


class NiN(nn.Module):
    num_classes: int = 10
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        require_min_size(x, 1, "nin")
        x = MLPConv((192, 160, 96), 5, dtype=self.dtype, name="mlpconv1")(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = MLPConv((192, 192, 192), 5, dtype=self.dtype, name="mlpconv2")(x)
        x = nn.avg_pool(x, (3, 3), (2, 2), padding="SAME")
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        # The released model keeps the ReLU on the class maps before pooling.
        x = MLPConv((192, 192, self.num_classes), 3, dtype=self.dtype, name="mlpconv3")(x)
        return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)  # global average pooling
