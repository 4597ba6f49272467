"""The project's own cache folder: decoded datasets, official archives downloaded on
first use, compiled programs (JAX's persistent compilation cache) and oneDNN kernels.

`$CNN_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/cnn_jax`, else `~/.cache/cnn_jax`: per user,
never inside the clone nor ../shared.

Compiled once: importing cnn_jax points JAX's persistent compilation cache at
`<cache>/jax` (unless JAX_COMPILATION_CACHE_DIR is set), so a second run of the same
net skips XLA's compilation. `CNN_JAX_COMPILATION_CACHE=0` turns it off.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMPILATION_CACHE = "CNN_JAX_COMPILATION_CACHE"   # 0 / off: compile every run afresh
# programs that compile faster than this are not worth a file (JAX's default is 1 s;
# the train and eval steps of a small CPU run compile in 0.3-3 s)
MIN_COMPILE_SECONDS = "0.3"


def cache_dir() -> Path:
    if os.environ.get("CNN_JAX_CACHE_DIR"):
        return Path(os.environ["CNN_JAX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cnn_jax"


def compilation_cache_enabled(environ=os.environ) -> bool:
    return environ.get(COMPILATION_CACHE, "1").strip().lower() not in ("0", "off", "false", "no")


def use_compilation_cache(environ=os.environ) -> None:
    """JAX's persistent compilation cache under the project's cache folder, set in the
    environment (so that worker and sweep processes share it) and in JAX's config if
    JAX is already imported. A folder the user names in JAX_COMPILATION_CACHE_DIR wins."""
    if not compilation_cache_enabled(environ):
        return
    environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "jax"))
    environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_COMPILE_SECONDS)
    if "jax" in sys.modules:
        import jax
        if jax.config.jax_compilation_cache_dir is None:
            jax.config.update("jax_compilation_cache_dir", environ["JAX_COMPILATION_CACHE_DIR"])
            jax.config.update("jax_persistent_cache_min_compile_time_secs",
                              float(environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
