"""TFDS offline: a tiny dataset built by tfds's own builder in ArrayRecord format in a
temporary folder, then trained on and evaluated through `--data tfds:NAME`, as a user
with a prepared TFDS folder would (no download, no TensorFlow)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax.data import ops
from cnn_jax.data.sources import open_source

tfds = pytest.importorskip("tensorflow_datasets")
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["dark", "light"]


def pixels(split_seed: int, i: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * split_seed + i)
    return (rng.integers(0, 100, (24, 24, 3)) + 150 * (i % 2)).astype(np.uint8)


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """Dark and light 24x24 images: 40 to train on, 10 to test."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(24, 24, 3)),
            "label": tfds.features.ClassLabel(names=CLASSES)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40, 0), "test": self._generate_examples(10, 1)}

    def _generate_examples(self, n, seed):
        for i in range(n):
            buf = io.BytesIO()   # encoded here: tfds's own encoder would need TensorFlow
            Image.fromarray(pixels(seed, i)).save(buf, "PNG")
            buf.seek(0)
            yield i, {"image": buf, "label": i % 2}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyShapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_records_are_tfds_own_examples(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    train = open_source("tfds:tiny_shapes", "train", data_dir=str(prepared))
    assert len(train) == 40 and train.classes == CLASSES
    # tfds shuffles records on writing: match them by their pixels
    found = {ops.decode(train.read(i)[0], train.where(i)).tobytes(): int(train.labels[i])
             for i in range(len(train))}
    assert found == {pixels(0, i).tobytes(): i % 2 for i in range(40)}
    assert len(open_source("tfds:tiny_shapes", "test", data_dir=str(prepared))) == 10


def test_train_and_evaluate_through_tfds(prepared, tmp_path):
    env = dict(os.environ, CNN_JAX_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cnn_jax.train", "--model", "resnet8", "--data",
                        "tfds:tiny_shapes", "--data-dir", str(prepared), "--augment", "center",
                        "--image-size", "24", "--steps", "4", "--batch", "8", "--workers",
                        "0", "--no-progress", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["data"] == "tfds:tiny_shapes" and res["steps"] == 4
    ev = subprocess.run([sys.executable, "-m", "cnn_jax.evaluate", "--checkpoint", str(out),
                         "--views", "1", "--json", "--workers", "0"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    last = json.loads(ev.stdout.strip().splitlines()[-1])
    assert last["n_examples"] == 10 and last["classes"] == CLASSES
    assert last["error"] == pytest.approx(res["final_test_error"], abs=1e-6)
