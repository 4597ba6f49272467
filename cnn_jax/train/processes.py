"""A sweep's runs in parallel processes on a CPU, each on its own cores.

A small CIFAR net's step does not keep two cores busy: on a 2-core CPU at batch 32,
ResNet-20 trains at 316 images/s in one process with both cores and at 247 + 255 in
two processes with one core each, ResNet-56 at 120 and 78 + 80 (docs/benchmarks.md):
1.59x and 1.31x the sweep's throughput. So on
a CPU `run_all` hands its runs to one process per core, in the order given (pass the
longest first); each process is pinned to its cores (affinity, OMP_NUM_THREADS) before
JAX starts and trains one run after another with `train`, exactly as the sweep would
in-process: every run keeps its folder, checkpoints, resume and results. A run's
digits depend on how many cores its process had (kernels split their sums by thread),
which `hardware.cores` in its results records.

Failures: the first run to fail stops the others (they save first) and its error is
raised here. SIGINT or SIGTERM makes every process save and stop; `run_all` then exits
as a single run would, with 128 + the signal.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing as mp
import os
import pickle
import queue
import signal
from typing import Callable

from cnn_jax.provenance import available_cores
from cnn_jax.train.config import TrainConfig


def process_count(runs: int, backend: str) -> int:
    """Training processes for `runs` runs: one per core on a CPU (at most one per run),
    one (this process) on an accelerator."""
    return 1 if backend != "cpu" else max(1, min(runs, len(available_cores())))


def _worker(cores: list[int], tasks, messages, command: str) -> None:
    """Train the configurations from `tasks` one after another until a None arrives;
    report steps, results, a signal's stop or an error on `messages`."""
    _die_with_parent()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))  # oneDNN's (GNU OpenMP) threads
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM
    # imported after pinning (not at the top): JAX sizes its thread pools when it starts
    from cnn_jax.train.loop import train
    while (cfg := tasks.get()) is not None:
        try:
            result = train(cfg, command, on_steps=lambda n: messages.put(("steps", n)))
        except SystemExit as e:  # a signal: the run saved and can resume
            messages.put(("stopped", e.code))
            return
        except BaseException as e:  # noqa: BLE001 - raised again by the parent
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                e = RuntimeError(f"{type(e).__name__}: {e}")
            messages.put(("error", e))
            return
        messages.put(("done", cfg.run.out, result))


@contextlib.contextmanager
def _born_pinned(cores: list[int]):
    """Processes started inside are pinned to `cores` from birth. A spawned process
    imports its parent's main module (an experiment, which imports JAX) before
    `_worker` runs, so pinning there alone would come after JAX and OpenMP had sized
    their thread pools for every core. The affinity is this thread's (what a child
    inherits); both are restored on leaving."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = os.environ.get("OMP_NUM_THREADS")
    try:
        if affinity is not None:
            os.sched_setaffinity(0, cores)
        os.environ["OMP_NUM_THREADS"] = str(len(cores))
        yield
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads


def _die_with_parent() -> None:
    """Linux: this process is killed with its parent (kill -9 of the sweep kills its
    runs, as it would kill them in-process; they resume from their checkpoints)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


class ProcessPool:
    """`processes` training processes over the available cores, fed from one queue."""

    def __init__(self, processes: int):
        self.ctx = mp.get_context("spawn")  # a fresh interpreter: JAX is not fork-safe
        cores = available_cores()  # split evenly; more processes than cores share them
        per = max(1, len(cores) // processes)
        self.cores = [[cores[(i * per + j) % len(cores)] for j in range(per)]
                      for i in range(processes)]
        self.signal = None

    def train(self, configs: list[TrainConfig], command: str,
              on_steps: Callable[[int], None]) -> dict:
        """{out: results} of every configuration, trained in the order given."""
        tasks, messages = self.ctx.Queue(), self.ctx.Queue()
        for cfg in configs + [None] * len(self.cores):
            tasks.put(cfg)
        self.workers = [self.ctx.Process(target=_worker, args=(c, tasks, messages, command),
                                         daemon=True) for c in self.cores]
        for w, cores in zip(self.workers, self.cores):
            with _born_pinned(cores):
                w.start()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        results, failure, stopped = {}, None, None
        try:
            while any(w.is_alive() for w in self.workers) or not messages.empty():
                try:
                    kind, *rest = messages.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "steps":
                    on_steps(rest[0])
                elif kind == "done":
                    results[rest[0]] = rest[1]
                elif kind == "stopped":
                    stopped = rest[0]
                elif failure is None:  # the first error: the others save and stop
                    failure = rest[0]
                    self._stop_all()
        finally:
            for w in self.workers:
                w.join()
            for s, h in previous.items():
                signal.signal(s, h)
        if failure is not None:
            raise failure
        if self.signal is not None or stopped is not None:
            raise SystemExit(128 + (self.signal or signal.SIGTERM))
        if len(results) < len(configs):
            codes = [w.exitcode for w in self.workers]
            raise RuntimeError(f"a training process died without a word (exit codes "
                               f"{codes}); re-run the command to resume")
        return results

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        self._stop_all()

    def _stop_all(self) -> None:
        """Every training process saves at its next step and stops (the loop's own
        SIGTERM handling)."""
        for w in self.workers:
            if w.is_alive() and w.pid:
                os.kill(w.pid, signal.SIGTERM)
