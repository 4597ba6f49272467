"""Host-side augmentation, vectorised over a batch in numpy.

Every random choice is a pure function of (seed, epoch, example index, stream): a
counter-based hash (splitmix64) rather than a stateful generator, so the same seed
gives the same augmented batches whatever the batch size, worker count or resume
point. Each operation draws from its own stream, so switching one on or off leaves
the others' choices unchanged.

Pixel scale: images are uint8 in [0, 255]. The PCA colour eigenvalues are those of
the covariance of RGB values scaled to [0, 1] (Krizhevsky et al. 2012, Sec. 4.1,
as in most reimplementations); the shift is applied in [0, 255] units.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from cnn_jax.errors import BadInput

# --augment: cifar is the arrays' recipe below (crop_pad, flip, colour_shift, pca); the
# others are the papers' ImageNet transforms on streamed images (cnn_jax.data.streams),
# and `center`, none: every epoch the same central view (an optimisation test)
AUGMENTS = ("cifar", "resnet", "inception", "alexnet", "center")
STREAM_AUGMENTS = AUGMENTS[1:]
BAD_IMAGES = ("refuse", "skip")   # --bad-images: stop naming the file, or pass over it

# ------------------------------------------------------------------ randomness
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# (stream 2, STREAM_RESIZED, is kept for random-resized crops: the others keep their draws)
STREAM_CROP, STREAM_FLIP, STREAM_RESIZED, STREAM_SHIFT, STREAM_PCA = range(5)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch, index, stream: int, n: int) -> np.ndarray:
    """[B, n] floats in [0, 1), one row per example, fixed by (seed, epoch, index, stream)."""
    index = np.asarray(index, np.uint64).reshape(-1)
    epoch = np.broadcast_to(np.asarray(epoch, np.uint64), index.shape)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) ^ _splitmix64(np.uint64(stream)))
        key = _splitmix64(key ^ _splitmix64(epoch))
        key = _splitmix64(key ^ index)
        draws = _splitmix64(key[:, None] ^ _splitmix64(np.arange(n, dtype=np.uint64))[None])
    return (draws >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normals(seed: int, epoch, index, stream: int, n: int) -> np.ndarray:
    """[B, n] standard normals (Box-Muller on `uniforms`)."""
    u = uniforms(seed, epoch, index, stream, 2 * n)
    u1, u2 = 1.0 - u[:, :n], u[:, n:]
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)


# ------------------------------------------------------------------ geometry
def crop(images: np.ndarray, top: np.ndarray, left: np.ndarray, h: int, w: int) -> np.ndarray:
    """Per-image crops [B, h, w, C] at the given corners, by one fancy-indexing gather."""
    b = np.arange(len(images))[:, None, None]
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, :]
    return images[b, rows, cols]


def pad(images: np.ndarray, amount: int) -> np.ndarray:
    return np.pad(images, ((0, 0), (amount, amount), (amount, amount), (0, 0)))


def random_crop(images, pad_by: int, u: np.ndarray) -> np.ndarray:
    """He et al. 2015 Sec. 4.2: pad by `pad_by` zeros, take a random crop of the
    original size. `u`: [B, 2] uniforms."""
    h, w = images.shape[1:3]
    offsets = np.floor(u * (2 * pad_by + 1)).astype(np.int64)
    return crop(pad(images, pad_by), offsets[:, 0], offsets[:, 1], h, w)


def random_flip(images, u: np.ndarray) -> np.ndarray:
    """Mirror left-right where u < 0.5. `u`: [B, 1]."""
    mask = (u[:, 0] < 0.5)[:, None, None, None]
    return np.where(mask, images[:, :, ::-1], images)


# ------------------------------------------------------------------ colour
def colour_shift(images, u: np.ndarray, magnitude: float = 20.0) -> np.ndarray:
    """Add a random offset in [-magnitude, magnitude] to each channel of each image
    (the lecture's "R+20, G-20, B+20"). `u`: [B, C]. float32 out, unclipped."""
    offsets = (2 * u - 1) * magnitude
    return images.astype(np.float32) + offsets[:, None, None, :].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PCABasis:
    """Eigenvalues (descending) and eigenvectors (columns) of the RGB covariance of
    the training pixels, with values scaled to [0, 1]."""

    eigenvalues: np.ndarray   # [3]
    eigenvectors: np.ndarray  # [3, 3], column i is p_i


def pca_basis(images: np.ndarray, chunk: int = 4096) -> PCABasis:
    """Covariance of all pixels' RGB values (in [0, 1]) accumulated over chunks."""
    if images.shape[-1] != 3:
        raise BadInput(f"PCA colour augmentation needs RGB images; got {images.shape[-1]} "
                       f"channel(s)")
    n, s, ss = 0, np.zeros(3), np.zeros((3, 3))
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i:i + chunk], np.float64).reshape(-1, 3) / 255.0
        n, s, ss = n + len(x), s + x.sum(0), ss + x.T @ x
    mean = s / n
    cov = (ss - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    return PCABasis(values[order], vectors[:, order])


def cached_pca_basis(images: np.ndarray, cache_file: Optional[Path]) -> PCABasis:
    """`pca_basis`, stored beside the dataset's cache so it is computed once."""
    if cache_file is not None and cache_file.exists():
        z = np.load(cache_file)
        return PCABasis(z["eigenvalues"], z["eigenvectors"])
    basis = pca_basis(images)
    if cache_file is not None:
        tmp = cache_file.with_suffix(f".tmp{np.random.randint(1 << 30)}.npz")
        np.savez(tmp, eigenvalues=basis.eigenvalues, eigenvectors=basis.eigenvectors)
        tmp.replace(cache_file)
    return basis


def pca_shift(basis: PCABasis, alphas: np.ndarray) -> np.ndarray:
    """[B, 3] RGB shifts in [0, 255] units: sum_i alpha_i * lambda_i * p_i."""
    return 255.0 * (alphas * basis.eigenvalues[None]) @ basis.eigenvectors.T


def pca_lighting(images, basis: PCABasis, alphas: np.ndarray) -> np.ndarray:
    """Krizhevsky et al. 2012 "fancy PCA": add the same RGB shift to every pixel of an
    image. `alphas`: [B, 3] draws of N(0, sigma). float32 out, unclipped."""
    shift = pca_shift(basis, alphas).astype(np.float32)
    return images.astype(np.float32) + shift[:, None, None, :]


# ------------------------------------------------------------------ normalisation
@dataclasses.dataclass
class Normalizer:
    """(x - mean) / std. mean per pixel [H, W, C] (He et al.: "the per-pixel mean is
    subtracted") or per channel [C]; std per channel or 1. Works on numpy and jax
    arrays alike, so it can run on the device after a uint8 transfer."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_data(cls, images: np.ndarray, per_pixel: bool = True, scale: bool = False,
                  chunk: int = 4096) -> "Normalizer":
        total = np.zeros(images.shape[1:], np.float64)
        total_sq = np.zeros(images.shape[-1], np.float64)
        for i in range(0, len(images), chunk):
            x = np.asarray(images[i:i + chunk], np.float64)
            total += x.sum(0)
            total_sq += np.square(x).sum((0, 1, 2))
        pixel_mean = total / len(images)
        channel_mean = pixel_mean.mean((0, 1))
        n_pix = len(images) * images.shape[1] * images.shape[2]
        std = np.sqrt(total_sq / n_pix - channel_mean ** 2) if scale else np.ones_like(channel_mean)
        mean = pixel_mean if per_pixel else channel_mean
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def __call__(self, x):
        mean = self.mean
        if mean.ndim == 3 and tuple(x.shape[-3:-1]) != mean.shape[:2]:
            # an image of another size (a multi-scale test view, He et al. 2015's fully
            # convolutional test): the per-pixel mean's average, per channel
            mean = mean.mean((0, 1))
        return (x.astype("float32") - mean) / self.std


# ------------------------------------------------------------------ evaluation views
def center_crop(images, size: int) -> np.ndarray:
    h, w = images.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def ten_crop(images, size: int, pad_by: int = 0) -> np.ndarray:
    """[B, 10, size, size, C]: top-left, top-right, bottom-left, bottom-right and centre
    crops of the (optionally zero-padded) image, then the same five mirrored."""
    if pad_by:
        images = pad(images, pad_by)
    h, w = images.shape[1:3]
    if size > min(h, w):
        raise BadInput(f"ten_crop: crop {size} larger than the image {h}x{w}")
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
               ((h - size) // 2, (w - size) // 2)]
    five = [images[:, t:t + size, l:l + size] for t, l in corners]
    views = five + [v[:, :, ::-1] for v in five]
    return np.stack(views, axis=1)


# ------------------------------------------------------------------ the recipe
@dataclasses.dataclass(frozen=True)
class Augment:
    """A training-time augmentation recipe applied to a uint8 batch.

    crop_pad:        pad-and-random-crop by this many pixels (4 for CIFAR), 0 = off
    flip:            random horizontal mirror
    colour_shift:    per-channel offsets uniform in [-v, v] (0 = off)
    pca:             a PCABasis for fancy-PCA lighting, None = off
    pca_std:         sigma of the alphas (0.1 in the paper)

    Returns uint8 if only geometric operations are on (cheap to transfer), float32
    (same [0, 255] scale, unclipped) otherwise.
    """

    crop_pad: int = 0
    flip: bool = False
    colour_shift: float = 0.0
    pca: Optional[PCABasis] = None
    pca_std: float = 0.1

    def __call__(self, images: np.ndarray, seed: int, epoch, index) -> np.ndarray:
        x = np.asarray(images)
        if self.crop_pad:
            x = random_crop(x, self.crop_pad, uniforms(seed, epoch, index, STREAM_CROP, 2))
        if self.flip:
            x = random_flip(x, uniforms(seed, epoch, index, STREAM_FLIP, 1))
        if self.colour_shift:
            x = colour_shift(x, uniforms(seed, epoch, index, STREAM_SHIFT, x.shape[-1]),
                             self.colour_shift)
        if self.pca is not None:
            x = pca_lighting(x, self.pca,
                             self.pca_std * normals(seed, epoch, index, STREAM_PCA, 3))
        return x
