"""CIFAR-10 and MNIST from their official archives, on first use, without TensorFlow.

    python -m cnn_jax.data.fetch cifar10 mnist [--data-dir DIR]   # ahead of going offline

When no local copy of `cifar10` or `mnist` is found (cnn_jax.data.sources), their
official files are looked for, and otherwise downloaded, in the first writable of
--data-dir, $CNN_JAX_DATA_DIR and `<cache>/downloads` (the per-user cache folder,
cnn_jax.cache; never inside the clone): CIFAR-10's python version
(cifar-10-python.tar.gz) and MNIST's four idx files, each checked against its
published MD5. A download is written to a temporary name and renamed only once it is
whole and its checksum matches, so a transfer cut short never looks complete; a
mismatch deletes the file and names the URL and both checksums. Without a network the
error comes at once, in one line: the URL, the file to put where, and --data-dir.
`CNN_JAX_DOWNLOAD_URL=BASE` fetches the same file names from a mirror.

The files are then converted once, losslessly, into the cache as the decoded arrays
every small dataset becomes (uint8 [N, H, W, C] per split, memory-mapped), keyed by
their checksums: the pixels are the official ones, bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import http.client
import json
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from cnn_jax.cache import cache_dir
from cnn_jax.errors import DataError, exit_on_bad_input

MIRROR = "CNN_JAX_DOWNLOAD_URL"   # BASE: the same file names from a mirror
TIMEOUT = 20                      # seconds without an answer before a URL counts as unreachable
CONVERTED_FORMAT = 1              # bump when the converted arrays' layout changes


@dataclasses.dataclass(frozen=True)
class Official:
    """A dataset's official files: where they are published, their MD5s as published,
    and how they become (images, labels) per split and the class names."""
    bases: tuple                 # URL prefixes, tried in order
    md5: dict                    # file name -> MD5
    convert: Callable[[dict], tuple[dict, list]]


def _cifar10(files: dict) -> tuple[dict, list]:
    """cifar-10-python.tar.gz: five training batches and a test batch of pickled dicts
    (b'data': uint8 [N, 3072], channels first; b'labels'), and the class names."""
    batches = {}
    with tarfile.open(files["cifar-10-python.tar.gz"], "r:gz") as tar:
        for m in tar:
            if m.isfile():
                # the official, checksummed archive (what every CIFAR loader unpickles)
                batches[Path(m.name).name] = pickle.load(tar.extractfile(m), encoding="bytes")

    def split(names):
        data = np.concatenate([batches[n][b"data"] for n in names])
        labels = np.concatenate([batches[n][b"labels"] for n in names])
        return (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8),
                labels.astype(np.int32))
    classes = [c.decode() for c in batches["batches.meta"][b"label_names"]]
    return {"train": split([f"data_batch_{i}" for i in range(1, 6)]),
            "test": split(["test_batch"])}, classes


def _idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (LeCun's format): a big-endian magic number and dimensions, then uint8."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    found, dims = int.from_bytes(data[:4], "big"), data[3]
    if found != magic:
        raise DataError(f"{path}: not an idx file of this kind (magic {found}, expected {magic})")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _mnist(files: dict) -> tuple[dict, list]:
    """MNIST's four idx files: 28x28 grayscale digits and their labels."""
    def split(prefix):
        images = _idx(files[f"{prefix}-images-idx3-ubyte.gz"], 2051)[..., None]
        return images, _idx(files[f"{prefix}-labels-idx1-ubyte.gz"], 2049).astype(np.int32)
    return {"train": split("train"), "test": split("t10k")}, [str(d) for d in range(10)]


