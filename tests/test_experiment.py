"""What every experiment shares (cnn_jax.experiment): presets overridden field by field,
the output folder's guard, refused commands that leave nothing behind, claims."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnn_jax.experiment import claim, claims_in_words, guard_out, override, slug


@dataclasses.dataclass(frozen=True)
class Preset:
    steps: int
    lr: float = 0.1
    milestones: tuple = (32_000, 48_000)
    depths: tuple = ()
    augment: bool = True
    data: str = "cifar10"
    base: object = None


def test_set_reads_each_value_as_its_fields_type():
    p = override(Preset(steps=10), ["steps=600", "lr=0.01", "milestones=450", "augment=false",
                                    "depths=20,56", "data=mnist", "base=runs/x"])
    assert p == Preset(steps=600, lr=0.01, milestones=(450,), depths=(20, 56), augment=False,
                       data="mnist", base="runs/x")
    assert override(p, []) == p
    assert slug(["steps=600", "milestones=450,500"]) == "steps600-milestones450_500"


@pytest.mark.parametrize("item, message", [
    ("stepz=3", "KEY one of steps, lr, milestones"),
    ("steps", "expected KEY=VALUE"),
    ("steps=x", "'x' is not a int"),
    ("augment=maybe", "'maybe' is not a bool"),
    ("milestones=a,b", "is not a tuple"),
])
def test_set_names_what_is_wrong(item, message):
    with pytest.raises(ValueError, match=message):
        override(Preset(steps=10), [item])


def test_the_guard_refuses_another_recipe_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    guard_out(out, {"steps": 1})
    guard_out(out, {"steps": 1})  # the same recipe: resumes
    with pytest.raises(ValueError, match=r"different configuration \(differs in: steps\)"):
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
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parents[1]))
    r = subprocess.run([sys.executable, "-m", "experiments.plain_vs_resnet", "--preset", "smoke",
                        "--data", "synthetic:32x32x3:10:64:40", "--depths", "8", "--workers",
                        "0", "--processes", "1", "--set", "steps=4", "log_every=2"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "plain_vs_resnet-smoke-steps4-log_every2"
    results = json.loads((out / "results.json").read_text())
    assert results["overrides"] == ["steps=4", "log_every=2"]
    assert results["config"]["steps"] == 4 and results["runs"][0]["steps"] == 4
    assert results["runs"][0]["curve"]["step"] == [2, 4]
    bad = subprocess.run([sys.executable, "-m", "experiments.plain_vs_resnet", "--preset",
                          "smoke", "--set", "stepz=4"], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2 and "KEY one of plain, residual, steps" in bad.stderr
