"""A sweep's throughput on a CPU: one process with every core, or one process per core.

For each model and batch: the engine's train step (scripts/bench_train.py's `make_step`:
resident random images, compilation and warm-up excluded) timed in one process that
has every core (one run after another, as the sweep trains in-process), then in N
processes at once, each pinned to one core with one oneDNN thread (as
`cnn_jax.train.processes` trains a sweep's runs). Both are timed in the same
invocation, back to back, over the same number of steps per process.

    python scripts/bench_processes.py --model resnet56 resnet20 --batch 32 --json

The last line is one JSON object: per model and batch, `one_process_img_per_s`,
`per_core_img_per_s` (each pinned process's), `parallel_img_per_s` (their sum) and
`speedup` (parallel / one process).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time


def time_step(model: str, batch: int, steps: int, repeats: int) -> float:
    """Images/s of the step in this process (median of `repeats` windows)."""
    import statistics
    import jax
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_train import make_step  # scripts/ is a folder of scripts, not a package
    fn, state, data, _ = make_step(model, batch, "float32", 1)
    for _ in range(3):
        state, _ = fn(state, data)
    jax.block_until_ready(state)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, _ = fn(state, data)
        jax.block_until_ready(state)
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def pinned(core: int, model: str, batch: int, steps: int, repeats: int, start, results):
    """One process on one core: wait until all are built, then time."""
    os.sched_setaffinity(0, {core})
    os.environ["OMP_NUM_THREADS"] = "1"
    start.wait()
    results.put(time_step(model, batch, steps, repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["resnet56", "resnet20"])
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="only the JSON line")
    a = p.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    ctx = mp.get_context("spawn")
    rows = []
    for model in a.model:
        for batch in a.batch:
            one = time_step(model, batch, a.steps, a.repeats)
            start, results = ctx.Barrier(len(cores)), ctx.Queue()
            procs = [ctx.Process(target=pinned, args=(c, model, batch, a.steps, a.repeats,
                                                      start, results)) for c in cores]
            for q in procs:
                q.start()
            per_core = [results.get() for _ in procs]
            for q in procs:
                q.join()
            row = {"model": model, "batch": batch, "cores": len(cores),
                   "one_process_img_per_s": one, "per_core_img_per_s": per_core,
                   "parallel_img_per_s": sum(per_core), "speedup": sum(per_core) / one}
            rows.append(row)
            if not a.json:
                print(f"{model} batch {batch}: one process {one:.1f} img/s, {len(cores)} "
                      f"pinned processes {sum(per_core):.1f} ({row['speedup']:.2f}x)",
                      file=sys.stderr)
    import jax
    from cnn_jax.provenance import hardware, versions
    print(json.dumps({"rows": rows, "backend": jax.default_backend(), "hardware": hardware(),
                      "versions": versions(), "command": "python " + " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
