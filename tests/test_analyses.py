"""The analyses behind the lecture's claims: layer responses (Fig. 7), residual blocks
that fall back to the identity, the augmentation ablation; and the engine pieces they
stand on (appended blocks, --init-from, --train-subset)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.errors import BadInput
from cnn_jax.models import create_model
from cnn_jax.train import TrainConfig
from cnn_jax.train.checkpoint import merge_variables
from cnn_jax.train.inputs import training_split
from helpers import count, quick_variables

ENV = dict(os.environ, JAX_PLATFORMS="cpu")
CIFAR_LIKE = "synthetic:32x32x3:10:128:100"


def run(module, out, *extra):
    return subprocess.run([sys.executable, "-m", module, "--preset", "smoke", "--out",
                           str(out), "--workers", "0", "--data", CIFAR_LIKE, *extra],
                          env=ENV, capture_output=True, text=True, timeout=900)


# ------------------------------------------------------------------ engine pieces
def test_appended_blocks_add_exactly_their_parameters():
    x = jnp.zeros((1, 32, 32, 3))
    base = count(jax.eval_shape(create_model("resnet20").init, jax.random.key(0), x)["params"])
    grown = create_model("resnet20", extra_blocks=(0, 0, 3), extra_shortcut=None)
    n = count(jax.eval_shape(grown.init, jax.random.key(0), x)["params"])
    # per block: two 3x3x64x64 kernels and two BNs (scale, bias) of 64
    assert base == 269_722 and n == base + 3 * (2 * 3 * 3 * 64 * 64 + 2 * 2 * 64)
    with pytest.raises(BadInput, match="extra_blocks"):
        create_model("resnet8", extra_blocks=(0, 0, 0, 1)).init(jax.random.key(0), x)


def test_a_residual_block_with_a_zero_branch_is_the_identity():
    """The lecture's argument, exactly: W[l+2] = 0, b[l+2] = 0 gives a[l+2] = g(a[l]) =
    a[l]; the grown net computes the base net's function, bit for bit. A plain block
    with the same zero weights outputs zeros instead."""
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 3))
    base = create_model("resnet8")
    v = quick_variables(base, x)
    for shortcut, same in (("A", True), (None, False)):
        grown = create_model("resnet8", extra_blocks=(0, 0, 1), extra_shortcut=shortcut)
        g = merge_variables(quick_variables(grown, x), v, "base")
        bn = g["params"]["stage3_extra1"]["ConvBN_1"]["bn"]
        bn["scale"], bn["bias"] = jnp.zeros_like(bn["scale"]), jnp.zeros_like(bn["bias"])
        equal = bool(jnp.array_equal(grown.apply(g, x), base.apply(v, x)))
        assert equal == same


def test_merge_variables_takes_matching_names_and_refuses_mismatches():
    x = jnp.zeros((1, 8, 8, 3))
    v8 = quick_variables(create_model("resnet8"), x)
    grown = create_model("resnet8", extra_blocks=(1,))
    fresh = quick_variables(grown, x)
    g = merge_variables(fresh, v8, "base")
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(jnp.array_equal, a, b)))
    assert all(same(g["params"][name], v8["params"][name]) for name in v8["params"])
    assert same(g["batch_stats"], {**fresh["batch_stats"], **v8["batch_stats"]})
    assert same(g["params"]["stage1_extra1"], fresh["params"]["stage1_extra1"])
    wide = quick_variables(create_model("resnet8", widths=(8, 16, 32)), x)
    with pytest.raises(BadInput, match=r"--init-from wide: \S+ has shape \(.*\) there "
                                         r"but \(.*\) in this model"):
        merge_variables(v8, wide, "wide")
    with pytest.raises(BadInput, match="none of its variables"):
        merge_variables(v8, {"params": {"C1": v8["params"]["stem"]}}, "lenet")


def test_init_from_starts_from_the_run_and_bad_paths_are_refused(tmp_path):
    from cnn_jax.train.checkpoint import load_variables
    from cnn_jax.train.loop import train
    small = dict(model="resnet8", data="synthetic:16x16x3:10:256:100", batch=16, steps=2,
                 lr=0.0, weight_decay=0.0, momentum=0.0, log_every=1, eval_every=2,
                 checkpoint_every=2, progress=False, workers=0)
    train(TrainConfig(**small, out=str(tmp_path / "a")))
    # lr 0: the continued run's weights are exactly the source's
    train(TrainConfig(**small, seed=3, init_from=str(tmp_path / "a"), out=str(tmp_path / "b")))
    a, b = load_variables(tmp_path / "a"), load_variables(tmp_path / "b")
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a["params"], b["params"])))
    with pytest.raises(BadInput, match="--init-from: .*nowhere"):
        train(TrainConfig(**small, init_from=str(tmp_path / "nowhere"), out=str(tmp_path / "c")))


def test_train_subset_is_fixed_and_stratified():
    cfg = TrainConfig(data="synthetic:8x8x3:10:500:50", train_subset=100)
    a, b = training_split(cfg), training_split(cfg)
    assert len(a) == 100 and np.array_equal(a.normaliser_images(), b.normaliser_images())
    full = np.bincount(training_split(TrainConfig(data=cfg.data.name)).labels, minlength=10)
    assert np.all(np.abs(np.bincount(a.labels, minlength=10) - 100 * full / full.sum()) <= 1)
    assert TrainConfig().digest() == TrainConfig(train_subset=0, init_from="").digest()
    assert TrainConfig().digest() != cfg.digest()


# ------------------------------------------------------------------ the experiments
def test_layer_responses_smoke_and_the_stem_std_by_hand(tmp_path):
    from experiments.layer_responses import layer_responses
    r = run("experiments.layer_responses", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    nets = {n["name"]: n for n in results["nets"]}
    assert set(nets) == {"plain8", "resnet8", "resnet14"}
    assert all(n["origin"].startswith("trained here") for n in nets.values())
    # every 3x3 layer, in order: the stem, then two per block (6n + 1)
    assert len(nets["resnet14"]["std"]) == 13 and nets["resnet14"]["layers"][:3] == [
        "stem", "stage1_block1/ConvBN_0", "stage1_block1/ConvBN_1"]
    assert nets["resnet14"]["layers"][-1] == "stage3_block2/ConvBN_1"
    claims = {c["claim"]: c for c in results["claims"]}
    assert set(claims) == {"residual_smaller_than_plain_8", "deeper_resnet_smaller_14"}
    std = {k: np.mean(n["std"]) for k, n in nets.items()}
    assert claims["deeper_resnet_smaller_14"]["pass"] == (std["resnet14"] < std["resnet8"])
    assert (tmp_path / "out" / "responses.png").stat().st_size > 10_000
    assert "where it comes from" in (tmp_path / "out" / "table.md").read_text()

    # the stem's response by hand: conv, then BN with the running statistics
    from cnn_jax import data as data_lib
    from cnn_jax.trained import load_trained
    from cnn_jax.train.inputs import make_normaliser
    run_dir = Path(nets["resnet8"]["source"])
    m = load_trained(run_dir)
    images = data_lib.load(CIFAR_LIKE, "test").images[:50]
    x = make_normaliser("per_pixel", training_split(m.config).normaliser_images())(images)
    p, s = m.variables["params"]["stem"], m.variables["batch_stats"]["stem"]["bn"]
    y = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = (y - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    expected = float(np.mean(np.std(np.asarray(y, np.float64), axis=(0, 1, 2))))
    # (within the rounding of oneDNN's convolutions and float32 moments)
    assert layer_responses(run_dir, 50)["std"][0] == pytest.approx(expected, rel=5e-4)
    # its error on the 64 measured images is the training loop's on the same subset
    loop = json.loads((run_dir / "results.json").read_text())["final_test_error"]
    assert nets["resnet8"]["test_error"] == pytest.approx(loop, abs=1e-6)


def test_layer_responses_of_released_weights():
    """The released ResNets (../shared/reference) measured through the same code: the
    deeper one's layers respond less (mean std 0.38 vs 0.63 over 1,000 test images)."""
    from cnn_jax.data.sources import SHARED_DATA
    from cnn_jax.trained import released_weights
    from experiments.layer_responses import layer_responses
    weights = [released_weights(f"resnet{d}") for d in (20, 56)]
    if None in weights or not (SHARED_DATA / "cifar10.tar.xz").exists():
        pytest.skip("the released weights or the CIFAR-10 archive are absent on this machine")
    r20, r56 = (layer_responses(w, 500, data="cifar10") for w in weights)
    assert len(r20["std"]) == 19 and len(r56["std"]) == 55
    assert np.mean(r56["std"]) < np.mean(r20["std"])
    assert r20["test_error"] < 0.15 and r56["test_error"] < 0.13


