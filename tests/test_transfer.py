"""Transfer learning: the demonstration end to end, frozen layers that really stay
frozen, cached features that are reused only when they are still right, a user's own
folder of photos of any size with predictions, and clear errors on bad input."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnn_jax.errors import BadInput
from cnn_jax.data.sources import DataError, load, open_stored
from cnn_jax.models import create_model
from cnn_jax.train.checkpoint import load_variables
from cnn_jax.data.dataset import select_classes
from cnn_jax.train.inputs import source_normaliser
from cnn_jax.train.state import TrainState
from cnn_jax.train.metrics import cross_entropy
from cnn_jax.train.steps import freeze, make_optimizer, make_train_step
from cnn_jax.train.config import OptimiserConfig
from cnn_jax.transfer import cached_features, head_name, load_backbone, predict, stages
from helpers import quick_variables, refused

# one worker builds the `demo` fixture (a pretrained net and four transfer runs) once
pytestmark = pytest.mark.xdist_group("transfer_demo")
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
CIFAR_LIKE = "synthetic:32x32x3:10:128:100"


def run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.transfer_learning", *map(str, args),
                           "--workers", "0"], env=ENV, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "demo"
    r = run("--preset", "smoke", "--out", out, "--data", CIFAR_LIKE)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def photos(root: Path, classes=("cats", "dogs"), per_class=6, split=None):
    """A small ImageFolder of JPEGs and PNGs of assorted sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        folder = root / split / c if split else root / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(40, 90, 2)
            img = np.clip(rng.normal(60 + 120 * k, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{c}{i}.{'jpg' if i % 2 else 'png'}")
    return root


# ------------------------------------------------------------------ the demonstration
def test_demonstration_writes_one_entry_per_mode(demo):
    res = json.loads((demo / "results.json").read_text())
    assert [r["mode"] for r in res["runs"]] == ["frozen", "finetune", "full", "scratch"]
    for r in res["runs"]:
        assert 0 <= r["val_accuracy"] <= 1 and r["wall_s"] > 0
    frozen = res["runs"][0]
    assert frozen["trained_params"] == 64 * 5 + 5 and frozen["feature_dim"] == 64
    assert frozen["speedup_per_epoch"] > 1
    for f in ("table.md", "transfer.png", "data.json", "frozen/features/train.npy",
              "frozen/seed0/model.json", "finetune/seed0/model.json"):
        assert (demo / f).exists(), f
    table = (demo / "table.md").read_text()
    assert "| frozen | new softmax on cached features |" in table
    # the baseline: the most common of the 8 x 5 training images' classes, on the test images
    data = json.loads((demo / "data.json").read_text())
    assert list(data["train"]) == list("56789") and sum(data["train"].values()) == 40
    assert sum(data["evaluated"].values()) == 54   # classes 5-9 of the 100 test images
    test = np.asarray([int(c) for c, n in data["evaluated"].items() for _ in range(n)])
    assert data["majority_accuracy"] == pytest.approx(np.mean(test == int(data["majority_class"])))
    assert f"| baseline | always the most common training class ({data['majority_class']})" in table
    assert "Scored on the test/ folder (54 images" in table


def test_finetune_changes_only_the_last_stage_and_the_new_head(demo):
    before = load_variables(demo / "pretrain")
    after = load_variables(demo / "finetune" / "seed0" / "run")
    cfg = json.loads((demo / "finetune" / "seed0" / "run" / "config.json").read_text())["config"]
    assert cfg["model"]["trainable"] == "stage3,fc" and cfg["model"]["init_skip"] == "fc"
    for col in ("params", "batch_stats"):
        for name in before[col]:
            same = jax.tree.all(jax.tree.map(np.array_equal, before[col][name], after[col][name])) \
                if name != "fc" else False
            # frozen: weights and BN statistics bit for bit; stage3 learnt
            assert same == (not name.startswith(("stage3", "fc"))), (col, name)
    assert after["params"]["fc"]["kernel"].shape == (64, 5)


def test_frozen_model_on_disk_matches_the_cached_features(demo):
    """The saved network (backbone + new softmax) classifies the held-out images as the
    softmax on their cached features did."""
    from cnn_jax.train import TrainConfig
    from cnn_jax.data.dataset import subset
    from cnn_jax.train.inputs import split_of
    from cnn_jax.trained import load_trained
    from cnn_jax.transfer import accuracy
    net = load_trained(demo / "frozen" / "seed0")
    assert net.classes == ("5", "6", "7", "8", "9") and net.config is None
    cfg = TrainConfig(data=CIFAR_LIKE, classes="5,6,7,8,9", eval_subset=100)
    val = subset(split_of(cfg, "test"), 100)
    acc = accuracy(net, net.variables, val)
    reported = json.loads((demo / "results.json").read_text())["runs"][0]["val_accuracy"]
    assert abs(acc - reported) <= 1 / len(val)


# ------------------------------------------------------------------ freezing, exactly
def test_frozen_modules_run_in_inference_mode_and_do_not_move():
    model = create_model("resnet8", num_classes=3)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
    labels = jnp.array([0, 1, 2, 0])
    variables = quick_variables(model, jnp.zeros((1, 32, 32, 3)))
    variables["batch_stats"] = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
    tx = freeze(make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=5e-4)), ("fc",))
    norm = lambda im: (im.astype(jnp.float32) - 128) / 64
    step = jax.jit(make_train_step(model, tx, lambda s, w: 0.1, norm, trainable=("fc",)))
    state, metrics = step(TrainState.create(variables, tx, jax.random.PRNGKey(0)),
                          {"image": x, "label": labels})
    # everything but the head computes exactly its test-time function ...
    eval_logits = model.apply(variables, norm(x), train=False)
    np.testing.assert_allclose(metrics["loss"], cross_entropy(eval_logits, labels).mean(), rtol=1e-5)
    # ... and neither its weights nor its BN statistics move; the head does
    for name in variables["params"]:
        moved = not jax.tree.all(jax.tree.map(jnp.array_equal, state.params[name],
                                              variables["params"][name]))
        assert moved == (name == "fc"), name
    assert jax.tree.all(jax.tree.map(jnp.array_equal, state.batch_stats, variables["batch_stats"]))


