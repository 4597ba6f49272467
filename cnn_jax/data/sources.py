"""Where records come from: one kind of dataset, random access by index.

    source = open_source("cifar10", "train")              # decoded pixels (cached)
    source = open_source("imagenet_sample", "train")      # encoded JPEGs, read in place
    record, label = source.read(17)   # a uint8 [H, W, C] array, or the file's bytes

Every split of every dataset is a `Source`: `len`, `labels`, `classes`, `read(i)`,
`where(i)` (the file behind record i, for messages). The kinds:
  * `Arrays`: records that are already pixels (uint8 [N, H, W, C], usually a memory map
    of the decoded cache), with a batched `pixels(index)` for the numpy fast path;
  * an ImageFolder (<root>/<split>/<class>/<image> or <root>/<class>/<image>) as a
    directory, or an uncompressed .tar read in place through a cached offsets index;
  * ArrayRecord shards of scripts/prepare_arrayrecord.py (`arrayrecord:DIR`): each
    record is the label (int32, little-endian) then the file's bytes;
  * TFDS through `tfds.data_source` (ArrayRecord builds; `tfds:NAME`), left encoded;
  * `Subset`: records `keep` of another source (a holdout, a subset, some classes).
Small datasets (DATASETS' `decode`) are decoded once into the cache and memory-mapped;
large ones stream. CIFAR-10 and MNIST without a local copy come from their official
archives (cnn_jax.data.fetch: downloaded once, checksummed, converted losslessly). A bare
path (`/data/photos`, `photos.tar`) is an ImageFolder, as `imagefolder:PATH`. One scanner (cnn_jax.data.imagefolder) reads every ImageFolder, one
fingerprint keys every cache entry, one TFDS reader serves both. Nothing here transforms an image:
cnn_jax.data.ops does that.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from cnn_jax.cache import PROJECT_ROOT, cache_dir
from cnn_jax.data.imagefolder import (SPLITS, _cached, _exists, decode_image, decode_into,
                                      fingerprint, fit_image, imagefolder_index)
from cnn_jax.errors import DataError

log = logging.getLogger(__name__)

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")
CACHE_FORMAT = 3     # bump when the decoded cache's layout changes (3: one scanner)
LABEL = struct.Struct("<i")    # an ArrayRecord record: label, then the encoded image
DATASET_FILE = "dataset.json"  # beside ArrayRecord shards: classes, splits, shards

# The named datasets: found locally first (an ImageFolder archive or folder named like
# the dataset), else from their official archives (`fetch`: cnn_jax.data.fetch) or a
# prepared TFDS build (`tfds`). `decode`: small enough to decode into the cache.
DATASETS = {
    "cifar10": {"fetch": True, "tfds": None, "decode": True},
    "mnist": {"fetch": True, "tfds": None, "decode": True},
    "imagenet_sample": {"fetch": False, "tfds": None, "decode": False},
    "imagenet2012": {"fetch": False, "tfds": "imagenet2012", "decode": False},
}
TFDS_SPLITS = {"val": "validation"}   # our split names where TFDS's differ
TFDS_PREPARE = {
    "imagenet2012": "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
                    "image-net.org) in ~/tensorflow_datasets/downloads/manual/ (or "
                    "<data_dir>/downloads/manual/), then prepare it once with: tfds build "
                    "imagenet2012 --file_format=array_record [--data_dir DIR]"}


class MissingSplit(DataError):
    """The dataset has no such split (e.g. an ImageFolder without test/)."""


# ------------------------------------------------------------------ the sources
class Source:
    """One split of a dataset: `read(i)` -> (record, label)."""

    source: str            # what it was opened from (for messages)
    classes: list
    labels: np.ndarray     # int32 [N]
    skipped: tuple = ()    # (file, reason) of the split's files that are not in it
    split: str = ""        # the stored split it was read from
    origin: str = ""       # what these records are, in words (`describe`)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int):
        raise NotImplementedError

    def where(self, i: int) -> str:
        return f"{self.source}[{i}]"

    def describe(self) -> str:
        """What these records are and where they come from: 'test/ of PATH', 'a
        stratified holdout of 5,000 of train/ of PATH' (the count is len(self))."""
        return self.origin or f"{self.split or 'records'}/ of {self.source}"

    def take(self, keep, labels=None, classes=None) -> "Source":
        """Records `keep` of this source, optionally relabelled."""
        return Subset(self, keep, labels, classes)

    def __getstate__(self):  # open files and readers are reopened in each process
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}


