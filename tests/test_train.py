"""The training engine: schedules, determinism, resume to the bit after SIGKILL,
SIGTERM, devices, K steps per call, NaN guard, refused configs, grouped BN."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.errors import BadInput
from cnn_jax.models import create_model
from cnn_jax.train import TrainConfig, schedules
from cnn_jax.train.checkpoint import load_variables
from cnn_jax.provenance import cpu_features
from cnn_jax.train.loop import ConfigMismatch, Diverged, finite_runs, train
from cnn_jax.train.steps import make_optimizer, make_train_step
from cnn_jax.train.config import OptimiserConfig
from cnn_jax.train.state import TrainState

DATA = "synthetic:16x16x3:10:256:100"
SMALL = dict(model="resnet8", data=DATA, batch=32, seed=0, lr=0.01, log_every=2,
             eval_every=100, checkpoint_every=100, progress=False, workers=0)


def cli(out, *extra, steps=8, env=None, **overrides):
    """The contract command line for the small run."""
    opts = {**SMALL, **overrides}
    args = [sys.executable, "-m", "cnn_jax.train", "--model", opts["model"], "--data",
            opts["data"], "--steps", str(steps), "--batch", str(opts["batch"]), "--seed",
            str(opts["seed"]), "--out", str(out), "--lr", str(opts["lr"]), "--log-every",
            str(opts["log_every"]), "--eval-every", str(opts["eval_every"]),
            "--checkpoint-every", str(opts["checkpoint_every"]), "--no-progress",
            "--workers", "0", *extra]
    return args, dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))


def run_cli(out, *extra, **kw):
    args, env = cli(out, *extra, **kw)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def results(out):
    return json.loads((Path(out) / "results.json").read_text())


def max_rel_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) /
                     (np.max(np.abs(np.asarray(x))) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------ schedules
def test_paper_schedule_in_iterations():
    lr = schedules.paper(0.1)
    got = [float(lr(s)) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_warmup_switch():
    lr = schedules.with_warmup(schedules.paper(0.1), 0.01)
    assert float(lr(0, schedules.NEVER)) == pytest.approx(0.01)
    assert float(lr(399, schedules.NEVER)) == pytest.approx(0.01)
    assert float(lr(399, 400)) == pytest.approx(0.01)
    assert float(lr(400, 400)) == pytest.approx(0.1)
    assert float(lr(40_000, 400)) == pytest.approx(0.01)  # then the paper schedule


@pytest.mark.parametrize("threshold,expected_end,lrs", [
    (1.01, 1, [0.01, 0.1, 0.1]),               # error below the threshold at once
    (-1.0, schedules.NEVER, [0.01, 0.01, 0.01]),  # never below: warm-up goes on
])
def test_warmup_ends_when_training_error_falls_below_threshold(threshold, expected_end, lrs):
    model = create_model("lenet5")
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=1e-4))
    lr_fn = schedules.with_warmup(schedules.paper(0.1), 0.01)
    step = jax.jit(make_train_step(model, tx, lr_fn, lambda x: x.astype(jnp.float32) / 255,
                                   warmup_until_error=threshold))
    x = jnp.zeros((4, 32, 32, 1))
    state = TrainState.create(model.init(jax.random.key(0), x), tx, jax.random.PRNGKey(1))
    batch = {"image": jnp.full((4, 32, 32, 1), 100, jnp.uint8),
             "label": jnp.array([0, 1, 2, 3])}
    seen = []
    for _ in range(3):
        state, m = step(state, batch)
        seen.append(float(m["lr"]))
    np.testing.assert_allclose(seen, lrs, rtol=1e-6)
    assert int(state.warmup_end) == expected_end


def test_sgd_matches_pytorch_coupled_weight_decay():
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=0.1))
    p, g = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.5, 0.5])}
    opt = tx.init(p)
    v = np.zeros(2)
    pw = np.array([1.0, -2.0])
    for _ in range(3):
        d, opt = tx.update(g, opt, p)
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, d)
        v = 0.9 * v + (np.array([0.5, 0.5]) + 0.1 * pw)  # torch.optim.SGD
        pw = pw - 0.1 * v
    np.testing.assert_allclose(p["w"], pw, rtol=1e-6)


def test_decay_mask_spares_batchnorm_and_biases():
    from cnn_jax.train.steps import decay_mask
    v = jax.eval_shape(create_model("resnet8").init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    mask = decay_mask(v["params"])
    assert mask["stem"]["conv"]["kernel"] and mask["fc"]["kernel"]
    assert not mask["stem"]["bn"]["scale"] and not mask["fc"]["bias"]


# ------------------------------------------------------------------ determinism, K steps
def test_same_seed_same_result_bit_for_bit(tmp_path):
    a = train(TrainConfig(**SMALL, steps=6, out=str(tmp_path / "a")))
    b = train(TrainConfig(**SMALL, steps=6, out=str(tmp_path / "b")))
    assert a["final_params_digest"] == b["final_params_digest"]
    c = train(TrainConfig(**{**SMALL, "seed": 1}, steps=6, out=str(tmp_path / "c")))
    assert c["final_params_digest"] != a["final_params_digest"]
    for key in ("config.json", "metrics.jsonl", "results.json"):
        assert (tmp_path / "a" / key).exists()
    logged = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train_loss" in r] == [2, 4, 6]
    assert logged[-1]["eval_n"] == 100 and "eval_error" in logged[-1]
    # the same scalars for TensorBoard
    events = tensorboard_scalars(tmp_path / "a" / "tensorboard")
    assert events["train/loss"] == [(r["step"], pytest.approx(r["train_loss"]))
                                    for r in logged if "train_loss" in r]
    assert events["test/error"] == [(6, pytest.approx(logged[-1]["eval_error"]))]


def tensorboard_scalars(folder) -> dict:
    """tag -> [(step, value)] from the TFRecord event files of `folder`."""
    import struct
    from tensorboardX.proto.event_pb2 import Event
    out: dict = {}
    for f in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4  # length, its CRC, the record, its CRC
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_k_steps_per_call_equal_one_step_per_call(tmp_path):
    one = train(TrainConfig(**SMALL, steps=8, out=str(tmp_path / "one")))
    four = train(TrainConfig(**{**SMALL, "steps_per_call": 4}, steps=8, out=str(tmp_path / "k")))
    assert max_rel_diff(load_variables(tmp_path / "one"), load_variables(tmp_path / "k")) < 1e-4
    m1 = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m4 = [json.loads(l) for l in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    # the logging cadence is exact with K > 1: the same steps are logged
    assert [r["step"] for r in m1] == [r["step"] for r in m4]
    np.testing.assert_allclose([r.get("train_loss", 0) for r in m1],
                               [r.get("train_loss", 0) for r in m4], rtol=1e-4)
    assert one["final_test_error"] == pytest.approx(four["final_test_error"], abs=0.02)


def test_worker_processes_feed_the_loop_the_same_batches(tmp_path):
    """The loop's prefetch thread drives grain's worker processes: 2 workers give the
    parameters 0 workers give, bit for bit (here with 2 steps per call)."""
    runs = {w: train(TrainConfig(**{**SMALL, "workers": w, "steps_per_call": 2}, steps=6,
                                 out=str(tmp_path / f"w{w}"))) for w in (0, 2)}
    assert runs[0]["final_params_digest"] == runs[2]["final_params_digest"]


# ------------------------------------------------------------------ never lose work
def wait_for_checkpoint(out: Path, step: int, proc, timeout=300):
    target = out / "checkpoints" / str(step)
    t = time.time()
    while not target.is_dir() and time.time() - t < timeout:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert target.is_dir()


RESUME_OPTS = dict(steps=120, checkpoint_every=20, log_every=10, eval_every=60)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run both kills are compared with, trained once (xdist_group below)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    ref = run_cli(out, **RESUME_OPTS)
    assert ref.returncode == 0, ref.stderr
    return out


@pytest.mark.xdist_group("uninterrupted")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_a_kill_is_bit_identical(tmp_path, sig, uninterrupted):
    args, env = cli(tmp_path / "run", **RESUME_OPTS)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_checkpoint(tmp_path / "run", 20, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert not (tmp_path / "run" / "results.json").exists(), "killed too late to test resume"
    if sig == signal.SIGTERM:  # finished its call, saved, exited cleanly
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "SIGTERM: saved step" in err
    resumed = run_cli(tmp_path / "run", **RESUME_OPTS)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert results(tmp_path / "run")["final_params_digest"] == \
        results(uninterrupted)["final_params_digest"]
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "img_per_s"}
                       for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "run") == strip(uninterrupted)


def test_rerunning_a_finished_run_does_not_train_again(tmp_path):
    first = train(TrainConfig(**SMALL, steps=4, out=str(tmp_path)))
    again = train(TrainConfig(**SMALL, steps=4, out=str(tmp_path)))
    assert again["final_params_digest"] == first["final_params_digest"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["4"]


def test_a_changed_configuration_is_refused(tmp_path):
    train(TrainConfig(**SMALL, steps=4, out=str(tmp_path)))
    with pytest.raises(ConfigMismatch, match="changed: lr"):
        train(TrainConfig(**{**SMALL, "lr": 0.02}, steps=4, out=str(tmp_path)))
    # cadence is not part of the result: allowed
    train(TrainConfig(**{**SMALL, "log_every": 1}, steps=4, out=str(tmp_path)))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(**{**SMALL, "lr": 1e30, "log_every": 1, "checkpoint_every": 1},
                      steps=50, out=str(tmp_path))
    with pytest.raises(Diverged, match="at step (\\d+)") as e:
        train(cfg)
    bad_step = int(__import__("re").search("at step (\\d+)", str(e.value)).group(1))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad_step
    params = load_variables(tmp_path)["params"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_a_non_finite_state_is_found_per_run():
    """The check before each save: a step's loss is computed before its update, so
    an update that overflows leaves a finite loss and a non-finite state (lr 1e30
    above: step 2's loss is finite, its parameters are not)."""
    import jax.numpy as jnp
    state = {"w": jnp.ones((3, 4, 2)), "b": jnp.zeros((3, 2)), "step": jnp.zeros(3, jnp.int32),
             "key": jax.random.split(jax.random.key(0), 3)}
    assert finite_runs(state, 3).tolist() == [True, True, True]
    state["b"] = state["b"].at[1, 0].set(jnp.inf)
    state["w"] = state["w"].at[2, 3, 1].set(jnp.nan)
    assert finite_runs(state, 3).tolist() == [True, False, False]
    assert finite_runs({"w": jnp.array([1.0, jnp.inf])}, 1).tolist() == [False]


def test_cpu_features_name_the_vector_extensions():
    """Results record the CPU's vector extensions: XLA's CPU code rounds differently
    with AVX-512 than with AVX2, so the same command gives other digits."""
    zen4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 "
            "avx512_vnni\n\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu\n")
    assert cpu_features(zen4) == "family 25 model 17 avx2 fma avx512f avx512_vnni avx512_bf16"
    assert cpu_features("cpu family\t: 23\nmodel\t\t: 49\nflags\t\t: sse2 avx2 fma\n") == \
        "family 23 model 49 avx2 fma"
    assert cpu_features("processor\t: 0\nFeatures\t: fp asimd sve\n") == "asimd sve"  # Arm
    assert cpu_features("") == ""


