"""ImageFolder reading: the one scanner of <root>/<split>/<class>/<image> folders and
archives (its index cached), the one fingerprint that keys every cache entry, and the
decoding of a small dataset into the cache (cnn_jax.data.sources serves both as
sources: encoded records, or decoded arrays).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cnn_jax.cache import cache_dir
from cnn_jax.errors import DataError

log = logging.getLogger(__name__)

# what PIL reads (the first frame of an animated GIF); other files in a class folder
# are skipped and reported (Source.skipped, a warning)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm")
SPLITS = ("train", "val", "test")
INDEX_FORMAT = 2     # bump when the offsets index changes (2: skipped files with reasons)


# ------------------------------------------------------------------ caching
def fingerprint(root: Path) -> str:
    """What keys a cache entry of `root`: an archive's size, time and first and last MiB
    (not all of a 140 GB file); a folder's listing with every file's size and time."""
    h = hashlib.sha256(str(root).encode())
    if root.is_file():
        st = root.stat()
        h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
        with open(root, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, st.st_size - (1 << 20)))
            h.update(f.read())
    else:
        for p in sorted(root.rglob("*")):
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cached(final: Path, build) -> None:
    """Make `final` (a file or folder under the cache) by `build(tmp)` once: written
    whole and renamed into place; a second process waits on a lock instead of
    building it twice."""
    if final.exists():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            return
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            build(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()


# ------------------------------------------------------------------ the scanner
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


def _listing(root: Path) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(path inside, offset, size) of every file, sorted by path (offset -1 where it
    cannot be read in place: a folder or a compressed archive); and the folders."""
    if root.is_dir():
        paths = sorted(root.rglob("*"))
        return ([(p.relative_to(root).as_posix(), -1, 0) for p in paths if p.is_file()],
                [p.relative_to(root).as_posix() for p in paths if p.is_dir()])
    try:
        with tarfile.open(root, "r:*") as tar:
            members = list(tar)
            in_place = tar.fileobj is not None and type(tar.fileobj).__name__ == "BufferedReader"
            return (sorted((m.name, m.offset_data if in_place else -1, m.size)
                           for m in members if m.isfile()),
                    [m.name for m in members if m.isdir()])
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{root}: cannot read the archive ({e}); expected a .tar, .tar.gz "
                        f"or .tar.xz laid out <root>/<split>/<class>/<image>") from None


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
        raise DataError(f"{root}: class folder(s) with no images: "
                        f"{', '.join(str(root / e) for e in sorted(empty))}")


def _check_classes(root: Path, per_split: dict) -> list[str]:
    """The class names (sorted folder names), refusing fewer than two classes and
    splits whose class folders differ."""
    class_sets = {s: sorted({c for c, _ in items}) for s, items in per_split.items()}
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


def scan(root: Path) -> dict:
    """The index of an ImageFolder folder or archive: classes, and per split the files
    (sorted by path), their labels, offsets and sizes (for reading an uncompressed tar
    in place), and the files that are not images. Files outside any split folder
    count as train."""
    per_split: dict = {}
    skipped: dict = {}
    files, folders = _listing(root)
    for name, offset, size in files:
        parsed = _member_parts(name)
        if parsed is None:
            continue
        split, cls, file = parsed
        if not is_image_name(file):
            skipped.setdefault(split, []).append(
                [name, f"not an image file (reads {', '.join(IMAGE_SUFFIXES)})"])
            continue
        per_split.setdefault(split, []).append((cls, (name, offset, size)))
    if not per_split:
        raise DataError(f"{root}: found no images laid out <root>/<split>/<class>/<image> "
                        f"or <root>/<class>/<image> with suffix {', '.join(IMAGE_SUFFIXES)}")
    _refuse_empty_classes(root, per_split, folders)
    if not set(per_split) & set(SPLITS):  # <top folder>/<class>/<image>: no split folders
        per_split = {"train": [item for items in per_split.values() for item in items]}
        skipped = {"train": [item for items in skipped.values() for item in items]}
    for parts in (per_split, skipped):
        if None in parts:
            parts.setdefault("train", []).extend(parts.pop(None))
    classes = _check_classes(root, per_split)
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: {"names": [f[0] for _, f in items], "offsets": [f[1] for _, f in items],
                  "sizes": [f[2] for _, f in items], "labels": [index[c] for c, _ in items]}
              for s, items in per_split.items()}
    return {"source": str(root), "classes": classes, "splits": splits, "skipped": skipped}


