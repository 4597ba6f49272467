"""From the stored uint8 images to the model's input: the adaptations a recipe asks for.

Host side, once: `input_pad` zero-pads every image (LeCun et al. 1998 feed the 28x28
MNIST digits centred in a 32x32 field). Device side, inside the compiled step:
normalisation, then an optional bilinear `resize` (for architectures whose first stage
needs more pixels than the data has, e.g. AlexNet or GoogLeNet on CIFAR-10).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.data.augment import STREAM_AUGMENTS, Augment, Normalizer, cached_pca_basis, pad
from cnn_jax.data.records import Subset, open_records, streams
from cnn_jax.data.sources import Arrays, MissingSplit, load, stratified_holdout
from cnn_jax.data.streams import LIGHTING, Stream
from cnn_jax.errors import BadInput
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


def take(source: Arrays | Stream, keep: np.ndarray, labels=None, classes=None):
    """Examples `keep` of a split (arrays or stream), optionally relabelled."""
    labels = source.labels[keep] if labels is None else labels
    classes = source.classes if classes is None else classes
    if isinstance(source, Stream):
        return dataclasses.replace(source, records=Subset(source.records, keep, labels, classes))
    return Arrays(np.asarray(source.images[keep]), labels, classes)


def prepare_arrays(arrays: Arrays | Stream, input_pad: int) -> Arrays | Stream:
    """The split with every image zero-padded by `input_pad` pixels on each side."""
    if not input_pad or isinstance(arrays, Stream):
        return arrays
    return dataclasses.replace(arrays, images=pad(np.asarray(arrays.images), input_pad),
                               path=None, indices=None)


def subset(arrays: Arrays, size: int) -> Arrays:
    """A fixed stratified subset of `size` examples (all of them when size is 0 or
    not smaller than the split)."""
    if not size or size >= len(arrays):
        return arrays
    return take(arrays, stratified_holdout(arrays.labels, size, seed=0))


def select_classes(arrays: Arrays, spec: str) -> Arrays:
    """Only the classes of `spec` ("0,1,2" or "cat,dog"), relabelled 0.. in its order."""
    if not spec:
        return arrays
    wanted = [c.strip() for c in spec.split(",") if c.strip()]
    index = []
    for c in wanted:
        if c in arrays.classes:
            index.append(arrays.classes.index(c))
        elif c.isdigit() and int(c) < len(arrays.classes):
            index.append(int(c))
        else:
            raise BadInput(f"--classes: {c!r} is neither a class name nor an index of "
                           f"{arrays.classes}")
    if len(set(index)) != len(index) or len(index) < 2:
        raise BadInput(f"--classes: need at least two different classes; got {spec!r}")
    relabel = np.full(len(arrays.classes), -1, np.int32)
    relabel[index] = np.arange(len(index))
    keep = np.flatnonzero(relabel[arrays.labels] >= 0)
    return take(arrays, keep, relabel[arrays.labels[keep]], [arrays.classes[i] for i in index])


def streaming(cfg) -> bool:
    """Whether a run of `cfg` streams its images (an ImageNet augmentation, or a
    dataset that only streams) rather than reading decoded arrays."""
    return cfg.augment in STREAM_AUGMENTS or streams(cfg.data)


def split_arrays(cfg, split: str, data_dir=None) -> Arrays | Stream:
    """One split as a run of `cfg` sees it: resized (arrays) or streamed, held out and
    class-selected (not yet subset or padded)."""
    if streaming(cfg):
        return select_classes(split_stream(cfg, split, data_dir or cfg.data_dir), cfg.classes)
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
    arrays = load(cfg.data, split, data_dir=data_dir or cfg.data_dir, holdout=cfg.holdout,
                  size=size, crop=size is not None)
    return select_classes(arrays, cfg.classes)


def split_stream(cfg, split: str, data_dir=None) -> Stream:
    """A split of a streaming dataset: 'val' is a stratified holdout of train when
    --holdout is set; 'test' is test/, else val/ (MissingSplit when neither exists)."""
    if cfg.augment not in STREAM_AUGMENTS:
        raise BadInput(f"--augment {cfg.augment}: {cfg.data} streams full-size images of "
                       f"every size; choose one of {', '.join(STREAM_AUGMENTS)}")
    name = cfg.data if streams(cfg.data) or cfg.data.startswith("imagefolder:") else None
    if name is None:
        raise BadInput(f"--augment {cfg.augment} transforms full-size images as they stream; "
                       f"--data {cfg.data} is read as decoded arrays. Stream imagenet_sample, "
                       f"imagenet2012, imagefolder:PATH (a folder or uncompressed .tar), "
                       f"arrayrecord:DIR or tfds:NAME, or use --augment cifar")
    if split == "test":
        try:
            records = open_records(name, "test", data_dir)
        except MissingSplit:
            records = open_records(name, "val", data_dir)
    else:
        records = open_records(name, "train", data_dir)
        if cfg.holdout:
            val = stratified_holdout(records.labels, cfg.holdout, seed=0)
            keep = val if split == "val" else np.setdiff1d(np.arange(len(records)), val)
            records = Subset(records, keep)
    return Stream(records, cfg.image_size or 224, cfg.augment,
                  lighting=cfg.augment in LIGHTING or cfg.pca_colour, bad_images=cfg.bad_images)


def training_arrays(cfg, data_dir=None) -> Arrays:
    """The images a run of `cfg` trains on (holdout, subset and padding applied): its
    normaliser and PCA basis come from these, at training and at evaluation time."""
    return prepare_arrays(subset(split_arrays(cfg, "train", data_dir), cfg.train_subset),
                          cfg.input_pad)


def make_augment(cfg, train_arrays: Arrays | Stream) -> Optional[Augment]:
    """The run's training augmentation of arrays; the PCA basis of its training images
    (cached beside the decoded arrays when they are a whole stored split). None for a
    stream, which transforms its own images."""
    if isinstance(train_arrays, Stream):
        return None
    pca = None
    if cfg.pca_colour:
        whole = train_arrays.path is not None and train_arrays.indices is None
        pca = cached_pca_basis(train_arrays.images,
                               train_arrays.path.with_name("train_pca.npz") if whole else None)
    return Augment(crop_pad=cfg.crop_pad, flip=cfg.flip, colour_shift=cfg.colour_shift, pca=pca)


def normaliser_images(train: Arrays | Stream) -> np.ndarray:
    """What a data-derived normaliser is computed from: the training images, or for a
    stream the single test views of a fixed spread of its training images."""
    return train.sample() if isinstance(train, Stream) else train.images


def make_normaliser(kind: str, train_images: np.ndarray, source: str = "",
                    model: str = "") -> Normalizer | None:
    """per_pixel / per_channel: the training set's mean subtracted (He et al.);
    standard: per-channel mean and standard deviation; lecun: the 1998 paper's scale;
    imagenet / inception: torchvision's for its ImageNet weights; source: the one the
    run at `source` (--init-from) was trained with, so a pretrained net sees its inputs
    as it learnt them."""
    if kind == "none":
        return None
    fixed = {"lecun": LECUN, "imagenet": IMAGENET, "inception": INCEPTION}
    if kind in fixed:
        return fixed[kind]
    if kind == "source":
        return source_normaliser(source, model)
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


NORMALISER_FILE = "normaliser.npz"


def save_normaliser(out: Path, normaliser: Normalizer | None, image_shape: tuple) -> None:
    """Beside a run's checkpoints: what its inputs were normalised with, and the shape
    of its stored training images."""
    shape = np.asarray(image_shape, np.int64)
    if normaliser is None:
        np.savez(out / NORMALISER_FILE, none=np.array(True), image_shape=shape)
    else:
        np.savez(out / NORMALISER_FILE, mean=normaliser.mean, std=normaliser.std,
                 image_shape=shape)


def training_image_shape(source) -> tuple:
    """(H, W, C) of the images the run at `source` trained on."""
    saved = Path(source) / NORMALISER_FILE
    if saved.exists():
        with np.load(saved) as f:
            if "image_shape" in f:
                return tuple(int(v) for v in f["image_shape"])
    return training_arrays(TrainConfig.of_run(source)).image_shape


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
    return make_normaliser(cfg.normalise, normaliser_images(training_arrays(cfg)), cfg.init_from,
                           cfg.model)
