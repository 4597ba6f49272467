"""Which accelerator this machine has, which jax build it needs, and a warning when JAX
runs on the CPU beside one.

    python cnn_jax/accelerator.py --extra    # 'cuda12', 'tpu' or '' (what `make` installs)

A GPU is what `nvidia-smi -L` lists; a TPU is a /dev/accel* device (TPU v2-v4 VMs), a
/dev/vfio/<n> group (v5e, v5p, v6e VMs) or Colab's COLAB_TPU_ADDR. Only the standard
library is used: the setup runs this file before anything is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

EXTRAS = {"gpu": "cuda12", "tpu": "tpu"}


def install_line(extra: str) -> str:
    return f'pip install -e ".[{extra}]"'


def nvidia_gpus(environ=os.environ) -> list[str]:
    """`nvidia-smi -L`'s lines ('GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)'), or []."""
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                           env=dict(environ))
    except (OSError, subprocess.SubprocessError):
        return []
    return [l.strip() for l in r.stdout.splitlines() if l.startswith("GPU ")] \
        if r.returncode == 0 else []


def tpu_devices(dev: Path = Path("/dev"), environ=os.environ) -> list[str]:
    """What shows a TPU: /dev/accel* devices, /dev/vfio/<n> groups, COLAB_TPU_ADDR."""
    found = sorted(str(p) for p in dev.glob("accel*"))
    found += sorted(str(p) for p in (dev / "vfio").glob("[0-9]*"))
    if environ.get("COLAB_TPU_ADDR"):
        found.append(f"COLAB_TPU_ADDR={environ['COLAB_TPU_ADDR']}")
    return found


def detect(dev: Path = Path("/dev"), environ=os.environ) -> tuple[Optional[str], list[str]]:
    """('gpu' | 'tpu' | None, what showed it)."""
    gpus = nvidia_gpus(environ)
    if gpus:
        return "gpu", gpus
    tpus = tpu_devices(dev, environ)
    return ("tpu", tpus) if tpus else (None, [])


def unused_accelerator_warning(backend: str, environ=os.environ) -> Optional[str]:
    """One line when JAX's backend is the CPU on a machine with a GPU or TPU (its CPU
    build is installed), naming the device and the install line; None otherwise, and
    when JAX_PLATFORMS asks for the CPU (a choice, not a mistake)."""
    if backend != "cpu" or environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    kind, shown = detect(environ=environ)
    if kind is None:
        return None
    what = "an NVIDIA GPU" if kind == "gpu" else "a TPU"
    return (f"warning: this machine has {what} ({shown[0]}{', ...' if len(shown) > 1 else ''}), "
            f"but JAX runs on the CPU: the CPU-only jax is installed. To use the {kind.upper()}, "
            f"run in the project folder: {install_line(EXTRAS[kind])}")


_warned = False


def warn_if_unused() -> None:
    """Print the warning once per process (commands that train or evaluate call this
    first, after the many-host runtime has started)."""
    global _warned
    if _warned:
        return
    _warned = True
    import jax
    line = unused_accelerator_warning(jax.default_backend())
    if line:
        print(line, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--extra"]:
        print("usage: python cnn_jax/accelerator.py --extra", file=sys.stderr)
        return 2
    kind, shown = detect()
    if kind is None:
        print("setup: no NVIDIA GPU (nvidia-smi) or TPU (/dev/accel*, /dev/vfio) found: "
              "installing jax's CPU build", file=sys.stderr)
        print("")
    else:
        print(f"setup: found {'an NVIDIA GPU' if kind == 'gpu' else 'a TPU'} ({shown[0]}): "
              f"installing the '{EXTRAS[kind]}' extra (jax's {kind.upper()} build)",
              file=sys.stderr)
        print(EXTRAS[kind])
    return 0


if __name__ == "__main__":
    sys.exit(main())
