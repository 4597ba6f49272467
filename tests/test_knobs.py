"""No silent knob. For each preset of the data recipe (--augment), every field of the
recipe that can change a run's numbers (declared `result` or `added`), changed alone
from a base configuration, either changes what the run does or is refused, naming the
field. What a change can change, looked at directly:

  * the data section: the first training batch the pipeline draws (its pixels, labels,
    keys), the evaluation split, or the network's input (the normaliser, the resize);
  * the model and the optimiser: the parameters after the first two steps;
  * the schedule: the learning rate at every step of the run;
  * the seed: all of them.

A field whose role is `outside` cannot change the numbers (tests/test_config.py), and
`steps` under the paper's schedule is left out of the digest by its own declaration.
"""

import jax
import numpy as np
import pytest
from PIL import Image

from cnn_jax.data.keys import IMAGE, SHIFT
from cnn_jax.data.pipeline import train_dataset
from cnn_jax.errors import BadInput
from cnn_jax.recipe import ADDED, OUTSIDE, RESULT
from cnn_jax.train import TrainConfig
from cnn_jax.train import schedules
from cnn_jax.train.inputs import make_input_fn, training_split
from cnn_jax.train.loop import train
from cnn_jax.train.metrics import params_digest
from cnn_jax.train.schedules import NEVER
from cnn_jax.train.setup import build, evaluation_split
from cnn_jax.train.start import _initial_state, _pretrained

pytestmark = pytest.mark.xdist_group("knobs")   # the folders and runs below, made once