def _exists(root: Path) -> Path:
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (expected an ImageFolder "
                        f"directory or a .tar/.tar.gz/.tar.xz archive)")
    return root


def imagefolder_index(root: Path) -> dict:
    """`scan(root)`, cached under its fingerprint."""
    root = _exists(root)
    final = cache_dir() / "index" / f"{root.name}-{INDEX_FORMAT}-{fingerprint(root)}.json"
    if not final.exists():
        _cached(final, lambda tmp: tmp.write_text(json.dumps(scan(root))))
        for split, files in json.loads(final.read_text())["skipped"].items():
            if files:
                log.warning("%s: skipped %d file(s) of '%s', e.g. %s: %s", root,
                            len(files), split, *files[0])
    return json.loads(final.read_text())



def decode_image(data: bytes, where: str, channels: Optional[int]) -> np.ndarray:
    """uint8 [H, W, C] by Pillow: channels None keeps the file's own (grayscale -> 1,
    colour -> 3), 1 or 3 convert."""
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


def _file_bytes(root: Path, index: dict):
    """(split, position, path, bytes) of every image of the index, in the archive's or
    the folder's sorted order (a compressed archive is read once, front to back)."""
    where = {name: (split, k) for split, s in index["splits"].items()
             for k, name in enumerate(s["names"])}
    if root.is_dir():
        for name in sorted(where):
            yield (*where[name], name, (root / name).read_bytes())
        return
    with tarfile.open(root, "r:*") as tar:
        for m in tar:
            if m.isfile() and m.name in where:
                yield (*where[m.name], m.name, tar.extractfile(m).read())


def _decode_split_files(root: Path, index: dict, channels, skip_bad, size, crop):
    """Every split's images decoded, its labels, and the files skipped (with reasons)."""
    images = {s: [None] * len(v["names"]) for s, v in index["splits"].items()}
    skipped = {s: [list(f) for f in v] for s, v in index["skipped"].items()}
    first: dict = {}
    total = sum(len(v) for v in images.values())
    for split, k, name, data in tqdm(_file_bytes(root, index), total=total, leave=False,
                                     desc=f"decoding {root.name}", unit="file", mininterval=2):
        where = f"{root}:{name}" if root.is_file() else str(root / name)
        try:
            img = decode_image(data, where, channels)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.setdefault(split, []).append([name, str(e).split(": ", 1)[-1]])
            continue
        if size is not None:
            img = fit_image(img, size, crop)
        if not first:
            first.update(shape=img.shape, where=where)
        elif img.shape != first["shape"]:
            raise DataError(
                f"{where}: image of shape {img.shape} but {first['where']} has "
                f"{first['shape']}; all images must share one size and channel count "
                f"(pass size=(H, W) to resize, channels=1 or 3 to convert)")
        images[split][k] = img
    out = {}
    for split, imgs in images.items():
        keep = [k for k, img in enumerate(imgs) if img is not None]
        labels = np.asarray(index["splits"][split]["labels"], np.int32)[keep]
        out[split] = (np.stack([imgs[k] for k in keep]), labels)
    return out, skipped


def decode_into(root: Path, folder: Path, channels, skip_bad, size, crop) -> None:
    """Every split of `root` decoded into `folder`: <split>_images.npy, <split>_labels.npy
    and meta.json (classes, sizes, the files skipped and why)."""
    index = scan(root)
    decoded, skipped = _decode_split_files(root, index, channels, skip_bad, size, crop)
    folder.mkdir(parents=True)
    for s, (images, labels) in decoded.items():
        np.save(folder / f"{s}_images.npy", images)
        np.save(folder / f"{s}_labels.npy", labels)
    for s, files in skipped.items():
        if files:
            log.warning("%s: skipped %d file(s) of '%s', e.g. %s: %s", root, len(files),
                        s, *files[0])
    (folder / "meta.json").write_text(json.dumps(
        {"source": str(root), "classes": index["classes"],
         "splits": {s: len(labels) for s, (_, labels) in decoded.items()},
         "skipped": skipped}, indent=1))
