"""A split as the network sees it: a source and the preprocessing ops a preset composes.

    spec = DataSpec("imagenet_sample", augment="resnet", image_size=224)
    train = open_split(spec, "train")          # no TrainConfig needed
    batch = train.train_batch(index, epoch, seed)
    views = train.eval_batch(index, "10")

`DataSpec` says what the data is (name, folder, holdout, classes, subsets, image size,
augmentation, bad-image policy); TrainConfig holds one (`TrainConfig.data_spec`).
"Image size" has one meaning: the side S of the square images the pipeline delivers
to the network (before `input_pad` and the device-side `resize`). Decoded ImageFolder
arrays are stored at S (covered and centre-cropped); streamed images are cut to S;
0 keeps a decoded dataset's own size and streams at 224.

`Dataset` works the same on every source. Decoded arrays of one size take the
vectorised numpy path (a gather, then each op on the whole batch); anything else
(encoded JPEGs of every size) goes image by image through the same ops, decoding no
more pixels than the crop needs. Unreadable files are refused (naming the file) or,
with bad_images="skip", left out: their slot carries mask 0 and zero pixels, and the
batch lists them (SKIPPED) so that each file is counted once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Optional

import numpy as np

from cnn_jax.data import ops
from cnn_jax.data.keys import IMAGE, LABEL, MASK, SHIFT, SKIPPED
from cnn_jax.data.sources import (Arrays, Decode, MissingSplit, Source, imagefolder_path,
                                  open_source, stratified_holdout, streams)
from cnn_jax.errors import BadInput, DataError
from cnn_jax.recipe import added, outside, result

log = logging.getLogger(__name__)

STREAM_SIDE = 224            # a streamed dataset's default side
SAMPLE = 500                 # images a streamed normaliser is estimated from
LIGHTING = tuple(k for k, names in ops.RECIPES.items() if "lighting" in names)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the data is and how it is prepared: enough to open any split of it. The
    `data` section of a run's recipe (cnn_jax.train.TrainConfig): each field declares
    what it does to a run's numbers (cnn_jax.recipe) and its flag."""
    name: str = result("cifar10", "the dataset: cifar10, mnist, imagenet_sample, "
                       "imagenet2012, a folder or .tar in ImageFolder layout (PATH or "
                       "imagefolder:PATH), arrayrecord:DIR, tfds:NAME or "
                       "synthetic[:HxWxC:classes:n_train:n_test]", flat="data")
    data_dir: Optional[str] = outside(None, "a folder of local copies of the named datasets "
                                      "(else $CNN_JAX_DATA_DIR, ../shared/data, a download)")
    holdout: int = result(0, ">0: train on train/ less a stratified holdout of this many "
                          "images, and evaluate on it ('val')")
    classes: str = added("", "train and evaluate on these classes only ('0,1' or 'cat,dog'), "
                         "relabelled in that order")
    train_subset: int = added(0, ">0: train on a fixed stratified subset of this many images")
    eval_subset: int = added(0, ">0: evaluate on a fixed stratified subset of this many images")
    image_size: int = added(0, ">0: the side S of the square images delivered to the network "
                            "(decoded folders are stored covering S, centre-cropped; streams "
                            "are cut to S); 0: a decoded dataset's own size, 224 for streams")
    augment: str = added("cifar", "the training preprocessing, a named recipe of ops "
                         "(cnn_jax.data.ops.RECIPES): cifar (pad-and-crop, flip), resnet "
                         "(scale augmentation, flip, PCA lighting), inception (random-resized "
                         "crop, flip), alexnet (256 crops, flip, PCA lighting), center (the "
                         "single test view)", choices=ops.AUGMENTS)
    crop_pad: int = result(4, "cifar: pad by this many pixels and crop back at random (0: "
                           "no crop)")
    flip: bool = result(True, "mirror left-right with probability 1/2")
    colour_shift: float = result(0.0, ">0: add a random offset in [-x, x] to each channel of "
                                 "each image")
    pca_colour: bool = result(False, "Krizhevsky's PCA lighting (the training images' basis "
                              "for decoded arrays, ImageNet's for streams)")
    input_pad: int = added(0, "zero-pad every image by this many pixels first (LeNet: MNIST's "
                           "28 to 32)")
    bad_images: str = added("refuse", "an unreadable file: refuse (stop, naming it) or skip "
                            "(leave it out, counted)", choices=ops.BAD_IMAGES)
    normalise: str = result("per_pixel", "the inputs' normalisation: per_pixel or "
                            "per_channel mean (of the training images), standard (mean and "
                            "std), lecun, imagenet or inception (torchvision's), source "
                            "(--init-from's own), none", choices=ops.NORMALISATIONS)
    resize: int = added(0, ">0: bilinear resize to this size on the device (nets built for "
                        "larger inputs)")

    @property
    def streams(self) -> bool:
        """Whether images are read encoded (a dataset too large to decode, or a folder
        of images of every size under an ImageNet preset) rather than decoded into the
        cache. Any preset runs on either."""
        return streams(self.name) or (self.augment != "cifar" and
                                      imagefolder_path(self.name) is not None)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A split: its source, the side S, and its training recipe (the ops, in order:
    cnn_jax.data.ops.recipe); its test views are the papers' (ops.view_source)."""
    source: Source
    side: int
    ops: tuple = ()                     # the training recipe's ops
    view_pad: int = 4                   # images of side S: the ten views' padding
    bad_images: str = "refuse"

    @property
    def input_pad(self) -> int:
        """The recipe's zero padding (ops.Pad, --input-pad): the test views' too."""
        return sum(op.amount for op in self.ops if isinstance(op, ops.Pad))

    def __len__(self) -> int:
        return len(self.source)

    @property
    def classes(self) -> list:
        return self.source.classes

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    @property
    def skipped(self) -> tuple:
        """(file, reason) of the split's files that are not images (or not decodable)."""
        return self.source.skipped

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) of the images delivered (after input_pad)."""
        if self.batched:
            h, w, c = self.source.image_shape
            return (h + 2 * self.input_pad, w + 2 * self.input_pad, c)
        return (self.delivered_side, self.delivered_side, 3)

    @property
    def batched(self) -> bool:
        """Decoded arrays of one size whose ops all have a whole-batch form."""
        return isinstance(self.source, Arrays) and all(op.batch is not None for op in self.ops)

    def take(self, keep, labels=None, classes=None) -> "Dataset":
        """Examples `keep` of this split, optionally relabelled."""
        return dataclasses.replace(self, source=self.source.take(keep, labels, classes))

    def describe(self) -> str:
        """What these examples are and where from, with their count."""
        return f"{self.source.describe()} ({len(self):,} images)"

    # -------------------------------------------------------------- reading
    def _read(self, i: int, view):
        """view(record, where) of record i, or None where it is unreadable and bad
        images are skipped."""
        record, label = self.source.read(int(i))
        try:
            return view(record, self.source.where(int(i))), label
        except DataError as e:
            if self.bad_images != "skip":
                raise DataError(f"record {i}: {e} (--bad-images skip leaves unreadable "
                                f"files out)") from None
            log.warning("leaving out record %d: %s", i, e)
            return None, label

    def _per_image(self, index, view, shape, dtype=np.uint8) -> dict:
        """The batch of view(record, where, k) over `index`: an unreadable record is
        left out (zeros, mask 0, listed in SKIPPED) where bad images are skipped."""
        images = np.zeros((len(index), *shape), dtype)
        labels, mask = np.zeros(len(index), np.int32), np.ones(len(index), np.float32)
        for k, i in enumerate(index):
            img, labels[k] = self._read(i, lambda r, w, k=k: view(r, w, k))
            if img is None:
                mask[k] = 0
            else:
                images[k] = img
        out = {IMAGE: images, LABEL: labels}
        if self.bad_images == "skip":
            out[MASK], out[SKIPPED] = mask, np.asarray(index)[mask == 0].astype(np.int64)
        return out

    def _padded(self, img: np.ndarray) -> np.ndarray:
        return ops.pad(img, self.input_pad) if self.input_pad else img

    @property
    def delivered_side(self) -> int:
        return self.side + 2 * self.input_pad

    # -------------------------------------------------------------- training
    def train_batch(self, index: np.ndarray, epoch: np.ndarray, seed: int) -> dict:
        """The training views of examples `index` at `epoch`, the recipe's ops in order,
        each with its own draws: uint8, or float32 where colour ops ran on decoded
        arrays; other images send their colour as SHIFT [B, 3], added on the device (a
        uint8 transfer)."""
        index = np.asarray(index)
        draws = [ops.uniforms(seed, epoch, index, op.stream, op.draws) if op.draws else None
                 for op in self.ops]
        if self.batched:
            x = self.source.pixels(index)
            for op, u in zip(self.ops, draws):
                x = op.batch(x, u)
            return {IMAGE: x, LABEL: self.labels[index]}
        shaping = [(op, u) for op, u in zip(self.ops, draws) if not op.colour]
        out = self._per_image(index, lambda r, w, k: self._shaped(r, w, shaping, k),
                              self.image_shape)
        shifts = [op.shift(u, 3) for op, u in zip(self.ops, draws) if op.colour]
        if shifts:
            out[SHIFT] = np.sum(shifts, axis=0).astype(np.float32)
        return out

    def _shaped(self, record, where: str, shaping: list, k: int) -> np.ndarray:
        """One image through the recipe's geometry and flip (its colour goes as SHIFT)."""
        image = ops.Picture.of(record, where)
        for op, u in shaping:
            image = op.one(image, None if u is None else u[k], self.side)
        return ops.pixels(image)

    # -------------------------------------------------------------- evaluation
    def single_view(self, record, where: str) -> np.ndarray:
        """The centre view: an image of side S itself; any other image's centre S x S
        after its shorter side is resized to 256 / 224 * S."""
        return ops.ten_views(ops.view_source(record, where, self.side, 0), self.side)[ops.CENTRE]

    def eval_batch(self, index: np.ndarray, views: str = "1") -> dict:
        """views '1': [B, H, W, C], the centre view; '2' and '10': [B, V, H, W, C]
        (ops.pick of the ten views); 'multiscale': a list per image of its five
        whole-image views (their shapes differ). Images of side S are padded by
        `view_pad` for their ten views (CIFAR), so their centre view is the image."""
        index = np.asarray(index)
        if views == "multiscale":
            return self._per_image_list(index, lambda r, w: ops.multiscale_views(r, w, self.side))
        size = self.delivered_side
        if self.batched and self.source.image_shape[:2] == (self.side, self.side):
            x = self._padded(self.source.pixels(index))
            if views != "1":
                x = ops.pick(ops.ten_views_batch(ops.pad(x, self.view_pad), size), views)
            return {IMAGE: x, LABEL: self.labels[index]}
        if views == "1":
            return self._per_image(index, lambda r, w, k: self._padded(self.single_view(r, w)),
                                   self.image_shape)
        n = 10 if views == "10" else 2
        return self._per_image(index, lambda r, w, k: ops.pick(ops.ten_views(
            ops.view_source(self._padded(r) if isinstance(r, np.ndarray) else r, w, size,
                            self.view_pad), size)[None], views)[0],
            (n, size, size, self.image_shape[-1]))

    def _per_image_list(self, index, view) -> dict:
        images, labels, mask = [], [], []
        for i in index:
            v, label = self._read(i, view)
            images.append(v)
            labels.append(label)
            mask.append(v is not None)
        out = {IMAGE: images, LABEL: np.asarray(labels, np.int32)}
        if self.bad_images == "skip":
            m = np.asarray(mask, np.float32)
            out[MASK], out[SKIPPED] = m, np.asarray(index)[m == 0].astype(np.int64)
        return out

    def digest(self) -> str:
        """What identifies these examples (a cache key): the pixels of decoded arrays,
        else the files behind the records; and the labels."""
        h = hashlib.sha256()
        if self.batched:
            for i in range(0, len(self), 1024):
                h.update(np.ascontiguousarray(self.source.images[i:i + 1024]).tobytes())
        else:
            h.update("\n".join(self.source.where(i) for i in range(len(self))).encode())
            h.update(f"{self.side}|{self.input_pad}".encode())
        h.update(np.asarray(self.labels, np.int64).tobytes())
        return h.hexdigest()[:16]

    def normaliser_images(self, n: int = SAMPLE) -> np.ndarray:
        """What a data-derived normaliser is computed from: all the training images of
        decoded arrays (padded), else the single views of a fixed spread of n."""
        if self.batched:
            return self._padded(self.source.images) if self.input_pad else self.source.images
        index = np.unique(np.linspace(0, len(self) - 1, min(n, len(self))).astype(int))
        batch = self.eval_batch(index)
        return batch[IMAGE][batch[MASK] > 0] if MASK in batch else batch[IMAGE]


