"""Where a number came from: the versions, hardware, cores and CPU kernels a run used,
as every results.json, benchmark and experiment records them. It sits below training
(docs/architecture.md): nothing here imports cnn_jax.train."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import flax
import jax
import numpy as np
import optax

from cnn_jax import onednn


def versions() -> dict:
    out = {"python": platform.python_version(), "jax": jax.__version__,
           "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}
    # the CPU kernels (cnn_jax.cpu_kernels, cnn_jax.train.conv_kernels, cnn_jax.onednn)
    # change rounding
    out.update({k.lower(): os.environ[k] for k in ("XLA_FLAGS", "CNN_JAX_CONV_KERNELS",
                                                   "CNN_JAX_CONV_GRAD") if os.environ.get(k)})
    if jax.default_backend() == "cpu" and onednn.library_version():
        out["onednn"] = onednn.library_version()
    return out


def available_cores() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpuinfo(text: str | None = None) -> dict:
    """The first processor's "key: value" fields of /proc/cpuinfo (or of `text`); {}
    where there is none (not Linux)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The host CPU's model name and core count (for records of CPU timings)."""
    name = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


# Vector extensions that change how fast XLA's CPU code runs and how it rounds: the same
# command gives other digits on an AVX-512 CPU than on an AVX2 one (docs/results.md).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_bf16", "asimd", "sve")


def cpu_features(cpuinfo: str | None = None) -> str:
    """The CPU's family/model and which of CPU_FEATURES it has (Linux; else "")."""
    fields = _cpuinfo(cpuinfo)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = " ".join(f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model")
                     if fields.get(k))
    return " ".join(filter(None, [model] + [f for f in CPU_FEATURES if f in flags]))


def hardware() -> dict:
    d = jax.devices()
    backend = jax.default_backend()
    return {"backend": backend,
            "device": cpu_name() if backend == "cpu" else d[0].device_kind,
            "devices": len(d), "processes": jax.process_count(),
            "host": platform.node(), "cpu": cpu_name(), "cpu_features": cpu_features(),
            "cores": len(available_cores())}  # this process's: they change CPU rounding
