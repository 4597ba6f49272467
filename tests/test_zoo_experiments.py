"""LeNet-5 on MNIST and the CIFAR-10 zoo: the smoke presets end to end (contract
outputs), resume without retraining, and bad input."""
import json
import os
import subprocess
import sys

import pytest

from helpers import refused

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def run(module, out, *extra):
    return subprocess.run([sys.executable, "-m", module, "--preset", "smoke", "--out",
                           str(out), "--workers", "0", *extra],
                          env=ENV, capture_output=True, text=True, timeout=900)


def test_lenet_mnist_smoke_writes_one_entry_per_variant(tmp_path):
    r = run("experiments.lenet_mnist", tmp_path, "--data", "synthetic:28x28x1:10:256:100")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {x["name"]: x for x in results["runs"]}
    assert set(runs) == {"lenet5", "lenet5_classic"}
    assert runs["lenet5"]["params"] == 61_706 and runs["lenet5_classic"]["params"] == 60_000
    for x in runs.values():
        assert 0 <= x["final_test_error"] <= 1
        assert x["seeds"][0]["curve"]["eval_step"] == [2, 4]
    # the nets saw 32x32 inputs: the 28x28 digits were padded
    config = json.loads((tmp_path / "nets" / "lenet5-seed0" / "config.json").read_text())
    assert config["config"]["data"]["input_pad"] == 2 and config["config"]["data"]["normalise"] == "lecun"
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "| `lenet5_classic` | 60,000 |" in (tmp_path / "table.md").read_text()
    again = run("experiments.lenet_mnist", tmp_path, "--data", "synthetic:28x28x1:10:256:100")
    assert again.returncode == 0 and "0 to train" in again.stderr


@pytest.mark.slow  # 95 s: the longest smoke run, kept out of the 15-minute CI
def test_zoo_cifar_smoke_reports_cost_and_error_per_net(tmp_path):
    nets = ["lenet5", "alexnet", "resnet20"]
    r = run("experiments.zoo_cifar", tmp_path, "--data", "synthetic:32x32x3:10:64:40",
            "--nets", *nets)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {x["name"]: x for x in results["runs"]}
    assert list(runs) == nets
    assert runs["alexnet"]["input"] == "67x67x3" and runs["resnet20"]["input"] == "32x32x3"
    assert runs["resnet20"]["params"] == 269_722
    assert runs["lenet5"]["params"] == 62_006  # C1 sees three channels: 300 more weights
    for x in runs.values():
        assert x["macs"] > 0 and x["img_per_s"] > 0 and 0 <= x["final_test_error"] <= 1
    assert (tmp_path / "zoo.png").stat().st_size > 10_000
    assert "upsampled to 67x67" in (tmp_path / "table.md").read_text()


def test_bad_input(tmp_path, capsys):
    from experiments.lenet_mnist import main
    code, err = refused(main, ["--preset", "smoke", "--out", tmp_path, "--workers", "0",
                               "--data", "nosuchdata"], capsys)   # in this process
    assert code == 2 and "nosuchdata" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"preset": "paper"}))
    r = run("experiments.zoo_cifar", tmp_path / "other", "--data", "synthetic:32x32x3:10:64:50")
    assert r.returncode == 2 and "different configuration" in r.stderr
    assert json.loads((tmp_path / "other" / "config.json").read_text()) == {"preset": "paper"}