# ------------------------------------------------------------------ opening a split
def ignored_by_recipe(spec: DataSpec) -> list[tuple[str, str]]:
    """(field, why) of the data fields set away from their defaults that the recipe
    `spec.augment` has no op for: refused (cnn_jax.train.config.validate), never
    silently dropped."""
    defaults, out = DataSpec(), []
    if spec.crop_pad != defaults.crop_pad and spec.augment != "cifar":
        out.append(("crop_pad", f"--augment {spec.augment} has no pad-and-crop (the cifar "
                                f"recipe's)"))
    if not spec.flip and spec.augment == "center":
        out.append(("flip", "--augment center has no flip (it is the single test view)"))
    if spec.pca_colour and spec.augment in LIGHTING:
        out.append(("pca_colour", f"--augment {spec.augment} has PCA lighting already"))
    return out


def check(spec: DataSpec) -> None:
    if spec.augment not in ops.AUGMENTS:
        raise BadInput(f"--augment: must be one of {', '.join(ops.AUGMENTS)}; got "
                       f"{spec.augment!r}")
    if spec.augment == "cifar" and streams(spec.name):
        raise BadInput(f"--augment cifar: {spec.name} streams full-size images of every "
                       f"size; choose one of {', '.join(ops.AUGMENTS[1:])}")