class Arrays(Source):
    """Records that are already pixels: uint8 [N, H, W, C], a memory map of the decoded
    cache (`path`, rows `indices` of it: reopened in each worker, nothing large is
    pickled) or an array in memory."""

    def __init__(self, images, labels, classes, path: Optional[Path] = None,
                 indices: Optional[np.ndarray] = None, skipped: tuple = (), source: str = ""):
        self.images, self.labels, self.classes = images, np.asarray(labels, np.int32), classes
        self.path, self.indices, self.skipped = path, indices, tuple(skipped)
        self.source = source or (str(path) if path else "arrays")

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def read(self, i):
        return np.asarray(self.images[int(i)]), int(self.labels[i])

    def pixels(self, index: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, C] of rows `index`, read from the memory map in sorted order."""
        index = np.asarray(index)
        if getattr(self, "_open_map", None) is None:
            self._open_map = np.load(self.path, mmap_mode="r") if self.path is not None \
                else np.asarray(self.images)
        rows = index if self.path is None or self.indices is None else self.indices[index]
        order = np.argsort(rows)
        out = np.empty((len(rows), *self._open_map.shape[1:]), self._open_map.dtype)
        out[order] = self._open_map[rows[order]]
        return out

    def take(self, keep, labels=None, classes=None) -> "Arrays":
        """Rows `keep`: still arrays (rows of the same memory map)."""
        keep = np.asarray(keep, np.int64)
        rows = keep if self.indices is None else self.indices[keep]
        taken = Arrays(self.images[keep], self.labels[keep] if labels is None else labels,
                      self.classes if classes is None else classes, self.path,
                      rows if self.path is not None else None, self.skipped, self.source)
        taken.split, taken.origin = self.split, self.origin
        return taken

    def __getstate__(self):
        state = super().__getstate__()
        if self.path is not None:
            state["images"] = None  # a memory map: each process maps it again
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.images is None:
            whole = np.load(self.path, mmap_mode="r")
            self.images = whole if self.indices is None else whole[self.indices]


class Subset(Source):
    """Records `keep` of `base` (a holdout, a subset, some classes relabelled)."""

    def __init__(self, base: Source, keep: np.ndarray, labels: Optional[np.ndarray] = None,
                 classes: Optional[list] = None):
        self.base, self.keep = base, np.asarray(keep, np.int64)
        self.labels = base.labels[self.keep] if labels is None else np.asarray(labels, np.int32)
        self.classes = base.classes if classes is None else classes
        self.source, self.skipped, self.split = base.source, base.skipped, base.split
        self.origin = base.origin

    def read(self, i):
        data, _ = self.base.read(int(self.keep[i]))
        return data, int(self.labels[i])

    def where(self, i):
        return self.base.where(int(self.keep[i]))


class FolderRecords(Source):
    def __init__(self, root: Path, names: list, labels: np.ndarray, classes: list, skipped=()):
        self.source, self.names, self.labels, self.classes = str(root), names, labels, classes
        self.skipped = tuple(skipped)

    def read(self, i):
        return (Path(self.source) / self.names[i]).read_bytes(), int(self.labels[i])

    def where(self, i):
        return str(Path(self.source) / self.names[i])


class TarRecords(Source):
    def __init__(self, archive: Path, names: list, offsets: np.ndarray, sizes: np.ndarray,
                 labels: np.ndarray, classes: list, skipped=()):
        self.source, self.names, self.labels, self.classes = str(archive), names, labels, classes
        self.offsets, self.sizes, self.skipped = offsets, sizes, tuple(skipped)

    def read(self, i):
        if getattr(self, "_open_fd", None) is None:
            self._open_fd = os.open(self.source, os.O_RDONLY)
        data = os.pread(self._open_fd, int(self.sizes[i]), int(self.offsets[i]))
        if len(data) != self.sizes[i]:
            raise DataError(f"{self.where(i)}: archive truncated (read {len(data)} of "
                            f"{self.sizes[i]} bytes)")
        return data, int(self.labels[i])

    def where(self, i):
        return f"{self.source}:{self.names[i]}"


class ArrayRecords(Source):
    def __init__(self, shards: list, labels: np.ndarray, classes: list, source: str):
        self.shards, self.labels, self.classes, self.source = shards, labels, classes, source

    def read(self, i):
        if getattr(self, "_open_source", None) is None:
            from array_record.python import array_record_data_source as ards  # in workers
            self._open_source = ards.ArrayRecordDataSource(self.shards)
        record = self._open_source[int(i)]
        return record[LABEL.size:], LABEL.unpack_from(record)[0]


class TfdsRecords(Source):
    def __init__(self, name: str, split: str, data_dir: Optional[str], labels: np.ndarray,
                 classes: list):
        self.source, self.name, self.split, self.data_dir = f"tfds:{name}", name, split, data_dir
        self.labels, self.classes = labels, classes

    def read(self, i):
        if getattr(self, "_open_source", None) is None:
            self._open_source = tfds_source(self.name, self.split, self.data_dir)[0]
        r = self._open_source[int(i)]
        return bytes(r["image"]), int(r["label"])


# ------------------------------------------------------------------ locations
def search_dirs(data_dir: Optional[str] = None) -> list[Path]:
    """The data-directory flag, then $CNN_JAX_DATA_DIR, then ../shared/data. A folder
    named by the flag or the variable that does not exist is an error (a typo would
    otherwise train on whatever the next place holds)."""
    named = [("--data-dir", data_dir), ("CNN_JAX_DATA_DIR", os.environ.get("CNN_JAX_DATA_DIR"))]
    for where, d in named:
        if d and not Path(d).expanduser().is_dir():
            raise DataError(f"{where} {d}: no such directory (expected a folder holding "
                            f"<dataset>.tar.xz or <dataset>/ in ImageFolder layout)")
    return [Path(d).expanduser() for _, d in named if d] + [SHARED_DATA]


def find_local(name: str, data_dir: Optional[str] = None) -> tuple[Optional[Path], list[str]]:
    """The first `<dir>/<name>.tar.xz|.tar.gz|.tar` or `<dir>/<name>/`; and every place looked."""
    looked = []
    for d in search_dirs(data_dir):
        for candidate in [d / f"{name}{s}" for s in ARCHIVE_SUFFIXES] + [d / name]:
            looked.append(str(candidate))
            if candidate.is_file() or (candidate.is_dir() and any(candidate.iterdir())):
                return candidate, looked
    return None, looked


def _split_of(index: dict, root: Path, split: str) -> dict:
    if split not in index["splits"]:
        raise MissingSplit(f"{root}: has no '{split}' split; found {sorted(index['splits'])}")
    return index["splits"][split]


def imagefolder_records(root: Path, split: str) -> Source:
    """A split of an ImageFolder folder or uncompressed tar, its files left encoded."""
    root = _exists(root)
    index = imagefolder_index(root)
    s = _split_of(index, root, split)
    labels = np.asarray(s["labels"], np.int32)
    skipped = [tuple(f) for f in index["skipped"].get(split, ())]
    if root.is_dir():
        return FolderRecords(root, s["names"], labels, index["classes"], skipped)
    if any(o < 0 for o in s["offsets"]):
        raise DataError(f"{root}: cannot read it in place (a compressed archive); streaming "
                        f"reads an uncompressed .tar or a folder (unpack a .tar.gz/.tar.xz "
                        f"first, or write ArrayRecord shards: scripts/prepare_arrayrecord.py)")
    return TarRecords(root, s["names"], np.asarray(s["offsets"], np.int64),
                      np.asarray(s["sizes"], np.int64), labels, index["classes"], skipped)


# ------------------------------------------------------------------ the decoded cache
def cached_imagefolder(root: Path, split: str, channels: Optional[int] = None,
                       skip_bad: bool = False, size: Optional[tuple] = None,
                       crop: bool = False) -> Arrays:
    """A split of an ImageFolder (folder or any tar) decoded once into the cache, then
    memory-mapped. All splits are written together into `<cache>/<name>-<key>/`."""
    root = _exists(root)
    options = f"c{channels}-s{'x'.join(map(str, size)) if size else 'native'}-b{int(skip_bad)}"
    if size and crop:
        options += "-crop"
    key = hashlib.sha256(f"{CACHE_FORMAT}|{fingerprint(root)}|{options}".encode()).hexdigest()[:16]
    name = re.sub(r"(\.tar(\.xz|\.gz)?|\.tgz)$", "", root.name)
    final = cache_dir() / f"{name}-{key}"

    _cached(final, lambda tmp: decode_into(root, tmp, channels, skip_bad, size, crop))
    return read_decoded(final, split, str(root))


def read_decoded(final: Path, split: str, source: str) -> Arrays:
    """A split of a decoded cache folder (<split>_images.npy, <split>_labels.npy,
    meta.json), memory-mapped."""
    meta = json.loads((final / "meta.json").read_text())
    if split not in meta["splits"]:
        raise MissingSplit(f"{source}: has no '{split}' split; found {sorted(meta['splits'])}")
    images_path = final / f"{split}_images.npy"
    return Arrays(np.load(images_path, mmap_mode="r"), np.load(final / f"{split}_labels.npy"),
                  meta["classes"], images_path,
                  skipped=tuple(tuple(f) for f in meta["skipped"].get(split, ())),
                  source=source)


# ------------------------------------------------------------------ official archives
def official_arrays(name: str, split: str, data_dir: Optional[str],
                    decode: Optional[Decode]) -> Arrays:
    """A split of CIFAR-10 or MNIST from its official files (cnn_jax.data.fetch:
    downloaded and converted once), with `decode`'s channels and size applied (once,
    into the cache) where they differ from the official pixels."""
    from cnn_jax.data import fetch
    final = fetch.converted(name, data_dir)
    meta = json.loads((final / "meta.json").read_text())
    source = f"{name} (official files in {meta['source']})"
    decode = decode or Decode()
    if decode.channels is None and decode.size is None:
        return read_decoded(final, split, source)
    options = f"c{decode.channels}-s{'x'.join(map(str, decode.size or ()))}-crop{int(decode.crop)}"
    fitted = final.with_name(f"{final.name}-{options}")

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for s in meta["splits"]:
            images = np.load(final / f"{s}_images.npy")
            np.save(tmp / f"{s}_images.npy", np.stack([_refit(im, decode) for im in images]))
            shutil.copy(final / f"{s}_labels.npy", tmp / f"{s}_labels.npy")
        shutil.copy(final / "meta.json", tmp / "meta.json")
    _cached(fitted, build)
    return read_decoded(fitted, split, source)


def _refit(image: np.ndarray, decode: Decode) -> np.ndarray:
    """One decoded image with `decode`'s channels (Pillow's conversion, as the
    ImageFolder decoder's) and size."""
    if decode.channels not in (None, image.shape[-1]):
        from PIL import Image
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        image = np.asarray(pil.convert("L" if decode.channels == 1 else "RGB"), np.uint8)
        image = image[..., None] if image.ndim == 2 else image
    return fit_image(image, decode.size, decode.crop) if decode.size else image