def test_bad_input(tmp_path):
    run = dict(SMALL, batch=30)
    code = ("import jax; from cnn_jax.train import TrainConfig, train; "
            f"train(TrainConfig(**{run!r}, steps=2, out={str(tmp_path)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert out.stderr.strip().splitlines()[-1] == \
        "cnn_jax.errors.BadInput: --batch 30 is not divisible by the 4 devices"
    blocked = tmp_path / "file"
    blocked.write_text("")
    out = run_cli(blocked / "sub", steps=2)
    assert out.returncode == 2 and "--out" in out.stderr and "not writable" in out.stderr
    out = run_cli(tmp_path / "x", steps=2, model="resnet21")
    assert out.returncode == 2 and "6n+2" in out.stderr
    out = run_cli(tmp_path / "y", steps=2, model="resnet2O")
    assert out.returncode == 2 and "unknown model 'resnet2O'" in out.stderr
    out = run_cli(tmp_path / "z", "--data-dir", str(tmp_path / "no"), steps=2, data="cifar10")
    assert out.returncode == 2 and f"--data-dir {tmp_path / 'no'}: no such directory" in out.stderr
    assert not any((tmp_path / d).exists() for d in "xyz")  # a refused run leaves nothing
    with pytest.raises(BadInput, match="--schedule"):
        TrainConfig(schedule="linear").validate()


# ------------------------------------------------------------------ devices
def test_eight_devices_equal_one_and_checkpoints_move_between_them(tmp_path):
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r1 = run_cli(tmp_path / "one", steps=8, checkpoint_every=4)
    r8 = run_cli(tmp_path / "eight", steps=8, checkpoint_every=4, env=eight)
    assert r1.returncode == 0 and r8.returncode == 0, r1.stderr + r8.stderr
    assert results(tmp_path / "eight")["hardware"]["devices"] == 8
    one, many = load_variables(tmp_path / "one"), load_variables(tmp_path / "eight")
    assert max_rel_diff(one["params"], many["params"]) < 1e-4  # global-batch BN
    assert max_rel_diff(one["batch_stats"], many["batch_stats"]) < 1e-4
    # saved on 8, resumed on 1 (and the reverse) to 12 steps
    up = run_cli(tmp_path / "eight", steps=12, checkpoint_every=4)
    down = run_cli(tmp_path / "one", steps=12, checkpoint_every=4, env=eight)
    assert up.returncode == 0 and down.returncode == 0, up.stderr + down.stderr
    assert "resuming" in up.stderr and "resuming" in down.stderr
    a, b = load_variables(tmp_path / "eight"), load_variables(tmp_path / "one")
    # the float-level differences of the first 8 steps grow with training: looser here
    assert max_rel_diff(a["params"], b["params"]) < 5e-3


@pytest.mark.slow  # 50 s: kept out of the 15-minute CI
def test_per_group_batchnorm_statistics():
    model = create_model("resnet8")
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=0.0))
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3)) * 40 + 120
    state = TrainState.create(model.init(jax.random.key(1), x), tx, jax.random.PRNGKey(2))
    batch = {"image": x, "label": jnp.arange(8) % 10}
    ident = lambda z: z / 255.0
    zero_lr = lambda s, w: 0.0
    grouped = make_train_step(model, tx, zero_lr, ident, bn_group=4)
    new, _ = jax.jit(grouped)(state, batch)
    # the running mean moves by the average of each group's own batch mean
    halves = [model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          x[i:i + 4] / 255.0, train=True, mutable=["batch_stats"])[1]
              for i in (0, 4)]
    expected = jax.tree.map(lambda a, b: (a + b) / 2, halves[0]["batch_stats"],
                            halves[1]["batch_stats"])
    assert max_rel_diff(new.batch_stats, expected) < 1e-5
    whole, _ = jax.jit(make_train_step(model, tx, zero_lr, ident))(state, batch)
    assert max_rel_diff(new.batch_stats, whole.batch_stats) > 1e-3