def test_heads_and_stages_of_the_zoo():
    assert head_name("resnet20", {}, 32) == "fc"
    assert stages("resnet20", {}, 32) == ["stem", "stage1", "stage2", "stage3"]
    assert stages("resnet50", {}, 64) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert head_name("vgg16", {}, 224) == "fc3"
    assert head_name("googlenet_torchvision", {}, 64) == "fc"
    assert head_name("alexnet_torchvision", {}, 224) == "fc8"
    from cnn_jax.train.steps import is_trainable
    assert is_trainable("conv5_2", ("conv5",)) and not is_trainable("conv13", ("conv1",))


# ------------------------------------------------------------------ the feature cache
def test_feature_cache_is_reused_only_for_the_same_backbone_and_data(demo, tmp_path):
    from cnn_jax.data.dataset import Dataset
    from cnn_jax.data.sources import Arrays, synthetic_arrays
    backbone = load_backbone(demo / "pretrain")
    source = synthetic_arrays("synthetic:32x32x3:10:20:10", "train")
    arrays = Dataset(source, 32)
    first, info = cached_features(tmp_path, "train", backbone, arrays, progress=False)
    again, info2 = cached_features(tmp_path, "train", backbone, arrays, progress=False)
    assert not info["cached"] and info2["cached"] and isinstance(again, np.memmap)
    np.testing.assert_array_equal(first, again)
    other = Dataset(Arrays(np.asarray(source.images)[::-1].copy(), source.labels,
                           source.classes), 32)
    _, info3 = cached_features(tmp_path, "train", backbone, other, progress=False)
    assert not info3["cached"]   # other images: rebuilt
    backbone.variables["params"]["stem"]["conv"]["kernel"] = \
        backbone.variables["params"]["stem"]["conv"]["kernel"] * 1.01
    rebuilt, info4 = cached_features(tmp_path, "train", backbone, other, progress=False)
    assert not info4["cached"]   # another backbone: rebuilt
    assert not np.array_equal(rebuilt, np.load(tmp_path / "train.npy")[::-1] * 0 + first[::-1])


# ------------------------------------------------------------------ a user's own photos
def test_users_folder_frozen_then_predict(demo, tmp_path):
    data = photos(tmp_path / "pets")
    out = tmp_path / "run"
    r = run("--data", data, "--backbone", demo / "pretrain", "--mode", "frozen", "--out", out,
            "--epochs", "20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "augmentation is off" in r.stderr
    assert "scored on a fixed stratified 20 % of its train/ images (2;" in r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["classes"] == ["cats", "dogs"] and res["runs"][0]["mode"] == "frozen"
    assert res["runs"][0]["n_val"] == 2 and res["runs"][0]["n_train"] == 10  # 20 % held out
    again = run("--data", data, "--backbone", demo / "pretrain", "--mode", "frozen", "--out",
                out, "--epochs", "20")
    assert again.returncode == 0   # finished: re-read, same numbers and times
    assert json.loads((out / "results.json").read_text())["runs"] == res["runs"]
    new = photos(tmp_path / "unlabelled", classes=("a", "b"), per_class=2)
    r = run("--predict", new, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "predictions-unlabelled.csv")))
    assert [x["file"] for x in rows] == ["a/a0.png", "a/a1.jpg", "b/b0.png", "b/b1.jpg"]
    assert all(x["class"] in ("cats", "dogs") and 0.5 <= float(x["probability"]) <= 1 for x in rows)
    # the dark "a" photos look like the dark "cats" (two-class colour task)
    assert rows[0]["class"] == "cats" and rows[3]["class"] == "dogs"


