"""Multi-view and ensemble evaluation: view geometry, averaging, identities, coverage,
agreement with the training loop's own evaluation, the CLI contract, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnn_jax.errors import BadInput
from cnn_jax import data as data_lib
from cnn_jax.data import ops
from cnn_jax.data.dataset import Dataset
from cnn_jax.data.sources import Arrays
from cnn_jax.evaluate import build_groups, evaluate, load_member
from cnn_jax.train import TrainConfig
from cnn_jax.train.loop import train

pytestmark = pytest.mark.xdist_group("evaluate_runs")  # the `runs` fixture, built once
DATA = "synthetic:16x16x3:10:64:37"   # 37 test images: no batch size divides it


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = []
    for seed in (0, 1):
        cfg = TrainConfig(model="resnet8", data=DATA, steps=4, batch=16, seed=seed, lr=0.05,
                          log_every=2, eval_every=4, checkpoint_every=4, progress=False,
                          workers=0, out=str(root / f"seed{seed}"))
        train(cfg)
        out.append(root / f"seed{seed}")
    return out


def make_views(images, views, side):
    """The test views of a batch of decoded images, as the evaluator makes them."""
    d = Dataset(Arrays(images, np.zeros(len(images), np.int32), ["a", "b"]), side)
    v = d.eval_batch(np.arange(len(images)), str(views))["image"]
    return v[:, None] if views == 1 else v


def test_views_of_a_32x32_image_are_the_padded_corners_centre_and_mirrors():
    img = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3) % 251
    img = img.astype(np.uint8)
    padded = np.pad(img, ((0, 0), (4, 4), (4, 4), (0, 0)))
    v10 = make_views(img, 10, 32)
    assert v10.shape == (2, 10, 32, 32, 3)
    np.testing.assert_array_equal(v10[:, 0], padded[:, :32, :32])     # top left
    np.testing.assert_array_equal(v10[:, 3], padded[:, 8:, 8:])       # bottom right
    np.testing.assert_array_equal(v10[:, 4], img)                     # centre = the image
    np.testing.assert_array_equal(v10[:, 5:], v10[:, :5, :, ::-1])    # mirrors
    np.testing.assert_array_equal(make_views(img, 1, 32)[:, 0], img)
    two = make_views(img, 2, 32)
    np.testing.assert_array_equal(two[:, 1], img[:, :, ::-1])


def test_views_of_large_images_resize_the_shorter_side_then_crop():
    img = np.full((1, 300, 400, 3), 90, np.uint8)
    img[:, :, :200] = 10                      # left half dark
    v = make_views(img, 10, 224)
    assert v.shape == (1, 10, 224, 224, 3)
    # shorter side 300 -> 256, so the image is 256x341: the left corner crop is mostly
    # dark, the right one bright, the mirror of the left crop is the left crop flipped
    assert v[0, 0].mean() < 50 and v[0, 1].mean() > 50
    np.testing.assert_array_equal(v[0, 5], v[0, 0, :, ::-1])
    assert ops.shorter_side((300, 400), 256) == (256, 341)


def test_single_view_equals_the_training_loops_evaluation(runs):
    """The same error as the loop's last evaluation, with the same convolutions: oneDNN's
    where the loop used them (CPUs, cnn_jax.onednn), XLA's elsewhere."""
    from cnn_jax import onednn
    r = evaluate([runs[0]], views="1", batch=16)
    trained = json.loads((runs[0] / "results.json").read_text())
    assert r["n_examples"] == 37
    assert r["error"] == pytest.approx(trained["final_test_error"], abs=1e-6)
    g = build_groups([load_member(runs[0])])[0]
    hlo = g.forward.lower(g.stacked, np.zeros((2, 16, 16, 3), np.uint8)).compile().as_text()
    assert (onednn.TARGETS["forward"] in hlo) == (trained["conv_kernels"] == "onednn")


def test_a_fine_tuned_run_normalised_as_its_source_is_evaluated(runs, tmp_path):
    """A run that fine-tunes another (--init-from, --normalise source) feeds its net as
    the source was fed; evaluation reads that from the run (it once failed looking for
    the source's config in the current folder)."""
    cfg = TrainConfig(model="resnet8", data=DATA, steps=2, batch=16, lr=0.01, log_every=1,
                      eval_every=2, checkpoint_every=2, progress=False, workers=0,
                      init_from=str(runs[0]), init_skip="fc", trainable="stage3,fc",
                      normalise="source", out=str(tmp_path / "finetuned"))
    trained = train(cfg)
    r = evaluate([tmp_path / "finetuned"], views=1, batch=16)
    assert r["n_examples"] == 37
    assert r["error"] == pytest.approx(trained["final_test_error"], abs=1e-6)


