"""The project's own cache directory: decoded datasets, compiled oneDNN kernels.

`$CNN_JAX_CACHE_DIR`, else `.cache/` in the project root (never inside ../shared)."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("CNN_JAX_CACHE_DIR", PROJECT_ROOT / ".cache"))
