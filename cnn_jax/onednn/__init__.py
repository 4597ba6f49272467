"""Convolutions on oneDNN, called from XLA on CPUs (`TrainConfig.conv_kernels="onednn"`).

jaxlib's pip build runs CPU convolutions on Eigen's kernels, fixed when jaxlib is
built; oneDNN (what PyTorch runs on CPUs) generates kernels for the CPU it finds, and
on the 2-core machine of docs/benchmarks.md its forward pass, input gradient and
kernel gradient are 1.2-3.9x faster per float32 ResNet layer, and the whole CIFAR
ResNet-20 step 1.6x, past PyTorch's (CPU step 17). The three are XLA FFI custom calls
(conv.cc) tied by a custom VJP into one differentiable `conv2d`, so a step is still
one compiled XLA program.

conv.cc is compiled the first time it is needed, with the system's C++ compiler
($CXX, else c++), against XLA's FFI headers (shipped in jaxlib) and the oneDNN wheel
(`onednn-cpu-gomp`, a dependency on x86-64 Linux; $CNN_JAX_ONEDNN_LIB may name another
libdnnl.so.3 of oneDNN 3.x); the library is cached under the project's cache directory
keyed by everything that went into it. Where any of that is missing, `available()` is
False and `why_unavailable()` says what to install: `conv_kernels="auto"` then keeps
XLA's convolutions, and asking for "onednn" is an error.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.cache import cache_dir
from cnn_jax.errors import BadInput

HERE = Path(__file__).parent
SOURCES = (HERE / "conv.cc", HERE / "dnnl_v3.h")
WHEELS = ("onednn-cpu-gomp", "onednn-cpu-iomp", "onednn-cpu-tbb")  # CPU-only builds of oneDNN 3
TARGETS = {"forward": "CnnJaxOnednnConvForward", "input_grad": "CnnJaxOnednnConvInputGrad",
           "kernel_grad": "CnnJaxOnednnConvKernelGrad"}
DTYPES = (jnp.float32, jnp.bfloat16)


class OnednnUnavailable(BadInput):
    """oneDNN's convolutions cannot be used here; the message says why and what to do."""


def _wheel():
    """The first installed oneDNN wheel of WHEELS (its distribution), or None."""
    for wheel in WHEELS:
        try:
            return importlib.metadata.distribution(wheel)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def dnnl_library() -> Path:
    """libdnnl.so.3: $CNN_JAX_ONEDNN_LIB, else the one an installed oneDNN wheel holds."""
    if os.environ.get("CNN_JAX_ONEDNN_LIB"):
        path = Path(os.environ["CNN_JAX_ONEDNN_LIB"])
        if not path.is_file():
            raise OnednnUnavailable(f"CNN_JAX_ONEDNN_LIB={path}: no such file (expected a "
                                    "libdnnl.so.3 of oneDNN 3.x)")
        return path
    dist = _wheel()
    for f in (dist.files or ()) if dist else ():
        if f.name == "libdnnl.so.3":
            return Path(dist.locate_file(f))
    raise OnednnUnavailable("no oneDNN library: `pip install onednn-cpu-gomp==2023.2.0` "
                            "(x86-64 Linux) or set CNN_JAX_ONEDNN_LIB to a libdnnl.so.3")


def library_version() -> str | None:
    """The oneDNN wheel's name and version (or $CNN_JAX_ONEDNN_LIB), for records; None
    if there is none."""
    if os.environ.get("CNN_JAX_ONEDNN_LIB"):
        return os.environ["CNN_JAX_ONEDNN_LIB"]
    dist = _wheel()
    return f"{dist.metadata['Name']} {dist.version}" if dist else None


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    if not shutil.which(cxx):
        raise OnednnUnavailable(f"no C++ compiler ({cxx!r} is not on PATH; set CXX or "
                                "install g++) to build cnn_jax/onednn/conv.cc")
    return cxx