@pytest.mark.slow  # 80 s; identity blocks' mechanics are tested above: kept out of the 15-minute CI
def test_identity_blocks_smoke(tmp_path):
    r = run("experiments.identity_blocks", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    arms = {a["arm"]: a for a in results["arms"]}
    assert set(arms) == {"control", "residual", "plain"}
    base = results["base_errors"]
    assert [c["claim"] for c in results["claims"]] == [
        "residual_no_worse_than_control", "plain_worse_than_residual",
        "residual_blocks_closer_to_identity"]
    # the control arm just appended is the base net itself
    assert arms["control"]["appended"]["train_error"] == base["train_error"]
    assert arms["control"]["appended"]["test_error"] == base["test_error"]
    for arm in ("residual", "plain"):
        for when in ("appended", "trained"):
            (block,) = arms[arm][when]["blocks"]
            assert block["block"] == "stage3_extra1" and block["kernel_norm"] > 0
    assert arms["residual"]["params"] == arms["plain"]["params"] > arms["control"]["params"]
    assert (tmp_path / "identity_blocks.png").stat().st_size > 10_000
    r = run("experiments.identity_blocks", tmp_path / "x", "--base", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "nowhere" in r.stderr


def test_augmentation_ablation_smoke(tmp_path):
    r = run("experiments.augmentation_ablation", tmp_path, "--settings", "none", "+PCA colour")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {s["setting"]: s for s in results["settings"]}
    assert list(rows) == ["none", "+PCA colour"]
    assert rows["+PCA colour"]["augment"] == dict(crop_pad=4, flip=True, colour_shift=20.0,
                                                  pca_colour=True)
    for row in rows.values():
        assert row["pipeline_img_per_s"] > 0 and 0 <= row["final_test_error"] <= 1
    cfg = json.loads((Path(rows["+PCA colour"]["run_dirs"][0]) / "config.json").read_text())
    assert cfg["config"]["data"]["pca_colour"] and cfg["config"]["data"]["train_subset"] == 64
    assert (tmp_path / "augmentation.png").stat().st_size > 10_000
