"""The runs of a training job, each its own: its folder, config.json, checkpoints and
metrics log; and the checkpoint writer, the one place (with the compiled step) that
knows the runs' states are stacked [S, ...] (S = 1 for one run).

    runs = Runs(cfgs)                       # folders, checkpointers, logs: all at once
    step = runs.resume_step()               # None: a fresh start
    restored = runs.restore(targets)        # the newest checkpoint every run restores
    runs.save(step, state, data_states, unlogged, walls)
    runs.own(state, i)                      # run i's own (unstacked) state
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.errors import BadInput
from cnn_jax.files import write_atomic
from cnn_jax.provenance import hardware, versions
from cnn_jax.train.checkpoint import Checkpointer, Damaged
from cnn_jax.train.config import TrainConfig, changed_fields
from cnn_jax.train.inputs import save_normaliser
from cnn_jax.train.metrics import OBJECTIVE, STEP_KEYS, MetricsLog


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written, creating nothing: a refused run (bad
    model, data or folder) leaves no folder behind."""
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise BadInput(f"--out {out}: not writable ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: not writable ({existing} is read-only)")


def check_together(cfgs: list[TrainConfig]) -> None:
    """Runs trained at once must share everything but the seed and the folder."""
    outs = [str(Path(c.run.out).absolute()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise BadInput(f"runs trained together need their own --out folders; got {outs}")
    base = cfgs[0].seedless()
    for c in cfgs[1:]:
        diff = sorted(k for k, v in c.seedless().items() if base[k] != v)
        if diff:
            raise BadInput(f"runs trained together may differ only in seed and --out; "
                           f"{c.run.out} differs from {cfgs[0].run.out} in {', '.join(diff)}")




class ConfigMismatch(BadInput):
    """An --out folder holds a run of another configuration."""


@dataclasses.dataclass
class Run:
    """One run's own part of a training job."""
    cfg: TrainConfig
    out: Path
    ckpt: Checkpointer
    log: MetricsLog


@dataclasses.dataclass(frozen=True)
class Restored:
    """What the newest checkpoint every run restores holds: the step, the states
    (stacked), each run's input position, the metrics not yet logged ([k, S]) and each
    run's wall time before this session."""
    step: int
    state: object
    data_states: list
    unlogged: dict
    walls: list


class Runs:
    """The runs of a job, opened together: their folders, checkpointers and logs."""

    def __init__(self, cfgs: list[TrainConfig]):
        self.runs = []
        for cfg in cfgs:   # the first files of each run: nothing was written before this
            out = Path(cfg.run.out)
            out.mkdir(parents=True, exist_ok=True)
            self.runs.append(Run(cfg, out, Checkpointer(out / "checkpoints",
                                                        cfg.run.keep_checkpoints),
                                 MetricsLog(out / "metrics.jsonl")))

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    # -------------------------------------------------------------- starting
    def resume_step(self) -> Optional[int]:
        """The step every run's newest checkpoint is at (None: none has one)."""
        steps = {run.ckpt.latest_step() for run in self.runs}
        if len(steps) > 1:
            raise BadInput(f"runs trained together must resume from the same step; their "
                           f"latest checkpoints are at steps "
                           f"{[r.ckpt.latest_step() for r in self.runs]} "
                           f"({', '.join(str(r.out) for r in self.runs)}): train them one by one")
        return steps.pop()

    def start_fresh(self) -> None:
        """A run starting at step 0: refused over finished results of another recipe;
        log lines of an attempt that died before its first save dropped."""
        for run in self.runs:
            config_file = run.out / "config.json"
            if config_file.exists() and (run.out / "results.json").exists() and json.loads(
                    config_file.read_text()).get("config_digest") not in (None, run.cfg.digest()):
                raise ConfigMismatch(f"{run.out} holds finished results of a different "
                                     f"configuration; use another --out")
            if jax.process_index() == 0:
                run.log.truncate_after(0)

    def write_configs(self, normaliser, image_shape, conv_kernels: str, command: str) -> None:
        if jax.process_index() != 0:
            return
        together = {"trained_together": [r.cfg.run.seed for r in self.runs]} \
            if len(self.runs) > 1 else {}
        for run in self.runs:
            save_normaliser(run.out, normaliser, image_shape)
            write_atomic(run.out / "config.json", json.dumps(
                {"config": run.cfg.to_json(), "config_digest": run.cfg.digest(),
                 "command": command, "versions": versions(), "hardware": hardware(),
                 "conv_kernels": conv_kernels, **together}, indent=1))

    def restore(self, targets: list, stack) -> Restored:
        """The newest checkpoint that every run restores onto `targets` (each run's
        state, unstacked), its states stacked by `stack`. A newer one that does not
        (damaged files, a copy cut short, other bytes than were saved) is named in a
        warning and set aside into damaged_checkpoints/; when none restores, nothing is
        moved and the run is refused."""
        steps = sorted(set.intersection(*(set(r.ckpt.all_steps()) for r in self.runs)),
                       reverse=True)
        damaged = []
        for step in steps:
            try:
                found = [self._restore(run, step, t) for run, t in zip(self.runs, targets)]
            except Damaged as e:
                print(f"warning: checkpoint {e}; trying the one before", file=sys.stderr)
                damaged.append(step)
                continue
            for bad in damaged:
                for run in self.runs:
                    print(f"{run.out / 'checkpoints' / str(bad)} (damaged) moved to "
                          f"{run.ckpt.set_aside(bad)}", file=sys.stderr)
            for run in self.runs:
                if jax.process_index() == 0:
                    run.log.truncate_after(step)
                print(f"resuming {run.out} from step {step}", file=sys.stderr)
            states, data_states, metas = zip(*found)
            return Restored(step, stack(list(states)), list(data_states),
                            unlogged_of([m.get("unlogged_metrics") or {} for m in metas]),
                            [m.get("wall_s", 0.0) for m in metas])
        raise BadInput(f"none of the checkpoints in {self.runs[0].out / 'checkpoints'} restores "
                       f"(steps {', '.join(map(str, steps))}; see the warnings above). Nothing "
                       f"was moved; use another --out, or move them away to start again")

    @staticmethod
    def _restore(run: Run, step: int, target):
        """(state, data state, meta) of the run's checkpoint at `step`, refusing a
        checkpoint of another configuration; Damaged (naming it) when it does not restore."""
        where = run.out / "checkpoints" / str(step)
        try:
            meta = run.ckpt.read_meta(step)
        except Damaged as e:
            raise Damaged(f"{where}: {e}") from None
        if meta["config_digest"] != run.cfg.digest():
            diff = changed_fields(meta["config"], run.cfg, where)
            raise ConfigMismatch(
                f"{run.out} holds a run with a different configuration (changed: "
                f"{', '.join(diff) or 'unknown'}); resuming would mix two runs. Use "
                f"another --out, or restore the original settings to resume.")
        try:
            return run.ckpt.restore(step, target)
        except Damaged as e:
            raise Damaged(f"{where} does not restore: {e}") from None

    # -------------------------------------------------------------- the checkpoint writer
    def own(self, state, i: int):
        """Run i's own state: out of the stacked one where several train at once."""
        return jax.tree.map(lambda x: x[i], state) if len(self.runs) > 1 else state

    def save(self, step: int, state, data_states: list, unlogged: dict, walls: list) -> None:
        """Every run's checkpoint at `step`: its own state, input position, metrics not
        yet logged ([k, S]: its column) and wall time."""
        for i, run in enumerate(self.runs):
            run.log.flush()
            run.ckpt.save(step, self.own(state, i), data_states[i],
                          {"config_digest": run.cfg.digest(), "config": run.cfg.to_json(),
                           "unlogged_metrics": {k: v[:, i].tolist() for k, v in unlogged.items()},
                           "wall_s": walls[i]})

    def check(self) -> None:
        for run in self.runs:
            run.ckpt.check()

    def wait(self) -> None:
        for run in self.runs:
            run.ckpt.wait()

    def close(self) -> None:
        for run in self.runs:
            run.ckpt.close()
            run.log.close()


def unlogged_of(saved: list[dict]) -> dict:
    """Each run's saved unlogged metrics ({key: [k]}) as one {key: [k, S]}."""
    if not saved or not saved[0] or not len(saved[0].get(OBJECTIVE, ())):
        return {}
    return {k: np.stack([np.asarray(u[k], np.float32) for u in saved], axis=-1)
            for k in STEP_KEYS}


def stack_states(states: list, sharding):
    """Runs' states as the compiled step takes them: stacked [S, ...] on the devices
    where several train at once, one run's as it is."""
    if len(states) == 1:
        return states[0]
    return jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                   out_shardings=sharding)(*states)