def stored_split(spec: DataSpec, split: str) -> Source:
    """The source of `split` (held out and class-selected; not yet subset)."""
    check(spec)
    decode = None
    if not spec.streams:
        size = (spec.image_size, spec.image_size) if spec.image_size else None
        decode = Decode(size=size, crop=size is not None, skip_bad=spec.bad_images == "skip")
    source = open_source(spec.name, split, data_dir=spec.data_dir, holdout=spec.holdout,
                         decode=decode)
    return select_classes(source, spec.classes)


def open_split(spec: DataSpec, split: str, subset_size: Optional[int] = None,
               training: bool = False) -> Dataset:
    """`split` ('train', 'val' or 'test') of `spec` as a Dataset, with the preset's
    training ops (used by train_batch) and its test views. `subset_size`: a fixed
    stratified subset (default: the spec's train_subset for 'train' when training)."""
    source = stored_split(spec, split)
    size = spec.train_subset if subset_size is None and training else (subset_size or 0)
    source = subset(source, size)
    side = source.image_shape[0] if spec.augment == "cifar" else \
        spec.image_size or (STREAM_SIDE if spec.streams else source.image_shape[0])
    return Dataset(source, side, tuple(ops.recipe(spec)), spec.crop_pad or 4, spec.bad_images)


def with_pca(train: Dataset, spec: DataSpec) -> Dataset:
    """The training split with PCA lighting from its own images' basis (decoded
    arrays: cached beside the decoded cache when the split is a whole stored one)."""
    if not spec.pca_colour or not train.batched:
        return train
    src = train.source
    whole = src.path is not None and src.indices is None and not train.input_pad
    basis = ops.cached_pca_basis(train.normaliser_images(),
                                 src.path.with_name("train_pca.npz") if whole else None)
    return dataclasses.replace(train, ops=tuple(
        ops.Lighting(basis) if isinstance(op, ops.Lighting) else op for op in train.ops))