@pytest.mark.slow  # 60 s; the eight-device test above stays in the fast suite
def test_two_processes_on_localhost_equal_one(tmp_path):
    """Multi-host through jax.distributed.initialize (CPU collectives over gloo): each
    process feeds its half of every global batch."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        args, env = cli(tmp_path / "two", steps=6, checkpoint_every=3)
        args += ["--coordinator-address", f"localhost:{port}", "--num-processes", "2",
                 "--process-id", str(pid)]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    single = run_cli(tmp_path / "one", steps=6, checkpoint_every=3)
    assert single.returncode == 0, single.stderr
    assert results(tmp_path / "two")["hardware"]["processes"] == 2
    two, one = load_variables(tmp_path / "two"), load_variables(tmp_path / "one")
    assert max_rel_diff(one["params"], two["params"]) < 1e-4


def test_bfloat16_compute_trains_with_float32_state(tmp_path):
    r = train(TrainConfig(**{**SMALL, "dtype": "bfloat16"}, steps=4, out=str(tmp_path)))
    assert np.isfinite(r["final_train_loss"])
    v = load_variables(tmp_path)
    assert {x.dtype for x in jax.tree.leaves(v)} == {np.dtype("float32")}


def test_evaluation_before_the_first_log_line(tmp_path):
    r = train(TrainConfig(**{**SMALL, "log_every": 4, "eval_every": 1}, steps=2,
                          out=str(tmp_path)))
    logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_error" in r] == [1, 2]
    assert r["final_train_error"] is not None


def test_matmul_kernel_gradients_compute_the_same_step():
    """conv_kernels="matmul" (faster on CPUs) changes only the kernel gradient's summation
    order: same loss bit for bit, same parameters after a step within 1e-5 (which
    convolutions it takes: tests/test_cpu_kernels.py)."""
    import jax.numpy as jnp
    from cnn_jax.models import create_model
    from cnn_jax.train.state import TrainState
    from cnn_jax.train.steps import make_optimizer, make_train_step
    from helpers import quick_variables
    model = create_model("resnet8", num_classes=4)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
    batch = {"image": x, "label": jnp.array([0, 1, 2, 3])}
    variables = quick_variables(model, jnp.zeros((1, 32, 32, 3)))
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=1e-4))
    out = {}
    for cg in ("xla", "matmul"):
        step = jax.jit(make_train_step(model, tx, lambda s, w: 0.1, lambda im: im / 255.0,
                                       conv_kernels=cg))
        out[cg] = step(TrainState.create(variables, tx, jax.random.PRNGKey(0)), batch)
    assert out["xla"][1]["loss"] == out["matmul"][1]["loss"]
    for a, b in zip(jax.tree.leaves(out["xla"][0].params), jax.tree.leaves(out["matmul"][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_auto_kernel_gradients_follow_the_models_dtype(monkeypatch):
    """On CPUs without oneDNN's convolutions "auto" takes the chunked products for
    float32 models and XLA's own kernel gradient for bfloat16 ones (conv_kernels.resolve):
    the step's gradient holds the chunks' loops only in float32."""
    from cnn_jax import onednn
    for variable in ("CNN_JAX_CONV_KERNELS", "CNN_JAX_CONV_GRAD"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(onednn, "why_unavailable", lambda dtype=None: "not here")
    batch = {"image": jnp.zeros((2, 16, 16, 3), jnp.uint8), "label": jnp.array([0, 1])}
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=1e-4))
    scans = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = create_model("resnet8", num_classes=2, dtype=dtype)
        state = jax.eval_shape(lambda: TrainState.create(
            model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))), tx,
            jax.random.PRNGKey(0)))
        step = make_train_step(model, tx, lambda s, w: 0.1, lambda im: im / 255.0)
        scans[jnp.dtype(dtype).name] = str(jax.make_jaxpr(step)(state, batch)).count(" = scan[")
    assert scans == {"float32": 7, "bfloat16": 0}  # ResNet-8: 7 convolutions, a loop each


@pytest.mark.parametrize("kernels", [
    "seedwise", "matmul",  # the seeds' defaults on GPUs and on CPUs
    # the GPUs' products: their seeds-first rule is tested in test_cpu_kernels.py
    pytest.param("patches", marks=pytest.mark.slow)])
def test_seeds_at_once_equals_each_seed_alone(kernels, monkeypatch):
    """Several runs vmapped into one step (seeds_at_once) compute each run's own step:
    three seeds with their own parameters, momentum, BatchNorm statistics and batches,
    two steps (the second uses the momentum of the first), against the plain step run
    per seed; within 1e-5, the summation order of batched convolutions aside (at lr 0.1
    such differences grow chaotically over steps, as between device counts). Kernel
    gradients: XLA's convolution seed by seed, products over chunks (CPUs) and one
    product of patches batched over the seeds."""
    import jax.numpy as jnp
    from cnn_jax.train import conv_kernels
    if kernels == "patches":
        monkeypatch.setattr(conv_kernels, "backend_form", lambda: "patches")
    from cnn_jax.models import create_model
    from cnn_jax.train.state import TrainState
    from cnn_jax.train.steps import make_optimizer, make_train_step, seeds_at_once
    from helpers import quick_variables
    model = create_model("resnet8", num_classes=4)
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=1e-4))
    step = make_train_step(model, tx, lambda s, w: 0.01, lambda im: im / 255.0,
                           conv_kernels="seedwise" if kernels == "seedwise" else "matmul")
    rng = np.random.default_rng(0)
    base = quick_variables(model, jnp.zeros((1, 32, 32, 3)))
    perturb = lambda s: {**base, "params": jax.tree.map(
        lambda v: v + 0.05 * np.random.default_rng(s).standard_normal(v.shape), base["params"])}
    states = [TrainState.create(perturb(s), tx, jax.random.PRNGKey(s)) for s in range(3)]
    batches = [[{"image": jnp.asarray(rng.integers(0, 256, (3, 6, 32, 32, 3)), jnp.uint8)[i],
                 "label": jnp.asarray(rng.integers(0, 4, (3, 6)))[i]} for i in range(3)]
               for _ in range(2)]
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
    together, alone = stack(states), list(states)
    for t in range(2):
        together, m_together = jax.jit(seeds_at_once(step))(together, stack(batches[t]))
        outs = [jax.jit(step)(alone[i], batches[t][i]) for i in range(3)]
        alone = [o[0] for o in outs]
        np.testing.assert_allclose(m_together["loss"], [o[1]["loss"] for o in outs], rtol=1e-5)
    assert len({float(l) for l in m_together["loss"]}) == 3  # three different runs
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(stack(alone))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ seeds trained together
def together_cfgs(tmp_path, tag, seeds=(0, 1), **overrides):
    return [TrainConfig(**{**SMALL, "seed": s, **overrides}, out=str(tmp_path / f"{tag}{s}"))
            for s in seeds]


def test_seeds_trained_together_equal_each_trained_alone(tmp_path):
    """train_together: two seeds in one vmapped step write, each in its own folder, the
    files `train` writes, and each run's numbers are its run alone's up to rounding (the
    same data order, augmentation, initialisation and logging)."""
    from cnn_jax.train.loop import train_together
    together = train_together(together_cfgs(tmp_path, "t", steps=6, steps_per_call=2))
    assert together[0]["final_params_digest"] != together[1]["final_params_digest"]
    for s, res in zip((0, 1), together):
        alone = train(TrainConfig(**{**SMALL, "seed": s, "steps_per_call": 2}, steps=6,
                                  out=str(tmp_path / f"a{s}")))
        assert res["seed"] == s and res["trained_together"] == [0, 1]
        assert max_rel_diff(load_variables(tmp_path / f"t{s}"),
                            load_variables(tmp_path / f"a{s}")) < 1e-4
        lines = lambda tag: [json.loads(l) for l in
                             (tmp_path / f"{tag}{s}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines("t")] == [r["step"] for r in lines("a")] == [2, 4, 6, 6]
        np.testing.assert_allclose([r.get("train_loss", r.get("eval_loss")) for r in lines("t")],
                                   [r.get("train_loss", r.get("eval_loss")) for r in lines("a")],
                                   rtol=1e-4)
        assert res["final_test_error"] == pytest.approx(alone["final_test_error"], abs=0.02)
        saved = json.loads((tmp_path / f"t{s}" / "config.json").read_text())
        assert saved["config_digest"] == TrainConfig(**{**SMALL, "seed": s}).digest()
        assert saved["trained_together"] == [0, 1]


def test_seeds_together_resume_after_sigterm_is_bit_identical(tmp_path):
    """Stopped by SIGTERM at step 4 (the loop saves every run and exits), the same call
    again resumes every run and ends exactly where an uninterrupted group ends."""
    from cnn_jax.train.loop import train_together
    opts = dict(steps=8, checkpoint_every=6, log_every=2)
    ref = train_together(together_cfgs(tmp_path, "ref", **opts))
    taken = []

    def stop_at_step_4(n):  # steps of both runs, per call
        taken.append(n)
        if sum(taken) == 2 * 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        train_together(together_cfgs(tmp_path, "run", **opts), on_steps=stop_at_step_4)
    assert stopped.value.code == 128 + signal.SIGTERM
    for s in (0, 1):
        assert not (tmp_path / f"run{s}" / "results.json").exists()
        assert (tmp_path / f"run{s}" / "checkpoints" / "4").is_dir()
    resumed = train_together(together_cfgs(tmp_path, "run", **opts))
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "img_per_s"}
                       for l in (p / "metrics.jsonl").read_text().splitlines()]
    for s, a, b in zip((0, 1), resumed, ref):
        assert a["final_params_digest"] == b["final_params_digest"]
        assert strip(tmp_path / f"run{s}") == strip(tmp_path / f"ref{s}")


@pytest.mark.slow  # 45 s; the single-run 8-device test stays in the default run
def test_seeds_together_on_eight_devices_equal_one(tmp_path):
    """The [seeds, batch] input sharded along the batch over 8 devices: each seed's
    parameters are those of 1 device (global-batch BatchNorm) up to rounding."""
    code = ("import sys; from cnn_jax.train import TrainConfig; "
            "from cnn_jax.train.loop import train_together; "
            f"train_together([TrainConfig(**{{**{dict(SMALL, steps=4, steps_per_call=2)!r}, "
            "'seed': s}, out=f'{sys.argv[1]}/s{s}') for s in (0, 1)])")
    for name, env in (("one", {}), ("eight", {"XLA_FLAGS":
                                              "--xla_force_host_platform_device_count=8"})):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)],
                           env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    for s in (0, 1):
        assert results(tmp_path / "eight" / f"s{s}")["hardware"]["devices"] == 8
        assert max_rel_diff(load_variables(tmp_path / "one" / f"s{s}"),
                            load_variables(tmp_path / "eight" / f"s{s}")) < 1e-4


def test_runs_trained_together_must_share_recipe_folder_and_step(tmp_path):
    from cnn_jax.train.loop import train_together
    a, b = together_cfgs(tmp_path, "r", steps=2)
    with pytest.raises(BadInput, match="differ only in seed and --out; .* in lr"):
        train_together([a, TrainConfig(**{**SMALL, "seed": 1, "lr": 0.02}, steps=2,
                                       out=b.run.out)])
    with pytest.raises(BadInput, match="their own --out folders"):
        train_together([a, TrainConfig(**{**SMALL, "seed": 1}, steps=2, out=a.run.out)])
    train(a)  # seed 0 alone has a checkpoint at step 2, seed 1 none
    with pytest.raises(BadInput, match="resume from the same step"):
        train_together(together_cfgs(tmp_path, "r", steps=4))
    from cnn_jax.train.sweep import run_all, seed_groups
    four = together_cfgs(tmp_path, "r", steps=4)
    assert [[c.run.seed for c in g] for g in seed_groups(four)] == [[0], [1]]
    results = run_all(four, "test", together=True)  # each from where it stands
    assert [r["steps"] for r in results] == [4, 4] and "trained_together" not in results[0]


def test_profile_summary_counts_per_step():
    """scripts/profile_step.py's arithmetic on a hand-made trace: events and busy time
    per training step on each track, costliest names first."""
    sys.path.insert(0, "scripts")
    from profile_step import summarise
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    events += [{"ph": "X", "pid": 1, "name": "conv", "ts": i, "dur": 300.0} for i in range(4)]
    events += [{"ph": "X", "pid": 1, "name": "relu", "ts": i, "dur": 50.0} for i in range(8)]
    events += [{"ph": "X", "pid": 2, "name": "dispatch", "ts": 0, "dur": 1000.0},
               {"ph": "i", "pid": 1, "name": "marker", "ts": 0}]  # no duration: ignored
    out = summarise(events, steps=2, wall_ms=4.0)
    gpu = out["/device:GPU:0"]
    assert gpu["events_per_step"] == 6
    assert gpu["busy_ms_per_step"] == pytest.approx(0.8)
    assert gpu["busy_fraction"] == pytest.approx(1.6 / 4.0)
    assert [t["name"] for t in gpu["top"]] == ["conv", "relu"]
    assert gpu["top"][0] == {"name": "conv", "calls_per_step": 2,
                             "ms_per_step": pytest.approx(0.6)}
    assert out["/host:CPU"]["busy_ms_per_step"] == pytest.approx(0.5)


def test_profile_kinds_group_fusions_and_library_convolutions():
    """Kernel kinds: XLA's numbered fusions by name, cuDNN/CUTLASS convolutions as one."""
    sys.path.insert(0, "scripts")
    from profile_step import kind, summarise
    assert kind("input_reduce_fusion_253") == kind("input_reduce_fusion") == "input_reduce_fusion"
    assert kind("loop_add_fusion.2_18") == "loop_add_fusion"
    conv = "convolution (library kernels)"
    assert kind("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32") == conv
    assert kind("void cutlass__5x_cudnn::Kernel<cutlass__5x_cudnn::reduction::kernel::"
                "ReduceSplitK<") == conv
    assert kind("loop_convolution_fusion_2") == "loop_convolution_fusion"  # XLA's own
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}}]
    events += [{"ph": "X", "pid": 1, "name": f"loop_add_fusion_{i}", "ts": i, "dur": 10.0}
               for i in range(6)]
    events += [{"ph": "X", "pid": 1, "name": "sm80_xmma_fprop_implicit_gemm", "ts": 0,
                "dur": 100.0}]
    kinds = summarise(events, steps=2, wall_ms=1.0)["/device:GPU:0"]["kinds"]
    assert kinds == [{"kind": conv, "calls_per_step": 0.5, "ms_per_step": pytest.approx(0.05)},
                     {"kind": "loop_add_fusion", "calls_per_step": 3,
                      "ms_per_step": pytest.approx(0.03)}]


