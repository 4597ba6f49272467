import os
from pathlib import Path

# Tests run on the CPU, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the experiment subprocesses they start) compile the same small
# programs; XLA's compile time dominates the suite on a 2-core CPU. A disk cache
# shared by the pytest workers and their subprocesses compiles each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))