def test_users_folder_finetune_with_val_split(demo, tmp_path):
    data = photos(tmp_path / "pets", split="train")
    photos(tmp_path / "pets", split="val", per_class=2)
    out = tmp_path / "ft"
    r = run("--data", data, "--backbone", demo / "pretrain", "--mode", "finetune", "--out", out,
            "--steps", "2", "--batch", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scored on its val/ folder (4 images)" in r.stderr
    res = json.loads((out / "results.json").read_text())["runs"][0]
    assert res["mode"] == "finetune" and res["trainable"] == "stage3,fc"
    rows = predict(out / "finetune" / "seed0", tmp_path / "pets" / "val")
    assert len(rows) == 4
    again = run("--data", data, "--backbone", demo / "pretrain", "--mode", "finetune", "--out",
                out, "--steps", "2", "--batch", "4")
    assert again.returncode == 0, again.stderr[-3000:]   # finished: re-read, not retrained
    assert json.loads((out / "results.json").read_text())["runs"][0]["val_accuracy"] == \
        res["val_accuracy"]
    # a second mode, two seeds, beside the first: the table and plot compare all of them
    both = run("--data", data, "--backbone", demo / "pretrain", "--mode", "full", "--out", out,
               "--steps", "2", "--batch", "4", "--seeds", "2")
    assert both.returncode == 0, both.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["mode"], r["seed"]) for r in runs] == [("finetune", 0), ("full", 0), ("full", 1)]
    assert "| full | everything, from pretrained |" in (out / "table.md").read_text()
    other = run("--data", data, "--backbone", demo / "pretrain", "--mode", "finetune", "--out",
                out, "--steps", "3", "--batch", "4")
    assert other.returncode == 2 and "different configuration" in other.stderr


@pytest.mark.slow
def test_torchvision_weights_as_a_frozen_backbone(tmp_path):
    pytest.importorskip("torch")
    from safetensors.numpy import save_file
    from tests.test_convert import TV, randomised
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: np.ascontiguousarray(v.numpy()) for k, v in
               randomised(TV.resnet18()).state_dict().items()}, str(weights))
    out = tmp_path / "tv"
    r = run("--data", photos(tmp_path / "pets", per_class=5), "--backbone", weights,
            "--mode", "frozen", "--out", out, "--epochs", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "frozen" / "seed0" / "model.json").read_text())
    assert meta["model"] == "resnet18" and meta["image_size"] == 224
    assert np.allclose(meta["normaliser"]["mean"], [123.675, 116.28, 103.53])
    assert json.loads((out / "results.json").read_text())["runs"][0]["feature_dim"] == 512


# ------------------------------------------------------------------ data pieces
def test_class_folders_without_splits_and_images_of_any_size(tmp_path):
    root = photos(tmp_path / "p")
    assert open_stored(f"imagefolder:{root}", "train").classes == ["cats", "dogs"]
    with pytest.raises(DataError, match="no 'test' split"):
        open_stored(f"imagefolder:{root}", "test")
    split = load(f"imagefolder:{root}", "train", size=(32, 32), crop=True)
    assert split.images.shape == (12, 32, 32, 3)
    # cover-and-crop keeps the aspect ratio: a wide stripe image keeps its stripes' width
    wide = tmp_path / "w" / "train"
    for c in ("x", "y"):
        (wide / c).mkdir(parents=True)
        img = np.zeros((20, 80, 3), np.uint8)
        img[:, 30:50] = 255  # centre quarter bright
        Image.fromarray(img).save(wide / c / "i.png")
    out = load(f"imagefolder:{tmp_path / 'w'}", "train", size=(20, 20), crop=True).images[0]
    assert out[:, 0].max() == 255 and out[:, 10].min() == 255  # all bright: the centre


def test_select_classes_relabels_in_the_given_order():
    from cnn_jax.data.sources import synthetic_arrays
    a = synthetic_arrays("synthetic:8x8x3:10:200:10", "train")
    s = select_classes(a, "7,2")
    assert s.classes == ["7", "2"] and set(s.labels) == {0, 1}
    assert (s.labels == 0).sum() == (a.labels == 7).sum()
    with pytest.raises(BadInput, match="'12' is neither"):
        select_classes(a, "1,12")