OFFICIAL = {
    "cifar10": Official(("https://www.cs.toronto.edu/~kriz/",),
                        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
                        _cifar10),
    # LeCun's page, mirrored by PyTorch's (tried first: the original is often unavailable)
    "mnist": Official(("https://ossci-datasets.s3.amazonaws.com/mnist/",
                       "http://yann.lecun.com/exdb/mnist/"),
                      {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                       "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                       "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                       "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
                      _mnist),
}


# ------------------------------------------------------------------ where
def folders(data_dir: Optional[str] = None) -> list[Path]:
    """Where official files are looked for, and the first writable of them is where
    they are downloaded: --data-dir, $CNN_JAX_DATA_DIR, the per-user cache folder."""
    named = [data_dir, os.environ.get("CNN_JAX_DATA_DIR")]
    return [Path(d).expanduser() for d in named if d] + [cache_dir() / "downloads"]


def download_folder(data_dir: Optional[str] = None) -> Path:
    for folder in folders(data_dir):
        probe = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if probe is not None and os.access(probe, os.W_OK | os.X_OK):
            return folder
    raise DataError(f"no writable folder to download into: {', '.join(map(str, folders(data_dir)))}"
                    f"; pass --data-dir DIR (a folder you can write)")


def bases(official: Official) -> tuple:
    mirror = os.environ.get(MIRROR)
    return (mirror.rstrip("/") + "/",) if mirror else official.bases


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def present(name: str, data_dir: Optional[str] = None) -> Optional[dict]:
    """{file: path} when every official file of `name` is in one of `folders`."""
    for folder in folders(data_dir):
        files = {f: folder / f for f in OFFICIAL[name].md5}
        if all(p.is_file() for p in files.values()):
            return files
    return None


# ------------------------------------------------------------------ download
class DownloadFailed(DataError):
    """A file could not be fetched, or arrived damaged; nothing was left behind."""


def download(url: str, dest: Path, md5: str, progress: bool = True) -> None:
    """`url` into `dest`, whole and verified or not at all."""
    part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r, open(part, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, leave=False,
                      disable=not progress, mininterval=1) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
        got = part.stat().st_size
        if size is not None and got != size:
            raise DownloadFailed(f"{url}: the transfer was cut short ({got:,} of {size:,} "
                                 f"bytes); nothing was kept, try again")
        received = md5_of(part)
        if received != md5:
            raise DownloadFailed(f"{url}: checksum mismatch (MD5 expected {md5}, received "
                                 f"{received}); the file was deleted")
        os.replace(part, dest)
    except http.client.IncompleteRead as e:
        raise DownloadFailed(f"{url}: the transfer was cut short ({len(e.partial):,} bytes "
                             f"of a block, {e.expected:,} more expected); nothing was kept, "
                             f"try again") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadFailed(f"{url}: {type(e).__name__}: {reason}") from None
    finally:
        part.unlink(missing_ok=True)


def fetch(name: str, data_dir: Optional[str] = None, progress: bool = True) -> dict:
    """{file: path} of `name`'s official files, downloading those missing."""
    found = present(name, data_dir)
    if found is not None:
        return found
    official, folder = OFFICIAL[name], download_folder(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes fetching at once: one downloads
        for file, md5 in official.md5.items():
            if (folder / file).is_file():
                continue
            failures = []
            for base in bases(official):
                try:
                    download(base + file, folder / file, md5, progress)
                    break
                except DownloadFailed as e:
                    failures.append(str(e))
            else:
                raise DownloadFailed(_unreachable(name, file, failures, folder)) from None
    return {f: folder / f for f in official.md5}


def _unreachable(name: str, file: str, failures: list, folder: Path) -> str:
    others = [f for f in OFFICIAL[name].md5 if f != file and not (folder / f).is_file()]
    files = " ".join([file, *others])
    return (f"{name}: no local copy, and the download failed: {'; '.join(failures)}. Without "
            f"a network, fetch {files} from {bases(OFFICIAL[name])[0]} elsewhere and put "
            f"{'them' if others else 'it'} in {folder} (or in a folder given as --data-dir "
            f"or CNN_JAX_DATA_DIR); {MIRROR}=BASE fetches from a mirror")


# ------------------------------------------------------------------ conversion
def converted(name: str, data_dir: Optional[str] = None, progress: bool = True) -> Path:
    """The cache folder of `name`'s official pixels: <split>_images.npy, <split>_labels.npy
    and meta.json (the layout of every decoded dataset), converted once."""
    from cnn_jax.data.imagefolder import _cached  # the cache's one writer
    official = OFFICIAL[name]
    key = hashlib.sha256(json.dumps([CONVERTED_FORMAT, official.md5], sort_keys=True)
                         .encode()).hexdigest()[:16]
    final = cache_dir() / f"{name}-official-{key}"
    if not final.exists():
        files = fetch(name, data_dir, progress)

        def build(tmp: Path):
            for file, md5 in official.md5.items():   # a file put there by hand, checked once
                if md5_of(files[file]) != md5:
                    raise DataError(f"{files[file]}: not the official {file} (MD5 "
                                    f"{md5_of(files[file])}, expected {md5}); delete it to "
                                    f"download it again")
            splits, classes = official.convert(files)
            tmp.mkdir(parents=True)
            for split, (images, labels) in splits.items():
                np.save(tmp / f"{split}_images.npy", images)
                np.save(tmp / f"{split}_labels.npy", labels)
            (tmp / "meta.json").write_text(json.dumps(
                {"source": str(files[next(iter(official.md5))].parent), "classes": classes,
                 "splits": {s: len(l) for s, (_, l) in splits.items()}, "skipped": {},
                 "official": {f: str(p) for f, p in files.items()}}, indent=1))
        _cached(final, build)
    return final


@exit_on_bad_input
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn_jax.data.fetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", choices=sorted(OFFICIAL))
    p.add_argument("--data-dir", default=None, help="download here (default: the first "
                   "writable of $CNN_JAX_DATA_DIR and the per-user cache folder)")
    args = p.parse_args(argv)
    for name in args.names:
        folder = converted(name, args.data_dir)
        meta = json.loads((folder / "meta.json").read_text())
        sizes = ", ".join(f"{n:,} {s}" for s, n in meta["splits"].items())
        print(f"{name}: {sizes} images from {meta['source']}, converted into {folder}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
