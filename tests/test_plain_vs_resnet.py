"""The main experiment: the smoke preset end to end, resume of a half-finished
sweep, bad input, and the Colab notebook's code on CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax.errors import BadInput
from cnn_jax.evaluate import evaluate
from helpers import refused

DATA = "synthetic:32x32x3:10:128:100"
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
ROOT = Path(__file__).resolve().parents[1]


def experiment(out, *extra):
    # one process unless a test asks for more: the kill-and-resume test below expects
    # plain-8 to finish before ResNet-8 starts
    processes = () if "--processes" in extra else ("--processes", "1")
    return [sys.executable, "-m", "experiments.plain_vs_resnet", "--preset", "smoke",
            "--data", DATA, "--out", str(out), "--workers", "0", *processes, *extra]


def run(out, *extra):
    return subprocess.run(experiment(out, *extra), env=ENV, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The smoke sweep of plain-8 and ResNet-8, run once: its outputs are checked below
    and the resumed sweep is compared with it (xdist_group)."""
    out = tmp_path_factory.mktemp("sweep")
    r = run(out, "--depths", "8")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.xdist_group("sweep")
def test_smoke_preset_writes_the_contract_outputs(sweep):
    results = json.loads((sweep / "results.json").read_text())
    assert results["preset"] == "smoke"
    names = [x["name"] for x in results["runs"]]
    assert names == ["plain8", "resnet8"]
    for x in results["runs"]:
        for key in ("name", "depth", "residual", "params", "seed", "final_train_error",
                    "final_test_error", "curve", "wall_s", "img_per_s"):
            assert key in x, key
        assert x["params"] == 75_290
        assert x["curve"]["step"] == [2, 4, 6]
        assert len(x["curve"]["train_error"]) == 3 and len(x["curve"]["test_error"]) == 2
        # the reported test error is the saved net's, as the one evaluator finds it again
        run_dir = sweep / "nets" / f"{x['name']}-seed0"
        again = evaluate([run_dir], views="1")
        assert again["error"] == pytest.approx(x["final_test_error"], abs=1e-9)
        assert x["curve"]["test_error"][-1] == pytest.approx(x["final_test_error"], abs=1e-9)
        own = json.loads((run_dir / "results.json").read_text())
        assert own["final_train_error"] == pytest.approx(x["final_train_error"], abs=1e-9)
    assert results["runs"][1]["residual"] and not results["runs"][0]["residual"]
    png = np.asarray(Image.open(sweep / "curves.png").convert("RGB"))
    assert png.shape[0] > 300 and png.shape[1] > 600          # a figure, not a stub
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 20    # curves drawn in colours
    table = (sweep / "table.md").read_text()
    assert "| ResNet | 8 |" in table and "| plain | 8 |" in table
    assert "python -m experiments.plain_vs_resnet" in table
    # a second run reuses everything: nothing is trained again
    again = run(sweep, "--depths", "8")
    assert again.returncode == 0 and "0 to train" in again.stderr