def test_runs_save_their_normaliser(demo):
    from cnn_jax.train import TrainConfig
    from cnn_jax.train.inputs import make_normaliser, training_split
    saved = source_normaliser(str(demo / "pretrain"))
    cfg = TrainConfig.from_json(json.loads((demo / "pretrain" / "config.json").read_text())["config"])
    np.testing.assert_allclose(saved.mean, make_normaliser("per_pixel", training_split(cfg).normaliser_images()).mean)


# ------------------------------------------------------------------ bad input
def test_bad_input_is_a_clear_error(demo, tmp_path, capsys):
    from experiments.transfer_learning import main

    def run_refused(*args):
        return refused(main, [*args, "--workers", "0"], capsys)
    one = tmp_path / "one"
    photos(one, classes=("only",))
    code, err = run_refused("--data", one, "--backbone", demo / "pretrain", "--out", tmp_path / "o1")
    assert code == 2 and "at least two" in err
    empty = photos(tmp_path / "empty")
    (empty / "birds").mkdir()
    code, err = run_refused("--data", empty, "--backbone", demo / "pretrain", "--out",
                            tmp_path / "o2")
    assert code == 2 and "no images" in err and "birds" in err
    broken = photos(tmp_path / "broken")
    (broken / "cats" / "bad.jpg").write_bytes(b"not a jpeg")
    code, err = run_refused("--data", broken, "--backbone", demo / "pretrain", "--out",
                            tmp_path / "o3")
    assert code == 2 and "bad.jpg: cannot decode" in err
    code, err = run_refused("--data", photos(tmp_path / "ok"), "--backbone", tmp_path / "nothing",
                            "--out", tmp_path / "o4")
    assert code == 2 and "--backbone" in err
    code, err = run_refused("--predict", tmp_path / "ok", "--out", tmp_path / "o4")
    assert code == 2 and "model.json" in err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))  # refused: nothing written
    # the command itself, once: the exit status and the one line
    r = run("--data", one, "--backbone", demo / "pretrain", "--out", tmp_path / "o1")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") \
        and "at least two" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(DataError, match="at least two"):
        load(f"imagefolder:{one}", "train", size=(32, 32), crop=True)


def test_the_demonstration_refuses_the_flags_of_your_own_datas_runs(tmp_path, capsys):
    """--steps, --lr, --mode ... act with --backbone only: the demonstration says so and
    takes its settings through --set (its presets' fields and training fields)."""
    from experiments.transfer_learning import EXPERIMENT, main
    for flags in (["--steps", "10"], ["--lr", "0.5", "--epochs", "3"], ["--mode", "full"]):
        code, err = refused(main, ["--preset", "smoke", "--data", CIFAR_LIKE, "--out",
                                   tmp_path / "d", "--workers", "0", *flags], capsys)
        assert code == 2 and "used with --backbone (your own data) only" in err
        assert flags[0] in err and "--set" in err
        assert not (tmp_path / "d").exists()
    ctx = EXPERIMENT.context(["--preset", "smoke", "--set", "per_class=3", "steps=2",
                              "label_smoothing=0.1"])
    assert ctx.preset.per_class == 3 and ctx.preset.train == dict(steps=2, batch=16,
                                                                  label_smoothing=0.1)
    EXPERIMENT.recipe(ctx)
    assert ctx.args.mode is None   # the guard does not change what it guards


def test_engine_refuses_module_names_it_does_not_have(tmp_path):
    from cnn_jax.train import TrainConfig
    from cnn_jax.train.loop import train
    cfg = TrainConfig(model="resnet8", data="synthetic:32x32x3:10:16:8", steps=1, batch=8,
                      trainable="stage9,fc", out=str(tmp_path / "r"), progress=False)
    with pytest.raises(BadInput, match=r"--trainable: 'stage9' names no module of resnet8; "
                                         r"its modules: fc, stage1_block1"):
        train(cfg)


def test_init_from_torch_weights_keeps_all_but_the_skipped_head(tmp_path):
    pytest.importorskip("torch")
    from safetensors.numpy import save_file
    from cnn_jax.train.checkpoint import drop_modules, load_pretrained, merge_variables
    from tests.test_convert import TV, randomised
    state = {k: np.ascontiguousarray(v.numpy()) for k, v in
             randomised(TV.resnet18()).state_dict().items()}
    save_file(state, str(tmp_path / "r18.safetensors"))
    loaded = drop_modules(load_pretrained(str(tmp_path / "r18.safetensors"), "resnet18", {}), "fc")
    assert "fc" not in loaded["params"] and "conv5_2" in loaded["params"]
    model = create_model("resnet18", num_classes=3)
    fresh = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh)
    merged = merge_variables(fresh, loaded, "r18")
    np.testing.assert_array_equal(merged["params"]["conv1"]["conv"]["kernel"],
                                  state["conv1.weight"].transpose(2, 3, 1, 0))
    assert merged["params"]["fc"]["kernel"].shape == (512, 3)