def subset(split, size: int):
    """A fixed stratified subset of `size` examples of a Source or Dataset (all of
    them when size is 0 or not smaller)."""
    if not size or size >= len(split):
        return split
    taken = split.take(stratified_holdout(split.labels, size, seed=0))
    source = taken.source if isinstance(taken, Dataset) else taken
    source.origin = f"a fixed stratified {size:,} of {split_origin(split)}"
    return taken


def split_origin(split) -> str:
    """What a Source's or Dataset's examples are, in words (Source.describe)."""
    return (split.source if isinstance(split, Dataset) else split).describe()


def select_classes(source, spec: str):
    """Only the classes of `spec` ("0,1,2" or "cat,dog"), relabelled 0.. in its order."""
    if not spec:
        return source
    wanted = [c.strip() for c in spec.split(",") if c.strip()]
    index = []
    for c in wanted:
        if c in source.classes:
            index.append(source.classes.index(c))
        elif c.isdigit() and int(c) < len(source.classes):
            index.append(int(c))
        else:
            raise BadInput(f"--classes: {c!r} is neither a class name nor an index of "
                           f"{source.classes}")
    if len(set(index)) != len(index) or len(index) < 2:
        raise BadInput(f"--classes: need at least two different classes; got {spec!r}")
    relabel = np.full(len(source.classes), -1, np.int32)
    relabel[index] = np.arange(len(index))
    keep = np.flatnonzero(relabel[source.labels] >= 0)
    taken = source.take(keep, relabel[source.labels[keep]], [source.classes[i] for i in index])
    taken.origin = f"classes {', '.join(taken.classes)} of {source.describe()}"
    return taken


__all__ = ["DataSpec", "Dataset", "open_split", "stored_split", "with_pca", "subset",
           "select_classes", "MissingSplit"]
