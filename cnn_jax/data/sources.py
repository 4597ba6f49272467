"""Where images come from: ImageFolder directories and archives, the named datasets
(`cifar10`, `mnist`, local archives first, then TFDS), and synthetic data.

Every source ends as a pair of arrays: uint8 images [N, H, W, C] and int32 labels [N].
Decoded ImageFolder data are cached as memory-mappable `.npy` files in the project's
own cache directory (`CNN_JAX_CACHE_DIR`, default `<project>/.cache`), keyed by the
archive's content, so a changed archive is never served stale.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cnn_jax.cache import PROJECT_ROOT, cache_dir
from cnn_jax.errors import BadInput

log = logging.getLogger(__name__)

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")
# what PIL reads (the first frame of an animated GIF); other files in a class folder
# are skipped and reported (Arrays.skipped, a warning)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm")
SPLITS = ("train", "val", "test")
CACHE_FORMAT = 2  # bump when the cached layout changes (2: more suffixes, skipped files)


class DataError(BadInput):
    """Bad or missing data: the message says what was found and what was expected."""


class MissingSplit(DataError):
    """The dataset has no such split (e.g. an ImageFolder without test/)."""


@dataclasses.dataclass
class Arrays:
    images: np.ndarray   # uint8 [N, H, W, C], possibly a read-only memory map
    labels: np.ndarray   # int32 [N]
    classes: list[str]
    path: Optional[Path] = None         # the cached images .npy, when there is one
    indices: Optional[np.ndarray] = None  # rows of that file these arrays hold
    skipped: tuple = ()                 # (file, reason) of the split's files not read

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])


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


# ------------------------------------------------------------------ ImageFolder reading
def _member_parts(path: str) -> Optional[tuple[Optional[str], str, str]]:
    """'<root>/<split>/<class>/<file>' (root optional) -> (split, class, file);
    '<class>/<file>' (torchvision's ImageFolder: no split folders) -> (None, class, file);
    None for a file outside any class folder."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if len(parts) < 2:
        return None
    return (parts[-3] if len(parts) > 2 else None), parts[-2], parts[-1]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def fit_image(img: np.ndarray, size: tuple, crop: bool) -> np.ndarray:
    """Resize to `size` (H, W): stretched, or (crop=True) scaled until it covers
    `size` keeping its aspect ratio, then centre-cropped."""
    h, w = img.shape[:2]
    if (h, w) == tuple(size):
        return img
    mode = "L" if img.shape[-1] == 1 else "RGB"
    pil = Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode)
    if crop:
        scale = max(size[0] / h, size[1] / w)
        sh, sw = max(size[0], round(h * scale)), max(size[1], round(w * scale))
        pil = pil.resize((sw, sh), Image.BILINEAR)
        top, left = (sh - size[0]) // 2, (sw - size[1]) // 2
        pil = pil.crop((left, top, left + size[1], top + size[0]))
    else:
        pil = pil.resize((size[1], size[0]), Image.BILINEAR)
    out = np.asarray(pil, np.uint8)
    return out[..., None] if out.ndim == 2 else out


def _iter_files(root: Path, bar: tqdm) -> Iterator[tuple[str, bytes]]:
    """(path inside the dataset, bytes) for every file, in sorted path order."""
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
        bar.reset(total=len(files))
        for p in files:
            yield p.relative_to(root).as_posix(), p.read_bytes()
        return
    try:
        with tarfile.open(root, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            bar.reset(total=len(members))
            for m in members:
                yield m.name, tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{root}: cannot read the archive ({e}); expected a .tar, .tar.gz "
                        f"or .tar.xz laid out <root>/<split>/<class>/<image>") from None


def _empty_class_dirs(root: Path, split: str) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(str(d) for d in root.glob(f"**/{split}/*") if d.is_dir()
                  and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()))