DATA_FIELDS = [f for s, f, d, _ in TrainConfig().declared() if s == "data"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two tiny ImageFolders of JPEGs of every size (the streamed presets' data)."""
    root = tmp_path_factory.mktemp("knobs")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for c in range(3):
            (root / name / "train" / f"c{c}").mkdir(parents=True)
            for i in range(8):
                h, w = rng.integers(24, 60, 2)
                Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).resize(
                    (int(w), int(h)), Image.BILINEAR).save(
                    root / name / "train" / f"c{c}" / f"{i}.jpg", quality=90)
    return root


def base_of(preset: str, photos) -> TrainConfig:
    if preset == "cifar":
        return TrainConfig(data="synthetic:16x16x3:3:48:16", batch=8, workers=0,
                           progress=False)
    return TrainConfig(data=str(photos / "a"), augment=preset, image_size=16, batch=8,
                       workers=0, progress=False)


# a changed value per data field (per preset where the base differs)
def changed(field: str, preset: str, photos):
    streams = preset != "cifar"
    return {
        "data": str(photos / "b") if streams else "synthetic:16x16x3:3:64:16",
        "holdout": 6, "classes": "0,1", "train_subset": 12, "eval_subset": 4,
        "image_size": 12 if streams else 10, "augment": "center" if preset != "center" else
        "inception", "crop_pad": 2, "flip": False, "colour_shift": 10.0, "pca_colour": True,
        "input_pad": 2, "bad_images": "skip", "normalise": "per_channel", "resize": 24,
    }[field]


def first_batch(cfg: TrainConfig) -> dict:
    it = iter(train_dataset(training_split(cfg), cfg.optimiser.batch, cfg.run.seed, workers=0))
    try:
        return next(it)
    finally:
        it.close()


def differ(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return True
    return any(np.shape(a[k]) != np.shape(b[k]) or not np.array_equal(a[k], b[k]) for k in a)


def what_the_data_does(cfg: TrainConfig) -> tuple:
    """The first training batch, the evaluation split (its size) and the network's input
    for that batch (normalised, resized)."""
    batch = first_batch(cfg)
    split, evaluation = evaluation_split(cfg.data)
    setup = build([cfg])
    images = batch[IMAGE] if SHIFT not in batch else \
        batch[IMAGE].astype(np.float32) + batch[SHIFT][:, None, None, :]
    model_input = np.asarray(make_input_fn(setup.normaliser, cfg.data.resize)(images))
    return batch, (split, len(evaluation)), model_input


@pytest.mark.parametrize("preset", ["cifar", "resnet", "inception", "alexnet", "center"])
def test_every_data_field_changes_the_data_or_is_refused(preset, photos, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("CNN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    base = base_of(preset, photos)
    batch, evaluated, model_input = what_the_data_does(base)
    silent = []
    for f in DATA_FIELDS:
        name = f.metadata["declared"].flat or f.name
        # bad_images: what to do with an unreadable file; where there is none it has
        # nothing to do (tests/test_streams.py tries both policies on real bad files)
        if f.metadata["declared"].role == OUTSIDE or name == "bad_images" and preset == "cifar":
            continue
        cfg = base.replace(**{name: changed(name, preset, photos)})
        try:
            cfg.validate()
            b, e, x = what_the_data_does(cfg)
        except BadInput as refused:
            assert f"--{name.replace('_', '-')}" in str(refused), (name, str(refused))
            continue
        if not (differ(b, batch) or e != evaluated or np.shape(x) != np.shape(model_input)
                or not np.allclose(x, model_input)):
            silent.append(name)
    assert not silent, f"--augment {preset}: set alone, these change nothing: {silent}"


# ------------------------------------------------------------------ the model and optimiser
STEPS_BASE = dict(model="lenet5", data="synthetic:32x32x1:10:32:8", batch=8, workers=0,
                  progress=False, normalise="lecun", crop_pad=0, flip=False)


def two_steps(cfg: TrainConfig) -> str:
    """The parameters' digest after the first two steps, as the loop takes them."""
    setup = build([cfg])
    state = _initial_state(setup, _pretrained(cfg), cfg.run.seed)
    it = iter(setup.datasets[0])
    try:
        for _ in range(2):
            state, _ = setup.step_one(state, setup.put([[next(it)]]))
    finally:
        it.close()
    return params_digest(jax.device_get(state.params))


def test_every_model_and_optimiser_field_changes_the_steps_or_is_refused(tmp_path):
    base = TrainConfig(**STEPS_BASE)
    start = tmp_path / "start"
    train(base.replace(steps=1, out=str(start)))   # weights to start another run from
    changes = {
        "model": "lenet5_classic", "model_options": {"width": 2},
        "init_from": str(start), "init_skip": "output", "trainable": "output",
        "dtype": "bfloat16", "bn_group": 4, "optimizer": "adamw",
        "optimizer_options": {"b1": 0.5}, "batch": 4, "momentum": 0.5, "nesterov": True,
        "weight_decay": 0.1, "decay_norm_and_bias": False, "label_smoothing": 0.1,
        "seed": 1}
    fields = {(f.metadata["declared"].flat or f.name) for s, f, d, _ in base.declared()
              if s in ("model", "optimiser", "run") and d.role in (RESULT, ADDED)}
    assert fields == set(changes), "a field was added: give it a changed value here"
    reference = two_steps(base)
    silent = []
    for name, value in changes.items():
        cfg = base.replace(**{name: value})
        try:
            cfg.validate()
            digest = two_steps(cfg)
        except BadInput as refused:
            assert f"--{name.replace('_', '-')}" in str(refused) or name == "model_options", \
                (name, str(refused))
            continue
        if digest == reference:
            silent.append(name)
    assert not silent, f"set alone, these change nothing: {silent}"


def learning_rates(cfg: TrainConfig, steps: int = 64_000) -> np.ndarray:
    fn = schedules.of(cfg.schedule)
    return np.asarray(jax.vmap(lambda s: fn(s, NEVER))(np.arange(steps)), np.float64)


def test_every_schedule_field_changes_the_learning_rates_or_is_refused():
    base = TrainConfig()   # the paper's: 64k steps, 0.1 divided by 10 at 32k and 48k
    changes = {"schedule": "cosine", "lr": 0.05, "milestones": (100,), "warmup_steps": 10,
               "warmup_lr": 0.01, "warmup_until_error": 0.5}
    fields = {(f.metadata["declared"].flat or f.name) for s, f, d, _ in base.declared()
              if s == "schedule" and d.role in (RESULT, ADDED)} - {"steps"}
    assert fields == set(changes)
    reference = learning_rates(base)
    for name, value in changes.items():
        cfg = base.replace(**{name: value})
        try:
            cfg.validate()
        except BadInput as refused:
            assert name == "warmup_until_error" and "--warmup-until-error" in str(refused)
            continue
        assert not np.array_equal(learning_rates(cfg), reference), name
    # the schedule's own length matters where the schedule has one
    cosine = base.replace(schedule="cosine")
    assert not np.array_equal(learning_rates(cosine), learning_rates(cosine.replace(steps=100)))
    assert "steps" not in base.result_fields()   # the paper's: a longer run is the same run


def test_the_presets_ignore_nothing_they_are_given_silently():
    """The settings a recipe has no op for, refused by name (the cases above, spelt out)."""
    for augment, field, value, words in (
            ("resnet", "crop_pad", 2, "has no pad-and-crop"),
            ("center", "flip", False, "has no flip"),
            ("alexnet", "pca_colour", True, "has PCA lighting already")):
        with pytest.raises(BadInput, match=f"--{field.replace('_', '-')}: .*{words}"):
            TrainConfig(augment=augment, **{field: value}).validate()
