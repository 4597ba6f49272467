"""Phase 6 of a training job: each run's results.json, written atomically.

Per run: the final training metrics (the last logged window), every declared
evaluation's final metrics (`final_<name>_<metric>`, the main one's under its split's
name, with the split, folder and count it scored), the parameters' digest, the wall
time and rate, the files left out and input workers replaced over all processes, and
the configuration, versions and hardware.
"""
from __future__ import annotations

import json
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from cnn_jax.files import write_atomic
from cnn_jax.provenance import hardware, versions
from cnn_jax.train.metrics import ALIASES, OBJECTIVE, REPORTED, STEP_KEYS, params_digest


def files_left_out(ids: set) -> int:
    """How many files (their indices in the training split) this session left out as
    unreadable, each once, over all processes: a file may reach any process's rows
    in one epoch and another's in the next."""
    if jax.process_count() == 1:
        return len(ids)
    ids_array = np.asarray(sorted(ids), np.int64)
    longest = int(multihost_utils.process_allgather(np.array(len(ids_array))).max())
    padded = np.full(max(longest, 1), -1, np.int64)
    padded[:len(ids_array)] = ids_array
    every = multihost_utils.process_allgather(padded)
    return int(len(np.setdiff1d(np.unique(every), [-1])))


def summed(count: int) -> int:
    """A count of this process's, summed over all processes."""
    return int(multihost_utils.process_allgather(np.array(count)).sum()) \
        if jax.process_count() > 1 else count


def write_results(setup, runs, loop, state, step: int, command: str) -> list[dict]:
    """Each run's results.json (process 0 writes) and its content; `loop`'s finals are
    the declared evaluations' last metrics (StepLoop.finals)."""
    cfg, out = setup.cfg, []
    finals = loop.finals(state, step)
    skipped, restarts = files_left_out(loop.skipped), summed(loop.input_restarts)
    for i, run in enumerate(runs):
        own = runs.own(state, i)
        train_records = [r for r in run.log.read() if f"train_{OBJECTIVE}" in r]
        last_train = train_records[-1] if train_records else {}
        rates = [r["img_per_s"] for r in train_records if r.get("img_per_s")]
        results = {
            "model": cfg.model.name, "data": cfg.data.name, "params": setup.n_params,
            "steps": step, "seed": run.cfg.run.seed, "batch": cfg.optimiser.batch,
            **{f"final_train_{k}": last_train.get(f"train_{k}") for k in STEP_KEYS if k != "lr"},
            **{f"final_train_{a}": last_train.get(f"train_{k}") for a, k in ALIASES.items()},
            **{key: value for key, value in finals[i].items()},
            "final_params_digest": params_digest(own.params),
            "warmup_end": int(jax.device_get(own.warmup_end)) if cfg.schedule.warmup_lr else None,
            "wall_s": loop.walls[i] + time.perf_counter() - loop.wall_start,
            "img_per_s": float(np.median(rates)) if rates else None,
            **({"trained_together": [r.cfg.run.seed for r in runs]} if len(runs) > 1 else {}),
            "hardware": hardware(), "versions": versions(), "command": command,
            "conv_kernels": setup.conv_kernels, "config": run.cfg.to_json(),
            **({"skipped_images": skipped} if cfg.data.bad_images == "skip" else {}),
            "input_restarts": restarts,
        }
        if jax.process_index() == 0:
            write_atomic(run.out / "results.json", json.dumps(results, indent=1))
        out.append(results)
    runs.close()
    return out


def final_keys(name: str, metrics: dict, dataset, main: bool) -> dict:
    """An evaluation's results.json keys: final_<name>_<metric> and what it scored (the
    main evaluation's as eval_split / eval_data / eval_images)."""
    keys = {f"final_{name}_{k}": metrics[k] for k in REPORTED}
    if main:
        return {**keys, "eval_split": name, "eval_data": dataset.describe(),
                "eval_images": len(dataset)}
    return {**keys, f"final_{name}_data": dataset.describe()}
