"""From the stored uint8 images to the model's input: the adaptations a recipe asks for.

Host side, once: `input_pad` zero-pads every image (LeCun et al. 1998 feed the 28x28
MNIST digits centred in a 32x32 field). Device side, inside the compiled step:
normalisation, then an optional bilinear `resize` (for architectures whose first stage
needs more pixels than the data has, e.g. AlexNet or GoogLeNet on CIFAR-10).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.data.augment import Augment, Normalizer, cached_pca_basis, pad
from cnn_jax.data.sources import Arrays

# Sec. II.B: "the background level (white) corresponds to a value of -0.1 and the
# foreground (black) corresponds to 1.175": x / 255 * 1.275 - 0.1 = (x - 20) / 200.
LECUN = Normalizer(np.array([20.0], np.float32), np.array([200.0], np.float32))

NORMALISATIONS = ("per_pixel", "per_channel", "standard", "lecun", "none")


def prepare_arrays(arrays: Arrays, input_pad: int) -> Arrays:
    """The split with every image zero-padded by `input_pad` pixels on each side."""
    if not input_pad:
        return arrays
    return dataclasses.replace(arrays, images=pad(np.asarray(arrays.images), input_pad),
                               path=None, indices=None)


def subset(arrays: Arrays, size: int) -> Arrays:
    """A fixed stratified subset of `size` examples (all of them when size is 0 or
    not smaller than the split)."""
    if not size or size >= len(arrays):
        return arrays
    from cnn_jax.data.sources import stratified_holdout
    keep = stratified_holdout(arrays.labels, size, seed=0)
    return dataclasses.replace(arrays, images=np.asarray(arrays.images[keep]),
                               labels=arrays.labels[keep], path=None, indices=None)


def training_arrays(cfg, data_dir=None) -> Arrays:
    """The images a run of `cfg` trains on (holdout, subset and padding applied): its
    normaliser and PCA basis come from these, at training and at evaluation time."""
    from cnn_jax.data import load
    arrays = load(cfg.data, "train", data_dir=data_dir or cfg.data_dir, holdout=cfg.holdout)
    return prepare_arrays(subset(arrays, cfg.train_subset), cfg.input_pad)


def make_augment(cfg, train_arrays: Arrays) -> Augment:
    """The run's training augmentation; the PCA basis of its training images (cached
    beside the decoded arrays when they are a whole stored split)."""
    pca = None
    if cfg.pca_colour:
        whole = train_arrays.path is not None and train_arrays.indices is None
        pca = cached_pca_basis(train_arrays.images,
                               train_arrays.path.with_name("train_pca.npz") if whole else None)
    return Augment(crop_pad=cfg.crop_pad, flip=cfg.flip, colour_shift=cfg.colour_shift, pca=pca)


def make_normaliser(kind: str, train_images: np.ndarray) -> Normalizer | None:
    """per_pixel / per_channel: the training set's mean subtracted (He et al.);
    standard: per-channel mean and standard deviation; lecun: the 1998 paper's scale."""
    if kind == "none":
        return None
    if kind == "lecun":
        return LECUN
    return Normalizer.from_data(train_images, per_pixel=kind == "per_pixel",
                                scale=kind == "standard")


def model_input_shape(image_shape: tuple, resize: int) -> tuple:
    """(H, W, C) the model sees."""
    h, w, c = image_shape
    return (resize, resize, c) if resize else (h, w, c)


def make_input_fn(normaliser: Normalizer | None, resize: int = 0) -> Callable:
    """uint8 [B, H, W, C] -> float32 model input, on the device."""
    def to_input(x):
        x = normaliser(x) if normaliser is not None else x.astype(jnp.float32)
        if resize and x.shape[1:3] != (resize, resize):
            x = jax.image.resize(x, (x.shape[0], resize, resize, x.shape[3]), "bilinear")
        return x
    return to_input