# ------------------------------------------------------------------ ArrayRecord shards
def arrayrecord_records(folder: Path, split: str) -> Source:
    folder = Path(folder).expanduser()
    meta_file = folder / DATASET_FILE
    if not meta_file.exists():
        raise DataError(f"arrayrecord:{folder}: no {DATASET_FILE} there; expected the "
                        f"output folder of scripts/prepare_arrayrecord.py")
    meta = json.loads(meta_file.read_text())
    if split not in meta["splits"]:
        raise MissingSplit(f"arrayrecord:{folder}: has no '{split}' split; found "
                           f"{sorted(meta['splits'])}")
    shards = [str(folder / s) for s in meta["splits"][split]["shards"]]
    missing = [s for s in shards if not Path(s).exists()]
    if missing:
        raise DataError(f"arrayrecord:{folder}: shard(s) missing: {', '.join(missing)}")
    labels = np.load(folder / f"{split}_labels.npy").astype(np.int32)
    return ArrayRecords(shards, labels, meta["classes"], f"arrayrecord:{folder}")


def write_arrayrecord(records: Source, folder: Path, split: str, shards: int,
                      on_record=lambda: None) -> list[str]:
    """The records of one split as `shards` ArrayRecord files in `folder` (the bytes
    as they are, no re-encoding), its labels beside them; returns the shard names.
    Records go to shards in contiguous runs, so global index order is kept."""
    from array_record.python.array_record_module import ArrayRecordWriter  # script only
    n = len(records)
    names = [f"{split}-{k:05d}-of-{shards:05d}.array_record" for k in range(shards)]
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k, name in enumerate(names):
        tmp = folder / f".{name}.tmp"
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for i in range(bounds[k], bounds[k + 1]):
            data, label = records.read(i)
            writer.write(LABEL.pack(label) + data)
            on_record()
        writer.close()
        os.replace(tmp, folder / name)
    np.save(folder / f"{split}_labels.npy", records.labels)
    return names