@pytest.mark.slow  # 28 s: a benchmark's output format, kept out of the 15-minute CI
def test_conv_layer_benchmark_contract():
    """scripts/bench_conv_layers.py's JSON line (tiny batch: the contract, not the speed)."""
    r = subprocess.run([sys.executable, "scripts/bench_conv_layers.py", "--batch", "2",
                        "--repeats", "1", "--winograd", "--json"], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["layer"] for x in d["layers"]] == ["32x32x16", "16x16x32", "8x8x64"]
    from cnn_jax import onednn
    also = {"onednn_forward", "onednn_input_grad", "onednn_kernel_grad"} \
        if onednn.available() else set()
    for x in d["layers"]:
        assert set(x["ours"]) == {"forward", "input_grad", "kernel_grad_xla",
                                  "kernel_grad_chunks"} | also and min(x["ours"].values()) > 0
        if x["torch"] is not None:  # torch installed
            assert set(x["torch"]) == {"forward", "input_grad", "kernel_grad"}
        # Winograd is the same convolution up to float32 rounding (F(4x4) rounds worse)
        assert x["winograd"]["f2"]["max_rel_error"] < 3e-6
        assert x["winograd"]["f4"]["max_rel_error"] < 3e-5
    assert "xla_flags" in d["versions"] and ("onednn" in d["versions"]) == bool(also)


@pytest.mark.slow  # 20 s: a benchmark's output format, kept out of the 15-minute CI
def test_train_benchmark_contract():
    """scripts/bench_train.py's JSON line (small net: the contract, not the speed)."""
    r = subprocess.run([sys.executable, "scripts/bench_train.py", "--model", "resnet8",
                        "--batch", "8", "--conv-kernels", "xla", "matmul", "--steps", "1",
                        "--repeats", "1", "--reference", "torch", "--json"],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["backend"] == "cpu" and d["ours_img_per_s"] > 0
    assert [v["conv_kernels"] for v in d["variants"]] == ["xla", "matmul"]
    if d["reference"]:  # torch installed
        assert d["reference_img_per_s"] > 0 and d["ratio"] == d["ours_img_per_s"] / d["reference_img_per_s"]
