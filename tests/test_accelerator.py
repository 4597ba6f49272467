"""The accelerator's jax: `make`'s setup installs the cuda12 extra where `nvidia-smi -L`
lists a GPU and the tpu extra on a TPU VM, and says which; a command that trains or
evaluates on a CPU-only jax beside a GPU says so first, with the install line. A GPU
box is a fake `nvidia-smi` on PATH; a TPU VM a folder standing in for /dev. The
accelerator's recipe (the paper presets' compiled step) tried on 8 CPU devices, and
`auto`'s choices for a GPU and a TPU backend."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cnn_jax import accelerator

ROOT = Path(__file__).resolve().parents[1]
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5b8c7a2e-0000-0000-0000-000000000000)"
INSTALL = 'pip install -e ".[cuda12]"'


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def gpu_box(tmp_path):
    """PATH with an `nvidia-smi` that lists one H100 (as `nvidia-smi -L` does)."""
    bin_dir = tmp_path / "gpu-bin"
    bin_dir.mkdir()
    executable(bin_dir / "nvidia-smi",
               f'#!/bin/sh\n[ "$1" = "-L" ] && echo "{H100}" && exit 0\nexit 1\n')
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def no_gpu_env():
    """PATH without any nvidia-smi (a machine without NVIDIA's driver)."""
    path = ":".join(p for p in os.environ["PATH"].split(":")
                    if not (Path(p) / "nvidia-smi").exists())
    return dict(os.environ, PATH=path)


def extra(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cnn_jax/accelerator.py", "--extra"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_setup_picks_cuda12_where_nvidia_smi_lists_a_gpu(gpu_box):
    r = extra(gpu_box)
    assert r.returncode == 0 and r.stdout.strip() == "cuda12"
    assert "NVIDIA H100" in r.stderr and "'cuda12' extra" in r.stderr


def test_the_setup_picks_the_cpu_build_elsewhere():
    r = extra(no_gpu_env())
    if accelerator.tpu_devices():
        pytest.skip("this machine has a TPU")
    assert r.returncode == 0 and r.stdout.strip() == ""
    assert "CPU build" in r.stderr


def test_a_tpu_vm_is_found_by_its_devices(tmp_path):
    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio" / "vfio").touch()          # the control device is on every VFIO host
    assert accelerator.tpu_devices(dev, {}) == []
    (dev / "vfio" / "0").touch()             # v5e / v5p / v6e: numbered groups
    assert accelerator.tpu_devices(dev, {}) == [str(dev / "vfio" / "0")]
    (dev / "accel0").touch()                 # v2-v4
    assert accelerator.tpu_devices(dev, {})[0] == str(dev / "accel0")
    assert accelerator.tpu_devices(tmp_path / "none", {"COLAB_TPU_ADDR": "10.0.0.2:8470"}) == \
        ["COLAB_TPU_ADDR=10.0.0.2:8470"]


def test_make_installs_the_extra_it_found(tmp_path, gpu_box):
    """`make setup` with a stand-in Python that records what pip was asked to install
    (and runs the real one for the detection)."""
    log = tmp_path / "pip.log"
    fake = executable(tmp_path / "python", f"""#!/bin/sh
case "$1" in
  cnn_jax/accelerator.py) exec {sys.executable} "$@" ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi ;;
esac
echo "$@" >> {log}
""")
    r = subprocess.run(["make", "setup", f"PYTHON={fake}", f"VENV={tmp_path / 'venv'}"],
                       cwd=ROOT, env=gpu_box, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "-m pip install --quiet -e .[dev,cuda12]" in log.read_text().splitlines()
    assert "installing the 'cuda12' extra" in r.stderr
    log.unlink()
    (tmp_path / "venv" / ".installed").unlink()
    r = subprocess.run(["make", "setup", f"PYTHON={fake}", f"VENV={tmp_path / 'venv'}"],
                       cwd=ROOT, env=no_gpu_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "-m pip install --quiet -e .[dev]" in log.read_text().splitlines()


def first_lines(args, env) -> str:
    """stderr of a command that stops on bad data right after its start."""
    env = {k: v for k, v in env.items() if k != "JAX_PLATFORMS"}   # what jax finds itself
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    return r.stderr


COMMANDS = {
    "train": ["cnn_jax.train", "--data", "no_such_dataset", "--out", "{tmp}/run"],
    "experiment": ["experiments.plain_vs_resnet", "--preset", "smoke", "--data",
                   "no_such_dataset", "--out", "{tmp}/exp"],
    "evaluate": ["cnn_jax.evaluate", "--checkpoint", "{tmp}/nothing"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_cpu_only_jax_beside_a_gpu_is_named_first(command, tmp_path, gpu_box):
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    err = first_lines(args, gpu_box)
    warnings = [l for l in err.splitlines() if l.startswith("warning: this machine has")]
    assert len(warnings) == 1, err
    assert "NVIDIA H100" in warnings[0] and INSTALL in warnings[0]
    assert err.index(warnings[0]) < err.index("error:")


def test_nothing_of_the_kind_without_a_gpu(tmp_path):
    args = [a.format(tmp=tmp_path) for a in COMMANDS["train"]]
    assert "warning: this machine has" not in first_lines(args, no_gpu_env())


def test_asking_for_the_cpu_is_a_choice_not_a_mistake(gpu_box):
    assert accelerator.unused_accelerator_warning("cpu", dict(gpu_box, JAX_PLATFORMS="cpu")) \
        is None
    assert accelerator.unused_accelerator_warning("gpu", gpu_box) is None
    warning = accelerator.unused_accelerator_warning("cpu", {**gpu_box, "JAX_PLATFORMS": ""})
    assert warning is not None and INSTALL in warning


# ------------------------------------------------------------------ the accelerator's recipe
def test_the_paper_presets_step_on_eight_devices_is_the_step_on_one(tmp_path):
    """The paper presets' compiled call as a GPU or TPU runs it (their batch, bn_group,
    steps_per_call, dtype; XLA's convolutions; the batch sharded along `data`, the state
    replicated) on 1 and on 8 CPU devices, from the same state and batches
    (tests/accelerator_recipe.py): the same losses step by step. BatchNorm over each
    device's 16 images instead of the preset's 64 moves them by 4e-3 (measured)."""
    r = subprocess.run([sys.executable, "tests/accelerator_recipe.py", str(tmp_path)], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                                XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    cifar, imagenet = report["plain_vs_resnet/paper"], report["imagenet/paper"]
    assert (cifar["batch"], cifar["bn_group"], cifar["steps_per_call"], cifar["dtype"]) == \
        (128, 64, 10, "float32")
    assert (imagenet["batch"], imagenet["bn_group"], imagenet["steps_per_call"],
            imagenet["dtype"]) == (256, 0, 1, "bfloat16")
    for preset, k, shard in ((cifar, 10, [10, 16, 16, 16, 3]), (imagenet, 1, [32, 16, 16, 3])):
        one, eight = preset["one"], preset["eight"]
        assert eight["input_spec"] == ([None, "data"] if k > 1 else ["data"])   # k steps, batch
        assert (one["input_devices"], eight["input_devices"]) == (1, 8)
        assert eight["input_shard"] == shard and one["input_shard"][-4] == shard[-4] * 8
        assert one["state_replicated"] and eight["state_replicated"]
        assert (one["state_devices"], eight["state_devices"]) == ([1], [8])
        assert eight["dtype"] == preset["dtype"] and len(one["loss"]) == k
        assert preset["loss_rel_diff"] < 5e-4, preset
        assert preset["params_diff"] < 1e-2, preset


@pytest.mark.parametrize("backend,kind", [("gpu", "NVIDIA H100 80GB HBM3"), ("tpu", "TPU v4")])
def test_auto_picks_the_paper_preset_and_xlas_kernels_on_an_accelerator(monkeypatch, backend,
                                                                       kind):
    import jax
    from cnn_jax.experiment.command import choose_preset
    from cnn_jax.train.conv_kernels import backend_form, resolve
    for variable in ("CNN_JAX_CONV_KERNELS", "CNN_JAX_CONV_GRAD"):
        monkeypatch.delenv(variable, raising=False)
    assert choose_preset("auto")[0] == "quick"   # this CPU
    assert resolve("auto") in ("onednn", "matmul") and backend_form() != "patches"
    device = type("Device", (), {"device_kind": kind, "platform": backend})()
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    assert choose_preset("auto") == ("paper", f"auto: found a {backend.upper()} ({kind})")
    from experiments import imagenet, plain_vs_resnet
    for E in (plain_vs_resnet, imagenet):
        assert E.EXPERIMENT.context(["--preset", "auto"]).preset_name == "paper"
    assert resolve("auto") == "xla" and resolve("auto", dtype="bfloat16") == "xla"
    assert resolve("auto", seeds=5) == "seedwise"       # one convolution per seed
    assert backend_form() == "patches"
