import os

from cnn_jax.cache import cache_dir

# Tests run on the CPU, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the experiment subprocesses they start) compile the same small
# programs; XLA's compile time dominates the suite on a 2-core CPU. The project's
# persistent compilation cache (cnn_jax/cache.py), named here so that tests which give
# a run its own CNN_JAX_CACHE_DIR still share it, compiles each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "jax"))