# ------------------------------------------------------------------ TFDS
TENSORFLOW_EXTRA = ('TFDS prepares a dataset with TensorFlow, an optional extra here: '
                    'pip install -e ".[tensorflow]"')


def tfds_source(name: str, split: str, data_dir: Optional[str]):
    """(tfds.data_source with images left encoded, label names): the one TFDS reader,
    of data already prepared (an ArrayRecord build). MissingSplit where the build has
    no such split."""
    try:
        import tensorflow_datasets as tfds  # heavy and optional: only on this path
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        stored = split if split in builder.info.splits else TFDS_SPLITS.get(split, split)
        if builder.is_prepared() and stored not in builder.info.splits:
            raise MissingSplit(f"tfds:{name}: has no '{split}' split; found "
                               f"{sorted(builder.info.splits)}")
        source = builder.as_data_source(split=stored,
                                        decoders={"image": tfds.decode.SkipDecoding()})
        classes = list(builder.info.features["label"].names)
    except MissingSplit:
        raise
    except Exception as e:  # not installed, not prepared, not an ArrayRecord build
        how = TFDS_PREPARE.get(name, f"prepare it once with: tfds build {name} "
                                     f"--file_format=array_record [--data_dir DIR]")
        try:
            import tensorflow  # noqa: F401  (only to say whether it is there)
            needs = ""
        except ImportError:
            needs = f" ({TENSORFLOW_EXTRA})"
        raise DataError(f"TFDS dataset {name!r} (split {split!r}) is not prepared for "
                        f"random access ({type(e).__name__}: {str(e)[:300]}); {how}"
                        f"{needs}") from None
    return source, classes


