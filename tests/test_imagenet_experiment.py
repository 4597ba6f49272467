"""The ImageNet experiment (Fig. 4, Table 2): the smoke preset end to end on
imagenet_sample, its claims on given numbers, and its refusals."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax.data.sources import SHARED_DATA
from experiments import imagenet as E

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = SHARED_DATA / "imagenet_sample.tar"
needs_sample = pytest.mark.skipif(not SAMPLE.exists(), reason=f"{SAMPLE} is absent")


def experiment(out, *extra, cache=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               **({"CNN_JAX_CACHE_DIR": str(cache)} if cache else {}))
    return subprocess.run([sys.executable, "-m", "experiments.imagenet", "--preset", "smoke",
                           "--out", str(out), "--workers", "0", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# 80 s: kept out of the 15-minute CI; the experiment runs end to end there on 2 processes
# (test_multihost), plain-18's count is in test_models, re-reading in test_plain_vs_resnet
@pytest.mark.slow
@needs_sample
def test_smoke_preset_trains_a_plain_and_a_residual_net(tmp_path):
    r = experiment(tmp_path / "out", "--data", "imagenet_sample", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [x["name"] for x in results["runs"]] == ["plain18", "resnet18"]
    for x in results["runs"]:
        assert x["test_split"] == "train_set"  # imagenet_sample has only train/
        for key in ("final_test_top1_error", "final_test_top5_error",
                    "ten_crop_test_top1_error", "ten_crop_test_top5_error",
                    "final_train_error"):
            assert 0 <= x[key] <= 1, key
        assert x["final_test_top5_error"] <= x["final_test_top1_error"]
        assert x["curve"]["step"] == [2, 4]
    # ResNet-18 of Table 1 (1000 classes, torchvision's count); plain-18 is it without
    # the three projection shortcuts (1x1 convolution + BatchNorm: 173,824 parameters)
    assert [x["params"] for x in results["runs"]] == [11_689_512 - 173_824, 11_689_512]
    assert results["claims"] == []  # one depth: no claim of Fig. 4 can be tested
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| 18 | plain-18 |" in table and "27.94" in table and "27.88" in table
    assert "no val/" in table
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    # re-running re-reads: nothing trains, the 10-crop test is not repeated
    again = experiment(tmp_path / "out", "--data", "imagenet_sample", cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 nets, 0 to train" in again.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"][1][
        "ten_crop_test_top1_error"] == results["runs"][1]["ten_crop_test_top1_error"]


def run_record(family, depth, error, seed=0):
    net = E.Net(family, depth, imagenet=True)
    return {"name": net.name, "label": net.label, "depth": depth, "seed": seed,
            "final_train_error": 0.5, "final_train_set_error": error}


def test_claims_read_fig4_on_the_mean_training_errors():
    holds = [run_record("plain", 18, 0.30), run_record("plain", 34, 0.40),
             run_record("resnet", 18, 0.20), run_record("resnet", 34, 0.205)]
    claims = {c["claim"]: c for c in E.fig4_claims(holds)}
    assert [claims[k]["pass"] for k in ("plain_deeper_trains_worse", "resnet_beats_plain",
                                        "resnet_deeper_no_worse")] == [True, True, True]
    assert claims["resnet_beats_plain"]["measured"] == {"plain-34": 40.0, "ResNet-34": 20.5}
    fails = [run_record("plain", 18, 0.40), run_record("plain", 34, 0.30),
             run_record("resnet", 18, 0.10), run_record("resnet", 34, 0.29)]
    claims = {c["claim"]: c["pass"] for c in E.fig4_claims(fails)}
    assert claims == {"plain_deeper_trains_worse": False, "resnet_beats_plain": False,
                      "resnet_deeper_no_worse": False}


def test_a_depth_without_a_plain_net_or_an_unknown_depth_is_refused(tmp_path):
    for extra, words in ((["--set", "plain=50"], "plain-18 and plain-34 only"),
                         (["--depths", "20"], "--depths")):
        r = experiment(tmp_path / "out", *extra)
        assert r.returncode == 2, r.stderr[-2000:]
        assert words in r.stderr
        assert not (tmp_path / "out").exists()


def test_a_val_split_with_other_classes_is_refused(tmp_path):
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for split, classes in (("train", ("n01", "n02")), ("val", ("n01", "n03"))):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(
                    root / split / cls / f"{k}.JPEG")
    r = experiment(tmp_path / "out", "--data", f"imagefolder:{root}", "--processes", "1",
                   cache=tmp_path / "cache")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "split 'val' has classes" in r.stderr
    assert not (tmp_path / "out").exists()
