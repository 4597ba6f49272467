import os

from cnn_jax.cache import cache_dir

# Tests run on the CPU, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the experiment subprocesses they start) compile the same small
# programs; XLA's compile time dominates the suite on a 2-core CPU. The project's
# persistent compilation cache (cnn_jax/cache.py), named here so that tests which give
# a run its own CNN_JAX_CACHE_DIR still share it, compiles each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "jax"))
# Several CPU devices in one process meet in XLA's in-process collectives, which abort
# a process whose devices do not all arrive within 40 s: on 2 cores shared by the test
# workers and their subprocesses, a device's thread can be starved that long.
if "collective_call_terminate_timeout" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_collective_call_terminate_timeout_seconds=300").strip()