@pytest.mark.xdist_group("sweep")
def test_a_half_finished_sweep_resumes(tmp_path, sweep):
    proc = subprocess.Popen(experiment(tmp_path / "cut", "--depths", "8"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "cut" / "nets" / "resnet8-seed0" / "checkpoints" / "3"
    t = time.time()
    while not ckpt.is_dir() and time.time() - t < 300:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    finished = tmp_path / "cut" / "nets" / "plain8-seed0" / "results.json"
    stamp = finished.stat().st_mtime_ns
    r = run(tmp_path / "cut", "--depths", "8")
    assert r.returncode == 0, r.stderr
    assert "1 to train" in r.stderr and "resuming" in r.stderr
    assert finished.stat().st_mtime_ns == stamp  # the finished net was not touched
    digest = lambda root, net: json.loads(
        (root / "nets" / f"{net}-seed0" / "results.json").read_text())["final_params_digest"]
    for net in ("plain8", "resnet8"):
        assert digest(tmp_path / "cut", net) == digest(sweep, net)


def test_seeds_trained_together(tmp_path):
    """--seeds 2 --seeds-together: each net's two seeds in one vmapped step, each in its
    own folder; the table reports mean and spread over them."""
    r = run(tmp_path, "--depths", "8", "--seeds", "2", "--seeds-together")
    assert r.returncode == 0, r.stderr
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(x["name"], x["seed"]) for x in runs] == [
        ("plain8", 0), ("resnet8", 0), ("plain8", 1), ("resnet8", 1)]
    saved = [json.loads((Path(x["run_dir"]) / "results.json").read_text()) for x in runs]
    for x, res in zip(runs, saved):
        assert res["trained_together"] == [0, 1] and x["curve"]["step"] == [2, 4, 6]
    assert len({res["final_params_digest"] for res in saved}) == 4  # four different runs
    assert " ± " in (tmp_path / "table.md").read_text()


def test_nets_in_parallel_processes_compute_what_a_one_core_process_computes(tmp_path):
    """--processes 2 trains the two nets at once, each in a process pinned to one core;
    each net's parameters equal, bit for bit, those of the same net trained in one
    process on one core (a CPU kernel's rounding depends on its thread count only)."""
    r = run(tmp_path / "par", "--depths", "8", "--processes", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 runs, 2 at a time" in r.stderr
    one_core = dict(ENV, OMP_NUM_THREADS="1")
    alone = subprocess.run(["taskset", "-c", str(min(os.sched_getaffinity(0)))] +
                           experiment(tmp_path / "alone", "--depths", "8", "--processes", "1"),
                           env=one_core, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    for net in ("plain8", "resnet8"):
        par, one = (json.loads((tmp_path / d / "nets" / f"{net}-seed0" / "results.json")
                               .read_text()) for d in ("par", "alone"))
        assert par["hardware"]["cores"] == one["hardware"]["cores"] == 1
        assert par["final_params_digest"] == one["final_params_digest"], net


def test_cifar_depths_never_become_imagenet_nets():
    """--depths 50 and 152 are 6n+2: they build CIFAR nets (resnet50 and resnet152 are
    the ImageNet nets' names); CIFAR ResNet-50 has 755,802 parameters, by hand: a
    16-filter stem (464), 8 blocks per stage (37,376 + 143,872 + 573,440) and the fc
    (650)."""
    import jax
    import jax.numpy as jnp
    from cnn_jax.models import create_model
    from cnn_jax.models.resnet import CifarResNet
    from experiments.plain_vs_resnet import PRESETS, nets_for, run_config
    preset = PRESETS["smoke"]
    nets = nets_for(preset, [50, 152])
    assert [n.name for n in nets] == ["plain50", "resnet50", "resnet152"]  # plain: up to 110
    for net in nets:
        cfg = run_config(net, preset, 0, Path("unused"))
        model = create_model(cfg.model.name, **cfg.model.options)
        assert isinstance(model, CifarResNet) and model.depth == net.depth, cfg.model.name
        assert (model.shortcut is None) != net.residual
    cfg = run_config(nets[1], preset, 0, Path("unused"))
    v = jax.eval_shape(create_model(cfg.model.name, **cfg.model.options).init, jax.random.key(0),
                       jnp.zeros((1, 32, 32, 3)))
    assert sum(x.size for x in jax.tree.leaves(v["params"])) == 755_802


def test_the_paper_preset_normalises_per_gpu_as_the_paper_did():
    """Batch 128 on two GPUs: BatchNorm statistics over 64 images in the `paper` preset
    (docs/deviations.md), the whole batch elsewhere; `--set bn_group=...` overrides it,
    and the runs' configs carry it."""
    from cnn_jax.experiment import override
    from experiments.plain_vs_resnet import PRESETS, Net, run_config
    net = Net(True, 20)
    assert run_config(net, PRESETS["paper"], 0, Path("unused")).model.bn_group == 64
    assert run_config(net, PRESETS["quick"], 0, Path("unused")).model.bn_group == 0
    whole = override(PRESETS["paper"], ["bn_group=0"])
    assert run_config(net, whole, 0, Path("unused")).model.bn_group == 0
    with pytest.raises(BadInput, match="bn-group: 48 does not divide the batch 128"):
        run_config(net, override(PRESETS["paper"], ["bn_group=48"]), 0, Path("unused")).validate()


def test_claims_are_decided_on_the_mean_training_errors_over_seeds():
    from cnn_jax.experiment import Net, claims_in_words
    from experiments.plain_vs_resnet import fig6_claims

    def runs(errors):  # {(family, depth): [error per seed]}
        return [{"name": Net(f, d).name, "label": Net(f, d).label, "depth": d, "seed": s,
                 "final_train_error": e / 100}
                for (f, d), es in errors.items() for s, e in enumerate(es)]

    def check(errors, families=("plain", "resnet")):
        depths = sorted({d for _, d in errors})
        return fig6_claims(runs(errors), families, depths[0], depths[-1])

    good = check({("plain", 20): [30, 34], ("plain", 56): [78, 80],
                  ("resnet", 20): [2, 3], ("resnet", 56): [3.2, 3.0]})
    assert [c["claim"] for c in good] == ["plain_deeper_trains_worse", "resnet_beats_plain",
                                          "resnet_deeper_no_worse"]
    assert all(c["pass"] for c in good) and good[0]["seeds"] == 2
    assert good[2]["measured"] == {"ResNet-20": 2.5, "ResNet-56": 3.1}
    assert good[2]["required"] == "ResNet-56 <= ResNet-20 + 1 points"
    # one seed of ResNet-56 stuck: its mean is 2 points above ResNet-20's
    stuck = check({("plain", 20): [30, 34], ("plain", 56): [78, 80],
                   ("resnet", 20): [2, 3], ("resnet", 56): [1.0, 8.0]})
    assert [c["pass"] for c in stuck] == [True, True, False]
    words = claims_in_words(stuck, "Fig. 6's claims:")
    assert "FAILS  the deeper ResNet trains no worse" in words and "Not every claim" in words
    # plain nets only 4 points apart: no degradation shown
    flat = check({("plain", 20): [30], ("plain", 56): [34]})
    assert len(flat) == 1 and not flat[0]["pass"]
    assert check({("resnet", 8): [50]}) == []   # one depth: nothing to compare
    # a third family of the table: its own two claims, naming its nets
    three = check({("plain", 20): [30], ("plain", 56): [80], ("resnet", 20): [2],
                   ("resnet", 56): [3], ("preact", 20): [2], ("preact", 56): [1]},
                  ("plain", "resnet", "preact"))
    assert [c["claim"] for c in three][3:] == ["preact_beats_plain", "preact_deeper_no_worse"]
    assert three[4]["measured"] == {"pre-act ResNet-20": 2.0, "pre-act ResNet-56": 1.0}


def test_the_families_compared_are_any_of_the_table(tmp_path):
    """--families plain resnet preact: every net trained, the table's rows, the claims and
    the folder name say which; an unknown family is refused naming the table's."""
    r = subprocess.run([sys.executable, "-m", "experiments.plain_vs_resnet", "--preset", "smoke",
                        "--data", "synthetic:32x32x3:10:64:40", "--depths", "8", "14",
                        "--families", "resnet", "preact", "--workers", "0", "--processes", "1"],
                       env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "plain_vs_resnet-smoke-familiesresnet_preact"
    results = json.loads((out / "results.json").read_text())
    assert [x["name"] for x in results["runs"]] == ["resnet8", "resnet14", "preact_resnet8",
                                                    "preact_resnet14"]
    assert [c["claim"] for c in results["claims"]] == ["resnet_deeper_no_worse",
                                                       "preact_deeper_no_worse"]
    assert "| pre-act ResNet | 14 |" in (out / "table.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "experiments.plain_vs_resnet", "--preset",
                          "smoke", "--families", "wide"], env={**ENV, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'wide'" in bad.stderr


def test_bad_input(tmp_path, capsys):
    from experiments.plain_vs_resnet import main

    def refused_here(out, *extra):  # refusals come before any compilation: in this process
        return refused(main, experiment(out, *extra)[3:], capsys)
    code, err = refused_here(tmp_path, "--depths", "21")
    assert code == 2 and "6n+2" in err
    code, err = refused_here(tmp_path / "nothing", "--data", "cifar10", "--data-dir",
                             str(tmp_path / "no"))
    assert code == 2 and "--data-dir" in err and "no such directory" in err
    assert not (tmp_path / "nothing").exists()    # refused: nothing written
    blocked = tmp_path / "file"
    blocked.write_text("")
    code, err = refused_here(blocked / "out")
    assert code == 2 and "not writable" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"preset": "paper"}))
    r = run(tmp_path / "other")   # the command itself, once
    assert r.returncode == 2 and "different configuration" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    assert json.loads((tmp_path / "other" / "config.json").read_text()) == {"preset": "paper"}