def decode_image(data: bytes, where: str, channels: Optional[int]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if channels == 1 or (channels is None and im.mode in ("L", "1", "I;16", "I")):
                im = im.convert("L")
            else:
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def read_imagefolder(root: Path, channels: Optional[int] = None, skip_bad: bool = False,
                     size: Optional[tuple[int, int]] = None, crop: bool = False
                     ) -> dict[str, Arrays]:
    """Decode every split of an ImageFolder directory or archive in one pass.

    Layout: <root>/<split>/<class>/<image> with splits train, val, test; or
    <root>/<class>/<image> (no split folders: everything is 'train').
    channels: None keeps each file's own (grayscale -> 1, colour -> 3), 1 or 3 convert.
    size: (H, W) to resize every image to (crop=True: keep the aspect ratio, scale to
    cover and centre-crop); None requires all images to share one size.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (expected an ImageFolder "
                        f"directory or a .tar/.tar.gz/.tar.xz archive)")
    per_split, skipped = _decode_files(root, channels, skip_bad, size, crop)
    for split, files in skipped.items():
        if files:
            log.warning("%s: skipped %d file(s) of '%s', e.g. %s: %s", root, len(files),
                        split, files[0][0], files[0][1])
    classes = _check_classes(root, per_split)
    index = {c: i for i, c in enumerate(classes)}
    return {split: Arrays(np.stack([img for _, img in items]),
                          np.array([index[c] for c, _ in items], np.int32), classes,
                          skipped=tuple(skipped.get(split, ())))
            for split, items in per_split.items()}


def _decode_files(root: Path, channels, skip_bad, size, crop):
    """Every image of the folder or archive as (class, array) per split, and the files
    skipped per split as (path, reason). Files outside any split folder count as train."""
    per_split: dict[str, list] = {}
    skipped: dict[str, list] = {}
    first_shape: dict = {}
    bar = tqdm(desc=f"decoding {root.name}", unit="file", leave=False, mininterval=2.0)
    for path, data in _iter_files(root, bar):
        bar.update()
        parsed = _member_parts(path)
        if parsed is None:
            continue
        split, cls, file = parsed
        where = f"{root}:{path}" if root.is_file() else str(root / path)
        if not is_image_name(file):
            skipped.setdefault(split, []).append(
                (path, f"not an image file (reads {', '.join(IMAGE_SUFFIXES)})"))
            continue
        try:
            img = decode_image(data, where, channels)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.setdefault(split, []).append((path, str(e).split(": ", 1)[-1]))
            continue
        if size is not None:
            img = fit_image(img, size, crop)
        if not first_shape:
            first_shape.update(shape=img.shape, where=where)
        elif img.shape != first_shape["shape"]:
            raise DataError(
                f"{where}: image of shape {img.shape} but {first_shape['where']} has "
                f"{first_shape['shape']}; all images must share one size and channel count "
                f"(pass size=(H, W) to resize, channels=1 or 3 to convert)")
        per_split.setdefault(split, []).append((cls, img))
    bar.close()
    if not per_split:
        raise DataError(f"{root}: found no images laid out <root>/<split>/<class>/<image> "
                        f"or <root>/<class>/<image> with suffix {', '.join(IMAGE_SUFFIXES)}")
    if not set(per_split) & set(SPLITS):  # <top folder>/<class>/<image>: no split folders
        per_split = {"train": [item for items in per_split.values() for item in items]}
        skipped = {"train": [item for items in skipped.values() for item in items]}
    for parts in (per_split, skipped):
        if None in parts:
            parts.setdefault("train", []).extend(parts.pop(None))
    return per_split, skipped


def _check_classes(root: Path, per_split) -> list[str]:
    """The class names (sorted folder names), refusing empty class folders, fewer than
    two classes, and splits whose class folders differ."""
    class_sets = {s: sorted({c for c, _ in items}) for s, items in per_split.items()}
    for split in per_split:
        empty = _empty_class_dirs(root, split)
        if empty:
            raise DataError(f"{root}: class folder(s) with no images: {', '.join(empty)}")
    if root.is_dir() and not (set(per_split) - {"train"}) and not (root / "train").is_dir():
        empty = [str(d) for d in sorted(root.iterdir()) if d.is_dir() and not any(
            f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*"))]
        if empty:
            raise DataError(f"{root}: class folder(s) with no images: {', '.join(empty)}")
    reference_split = "train" if "train" in class_sets else sorted(class_sets)[0]
    classes = class_sets[reference_split]
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder ({', '.join(classes)}); "
                        f"classification needs at least two, one folder of images per class")
    for split, cs in class_sets.items():
        if cs != classes:
            raise DataError(
                f"{root}: split '{split}' has classes {cs} but '{reference_split}' has "
                f"{classes}; every split must have the same class folders")
    return classes


# ------------------------------------------------------------------ cache
def _fingerprint(root: Path) -> str:
    """Content hash of an archive (or of a directory's listing with sizes and mtimes)."""
    h = hashlib.sha256()
    if root.is_file():
        with open(root, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        for p in sorted(root.rglob("*")):
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached_imagefolder(root: Path, split: str, channels: Optional[int] = None,
                       skip_bad: bool = False, size: Optional[tuple] = None,
                       crop: bool = False) -> Arrays:
    """`read_imagefolder` through the cache: decode once, then memory-map.

    All splits are written together into `<cache>/<name>-<hash>/`; the folder appears
    by an atomic rename only when complete, and a file lock makes a second process
    wait for the first instead of decoding twice.
    """
    root = Path(root).resolve()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    options = f"c{channels}-s{'x'.join(map(str, size)) if size else 'native'}-b{int(skip_bad)}"
    if size and crop:
        options += "-crop"  # (absent otherwise: existing caches keep their keys)
    key = hashlib.sha256(f"{CACHE_FORMAT}|{_fingerprint(root)}|{options}".encode()).hexdigest()[:16]
    name = re.sub(r"(\.tar(\.xz|\.gz)?|\.tgz)$", "", root.name)
    final = cache_dir() / f"{name}-{key}"
    if not (final / "meta.json").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(final.parent / f".{final.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here
            if not (final / "meta.json").exists():
                _write_cache(root, final, channels, skip_bad, size, crop)
    meta = json.loads((final / "meta.json").read_text())
    if split not in meta["splits"]:
        raise MissingSplit(f"{root}: has no '{split}' split; found {sorted(meta['splits'])}")
    images_path = final / f"{split}_images.npy"
    return Arrays(np.load(images_path, mmap_mode="r"),
                  np.load(final / f"{split}_labels.npy"), meta["classes"], images_path,
                  skipped=tuple(tuple(f) for f in meta.get("skipped", {}).get(split, ())))


def _write_cache(root, final, channels, skip_bad, size, crop=False) -> None:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        decoded = read_imagefolder(root, channels, skip_bad, size, crop)
        for split, arr in decoded.items():
            np.save(tmp / f"{split}_images.npy", arr.images)
            np.save(tmp / f"{split}_labels.npy", arr.labels)
        classes = next(iter(decoded.values())).classes
        meta = {"source": str(root), "classes": classes,
                "splits": {s: len(a.labels) for s, a in decoded.items()},
                "skipped": {s: [list(f) for f in a.skipped] for s, a in decoded.items()},
                "shape": list(next(iter(decoded.values())).images.shape[1:])}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # a half-written folder cannot exist,
        os.replace(tmp, final)                    # but a stale one from a crash might
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


# ------------------------------------------------------------------ named datasets
NAMED = {"cifar10": {"tfds": "cifar10"}, "mnist": {"tfds": "mnist"}}


def _tfds_arrays(name: str, split: str, data_dir: Optional[str]) -> Arrays:
    import tensorflow_datasets as tfds  # heavy and optional: only on this path

    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    source = builder.as_data_source(split=split)
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.array([int(r["label"]) for r in records], np.int32)
    classes = list(builder.info.features["label"].names)
    return Arrays(images, labels, classes)


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
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = s["sizes"][split]
    images = rng.integers(0, 256, (n, *s["shape"]), dtype=np.uint8)
    labels = rng.integers(0, s["classes"], n).astype(np.int32)
    return Arrays(images, labels, [str(i) for i in range(s["classes"])])


def load(name: str, split: str, *, data_dir: Optional[str] = None, holdout: int = 0,
         holdout_seed: int = 0, channels: Optional[int] = None, skip_bad: bool = False,
         size: Optional[tuple] = None, crop: bool = False) -> Arrays:
    """One split of a dataset as arrays.

    name: 'cifar10', 'mnist', 'imagefolder:PATH' or 'synthetic[:HxWxC:classes:n:n]'.
    split: 'train', 'val' or 'test'. With `holdout=N`, 'val' is a stratified N-example
    holdout of the training set and 'train' is the rest; 'val' without a holdout size
    takes 10 % of train (5,000 for CIFAR-10). An ImageFolder without a test/ folder
    is evaluated on its val/ folder.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    base_split = "test" if split == "test" else "train"
    if name.startswith("synthetic"):
        arrays = synthetic_arrays(name, base_split)
    elif name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        try:
            arrays = cached_imagefolder(path, base_split, channels, skip_bad, size, crop)
        except MissingSplit:
            if base_split != "test":
                raise
            try:
                arrays = cached_imagefolder(path, "val", channels, skip_bad, size, crop)
            except MissingSplit:
                raise DataError(f"{path}: no test/ or val/ folder to evaluate on; hold out "
                                f"part of the training images instead (--holdout N)") from None
    elif name in NAMED:
        arrays = _named(name, base_split, data_dir, channels, skip_bad, size)
    else:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(NAMED)}, "
                        f"imagefolder:PATH or synthetic[:HxWxC:classes:n_train:n_test]")
    if split == "test" or (split == "train" and not holdout):
        return arrays
    val_idx = stratified_holdout(arrays.labels, holdout or len(arrays.labels) // 10,
                                 holdout_seed)
    keep = val_idx if split == "val" else np.setdiff1d(np.arange(len(arrays.labels)), val_idx)
    return Arrays(arrays.images[keep], arrays.labels[keep], arrays.classes, arrays.path, keep,
                  arrays.skipped)


def _named(name, split, data_dir, channels, skip_bad, size) -> Arrays:
    local, looked = find_local(name, data_dir)
    if local is not None:
        passed = [d for d in search_dirs(data_dir)[:-1] if not local.is_relative_to(d)]
        if passed and local.is_relative_to(SHARED_DATA):
            log.warning("%s: not in %s; reading %s", name, ", ".join(map(str, passed)), local)
        return cached_imagefolder(local, split, channels, skip_bad, size)
    try:
        return _tfds_arrays(NAMED[name]["tfds"], split, data_dir)
    except Exception as e:  # offline, not installed, or not prepared
        places = "\n  ".join(looked)
        raise DataError(
            f"dataset {name!r} not found. Looked for a local copy in:\n  {places}\n"
            f"then tried TFDS, which failed: {type(e).__name__}: {str(e)[:500]}\n"
            f"Pass --data-dir or set CNN_JAX_DATA_DIR to a folder holding {name}.tar.xz "
            f"(ImageFolder layout), or run where TFDS can download.") from None


def load_arrays(name: str, split: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """`(images uint8 [N, H, W, C], labels int [N])`: see `load` for the arguments."""
    a = load(name, split, **kwargs)
    return a.images, a.labels
