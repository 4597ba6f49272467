"""Images read at random, still encoded: `Records` of one split (index -> the file's
bytes and its label), for datasets too large to decode up front (ImageNet: 1.28
million JPEGs of every size, about 140 GB).

    records = open_records("imagenet_sample", "train")     # or a path, or TFDS
    data, label = records.read(17)

Kinds, one interface (grain's worker processes read them; each reopens its files):
  * an ImageFolder (<root>/<split>/<class>/<image> or <root>/<class>/<image>) as a
    directory, or as an uncompressed .tar read in place through an offsets index
    built once and cached (`CNN_JAX_CACHE_DIR`), keyed by the folder's listing or the
    archive's size, time and first and last MiB;
  * ArrayRecord shards written by scripts/prepare_arrayrecord.py (`arrayrecord:DIR`):
    each record is the label (int32, little-endian) then the file's bytes;
  * TFDS image datasets through `tfds.data_source` (ArrayRecord builds; `tfds:NAME`,
    and `imagenet2012`), images left encoded.
Nothing here decodes an image: cnn_jax.data.streams does that in the workers.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from cnn_jax.cache import cache_dir
from cnn_jax.data.sources import (IMAGE_SUFFIXES, SPLITS, DataError, MissingSplit,
                                  _check_classes, _member_parts, find_local, is_image_name)

log = logging.getLogger(__name__)

INDEX_FORMAT = 1          # bump when the cached index layout changes
LABEL = struct.Struct("<i")  # an ArrayRecord record: label, then the encoded image
DATASET_FILE = "dataset.json"  # beside ArrayRecord shards: classes, splits, shards
# datasets that stream: found locally (ImageFolder tar or folder), else from TFDS
STREAMING = {"imagenet_sample": None, "imagenet2012": "imagenet2012"}


class Records:
    """One split of a dataset, encoded: `read(i)` -> (bytes, label)."""

    source: str            # what it was opened from (for messages and the cache key)
    classes: list
    labels: np.ndarray     # int32 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> tuple[bytes, int]:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """The file behind record i, for messages."""
        return f"{self.source}[{i}]"

    def __getstate__(self):  # open files and readers are reopened in each process
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}


class Subset(Records):
    """Records `keep` of `base` (a holdout, a subset, some classes relabelled)."""

    def __init__(self, base: Records, keep: np.ndarray, labels: Optional[np.ndarray] = None,
                 classes: Optional[list] = None):
        self.base, self.keep = base, np.asarray(keep, np.int64)
        self.labels = base.labels[self.keep] if labels is None else labels
        self.classes = base.classes if classes is None else classes
        self.source = base.source
        self.relabel = labels is not None

    def read(self, i):
        data, _ = self.base.read(int(self.keep[i]))
        return data, int(self.labels[i])

    def where(self, i):
        return self.base.where(int(self.keep[i]))


class FolderRecords(Records):
    def __init__(self, root: Path, names: list, labels: np.ndarray, classes: list):
        self.source, self.names, self.labels, self.classes = str(root), names, labels, classes

    def read(self, i):
        return (Path(self.source) / self.names[i]).read_bytes(), int(self.labels[i])

    def where(self, i):
        return str(Path(self.source) / self.names[i])


class TarRecords(Records):
    def __init__(self, archive: Path, names: list, offsets: np.ndarray, sizes: np.ndarray,
                 labels: np.ndarray, classes: list):
        self.source, self.names, self.labels, self.classes = str(archive), names, labels, classes
        self.offsets, self.sizes = offsets, sizes

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


class ArrayRecords(Records):
    def __init__(self, shards: list, labels: np.ndarray, classes: list, source: str):
        self.shards, self.labels, self.classes, self.source = shards, labels, classes, source

    def read(self, i):
        if getattr(self, "_open_source", None) is None:
            from array_record.python import array_record_data_source as ards  # in workers
            self._open_source = ards.ArrayRecordDataSource(self.shards)
        record = self._open_source[int(i)]
        return record[LABEL.size:], LABEL.unpack_from(record)[0]


class TfdsRecords(Records):
    def __init__(self, name: str, split: str, data_dir: Optional[str], labels: np.ndarray,
                 classes: list):
        self.source, self.split, self.data_dir = f"tfds:{name}", split, data_dir
        self.labels, self.classes = labels, classes

    def _open(self):
        if getattr(self, "_open_source", None) is None:
            self._open_source = _tfds_source(self.source[5:], self.split, self.data_dir)[0]
        return self._open_source

    def read(self, i):
        r = self._open()[int(i)]
        return bytes(r["image"]), int(r["label"])


# ------------------------------------------------------------------ ImageFolder index
def _fingerprint(root: Path) -> str:
    """An archive: its size, time and first and last MiB (not all of a 140 GB file);
    a folder: the times of it, its split folders and their class folders (a file added
    or removed changes its folder's time)."""
    h = hashlib.sha256(f"{INDEX_FORMAT}|{root}".encode())
    if root.is_file():
        st = root.stat()
        h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
        with open(root, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, st.st_size - (1 << 20)))
            h.update(f.read())
    else:
        for d in [root, *sorted(root.iterdir()), *sorted(root.glob("*/*"))]:
            if d.is_dir():
                h.update(f"{d}|{d.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _scan(root: Path) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(path inside, offset, size) of every file, sorted by path (offset -1 in a
    folder); and the folders inside."""
    if root.is_dir():
        paths = sorted(root.rglob("*"))
        return ([(p.relative_to(root).as_posix(), -1, 0) for p in paths if p.is_file()],
                [p.relative_to(root).as_posix() for p in paths if p.is_dir()])
    try:
        with tarfile.open(root, "r:") as tar:  # uncompressed: headers only, seek between
            members = list(tar)
            return (sorted((m.name, m.offset_data, m.size) for m in members if m.isfile()),
                    [m.name for m in members if m.isdir()])
    except tarfile.ReadError as e:
        raise DataError(f"{root}: cannot read it in place ({e}); streaming reads an "
                        f"uncompressed .tar or a folder (unpack a .tar.gz/.tar.xz first, "
                        f"or write ArrayRecord shards: scripts/prepare_arrayrecord.py)") from None


def _refuse_empty_classes(root: Path, per_split: dict, folders: list[str]) -> None:
    """A class folder (a sibling of class folders with images) that holds none."""
    with_images = {(split, cls) for split, items in per_split.items() for cls, _ in items}
    splits = {split for split, _ in with_images}
    empty = []
    for folder in folders:
        parsed = _member_parts(folder + "/-")
        if parsed and parsed[0] in splits and (parsed[0], parsed[1]) not in with_images \
                and not any(f.startswith(folder.rstrip("/") + "/") for f in folders):
            empty.append(folder)
    if empty:
        raise DataError(f"{root}: class folder(s) with no images: {', '.join(sorted(empty))}")


def _build_index(root: Path) -> dict:
    per_split: dict = {}
    skipped: dict = {}
    files, folders = _scan(root)
    for name, offset, size in files:
        parsed = _member_parts(name)
        if parsed is None:
            continue
        split, cls, file = parsed
        if not is_image_name(file):
            skipped.setdefault(split or "train", []).append(name)
            continue
        per_split.setdefault(split, []).append((cls, (name, offset, size)))
    if not per_split:
        raise DataError(f"{root}: found no images laid out <root>/<split>/<class>/<image> "
                        f"or <root>/<class>/<image> with suffix {', '.join(IMAGE_SUFFIXES)}")
    _refuse_empty_classes(root, per_split, folders)
    if not set(per_split) & set(SPLITS):  # <top folder>/<class>/<image>
        per_split = {"train": [item for items in per_split.values() for item in items]}
    if None in per_split:
        per_split.setdefault("train", []).extend(per_split.pop(None))
    classes = _check_classes(root, per_split)
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: {"names": [f[0] for _, f in items], "offsets": [f[1] for _, f in items],
                  "sizes": [f[2] for _, f in items], "labels": [index[c] for c, _ in items]}
              for s, items in per_split.items()}
    return {"source": str(root), "classes": classes, "splits": splits, "skipped": skipped}


def imagefolder_index(root: Path) -> dict:
    """The offsets index of an ImageFolder folder or uncompressed tar, from the cache
    (written whole by an atomic rename; a second process waits on a lock)."""
    root = Path(root).resolve()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (expected an ImageFolder "
                        f"folder or uncompressed .tar)")
    final = cache_dir() / "index" / f"{root.name}-{_fingerprint(root)}.json"
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(final.parent / f".{final.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not final.exists():
                index = _build_index(root)
                tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(index))
                os.replace(tmp, final)
                for split, names in index["skipped"].items():
                    log.warning("%s: skipped %d file(s) of '%s' that are not images, "
                                "e.g. %s", root, len(names), split, names[0])
    return json.loads(final.read_text())


def imagefolder_records(root: Path, split: str) -> Records:
    index = imagefolder_index(root)
    if split not in index["splits"]:
        raise MissingSplit(f"{root}: has no '{split}' split; found {sorted(index['splits'])}")
    s = index["splits"][split]
    labels = np.asarray(s["labels"], np.int32)
    if Path(root).is_dir():
        return FolderRecords(Path(root).resolve(), s["names"], labels, index["classes"])
    return TarRecords(Path(root).resolve(), s["names"], np.asarray(s["offsets"], np.int64),
                      np.asarray(s["sizes"], np.int64), labels, index["classes"])


# ------------------------------------------------------------------ ArrayRecord shards
def arrayrecord_records(folder: Path, split: str) -> Records:
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


# ------------------------------------------------------------------ TFDS
TFDS_PREPARE = {
    "imagenet2012": "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
                    "image-net.org) in ~/tensorflow_datasets/downloads/manual/ (or "
                    "<data_dir>/downloads/manual/), then prepare it once with: tfds build "
                    "imagenet2012 --file_format=array_record [--data_dir DIR]"}


def _tfds_source(name: str, split: str, data_dir: Optional[str]):
    """(tfds.data_source with images left encoded, label names)."""
    try:
        import tensorflow_datasets as tfds  # heavy and optional: only on this path
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                  decoders={"image": tfds.decode.SkipDecoding()})
        classes = list(tfds.builder(name, data_dir=data_dir).info.features["label"].names)
    except Exception as e:  # not installed, not prepared, not an ArrayRecord build
        how = TFDS_PREPARE.get(name, f"prepare it once with: tfds build {name} "
                                     f"--file_format=array_record [--data_dir DIR]")
        raise DataError(f"TFDS dataset {name!r} (split {split!r}) is not prepared for "
                        f"random access ({type(e).__name__}: {str(e)[:300]}); {how}") from None
    return source, classes


def tfds_records(name: str, split: str, data_dir: Optional[str]) -> Records:
    """Labels are read once (every record, a pass over the data) and cached."""
    source, classes = _tfds_source(name, split, data_dir)
    key = hashlib.sha256(f"{name}|{split}|{data_dir}|{len(source)}".encode()).hexdigest()[:16]
    cached = cache_dir() / "index" / f"tfds-{name}-{split}-{key}-labels.npy"
    if cached.exists():
        labels = np.load(cached)
    else:
        labels = np.array([int(source[i]["label"]) for i in range(len(source))], np.int32)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}.npy")
        np.save(tmp, labels)
        os.replace(tmp, cached)
    return TfdsRecords(name, split, data_dir, labels, classes)


# ------------------------------------------------------------------ by name
def streams(name: str) -> bool:
    """Whether `name` is a dataset that only streams (never decoded into arrays)."""
    return name in STREAMING or name.startswith(("arrayrecord:", "tfds:"))


def open_records(name: str, split: str, data_dir: Optional[str] = None) -> Records:
    """One split of `name`: imagenet_sample / imagenet2012 (a local ImageFolder tar or
    folder first, then TFDS), imagefolder:PATH, arrayrecord:DIR or tfds:NAME."""
    if name.startswith("imagefolder:"):
        return imagefolder_records(Path(name.split(":", 1)[1]).expanduser(), split)
    if name.startswith("arrayrecord:"):
        return arrayrecord_records(Path(name.split(":", 1)[1]), split)
    if name.startswith("tfds:"):
        return tfds_records(name[5:], split, data_dir)
    if name not in STREAMING:
        raise DataError(f"unknown streaming dataset {name!r}; expected "
                        f"{', '.join(STREAMING)}, imagefolder:PATH, arrayrecord:DIR or tfds:NAME")
    local, looked = find_local(name, data_dir)
    if local is not None:
        return imagefolder_records(local, split)
    if STREAMING[name] is None:
        raise DataError(f"dataset {name!r} not found; looked in:\n  " + "\n  ".join(looked))
    return tfds_records(STREAMING[name], split, data_dir)


def write_arrayrecord(records: Records, folder: Path, split: str, shards: int,
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