def build(cache: Path | None = None) -> Path:
    """The compiled custom calls, built now if the cache has none for these sources,
    this jaxlib, this oneDNN library and this compiler."""
    lib, cxx = dnnl_library(), _compiler()
    key = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), jax.ffi.include_dir().encode(),
                 importlib.metadata.version("jaxlib").encode(), str(lib.resolve()).encode(),
                 cxx.encode()]:
        key.update(part)
    out = (cache or cache_dir()) / "onednn" / f"conv-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # other processes may race
            so = Path(tmp) / out.name
            cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-isystem",
                   jax.ffi.include_dir(), str(SOURCES[0]), "-o", str(so), str(lib),
                   f"-Wl,-rpath,{lib.parent}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise OnednnUnavailable(f"building {SOURCES[0]} failed ({' '.join(cmd)}):\n"
                                        f"{done.stderr[-2000:]}")
            os.replace(so, out)  # atomic: a reader sees the whole library or none
    except OSError as e:
        raise OnednnUnavailable(f"cannot build into {out.parent} ({e}); set "
                                "CNN_JAX_CACHE_DIR to a writable folder") from None
    return out


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Build, load and register the custom calls once: None, or why that failed."""
    try:
        handlers = ctypes.cdll.LoadLibrary(str(build()))
    except OnednnUnavailable as e:
        return str(e)
    except OSError as e:  # e.g. libgomp missing
        return f"loading the oneDNN convolutions failed: {e}"
    for target in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, target)),
                                    platform="cpu")
    return None


@functools.lru_cache(maxsize=None)
def _runs(dtype) -> str | None:
    """Whether oneDNN has kernels for `dtype` on this CPU (bfloat16 needs AVX-512): a
    3x3 convolution and its gradients tried once. None, or what failed."""
    x = jnp.ones((2, 4, 4, 16), dtype)
    try:
        jax.block_until_ready(jax.jit(jax.value_and_grad(
            lambda x, w: conv2d(x, w, (1, 1), ((1, 1), (1, 1))).astype(jnp.float32).sum(),
            argnums=(0, 1)))(x, jnp.ones((3, 3, 16, 16), dtype)))
    except jax.errors.JaxRuntimeError as e:
        detail = str(e).splitlines()[0].rpartition("onednn conv: ")[2]
        return f"oneDNN has no {jnp.dtype(dtype).name} convolutions for this CPU ({detail})"
    return None


def why_unavailable(dtype=jnp.float32) -> str | None:
    """None where oneDNN's convolutions in `dtype` can run here (building them if
    needed), else why not."""
    if jax.default_backend() != "cpu":
        return f"oneDNN's convolutions run on CPUs; JAX computes on {jax.default_backend()}"
    if jnp.dtype(dtype) not in DTYPES:
        return f"oneDNN's convolutions take float32 or bfloat16, not {jnp.dtype(dtype).name}"
    return _load() or _runs(jnp.dtype(dtype))


def available(dtype=jnp.float32) -> bool:
    return why_unavailable(dtype) is None


def require(dtype=jnp.float32, asked_by: str = "oneDNN's convolutions") -> None:
    """Raise OnednnUnavailable, naming `asked_by` and why, unless oneDNN's convolutions
    in `dtype` can run here."""
    reason = why_unavailable(dtype)
    if reason:
        raise OnednnUnavailable(f"{asked_by}: {reason}")


def _call(name: str, shape, dtype, a, b, strides, padding):
    (pt, pb), (pl, pr) = padding
    attrs = dict(zip(("sh", "sw", "pt", "pb", "pl", "pr"),
                     map(np.int64, (*strides, pt, pb, pl, pr))))
    out = jax.ShapeDtypeStruct(shape, dtype)
    return jax.ffi.ffi_call(TARGETS[name], out, vmap_method="sequential")(a, b, **attrs)


def output_shape(x_shape, w_shape, strides, padding) -> tuple:
    (n, h, w, _), (kh, kw, _, o) = x_shape, w_shape
    return (n, (h + sum(padding[0]) - kh) // strides[0] + 1,
            (w + sum(padding[1]) - kw) // strides[1] + 1, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, strides: tuple, padding: tuple):
    """`lax.conv_general_dilated(x, w, strides, padding, ("NHWC", "HWIO", "NHWC"))`
    on oneDNN: x and w of one dtype (float32 or bfloat16), padding ((top, bottom),
    (left, right)) of non-negative ints. Call require() first."""
    return _call("forward", output_shape(x.shape, w.shape, strides, padding), x.dtype,
                 x, w, strides, padding)


def _forward(x, w, strides, padding):
    return conv2d(x, w, strides, padding), (x, w)


def _backward(strides, padding, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    return (_call("input_grad", x.shape, x.dtype, dy, w, strides, padding),
            _call("kernel_grad", w.shape, w.dtype, x, dy, strides, padding))


conv2d.defvjp(_forward, _backward)
