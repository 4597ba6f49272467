"""What every experiment shares (cnn_jax.experiment): presets overridden field by field
(their own knobs and every training field), the output folder's guard, refused commands
that leave nothing behind, bugs told apart from bad input, claims."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnn_jax.errors import BadInput
from cnn_jax.experiment import (check_presets, claim, claims_in_words, guard_out, override,
                                slug, train_config)

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parents[1]))
EXPERIMENTS = ("plain_vs_resnet", "lenet_mnist", "zoo_cifar", "augmentation_ablation",
               "identity_blocks", "layer_responses", "ensembles", "transfer_learning")


@dataclasses.dataclass(frozen=True)
class Preset:
    depths: tuple = ()
    augment: bool = True
    data: str = "cifar10"
    base: object = None
    train: dict = dataclasses.field(default_factory=lambda: dict(steps=10, lr=0.1))


def test_set_reads_each_value_as_its_fields_type():
    p = override(Preset(), ["steps=600", "lr=0.01", "milestones=450", "augment=false",
                            "depths=20,56", "data=mnist", "base=runs/x", "nesterov=true",
                            "label_smoothing=0.1", "dtype=bfloat16"])
    assert p == Preset(depths=(20, 56), augment=False, data="mnist", base="runs/x",
                       train=dict(steps=600, lr=0.01, milestones=(450,), nesterov=True,
                                  label_smoothing=0.1, dtype="bfloat16"))
    assert override(p, []) == p
    assert slug(["steps=600", "milestones=450,500"]) == "steps600-milestones450_500"
    # the preset's training fields go over what the experiment sets for a run
    cfg = train_config(p, model="resnet8", lr=0.5, weight_decay=5e-4)
    assert (cfg.model.name, cfg.schedule.lr, cfg.optimiser.weight_decay, cfg.optimiser.label_smoothing) == ("resnet8", 0.01,
                                                                          5e-4, 0.1)


@pytest.mark.parametrize("item, message", [
    ("stepz=3", r"'stepz' is neither a field of this experiment's presets \(depths, augment, "
                r"data, base\) nor a training field \(holdout, .*label_smoothing"),
    ("steps", "expected KEY=VALUE"),
    ("steps=x", "'x' is not a int"),
    ("label_smoothing=lots", "'lots' is not a float"),
    ("augment=maybe", "'maybe' is not a bool"),
    ("milestones=a,b", "is not a tuple"),
    ("seed=3", "set for each run by --seeds"),
    ("out=here", "set for each run by --out"),
])
def test_set_names_what_is_wrong(item, message):
    with pytest.raises(BadInput, match=message):
        override(Preset(), [item])


def test_every_experiment_declares_its_presets_as_knobs_and_training_fields():
    import importlib
    for name in EXPERIMENTS:
        e = importlib.import_module(f"experiments.{name}").EXPERIMENT
        check_presets(name, e.presets)  # Experiment() checks it too: this names which
    @dataclasses.dataclass(frozen=True)
    class Clashing:
        lr: float = 0.1        # a knob shadowing a training field
        train: dict = dataclasses.field(default_factory=lambda: dict(lr=0.2, stepz=3))

    with pytest.raises(TypeError, match=r"shadow \['lr'\], or keys that are no training "
                                        r"field \['stepz'\]"):
        check_presets("x", {"p": Clashing()})
    assert override(Clashing(train={}), ["lr=0.5"]) == Clashing(lr=0.5, train={})


# What each experiment's smoke folder was guarded with by the code before presets held
# their training fields in `train`: a folder written then must still be recognised.
OLD_SMOKE_RECIPES = {
    "plain_vs_resnet": {"augment": True, "batch": 16, "bn_group": 0, "checkpoint_every": 3,
                        "data": "cifar10", "dtype": "float32", "eval_batch": 500,
                        "eval_every": 3, "eval_subset": 0, "log_every": 2, "lr": 0.1,
                        "milestones": [1000000000], "plain": [8, 14], "preset": "smoke",
                        "residual": [8, 14], "seeds": 1, "steps": 6, "steps_per_call": 1,
                        "train_subset": 0, "val": False, "warmup_110": True},
    "lenet_mnist": {"batch": 32, "data": "mnist", "epochs": 0, "evals_per_epoch": 0,
                    "logs_per_epoch": 0, "preset": "smoke", "seeds": 1, "steps": 4,
                    "recipes": {"lenet5": {"lr": 0.1, "passes": 15, "weight_decay": 0.0005},
                                "lenet5_classic": {"lr": 0.01, "passes": 10,
                                                   "weight_decay": 0.0}}},
    "augmentation_ablation": {"batch": 16, "data": "cifar10", "lr": 0.1,
                              "milestones": [32000, 48000], "model": "resnet8",
                              "pipeline_batches": 3, "preset": "smoke", "schedule": "cosine",
                              "seeds": 1, "steps": 3, "test_subset": 64, "train_subset": 64,
                              "weight_decay": 0.0001},
    "identity_blocks": {"base": None, "base_depth": 8, "batch": 16, "blocks": 1, "data": None,
                        "lr": 0.1, "preset": "smoke", "released": False,
                        "schedule": "constant", "seeds": 1, "steps": 4, "test_images": 64,
                        "train_images": 64, "weight_decay": 0.0005},
    "layer_responses": {"batch": 16, "data": "cifar10", "images": 64, "lr": 0.1, "plain": [8],
                        "preset": "smoke", "released": False, "residual": [8, 14], "steps": 6},
    "ensembles": {"data": None, "main_preset": "smoke", "members": None, "model": "resnet20",
                  "preset": "smoke", "released": [], "runs": None, "test_subset": 0,
                  "timing_batch": 8},
    "transfer_learning": {"batch": 16, "data": "cifar10", "model": "resnet8", "per_class": 8,
                          "preset": "smoke", "pretrain_batch": 16, "pretrain_steps": 20,
                          "pretrain_subset": 160, "seeds": 1, "softmax_epochs": 5, "steps": 6,
                          "test_subset": 100},
}


@pytest.mark.parametrize("name", sorted(OLD_SMOKE_RECIPES))
def test_folders_written_before_keep_their_recipe(name):
    import importlib
    e = importlib.import_module(f"experiments.{name}").EXPERIMENT
    ctx = e.context(["--preset", "smoke"])
    recipe = json.loads(json.dumps(e.recipe(ctx) if e.recipe else ctx.recipe()))
    assert recipe == OLD_SMOKE_RECIPES[name]


def test_the_guard_refuses_another_recipe_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    guard_out(out, {"steps": 1})
    guard_out(out, {"steps": 1})  # the same recipe: resumes
    with pytest.raises(BadInput, match=r"different configuration \(differs in: steps\)"):
        guard_out(out, {"steps": 2})
    assert json.loads((out / "config.json").read_text()) == {"steps": 1}


def test_claims_in_words():
    c = [claim("a", "a holds", {"x": 1.234}, "x > 1", True, 2, unit=" %"),
         claim("b", "b holds", {"y": 0.5}, "y > 1", False, 2)]
    words = claims_in_words(c, "Claims:")
    assert "HOLDS  a holds: x 1.234 % (needed: x > 1)" in words
    assert "FAILS  b holds: y 0.5 (needed: y > 1)" in words and "Not every claim" in words
    assert claims_in_words([], "Claims:") == ""


def test_overrides_reach_the_run_and_name_its_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.plain_vs_resnet", "--preset", "smoke",
                        "--data", "synthetic:32x32x3:10:64:40", "--depths", "8", "--workers",
                        "0", "--processes", "1", "--set", "steps=4", "log_every=2"],
                       env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "plain_vs_resnet-smoke-steps4-log_every2"
    results = json.loads((out / "results.json").read_text())
    assert results["overrides"] == ["steps=4", "log_every=2"]
    assert results["config"]["steps"] == 4 and results["runs"][0]["steps"] == 4
    assert results["runs"][0]["curve"]["step"] == [2, 4]
    bad = subprocess.run([sys.executable, "-m", "experiments.plain_vs_resnet", "--preset",
                          "smoke", "--set", "stepz=4"], env=ENV, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2 and "'stepz' is neither a field" in bad.stderr
    assert "presets (plain, residual," in bad.stderr and "label_smoothing" in bad.stderr
    assert not (tmp_path / "runs" / "plain_vs_resnet-smoke-stepz4").exists()


def test_a_training_field_set_reaches_every_run_and_guards_the_folder(tmp_path):
    """--set label_smoothing=0.1 (a field no preset names) lands in every net's
    config.json; the same command without it into the same folder is refused, naming
    the key, and changes nothing."""
    out = tmp_path / "ls"
    cmd = [sys.executable, "-m", "experiments.plain_vs_resnet", "--preset", "smoke", "--data",
           "synthetic:32x32x3:10:64:40", "--depths", "8", "--workers", "0", "--processes", "1",
           "--out", str(out)]
    r = subprocess.run(cmd + ["--set", "label_smoothing=0.1"], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    configs = sorted((out / "nets").glob("*/config.json"))
    assert len(configs) == 2
    for c in configs:
        assert json.loads(c.read_text())["config"]["optimiser"]["label_smoothing"] == 0.1
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "different configuration" in again.stderr
    assert "label_smoothing" in again.stderr.splitlines()[-1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_bug_keeps_its_traceback_while_bad_input_exits_2(tmp_path):
    """The command lines catch BadInput only: a ValueError from deep inside (a shape
    bug, say) is not a user's mistake and shows its traceback with exit status 1."""
    code = """
import sys
from experiments import plain_vs_resnet
def broken(*args, **kwargs):
    raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")
plain_vs_resnet.sweep = broken
sys.exit(plain_vs_resnet.main(sys.argv[1:]))
"""
    args = ["--preset", "smoke", "--data", "synthetic:32x32x3:10:64:40", "--out"]
    r = subprocess.run([sys.executable, "-c", code, *args, str(tmp_path / "bug")], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" in r.stderr and "could not be broadcast" in r.stderr
    assert "error: operands" not in r.stderr
    r = subprocess.run([sys.executable, "-c", code.replace("raise ValueError", "raise __import__("
                        "'cnn_jax.errors').errors.BadInput"), *args, str(tmp_path / "bad")],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: operands could not be broadcast" in r.stderr
    assert not (tmp_path / "bad").exists()   # refused: the folder it made is removed again


def test_the_training_and_evaluation_command_lines_keep_a_bugs_traceback(monkeypatch):
    from cnn_jax import evaluate
    from cnn_jax.train import __main__ as train_cli

    def shape_bug(*args, **kwargs):
        raise ValueError("shape bug")

    monkeypatch.setattr(train_cli, "train", shape_bug)
    with pytest.raises(ValueError, match="shape bug") as e:
        train_cli.main(["--model", "resnet8", "--out", "unused"])
    assert not isinstance(e.value, BadInput)
    monkeypatch.setattr(evaluate, "evaluate", shape_bug)
    with pytest.raises(ValueError, match="shape bug") as e:
        evaluate.main(["--checkpoint", "unused"])
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: (_ for _ in ()).throw(
        BadInput("--checkpoint unused: no such run")))
    assert evaluate.main(["--checkpoint", "unused"]) == 2
