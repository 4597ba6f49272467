"""Many training runs as one job, as every experiment needs them.

`guard_out` refuses an output folder holding another recipe (nothing is touched);
`run_all` trains each configuration in turn (or the seeds of one recipe at once)
under one progress bar, re-reads the finished ones and resumes the unfinished one, so
re-running a killed experiment's command carries on where it stopped; `curve` reads a
run's metrics.jsonl back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from cnn_jax.train.config import TrainConfig


def choose_preset(name: str, accelerator: str = "paper", cpu: str = "quick") -> tuple[str, str]:
    """'auto' -> the `accelerator` preset on a GPU/TPU, the `cpu` one otherwise; with
    the reason, for the experiment to print."""
    if name != "auto":
        return name, f"--preset {name}"
    import jax
    backend = jax.default_backend()
    if backend in ("gpu", "tpu"):
        return accelerator, f"auto: found a {backend.upper()} ({jax.devices()[0].device_kind})"
    return cpu, (f"auto: no GPU or TPU found, so the CPU-sized `{cpu}` preset "
                 f"(use --preset {accelerator} to run the full recipe anyway)")


class OutputInUse(ValueError):
    pass


def guard_out(out: Path, recipe: dict) -> None:
    """Create `out` (or check it is writable) and record `recipe` in out/config.json,
    refusing a folder whose config.json holds a different recipe."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("")
        (out / ".write_test").unlink()
    except OSError as e:
        raise OutputInUse(f"--out {out}: not writable ({e.strerror})") from None
    recipe = json.loads(json.dumps(recipe))
    saved_file = out / "config.json"
    if saved_file.exists():
        try:
            old = json.loads(saved_file.read_text())
        except ValueError:
            raise OutputInUse(f"--out {out}: config.json is not JSON; nothing was changed. "
                              f"Use another --out.") from None
        if old != recipe:
            diff = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            raise OutputInUse(
                f"--out {out} holds results of a different configuration (differs in: "
                f"{', '.join(diff)}); nothing was changed. Use another --out.")
    saved_file.write_text(json.dumps(recipe, indent=1))


def finished(cfg: TrainConfig) -> Optional[dict]:
    """results.json of a finished run of exactly this configuration, else None."""
    out = Path(cfg.out)
    try:
        saved = json.loads((out / "config.json").read_text())
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("config_digest") == cfg.digest() and results.get("steps") == cfg.steps:
        return results
    return None


def add_seeds_together(parser) -> None:
    """The experiments' `--seeds-together` flag (run_all's `together`)."""
    parser.add_argument("--seeds-together", action="store_true",
                        help="train the seeds of each configuration at once, in one vmapped "
                             "step: on an H100 5 ResNet-56 seeds ran 1.4x faster than one "
                             "after another; on CPUs slower (docs/benchmarks.md)")


def seed_groups(configs: list[TrainConfig]) -> list[list[TrainConfig]]:
    """Configurations that differ only in seed (and folder) and stand at the same step,
    in groups that can train at once (`train_together`), in order of first appearance."""
    from cnn_jax.train.checkpoint import saved_step
    groups: dict = {}
    for c in configs:
        recipe = json.dumps(c.seedless(), sort_keys=True, default=str)
        groups.setdefault((recipe, saved_step(c.out)), []).append(c)
    return list(groups.values())


def run_all(configs: list[TrainConfig], command: str, names: Optional[list[str]] = None,
            together: bool = False, processes: Optional[int] = None) -> list[dict]:
    """Train every configuration not yet finished; results.json of each, in order.
    `together`: the unfinished runs that differ only in seed train at once, in one
    vmapped step (`train_together`: faster on GPUs, slower on CPUs). Otherwise on a CPU
    they train in `processes` parallel processes (default: one per core,
    cnn_jax.train.processes), in the order given: pass the longest runs first."""
    import jax
    from tqdm.auto import tqdm
    from cnn_jax.train.loop import train_together
    from cnn_jax.train.processes import ProcessPool, process_count

    names = dict(zip((c.out for c in configs), names or [Path(c.out).name for c in configs]))
    todo = [c for c in configs if finished(c) is None]
    if processes is None:
        processes = 1 if together else process_count(len(todo), jax.default_backend())
    bar = tqdm(total=sum(c.steps for c in todo), unit="step", dynamic_ncols=True,
               desc=f"{len(configs)} nets, {len(todo)} to train")
    trained = {}
    if processes > 1:
        bar.set_description(f"{len(todo)} runs, {processes} at a time")
        trained = ProcessPool(processes).train(todo, command, bar.update)
    else:
        for group in seed_groups(todo) if together else [[c] for c in todo]:
            bar.set_description(", ".join(names[c.out] for c in group))
            for cfg, res in zip(group, train_together(group, command=command,
                                                      on_steps=bar.update)):
                trained[cfg.out] = res
    bar.close()
    return [trained[c.out] if c.out in trained else finished(c) for c in configs]


def curve(run_dir: Path, split: str = "test") -> dict:
    """Training error (logged windows) and evaluation error at the evaluation steps."""
    records = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
               if l.strip()]
    train = {r["step"]: r["train_error"] for r in records if "train_error" in r}
    evals = {r["step"]: r["eval_error"] for r in records if "eval_error" in r}
    steps = sorted(train)
    return {"step": steps, "train_error": [train[s] for s in steps],
            "eval_step": sorted(evals), f"{split}_error": [evals[s] for s in sorted(evals)]}


def claim(name: str, statement: str, measured: dict, required: str, holds: bool,
          seeds: int, **extra) -> dict:
    """One checked claim of an experiment, as results.json `claims` holds it: what is
    claimed, the numbers it was decided on, what they had to satisfy, and whether they
    did."""
    return {"claim": name, "statement": statement, "measured": measured,
            "required": required, "seeds": seeds, "pass": bool(holds), **extra}


def claims_in_words(claims: list[dict], heading: str) -> str:
    """The checks as a newcomer reads them, one line each, and a plain word when any
    fails."""
    if not claims:
        return ""
    lines = [heading]
    for c in claims:
        numbers = ", ".join(f"{k} {v:.4g}{c.get('unit', '')}" for k, v in c["measured"].items())
        lines.append(f"  {'HOLDS ' if c['pass'] else 'FAILS '} {c['statement']}: {numbers} "
                     f"(needed: {c['required']})")
    if not all(c["pass"] for c in claims):
        lines.append("  Not every claim holds in this run: docs/results.md says what this "
                     "preset shows over seeds, and why.")
    return "\n".join(lines)


def mean_std(values) -> str:
    """'1.23 ± 0.04' over seeds, or '1.23' for one; values in percent."""
    import numpy as np
    v = np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