def test_ensemble_average_is_the_mean_of_the_members_softmaxes(runs):
    import jax
    test = data_lib.load(DATA, "test")
    members = [load_member(r) for r in runs]
    both = build_groups(members)
    assert len(both) == 1 and len(both[0].members) == 2   # one compiled call for the two
    views = make_views(test.images, 10, 16)                      # [N, 10, 16, 16, 3]
    flat = views.reshape(-1, 16, 16, 3)
    joint = np.asarray(both[0].forward(both[0].stacked, flat))  # [2, N*10, K]
    for i, m in enumerate(members):
        g = build_groups([m])[0]
        np.testing.assert_allclose(joint[i], np.asarray(g.forward(g.stacked, flat))[0],
                                   atol=1e-5)
    probs = np.asarray(jax.nn.softmax(joint, -1)).reshape(2, len(test), 10, -1)
    expected = np.mean(np.argmax(probs.mean(axis=(0, 2)), -1) != test.labels)
    assert evaluate(runs, views=10, batch=16)["error"] == pytest.approx(expected)


def test_an_ensemble_of_one_model_twice_equals_the_model(runs):
    one = evaluate([runs[0]], views=2, batch=8)
    twice = evaluate([runs[0], runs[0]], views=2, batch=8)
    assert twice["models"] == 2 and twice["n_examples"] == one["n_examples"] == 37
    assert twice["error"] == one["error"] and twice["per_class_error"] == one["per_class_error"]


def test_cli_contract_and_bad_input(runs, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "cnn_jax.evaluate", "--checkpoint", str(runs[0]),
           "--checkpoint", str(runs[1]), "--views", "10", "--json", "--out",
           str(tmp_path / "e.json")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["views"] == "10" and last["models"] == 2 and last["n_examples"] == 37
    assert 0 <= last["error"] <= 1 and len(last["per_class_error"]) == 10
    assert json.loads((tmp_path / "e.json").read_text())["error"] == last["error"]
    bad = subprocess.run([sys.executable, "-m", "cnn_jax.evaluate", "--checkpoint",
                          str(tmp_path / "nothing")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "expected the --out folder of a training run" in bad.stderr
    views = subprocess.run(cmd[:5] + ["--views", "3"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert views.returncode == 2 and "--views" in views.stderr


def test_ensembles_smoke_preset(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "experiments.ensembles", "--preset", "smoke",
                        "--model", "resnet8", "--data", "synthetic:32x32x3:10:64:40",
                        "--out", str(tmp_path), "--workers", "0"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(x["models"], x["views"]): x for x in results["rows"]}
    assert set(rows) == {(k, v) for k in (1, 2) for v in (1, 2, 10)}
    assert rows[(1, 1)]["ensembles"] == 2 and rows[(1, 10)]["ensembles"] == 2
    assert rows[(2, 10)]["ensembles"] == 1 and rows[(2, 10)]["error_std"] == 0
    # one network, one view: the mean over the two seeds of their own test errors
    own = [json.loads((tmp_path / "nets" / f"resnet8-seed{s}" / "results.json").read_text())
           ["final_test_error"] for s in range(2)]
    assert rows[(1, 1)]["error"] == pytest.approx(np.mean(own), abs=1e-6)
    assert all(x["images_per_s"] > 0 for x in rows.values())
    assert (tmp_path / "ensembles.png").stat().st_size > 10_000
    claims = {c["claim"]: c for c in results["claims"]}
    assert set(claims) == {"ensemble_beats_its_best_member", "ten_views_beat_one"}
    best = min(results["single_model_errors"])
    assert claims["ensemble_beats_its_best_member"]["pass"] == (rows[(2, 1)]["error"] < best)
    # the same members are found in a finished sweep instead of trained again
    import argparse
    from experiments.ensembles import PRESETS, member_sources
    found = member_sources(argparse.Namespace(runs=str(tmp_path), model="resnet8", members=None),
                        PRESETS["smoke"], tmp_path / "unused")
    assert found == [tmp_path / "nets" / f"resnet8-seed{s}" for s in range(2)]
    with pytest.raises(BadInput, match="at least 2"):
        member_sources(argparse.Namespace(runs=str(tmp_path), model="resnet20", members=None),
                    PRESETS["smoke"], tmp_path / "unused")


def test_results_of_weights_files_go_under_the_working_directory(runs, tmp_path):
    """A run folder keeps its evaluations; weights files (a folder of downloads, maybe
    shared or read-only) are left with exactly the files they had."""
    from cnn_jax.evaluate import WEIGHTS_OUTPUT, default_output
    r = {"checkpoints": [str(runs[0])], "split": "test", "views": 1, "models": 1}
    assert default_output(r).parent == runs[0]
    r["checkpoints"] = [str(tmp_path / "downloads" / "resnet20-12fca82f.th")]
    assert default_output(r).parent == WEIGHTS_OUTPUT == Path("runs") / "evaluate"
    weights = sorted((Path(__file__).parents[2] / "shared" / "reference").glob("resnet20-*.th"))
    if not weights:
        pytest.skip("../shared/reference/resnet20-*.th is absent on this machine")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / weights[0].name).write_bytes(weights[0].read_bytes())
    r = subprocess.run([sys.executable, "-m", "cnn_jax.evaluate", "--checkpoint",
                        str(downloads / weights[0].name), "--data",
                        "synthetic:32x32x3:10:16:20", "--json"],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p.name for p in downloads.iterdir()] == [weights[0].name]
    written = list((tmp_path / "runs" / "evaluate").glob("evaluate_test_1views_1models_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["n_examples"] == 20
