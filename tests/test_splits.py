"""Splits mean what they say, on an ImageFolder a user brings (given as a bare path):
'val' is its own val/ (or a run's holdout), 'test' its test/, never training images;
every evaluation names the split, the folder and the count it scored."""
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax.data.dataset import DataSpec, open_split
from cnn_jax.data.sources import MissingSplit, open_source

ROOT = Path(__file__).resolve().parents[1]


def imagefolder(root: Path, splits: dict) -> Path:
    """<root>/<split>/<class>/<k>.png, 32x32, two classes: {split: images per class}."""
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
                    root / split / cls / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """train/ (2 x 8) and val/ (2 x 3), no test/."""
    return imagefolder(tmp_path_factory.mktemp("data") / "photos", {"train": 8, "val": 3})


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_JAX_CACHE_DIR", str(tmp_path / "cache"))


def test_val_is_the_datasets_own_val_folder(photos):
    val = open_source(str(photos), "val")            # a bare path: an ImageFolder
    assert len(val) == 6 and all("/val/" in val.where(i) for i in range(6))
    assert val.describe() == f"val/ of {photos}"
    with pytest.raises(MissingSplit, match="no test/ split"):
        open_source(str(photos), "test")
    held = open_source(str(photos), "val", holdout=4)  # a run's holdout: of train/
    assert len(held) == 4 and all("/train/" in held.where(i) for i in range(4))
    assert held.describe() == f"a stratified holdout of 4 of train/ of {photos}"


def test_without_val_or_holdout_there_is_no_val(tmp_path):
    only_train = imagefolder(tmp_path / "only", {"train": 4})
    with pytest.raises(MissingSplit, match="no val/ split, and no training images were held"):
        open_source(str(only_train), "val")


def cli(module, *args, tmp):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CNN_JAX_CACHE_DIR=str(tmp / "cache"))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


TRAIN = ["--model", "resnet8", "--steps", "2", "--batch", "4", "--eval-batch", "4",
         "--workers", "0", "--no-progress", "--log-every", "1"]


def test_a_run_and_its_evaluation_name_what_they_scored(photos, tmp_path):
    r = cli("cnn_jax.train", "--data", photos, *TRAIN, "--out", tmp_path / "run", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (res["eval_split"], res["eval_images"]) == ("val", 6)
    assert res["eval_data"] == f"val/ of {photos} (6 images)" and "final_val_error" in res
    assert f"val error {res['final_val_error']:.4f} on val/ of {photos} (6 images)" in r.stdout
    ev = cli("cnn_jax.evaluate", "--checkpoint", tmp_path / "run", "--split", "val", "--json",
             "--workers", "0", tmp=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert out["split"] == "val" and out["n_examples"] == 6
    assert out["scored"] == f"val/ of {photos} (6 images)"
    assert f"val: val/ of {photos} (6 images)" in ev.stderr
    assert out["error"] == pytest.approx(res["final_val_error"], abs=1e-6)
    test = cli("cnn_jax.evaluate", "--checkpoint", tmp_path / "run", "--split", "test",
               "--workers", "0", tmp=tmp_path)
    assert test.returncode == 2 and "has no test/ split" in test.stderr


def test_a_run_without_a_validation_set_refuses_split_val(tmp_path):
    data = imagefolder(tmp_path / "trainonly", {"train": 6})
    r = cli("cnn_jax.train", "--data", data, *TRAIN, "--out", tmp_path / "run", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["eval_split"] == \
        "train_set"
    ev = cli("cnn_jax.evaluate", "--checkpoint", tmp_path / "run", "--split", "val",
             "--workers", "0", tmp=tmp_path)
    assert ev.returncode == 2, ev.stderr[-2000:]
    assert "no val/ split, and no training images were held out" in ev.stderr


def test_a_holdout_beside_a_val_folder_is_refused(photos, tmp_path):
    r = cli("cnn_jax.train", "--data", photos, *TRAIN, "--holdout", "4", "--out",
            tmp_path / "run", tmp=tmp_path)
    assert r.returncode == 2 and "--holdout 4" in r.stderr and "val/ split of its own" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_bare_tar_path_is_the_imagefolder_it_holds(photos, tmp_path):
    archive = tmp_path / "photos.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(photos, arcname="photos")
    spec = DataSpec(str(archive), augment="cifar")
    bare, named = (open_split(dataclasses.replace(spec, name=n), "train", training=True)
                   for n in (str(archive), f"imagefolder:{archive}"))
    index = np.arange(8)
    assert np.array_equal(bare.train_batch(index, np.zeros(8, np.int64), 0)["image"],
                          named.train_batch(index, np.zeros(8, np.int64), 0)["image"])
    assert DataSpec(str(archive), augment="resnet").streams   # full-size photos stream
    missing = cli("cnn_jax.train", "--data", tmp_path / "nowhere", *TRAIN, "--out",
                  tmp_path / "x", tmp=tmp_path)
    assert missing.returncode == 2 and f"{tmp_path / 'nowhere'}: no such file" in missing.stderr