def tfds_records(name: str, split: str, data_dir: Optional[str]) -> Source:
    """Labels are read once (every record, a pass over the data) and cached. A split
    whose labels are all unknown (-1: ImageNet's test) is no split to score."""
    source, classes = tfds_source(name, split, data_dir)
    key = hashlib.sha256(f"{name}|{split}|{data_dir}|{len(source)}".encode()).hexdigest()[:16]
    cached = cache_dir() / "index" / f"tfds-{name}-{split}-{key}-labels.npy"
    _cached(cached, lambda tmp: np.save(open(tmp, "wb"), np.array(
        [int(source[i]["label"]) for i in range(len(source))], np.int32)))
    labels = np.load(cached)
    if len(labels) and (labels < 0).all():
        raise MissingSplit(f"tfds:{name}: its '{split}' split has no labels")
    return TfdsRecords(name, split, data_dir, labels, classes)


def decoded(records: Source, channels: Optional[int] = None) -> Arrays:
    """Every record of a (small) encoded source decoded into memory."""
    images = np.stack([decode_image(records.read(i)[0], records.where(i), channels)
                       for i in range(len(records))])
    return Arrays(images, records.labels, records.classes, source=records.source)


# ------------------------------------------------------------------ synthetic
def _parse_synthetic(spec: str) -> dict:
    """'synthetic[:HxWxC[:classes[:train_size[:test_size]]]]'."""
    parts = spec.split(":")[1:]
    try:
        h, w, c = (int(v) for v in (parts[0] if parts and parts[0] else "32x32x3").split("x"))
        classes = int(parts[1]) if len(parts) > 1 else 10
        n_train = int(parts[2]) if len(parts) > 2 else 1024
        n_test = int(parts[3]) if len(parts) > 3 else 256
    except ValueError:
        raise DataError(f"bad synthetic spec {spec!r}; expected "
                        f"synthetic:HxWxC:classes:train_size:test_size, e.g. "
                        f"synthetic:32x32x3:10:1024:256") from None
    return dict(shape=(h, w, c), classes=classes, sizes={"train": n_train, "test": n_test})


