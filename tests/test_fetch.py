"""Data on first use: CIFAR-10 and MNIST from their official archives, served here by a
local HTTP server as tiny files in the official formats (the checksum table patched to
theirs): downloaded with a checksum, converted losslessly, never half-written; a
corrupt file, a transfer cut short and no server at all each end in one clear line;
a clone with no ../shared beside it and no network fails fast, naming what to do."""
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cnn_jax.data import fetch, sources
from cnn_jax.data.sources import Decode, open_source
from cnn_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CIFAR = "cifar-10-python.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def tiny_cifar(per_batch: int = 4, test: int = 6, seed: int = 0) -> tuple[bytes, dict]:
    """cifar-10-python.tar.gz as published (pickled batches of channels-first rows), and
    the images it holds as HWC arrays."""
    rng = np.random.default_rng(seed)
    buf, expected = io.BytesIO(), {}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for split, names, n in (("train", [f"data_batch_{i}" for i in range(1, 6)], per_batch),
                                ("test", ["test_batch"], test)):
            images, labels = [], []
            for name in names:
                rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
                batch_labels = rng.integers(0, 10, n).tolist()
                add(name, {b"batch_label": name.encode(), b"labels": batch_labels,
                           b"data": rows, b"filenames": [b"x.png"] * n})
                images.append(rows.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
                labels += batch_labels
            expected[split] = (np.concatenate(images), np.asarray(labels))
        add("batches.meta", {b"label_names": [c.encode() for c in CLASSES],
                             b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return buf.getvalue(), expected


def idx(array: np.ndarray, magic: int) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(head + array.astype(np.uint8).tobytes())


def tiny_mnist() -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    files, expected = {}, {}
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        files[f"{prefix}-images-idx3-ubyte.gz"] = idx(images, 2051)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = idx(labels, 2049)
        expected[split] = (images[..., None], labels)
    return files, expected


class Server:
    """Serves `files` at http://127.0.0.1:PORT/<name>; `mode` 'ok', 'corrupt' (the same
    length, other bytes) or 'short' (the promised length, half the bytes, then the
    connection closes). `requests` counts what was asked for."""

    def __init__(self, files: dict):
        self.files, self.mode, self.requests = files, "ok", []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if server.mode == "corrupt":
                    data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
                if server.mode == "short":
                    data = data[:len(data) // 2]
                self.wfile.write(data)
                self.wfile.flush()
                if server.mode == "short":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def offline_user(tmp_path, monkeypatch):
    """No local copy anywhere (no ../shared, no data dir), a cache of its own."""
    monkeypatch.setenv("CNN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CNN_JAX_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "SHARED_DATA", tmp_path / "no-shared")
    return tmp_path


@pytest.fixture
def cifar_server(offline_user, monkeypatch):
    archive, expected = tiny_cifar()
    server = Server({CIFAR: archive})
    monkeypatch.setenv(fetch.MIRROR, server.url)
    monkeypatch.setitem(fetch.OFFICIAL, "cifar10", fetch.Official(
        ("https://unused.invalid/",), {CIFAR: hashlib.md5(archive).hexdigest()},
        fetch.OFFICIAL["cifar10"].convert))
    yield server, expected
    server.close()


def downloads(tmp: Path) -> list[str]:
    folder = tmp / "cache" / "downloads"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) \
        if folder.exists() else []


def test_cifar10_is_downloaded_checked_and_converted_bit_for_bit(cifar_server, offline_user):
    server, expected = cifar_server
    for split in ("train", "test"):
        arrays = open_source("cifar10", split, decode=Decode())
        images, labels = expected[split]
        assert np.array_equal(np.asarray(arrays.images), images)   # lossless
        assert arrays.labels.tolist() == labels.tolist()
        assert arrays.classes == CLASSES
    assert len(open_source("cifar10", "train", decode=Decode())) == 20   # five batches of 4
    assert server.requests == [CIFAR]                     # downloaded once, converted once
    assert downloads(offline_user) == [CIFAR]
    # the cache, not the download, serves later reads: the archive may even go
    (offline_user / "cache" / "downloads" / CIFAR).unlink()
    assert len(open_source("cifar10", "test", decode=Decode())) == 6


def test_mnist_comes_from_its_four_idx_files(offline_user, monkeypatch):
    files, expected = tiny_mnist()
    server = Server(files)
    try:
        monkeypatch.setenv(fetch.MIRROR, server.url)
        monkeypatch.setitem(fetch.OFFICIAL, "mnist", fetch.Official(
            ("https://unused.invalid/",), {f: hashlib.md5(d).hexdigest() for f, d in files.items()},
            fetch.OFFICIAL["mnist"].convert))
        for split in ("train", "test"):
            arrays = open_source("mnist", split, decode=Decode())
            assert np.array_equal(np.asarray(arrays.images), expected[split][0])
            assert arrays.labels.tolist() == expected[split][1].tolist()
            assert arrays.classes == [str(d) for d in range(10)]
        # resized and in colour for a net that wants it: derived once, from the same pixels
        big = open_source("mnist", "test", decode=Decode(channels=3, size=(32, 32)))
        assert big.images.shape == (5, 32, 32, 3)
        assert sorted(server.requests) == sorted(files)
    finally:
        server.close()


def test_official_files_already_in_the_data_dir_are_used_without_a_network(
        cifar_server, offline_user, monkeypatch):
    server, expected = cifar_server
    data_dir = offline_user / "mine"
    data_dir.mkdir()
    (data_dir / CIFAR).write_bytes(server.files[CIFAR])
    monkeypatch.setenv(fetch.MIRROR, "http://127.0.0.1:9/")   # nothing there
    arrays = open_source("cifar10", "test", data_dir=str(data_dir), decode=Decode())
    assert np.array_equal(np.asarray(arrays.images), expected["test"][0])
    assert server.requests == [] and downloads(offline_user) == []


def test_a_corrupt_download_is_deleted_and_both_checksums_named(cifar_server, offline_user):
    server, _ = cifar_server
    server.mode = "corrupt"
    with pytest.raises(DataError) as e:
        open_source("cifar10", "train", decode=Decode())
    message = str(e.value)
    expected_md5 = fetch.OFFICIAL["cifar10"].md5[CIFAR]
    assert f"{server.url}{CIFAR}" in message and "checksum mismatch" in message
    assert f"expected {expected_md5}" in message
    corrupt = bytes(b ^ 0xFF for b in server.files[CIFAR][:64]) + server.files[CIFAR][64:]
    assert f"received {hashlib.md5(corrupt).hexdigest()}" in message
    assert downloads(offline_user) == []                 # nothing kept, nothing half-written
    server.mode = "ok"                                   # and the next try succeeds
    assert len(open_source("cifar10", "train", decode=Decode())) == 20


def test_a_transfer_cut_short_never_looks_complete(cifar_server, offline_user):
    server, _ = cifar_server
    server.mode = "short"
    with pytest.raises(DataError, match="cut short"):
        open_source("cifar10", "train", decode=Decode())
    assert downloads(offline_user) == []
    assert not list((offline_user / "cache").glob("cifar10-official-*"))


def dead_url() -> str:
    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_without_a_server_one_line_says_what_to_put_where(offline_user, monkeypatch):
    monkeypatch.setenv(fetch.MIRROR, dead_url())
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        open_source("cifar10", "test", decode=Decode())
    assert time.monotonic() - start < 30
    message = str(e.value)
    assert "\n" not in message
    assert f"{os.environ[fetch.MIRROR]}{CIFAR}" in message
    assert f"put it in {offline_user / 'cache' / 'downloads'}" in message
    assert "--data-dir" in message and fetch.MIRROR in message


def test_fetch_ahead_from_the_command_line(cifar_server, offline_user, capsys):
    assert fetch.main(["cifar10"]) == 0
    assert "20 train, 6 test images" in capsys.readouterr().err
    server, _ = cifar_server
    assert server.requests == [CIFAR]
    assert fetch.main(["cifar10"]) == 0 and server.requests == [CIFAR]   # nothing again


def test_a_clone_without_shared_data_and_no_network_fails_fast_and_clearly(tmp_path):
    """The main experiment from a copy of the project with nothing beside it: exit 2
    within seconds, the one line naming the URL and --data-dir, no output folder."""
    clone = tmp_path / "clone"
    for part in ("cnn_jax", "experiments"):
        shutil.copytree(ROOT / part, clone / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, CNN_JAX_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env.pop("CNN_JAX_DATA_DIR", None)
    env[fetch.MIRROR] = dead_url()
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "experiments.plain_vs_resnet", "--preset",
                        "smoke"], cwd=clone, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert time.monotonic() - start < 60
    error = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(error) == 1 and f"{env[fetch.MIRROR]}{CIFAR}" in error[0]
    assert "--data-dir" in error[0] and "Traceback" not in r.stderr
    assert not (clone / "runs").exists() or not any((clone / "runs").iterdir())
