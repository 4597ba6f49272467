"""Many training runs as one job, as every experiment needs them.

`run_all` trains each configuration (in parallel processes on a CPU, or the seeds of
one recipe at once) under one progress bar, re-reads the finished ones and resumes the
unfinished ones, so re-running a killed experiment's command carries on where it
stopped; `curve` reads a run's metrics.jsonl back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import jax
from tqdm.auto import tqdm

from cnn_jax.train.checkpoint import saved_step
from cnn_jax.train.config import TrainConfig
from cnn_jax.train.loop import train_together
from cnn_jax.train.processes import ProcessPool, process_count


def finished(cfg: TrainConfig) -> Optional[dict]:
    """results.json of a finished run of exactly this configuration, else None."""
    out = Path(cfg.run.out)
    try:
        saved = json.loads((out / "config.json").read_text())
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("config_digest") == cfg.digest() and results.get("steps") == cfg.schedule.steps:
        return results
    return None


def seed_groups(configs: list[TrainConfig]) -> list[list[TrainConfig]]:
    """Configurations that differ only in seed (and folder) and stand at the same step,
    in groups that can train at once (`train_together`), in order of first appearance."""
    groups: dict = {}
    for c in configs:
        recipe = json.dumps(c.seedless(), sort_keys=True, default=str)
        groups.setdefault((recipe, saved_step(c.run.out)), []).append(c)
    return list(groups.values())


def run_all(configs: list[TrainConfig], command: str, names: Optional[list[str]] = None,
            together: bool = False, processes: Optional[int] = None) -> list[dict]:
    """Train every configuration not yet finished; results.json of each, in order.
    `together`: the unfinished runs that differ only in seed train at once, in one
    vmapped step (`train_together`: faster on GPUs, slower on CPUs). Otherwise on a CPU
    they train in `processes` parallel processes (default: one per core,
    cnn_jax.train.processes), in the order given: pass the longest runs first."""
    names = dict(zip((c.run.out for c in configs), names or [Path(c.run.out).name for c in configs]))
    todo = [c for c in configs if finished(c) is None]
    if processes is None:
        processes = 1 if together else process_count(len(todo), jax.default_backend())
    bar = tqdm(total=sum(c.schedule.steps for c in todo), unit="step", dynamic_ncols=True,
               desc=f"{len(configs)} nets, {len(todo)} to train")
    trained = {}
    if processes > 1:
        bar.set_description(f"{len(todo)} runs, {processes} at a time")
        trained = ProcessPool(processes).train(todo, command, bar.update)
    else:
        for group in seed_groups(todo) if together else [[c] for c in todo]:
            bar.set_description(", ".join(names[c.run.out] for c in group))
            for cfg, res in zip(group, train_together(group, command=command,
                                                      on_steps=bar.update)):
                trained[cfg.run.out] = res
    bar.close()
    return [trained[c.run.out] if c.run.out in trained else finished(c) for c in configs]


def curve(run_dir: Path, split: str = "test") -> dict:
    """Training error (logged windows) and evaluation error at the evaluation steps."""
    records = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
               if l.strip()]
    train = {r["step"]: r["train_error"] for r in records if "train_error" in r}
    evals = {r["step"]: r["eval_error"] for r in records if "eval_error" in r}
    steps = sorted(train)
    return {"step": steps, "train_error": [train[s] for s in steps],
            "eval_step": sorted(evals), f"{split}_error": [evals[s] for s in sorted(evals)]}
