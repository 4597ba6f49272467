"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-Based Learning Applied to
Document Recognition", Fig. 2).

    INPUT 32x32 -> C1: 6@28x28 (5x5) -> S2: 6@14x14 -> C3: 16@10x10 (5x5)
    -> S4: 16@5x5 -> C5: 120 (5x5) -> F6: 84 -> OUTPUT: 10 (Gaussian/RBF)

`LeNet5` is the form taught today (full C3, average pooling, tanh, a dense softmax
layer): 61,706 parameters. `LeNet5Classic` is the paper's own network: C3's partial
connection table (Table I), trainable subsampling, the scaled tanh f(a) = A tanh(S a)
with A = 1.7159, S = 2/3, and Euclidean RBF output units with fixed +-1 codes:
60,000 trainable parameters, as stated in Sec. II.B. Its test error without
distortions is 0.95 % (Sec. III.C).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.errors import BadInput
from cnn_jax.models.layers import require_min_size


class LeNet5(nn.Module):
    """The modern textbook LeNet-5."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        require_min_size(x, 16, "lenet5")
        x = nn.tanh(nn.Conv(6, (5, 5), padding="VALID", dtype=self.dtype, name="c1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.tanh(nn.Conv(16, (5, 5), padding="VALID", dtype=self.dtype, name="c3")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.tanh(nn.Dense(120, dtype=self.dtype, name="c5")(x))
        x = nn.tanh(nn.Dense(84, dtype=self.dtype, name="f6")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="output")(x).astype(jnp.float32)


def squash(a):
    """The paper's sigmoid, f(a) = A tanh(S a) (Sec. II.B and Appendix A)."""
    return 1.7159 * jnp.tanh(2.0 / 3.0 * a)


# Table I: which S2 maps (rows 0-5) feed each C3 map (columns 0-15).
C3_TABLE = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


class PartialConv(nn.Module):
    """A convolution in which output map j sees only the input maps `table[j]`.

    Only the connected 5x5 kernels are parameters (1,500 weights + 16 biases for C3);
    they are scattered into a dense kernel with zeros elsewhere for one convolution.
    """

    table: tuple = C3_TABLE
    kernel_size: int = 5
    in_features: int = 6

    @nn.compact
    def __call__(self, x):
        pairs = [(i, j) for j, inputs in enumerate(self.table) for i in inputs]
        src, dst = np.array(pairs).T
        k = self.kernel_size
        fan_in = np.array([len(self.table[j]) * k * k for j in dst], np.float32)
        weights = self.param("kernel", paper_init(fan_in), (k, k, len(pairs)))
        bias = self.param("bias", nn.initializers.zeros, (len(self.table),))
        kernel = jnp.zeros((k, k, self.in_features, len(self.table)), weights.dtype)
        kernel = kernel.at[:, :, src, dst].set(weights)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias

    def multiply_accumulates(self, in_shape, out_shape) -> int:
        connections = sum(len(t) for t in self.table) * self.kernel_size ** 2
        return int(np.prod(out_shape[1:-1])) * connections


def paper_init(fan_in=None):
    """Appendix C: weights uniform in [-2.4/F_i, 2.4/F_i], F_i the unit's fan-in
    (by default the product of all but the last kernel dimension)."""
    def init(key, shape, dtype=jnp.float32):
        f = np.prod(shape[:-1]) if fan_in is None else fan_in
        return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * jnp.asarray(2.4 / f, dtype)
    return init


class Subsample(nn.Module):
    """S2/S4: sum of each 2x2 neighbourhood, times a trainable coefficient, plus a
    trainable bias, per feature map; then the squashing function."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        coef = self.param("coefficient", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return squash(coef * nn.avg_pool(x, (2, 2), (2, 2)) * 4.0 + bias)


# The output RBF units compare F6 with a fixed code per class: a stylised 7x12 bitmap
# of the character, drawn with -1 (white) and +1 (black) (Sec. II.B, Fig. 3).
_DIGIT_BITMAPS = """
..###.. ...#... ..###.. ..###.. ....#.. ####### ..###.. ####### ..###.. ..###..
.#...#. ..##... .#...#. .#...#. ...##.. #...... .#..... ......# .#...#. .#...#.
#.....# .#.#... #.....# #.....# ..#.#.. #...... #...... .....#. #.....# #.....#
#.....# ...#... ......# ......# .#..#.. #.###.. #...... .....#. #.....# #.....#
#.....# ...#... .....#. .....#. #...#.. ##...#. #.###.. ....#.. .#...#. #.....#
#.....# ...#... ....#.. ..###.. ####### .....## ##...#. ....#.. ..###.. .#...##
#.....# ...#... ...#... .....#. ....#.. ......# #.....# ...#... .#...#. ..###.#
#.....# ...#... ..#.... ......# ....#.. ......# #.....# ...#... #.....# ......#
#.....# ...#... .#..... #.....# ....#.. #.....# #.....# ..#.... #.....# .....#.
.#...#. ...#... #...... .#...#. ....#.. .#...#. .#...#. ..#.... .#...#. ....#..
..###.. .#####. ####### ..###.. ....#.. ..###.. ..###.. ..#.... ..###.. .###...
....... ....... ....... ....... ....... ....... ....... ....... ....... .......
"""


def digit_codes() -> np.ndarray:
    """[10, 84] array of +-1: the fixed RBF centres for the digits 0-9."""
    rows = [line.split() for line in _DIGIT_BITMAPS.strip().splitlines()]
    codes = np.array([[[1.0 if ch == "#" else -1.0 for ch in row[d]] for row in rows]
                      for d in range(10)], np.float32)  # [10, 12, 7]
    return codes.reshape(10, 84)


class RBFOutput(nn.Module):
    """y_i = sum_j (x_j - w_ij)^2 with fixed, non-trainable w (a constant, not a param).

    Returns -y as logits, so that a softmax cross-entropy on them is the paper's
    criterion (Eq. 9) without its extra constant class j (see docs/deviations.md).
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        if self.num_classes != 10:
            raise BadInput("lenet5_classic's RBF codes are the 10 digit bitmaps; "
                           f"num_classes must be 10, got {self.num_classes}")
        codes = jnp.asarray(digit_codes(), x.dtype)
        y = jnp.sum(jnp.square(x[:, None, :] - codes[None]), axis=-1)
        return -y

    def multiply_accumulates(self, in_shape, out_shape) -> int:
        return int(in_shape[-1]) * self.num_classes


class LeNet5Classic(nn.Module):
    """LeNet-5 exactly as in the 1998 paper (60,000 trainable parameters)."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        require_min_size(x, 32, "lenet5_classic")
        conv = functools.partial(nn.Conv, kernel_size=(5, 5), padding="VALID",
                                 kernel_init=paper_init())
        x = squash(conv(6, name="c1")(x))                    # 156 params
        x = Subsample(name="s2")(x)                          # 12
        x = squash(PartialConv(name="c3")(x))                # 1,516
        x = Subsample(name="s4")(x)                          # 32
        x = squash(conv(120, name="c5")(x))                  # 48,120
        x = x.reshape(x.shape[0], -1)
        x = squash(nn.Dense(84, kernel_init=paper_init(), name="f6")(x))  # 10,164
        return RBFOutput(self.num_classes, name="output")(x)            # fixed codes
