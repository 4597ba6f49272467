"""What the network receives, shown: `python -m cnn_jax.preview` draws the first training
examples as a run draws them and says what each op of the recipe decided; those
decisions, applied by hand to the stored images, give back the pixels it shows."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax import preview
from cnn_jax.data import ops
from cnn_jax.data.dataset import DataSpec
from cnn_jax.data.keys import INDEX, SHIFT
from cnn_jax.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:32x32x3:10:64:16"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_JAX_CACHE_DIR", str(tmp_path / "cache"))


def test_the_cifar_recipe_shown_is_the_batch_a_run_draws(tmp_path):
    spec = DataSpec(DATA, colour_shift=20.0)
    train, batch = preview.first_examples(spec, 8, seed=3)
    found = preview.decisions(train, batch, 3)
    assert [op.name for op in train.ops] == ["pad_crop", "flip", "colour_shift"]
    shown = preview.shown(batch)
    for k, d in enumerate(found):
        image = np.asarray(train.source.images[d["index"]]).astype(np.float32)
        top, left, h, w = d["crop"]                      # in the original's pixels
        by_hand = ops.pad(image, 4)[top + 4:top + 4 + h, left + 4:left + 4 + w]
        if d["flipped"]:
            by_hand = by_hand[:, ::-1]
        by_hand = np.clip(np.rint(by_hand + np.asarray(d["colour_shift"])), 0, 255)
        np.testing.assert_allclose(shown[k], by_hand, atol=1)   # the shift printed at 3 digits
    assert [d["index"] for d in found] == batch[INDEX].tolist()
    assert len({d["flipped"] for d in found}) == 2


def test_the_resnet_recipe_of_photos_and_the_command_line(tmp_path):
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (folder / "train" / c).mkdir(parents=True)
        for i in range(4):
            h, w = rng.integers(60, 140, 2)
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).resize(
                (int(w), int(h)), Image.BILINEAR).save(folder / "train" / c / f"{i}.jpg")
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "cnn_jax.preview", "--data", str(folder),
                        "--augment", "resnet", "--image-size", "48", "--n", "6", "--out",
                        str(out), "--json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ,
                                         "CNN_JAX_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    shown = json.loads(r.stdout.strip().splitlines()[-1])
    assert [o["op"] for o in shown["recipe"]] == ["scale_crop", "flip", "lighting"]
    assert shown["recipe"][0]["fast_decode"] is True and shown["side"] == 48
    assert len(shown["images"]) == 6
    for d in shown["images"]:
        top, left, h, w = d["crop"]                      # a square of the original
        assert h == w and 0 <= top and top + h <= d["size"][0] + 1e-6
        assert set(d) >= {"index", "label", "class", "size", "crop", "flipped", "lighting"}
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.size[0] > 200
    # the lighting it reports is the shift the run adds on the device
    spec = DataSpec(str(folder), augment="resnet", image_size=48)
    train, batch = preview.first_examples(spec, 6, seed=0)
    np.testing.assert_allclose(batch[SHIFT], [d["lighting"] for d in shown["images"]],
                               atol=1e-3)


def test_asking_for_more_examples_than_there_are_is_refused():
    with pytest.raises(BadInput, match="--n: between 1 and the 64 training images"):
        preview.first_examples(DataSpec(DATA), 65, seed=0)
