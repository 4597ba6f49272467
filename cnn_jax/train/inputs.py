"""From the delivered uint8 images to the model's input: the normaliser (from the
training images, fixed ones, or a pretrained run's), saved beside a run, and the
device-side function that applies it, then an optional bilinear `resize` (for
architectures whose first stage needs more pixels than the data has, e.g. AlexNet or
GoogLeNet on CIFAR-10). The host side (`input_pad`, the augmentation) is the
dataset's (cnn_jax.data.dataset).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.data.dataset import Dataset, open_split, with_pca
from cnn_jax.data.ops import Normalizer
from cnn_jax.files import atomic
from cnn_jax.models.convert import WEIGHT_SUFFIXES, detect_arch, read_state_dict
from cnn_jax.train.config import TrainConfig

# Sec. II.B: "the background level (white) corresponds to a value of -0.1 and the
# foreground (black) corresponds to 1.175": x / 255 * 1.275 - 0.1 = (x - 20) / 200.
LECUN = Normalizer(np.array([20.0], np.float32), np.array([200.0], np.float32))

# torchvision's ImageNet models: x / 255 normalised by ImageNet's channel statistics.
IMAGENET = Normalizer(np.array([0.485, 0.456, 0.406], np.float32) * 255,
                      np.array([0.229, 0.224, 0.225], np.float32) * 255)
# torchvision's GoogLeNet weights (transform_input=True): x / 255 mapped to [-1, 1].
INCEPTION = Normalizer(np.full(3, 127.5, np.float32), np.full(3, 127.5, np.float32))


def split_of(cfg: TrainConfig, split: str, data_dir=None) -> Dataset:
    """`split` as a run of `cfg` sees it: held out and class-selected, not subset."""
    return open_split(cfg.data_spec(data_dir), split)


def training_split(cfg: TrainConfig, data_dir=None) -> Dataset:
    """The images a run of `cfg` trains on (holdout, classes and subset applied) with
    its training ops: its normaliser and PCA basis come from these, at training and at
    evaluation time."""
    spec = cfg.data_spec(data_dir)
    return with_pca(open_split(spec, "train", training=True), spec)


def make_normaliser(kind: str, train_images, source: str = "",
                    model: str = "") -> Normalizer | None:
    """per_pixel / per_channel: the training set's mean subtracted (He et al.);
    standard: per-channel mean and standard deviation; lecun: the 1998 paper's scale;
    imagenet / inception: torchvision's for its ImageNet weights; source: the one the
    run at `source` (--init-from) was trained with, so a pretrained net sees its inputs
    as it learnt them. `train_images`: the images, or a function that reads them (only
    the data-derived kinds call it)."""
    if kind == "none":
        return None
    fixed = {"lecun": LECUN, "imagenet": IMAGENET, "inception": INCEPTION}
    if kind in fixed:
        return fixed[kind]
    if kind == "source":
        return source_normaliser(source, model)
    images = train_images() if callable(train_images) else train_images
    return Normalizer.from_data(images, per_pixel=kind == "per_pixel", scale=kind == "standard")


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


NORMALISER_FILE = "normaliser.npz"


def save_normaliser(out: Path, normaliser: Normalizer | None, image_shape: tuple) -> None:
    """Beside a run's checkpoints: what its inputs were normalised with, and the shape
    of its stored training images."""
    shape = np.asarray(image_shape, np.int64)
    arrays = dict(none=np.array(True)) if normaliser is None else \
        dict(mean=normaliser.mean, std=normaliser.std)
    with atomic(out / NORMALISER_FILE) as tmp:
        np.savez(tmp, **arrays, image_shape=shape)


def training_image_shape(source) -> tuple:
    """(H, W, C) of the images the run at `source` trained on."""
    saved = Path(source) / NORMALISER_FILE
    if saved.exists():
        with np.load(saved) as f:
            if "image_shape" in f:
                return tuple(int(v) for v in f["image_shape"])
    return training_split(TrainConfig.of_run(source)).image_shape


def weights_normaliser(model: str) -> Normalizer:
    """What released PyTorch weights of `model` were trained on: torchvision's
    GoogLeNet weights expect its transform_input=True ([-1, 1] inputs); every other
    file (torchvision, timm, the CIFAR reproduction) ImageNet's normalisation of x / 255."""
    return INCEPTION if model == "googlenet_torchvision" else IMAGENET


def source_normaliser(source: str, model: str = "") -> Normalizer | None:
    """The normaliser of the run at `source`: its saved one, else recomputed from its
    config and training data; a weights file: `weights_normaliser` of `model` (the
    architecture it is loaded into; detected from the file when not given)."""
    source = Path(source)
    if source.suffix in WEIGHT_SUFFIXES:
        return weights_normaliser(model or detect_arch(read_state_dict(source))[0])
    saved = source / NORMALISER_FILE
    if saved.exists():
        with np.load(saved) as f:
            return None if "none" in f else Normalizer(f["mean"], f["std"])
    cfg = TrainConfig.of_run(source)  # a run from before normalisers were saved
    return make_normaliser(cfg.data.normalise, training_split(cfg).normaliser_images,
                           cfg.model.init_from, cfg.model.name)