def synthetic_arrays(spec: str, split: str) -> Arrays:
    """Random uint8 images and labels (never zeros), fixed by the split's name."""
    s = _parse_synthetic(spec)
    if split not in s["sizes"]:
        raise MissingSplit(f"{spec}: has no '{split}' split; found train, test")
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = s["sizes"][split]
    images = rng.integers(0, 256, (n, *s["shape"]), dtype=np.uint8)
    labels = rng.integers(0, s["classes"], n).astype(np.int32)
    return Arrays(images, labels, [str(i) for i in range(s["classes"])], source=spec)


# ------------------------------------------------------------------ splits
def stratified_holdout(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of a validation set of `size` examples with every class represented in
    proportion (500 per class for 5,000 of CIFAR-10), chosen by a fixed seed."""
    if not 0 < size < len(labels):
        raise DataError(f"validation holdout must be between 1 and {len(labels) - 1} "
                        f"examples; got {size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts * size / len(labels)).astype(int)
    # hand out what rounding left over to the largest classes, in class order
    for c in np.argsort(-counts, kind="stable")[: size - quota.sum()]:
        quota[c] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


# ------------------------------------------------------------------ by name
PREFIXES = ("imagefolder:", "arrayrecord:", "tfds:", "synthetic")


def imagefolder_path(name: str) -> Optional[Path]:
    """The ImageFolder `name` means: `imagefolder:PATH`, or a bare path (one with a
    slash, starting with . or ~, or naming something that exists) that is no dataset
    name; None for anything else."""
    if name.startswith("imagefolder:"):
        return Path(name.split(":", 1)[1]).expanduser()
    if name in DATASETS or name.startswith(PREFIXES):
        return None
    if "/" in name or name.startswith((".", "~")) or Path(name).expanduser().exists():
        return Path(name).expanduser()
    return None


def streams(name: str) -> bool:
    """Whether `name` is a dataset read encoded (never decoded into the cache)."""
    named = DATASETS.get(name)
    return (named is not None and not named["decode"]) or \
        name.startswith(("arrayrecord:", "tfds:"))


@dataclasses.dataclass(frozen=True)
class Decode:
    """How a decoded source is made: channels (None: the files' own), size (H, W) to
    resize to (crop: cover and centre-crop), and whether unreadable files are skipped."""
    channels: Optional[int] = None
    size: Optional[tuple] = None
    crop: bool = False
    skip_bad: bool = False


def open_stored(name: str, split: str, data_dir: Optional[str] = None,
                decode: Optional[Decode] = None) -> Source:
    """The stored split `split` of `name` as it is (no fallback, no holdout): decoded
    pixels when `decode` is given (or the dataset is synthetic), else the encoded
    records. MissingSplit when the dataset has no such split."""
    source = _stored(name, split, data_dir, decode)
    source.split = split
    source.origin = f"{split}/ of {source.source}"
    return source


def _stored(name: str, split: str, data_dir: Optional[str], decode: Optional[Decode]
            ) -> Source:
    if name.startswith("synthetic"):
        arrays = synthetic_arrays(name, split)
        if decode is None or (decode.size is None and decode.channels is None):
            return arrays
        return Arrays(np.stack([_refit(im, decode) for im in arrays.images]), arrays.labels,
                      arrays.classes, source=arrays.source)
    path = imagefolder_path(name)
    if path is not None:
        if decode is None:
            return imagefolder_records(path, split)
        return cached_imagefolder(path, split, decode.channels, decode.skip_bad, decode.size,
                                  decode.crop)
    if name.startswith("arrayrecord:"):
        return arrayrecord_records(Path(name.split(":", 1)[1]), split)
    if name.startswith("tfds:"):
        return tfds_records(name[5:], split, data_dir)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}, "
                        f"a folder or .tar in ImageFolder layout (PATH or imagefolder:PATH), "
                        f"arrayrecord:DIR, tfds:NAME or synthetic[:HxWxC:classes:n_train:n_test]")
    return _named(name, split, data_dir, decode)


def _named(name: str, split: str, data_dir: Optional[str], decode: Optional[Decode]) -> Source:
    """A named dataset: a local copy (an ImageFolder archive or folder named like it),
    else its official files (downloaded on first use), else a prepared TFDS build."""
    local, looked = find_local(name, data_dir)
    if local is not None:
        passed = [d for d in search_dirs(data_dir)[:-1] if not local.is_relative_to(d)]
        if passed and local.is_relative_to(SHARED_DATA):
            log.warning("%s: not in %s; reading %s", name, ", ".join(map(str, passed)), local)
        return open_stored(f"imagefolder:{local}", split, data_dir, decode)
    if DATASETS[name]["fetch"]:
        return official_arrays(name, split, data_dir, decode)
    tfds_name = DATASETS[name]["tfds"]
    if tfds_name is None:
        raise DataError(f"dataset {name!r} not found; looked in:\n  " + "\n  ".join(looked))
    try:
        records = tfds_records(tfds_name, split, data_dir)
    except MissingSplit:
        raise
    except DataError as e:
        places = "\n  ".join(looked)
        raise DataError(
            f"dataset {name!r} not found. Looked for a local copy in:\n  {places}\n"
            f"then for a prepared TFDS build: {str(e)[:800]}\n"
            f"Pass --data-dir or set CNN_JAX_DATA_DIR to a folder holding {name}/ or "
            f"{name}.tar (ImageFolder layout), or --data PATH.") from None
    return records if decode is None else decoded(records, decode.channels)


def prepare(name: Optional[str], data_dir: Optional[str] = None) -> None:
    """Before a job of many runs starts: a named dataset with no local copy is fetched
    (and converted) once, here, with its progress bar, or refused in one line."""
    if name in DATASETS and DATASETS[name]["fetch"] and find_local(name, data_dir)[0] is None:
        from cnn_jax.data import fetch
        fetch.converted(name, data_dir)


def open_source(name: str, split: str, *, data_dir: Optional[str] = None, holdout: int = 0,
                holdout_seed: int = 0, decode: Optional[Decode] = None) -> Source:
    """One split of a dataset.

    name: 'cifar10', 'mnist', 'imagenet_sample', 'imagenet2012', a folder or .tar in
    ImageFolder layout (PATH or 'imagefolder:PATH'), 'arrayrecord:DIR', 'tfds:NAME' or
    'synthetic[:HxWxC:classes:n:n]'. `decode`: decode into the cache (Arrays) with these
    options; None reads the files encoded.
    split: what its name says, never anything else. 'test': the dataset's test/.
    'val': with `holdout=N`, a stratified N-example holdout of the training set ('train'
    is then the rest); without one, the dataset's own val/. A split the dataset does
    not have is MissingSplit, saying what it has.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "val" and not holdout:
        try:
            return open_stored(name, "val", data_dir, decode)
        except MissingSplit:
            raise MissingSplit(f"{name}: has no val/ split, and no training images were held "
                               f"out (--holdout N): there is no validation set to score"
                               ) from None
    if split == "test":
        try:
            return open_stored(name, "test", data_dir, decode)
        except MissingSplit:
            raise MissingSplit(f"{name}: has no test/ split (a val/ one, where it has it, is "
                               f"--split val; or hold out training images: --holdout N)"
                               ) from None
    base = open_stored(name, "train", data_dir, decode)
    if split == "train" and not holdout:
        return base
    val = stratified_holdout(base.labels, holdout, holdout_seed)
    taken = base.take(val if split == "val" else np.setdiff1d(np.arange(len(base)), val))
    taken.origin = (f"a stratified holdout of {holdout:,} of train/ of {base.source}"
                    if split == "val" else
                    f"train/ of {base.source} less a holdout of {holdout:,}")
    return taken


def load(name: str, split: str, *, data_dir: Optional[str] = None, holdout: int = 0,
         holdout_seed: int = 0, channels: Optional[int] = None, skip_bad: bool = False,
         size: Optional[tuple] = None, crop: bool = False) -> Arrays:
    """One split of a small dataset, decoded: `open_source` with `Decode(...)`."""
    return open_source(name, split, data_dir=data_dir, holdout=holdout,
                       holdout_seed=holdout_seed,
                       decode=Decode(channels, size, crop, skip_bad))
