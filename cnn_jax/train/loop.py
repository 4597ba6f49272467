"""`train(config)`: from a model name, a dataset and a recipe to a trained network,
on one CPU, one GPU, many devices or many hosts, resumable to the bit;
`train_together(configs)`: several seeds of one recipe in one vmapped step.

Phases: setup (mesh -> input -> model and compiled steps: cnn_jax.train.setup) ->
state (init or restore, `start`) -> the step loop (`StepLoop`: compiled calls,
logging, evaluation, checkpoints, stops agreed by every process) -> results
(`write_results`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from cnn_jax.data.dataset import open_split
from cnn_jax.data.keys import SKIPPED
from cnn_jax.data.pipeline import (ChunkPrefetcher, InputWorkersDied, stack_batches,
                                   to_global_array, training_keys)
from cnn_jax.data.sources import DataError
from cnn_jax.errors import BadInput
from cnn_jax.files import write_atomic
from cnn_jax.provenance import hardware, versions
from cnn_jax.train.checkpoint import Checkpointer, Damaged, drop_modules, load_pretrained
from cnn_jax.train.config import TrainConfig, changed_fields
from cnn_jax.train.evaluator import evaluate
from cnn_jax.train.inputs import save_normaliser
from cnn_jax.train.metrics import (ALIASES, OBJECTIVE, REPORTED, STEP_KEYS, MetricsLog, in_words,
                                   params_digest)
from cnn_jax.train.setup import Setup, build
from cnn_jax.train.state import TrainState, initial_variables


class Diverged(BadInput):
    """The loss, or the state about to be saved, is no longer finite: the recipe (a
    learning rate too high, bad data) is at fault, and the last good checkpoint is kept."""


class ConfigMismatch(BadInput):
    """An --out folder holds a run of another configuration."""


def train(cfg: TrainConfig, command: Optional[str] = None,
          on_steps: Optional[Callable[[int], None]] = None) -> dict:
    """Train (or resume, or re-read a finished run) and return results.json's content.
    `on_steps(n)` is called after every compiled call with the steps it took (for an
    outer progress bar)."""
    return train_together([cfg], command, on_steps)[0]


def train_together(cfgs: list[TrainConfig], command: Optional[str] = None,
                   on_steps: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Train runs of one recipe that differ only in their seed at once, one vmapped
    step for all (`seeds_at_once`; on a GPU several small nets fill the chip better than
    one), each with its own data order, augmentation, initialisation, checkpoints, log
    and results in its own folder, exactly the files `train` writes. One configuration
    is `train` itself. Each run computes its own function: the same as trained alone
    up to rounding (batched kernels sum in another order), and a resumed group repeats
    its uninterrupted self bit for bit. `on_steps(n)` counts the steps of all runs."""
    if not cfgs:
        raise ValueError("train_together: no configuration given")
    for cfg in cfgs:
        cfg.validate()
    if len(cfgs) > 1:
        check_together(cfgs)
    for cfg in cfgs:
        check_writable(Path(cfg.run.out))
    command = command or " ".join(sys.argv)
    setup = build(cfgs)                                   # phases 1-3
    runs = [_Run(c) for c in cfgs]
    state, data_iter, step = start(setup, runs, command)  # phase 4
    loop = StepLoop(setup, runs)
    state, step = loop.run(state, data_iter, step, on_steps)  # phase 5
    return write_results(setup, runs, loop, state, step, command)  # phase 6


# ------------------------------------------------------------------ checks
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
        other = c.seedless()
        diff = sorted(k for k in base if base[k] != other[k])
        if diff:
            raise BadInput(f"runs trained together may differ only in seed and --out; "
                           f"{c.run.out} differs from {cfgs[0].run.out} in {', '.join(diff)}")


# ------------------------------------------------------------------ phase 4: the state
class _Run:
    """One run's own part of a training job: its folder, checkpoints, log, last metrics."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.out = cfg, Path(cfg.run.out)
        self.ckpt: Optional[Checkpointer] = None
        self.log: Optional[MetricsLog] = None
        self.wall_before, self.restored_meta = 0.0, {}
        self.last_train: Optional[dict] = None
        self.last_eval: Optional[dict] = None


class _Together:
    """Several runs' grain iterators drawn as one: a list of batches per draw, a list
    of states (each run's checkpoint stores its own)."""

    def __init__(self, iterators):
        self.iterators = iterators

    def __next__(self):
        return [next(it) for it in self.iterators]

    def get_state(self):
        return [it.get_state() for it in self.iterators]

    @property
    def restarts(self) -> int:
        return sum(getattr(it, "restarts", 0) for it in self.iterators)

    def close(self) -> None:
        for it in self.iterators:
            getattr(it, "close", lambda: None)()


def start(setup: Setup, runs: list[_Run], command: str):
    """Every run's state at its latest checkpoint, or at step 0 (from its seed, and
    --init-from's variables); its data iterator where that state left it; its
    config.json and normaliser written. Returns (state, data iterator, step): stacked
    over runs when several train together."""
    for run in runs:  # the first files of each run: nothing was written before this
        run.out.mkdir(parents=True, exist_ok=True)
        run.ckpt = Checkpointer(run.out / "checkpoints", setup.cfg.run.keep_checkpoints)
        run.log = MetricsLog(run.out / "metrics.jsonl")
    starts = {run.ckpt.latest_step() for run in runs}
    if len(starts) > 1:
        raise BadInput(f"runs trained together must resume from the same step; their "
                       f"latest checkpoints are at steps {[r.ckpt.latest_step() for r in runs]} "
                       f"({', '.join(str(r.out) for r in runs)}): train them one by one")
    step = starts.pop()
    make_state = jax.jit(functools.partial(_initial_state, setup), static_argnums=1,
                         out_shardings=setup.sharding())
    pretrained = _pretrained(setup.cfg) if step is None else None  # a resume restores
    states = [make_state(pretrained, run.cfg.run.seed) for run in runs]
    data_iters = [iter(d) for d in setup.datasets]
    if step is not None:
        step, restored = _restore_newest(runs, states)
    for i, run in enumerate(runs):
        if step is not None:
            states[i], data_state = restored[i]
            data_iters[i].set_state(data_state)
        else:
            _refuse_other_results(run)
            if jax.process_index() == 0:
                run.log.truncate_after(0)  # lines of an attempt that died before its first save
        if jax.process_index() == 0:
            _write_config(setup, run, runs, command)
    if not setup.together:
        return states[0], data_iters[0], step or 0
    state = jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                    out_shardings=setup.sharding())(*states)
    return state, _Together(data_iters), step or 0


def _initial_state(setup: Setup, pretrained, seed: int) -> TrainState:
    _, step_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = initial_variables(setup.model, seed, setup.input_shape, pretrained,
                                  setup.cfg.model.init_from)
    return TrainState.create(variables, setup.tx, step_rng)


def _pretrained(cfg: TrainConfig) -> Optional[dict]:
    """--init-from's variables, as host arrays (the same on every process), without
    --init-skip's modules."""
    if not cfg.model.init_from:
        return None
    try:
        variables = jax.device_get(load_pretrained(cfg.model.init_from, cfg.model.name, cfg.model.options))
    except BadInput as e:
        raise BadInput(f"--init-from: {e}") from None
    return drop_modules(variables, cfg.model.init_skip)


def _restore_newest(runs: list[_Run], targets: list) -> tuple[int, list]:
    """(step, [(state, data state) per run]) of the newest checkpoint that every run
    restores. A newer one that does not (damaged files, a copy cut short, other bytes
    than were saved) is named in a warning and set aside into damaged_checkpoints/;
    when none restores, nothing is moved and the run is refused."""
    steps = sorted(set.intersection(*(set(r.ckpt.all_steps()) for r in runs)), reverse=True)
    damaged = []
    for step in steps:
        try:
            restored = [_restore(run, step, t) for run, t in zip(runs, targets)]
        except Damaged as e:
            print(f"warning: checkpoint {e}; trying the one before", file=sys.stderr)
            damaged.append(step)
            continue
        for bad in damaged:
            for run in runs:
                print(f"{run.out / 'checkpoints' / str(bad)} (damaged) moved to "
                      f"{run.ckpt.set_aside(bad)}", file=sys.stderr)
        for run in runs:
            if jax.process_index() == 0:
                run.log.truncate_after(step)
            print(f"resuming {run.out} from step {step}", file=sys.stderr)
        return step, restored
    raise BadInput(f"none of the checkpoints in {runs[0].out / 'checkpoints'} restores "
                   f"(steps {', '.join(map(str, steps))}; see the warnings above). Nothing "
                   f"was moved; use another --out, or move them away to start again")


def _restore(run: _Run, step: int, target):
    """(state, data state) of the run's checkpoint at `step`, refusing a checkpoint of
    another configuration; Damaged (naming it) when it does not restore."""
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
        state, data_state, run.restored_meta = run.ckpt.restore(step, target)
    except Damaged as e:
        raise Damaged(f"{where} does not restore: {e}") from None
    run.wall_before = run.restored_meta.get("wall_s", 0.0)
    return state, data_state


def _refuse_other_results(run: _Run) -> None:
    config_file = run.out / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()).get(
            "config_digest") not in (None, run.cfg.digest()) \
            and (run.out / "results.json").exists():
        raise ConfigMismatch(f"{run.out} holds finished results of a different "
                             f"configuration; use another --out")


def _write_config(setup: Setup, run: _Run, runs: list[_Run], command: str) -> None:
    save_normaliser(run.out, setup.normaliser, setup.train_arrays.image_shape)
    write_atomic(run.out / "config.json", json.dumps(
        {"config": run.cfg.to_json(), "config_digest": run.cfg.digest(),
         "command": command, "versions": versions(), "hardware": hardware(),
         "conv_kernels": setup.conv_kernels,
         **({"trained_together": [r.cfg.run.seed for r in runs]} if setup.together else {})},
        indent=1))


# ------------------------------------------------------------------ phase 5: the steps
@functools.partial(jax.jit, static_argnums=1)
def finite_runs(state, seeds: int):
    """Per run (leading axis when `seeds` runs train together, else one): whether every
    floating-point number of its state is finite. A step's loss is computed before its
    update, so a finite loss does not vouch for the state the update produced."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = [jnp.isfinite(x).reshape(seeds, -1).all(1) if seeds > 1 else
             jnp.isfinite(x).all()[None] for x in leaves]
    return jnp.stack(flags).all(0)


class Stops:
    """Why this process would stop before its next call: a signal it received (SIGTERM,
    a preemption notice; SIGINT) or its input failing (its workers kept dying, a file it
    must refuse). Many processes agree on it before the call: each tells the others its
    reason (one small all-gather per call; a single process asks no one), so all stop
    after the same step, save once together and exit with the same status, and no
    process waits in a collective for one that has left."""

    def __init__(self):
        self.received: Optional[int] = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _handle(self, signum, frame):
        self.received = signum

    def agree(self, failed: Optional[BaseException]) -> np.ndarray:
        """Every process's exit status if it stopped now (0: no reason to), in
        process order: 128 + a signal's number, or 2 for a failed input."""
        mine = 128 + self.received if self.received is not None else (2 if failed else 0)
        if jax.process_count() == 1:
            return np.array([mine])
        return np.asarray(multihost_utils.process_allgather(np.int32(mine))).reshape(-1)


def _reason(status: int) -> str:
    return signal.Signals(status - 128).name if status > 128 else "its input failed"


class PendingMetrics:
    """Per-step metrics ([k] per call, [k, S] when S runs train together) not yet checked
    and logged; a checkpoint carries them, so a resumed run logs exactly the lines an
    uninterrupted one would."""

    KEYS = STEP_KEYS

    def __init__(self, runs: list[_Run], seeds: int, stop: Callable[[], None]):
        self.runs, self.seeds, self.stop = runs, seeds, stop
        self.pending: list = []
        restored = [r.restored_meta.get("unlogged_metrics") or {} for r in runs]
        if restored[0] and len(restored[0][OBJECTIVE]):
            self.pending = [{k: np.stack([np.asarray(u[k], np.float32) for u in restored],
                                         axis=-1) for k in self.KEYS}]

    def add(self, metrics) -> None:
        self.pending.append(metrics)

    def take(self, step: int, keep: bool = True) -> dict:
        """The pending metrics as host arrays [steps, S] (kept pending unless `keep` is
        False); a non-finite loss stops the run, naming the step."""
        host = jax.device_get(self.pending)
        merged = {k: np.concatenate([np.asarray(m[k], np.float32).reshape(-1, self.seeds)
                                     for m in host] + [np.zeros((0, self.seeds), np.float32)])
                  for k in self.KEYS}
        self.pending = [merged] if keep else []
        for i, run in enumerate(self.runs):
            loss = merged[OBJECTIVE]
            bad = np.flatnonzero(~np.isfinite(loss[:, i]))
            if len(bad):
                self.stop()
                raise Diverged(
                    f"loss became {loss[bad[0], i]} at step {step - len(loss) + bad[0] + 1}"
                    f"{f' in {run.out}' if self.seeds > 1 else ''}; stopped without saving. "
                    f"The last good checkpoint in {run.out / 'checkpoints'} is kept (step "
                    f"{run.ckpt.latest_step()}). Lower --lr or check the data.")
        return merged


class StepLoop:
    """Phase 5: compiled calls of up to `steps_per_call` steps, their input prepared on
    a background thread; logging, evaluation and checkpoints on their exact steps; a
    signal saves and stops; any error first lets the checkpoints being written finish."""

    def __init__(self, setup: Setup, runs: list[_Run]):
        self.setup, self.runs, self.cfg = setup, runs, setup.cfg
        self.metrics = PendingMetrics(runs, setup.seeds, self.finish_saves)
        lead = (None,) if setup.together else ()  # [S, B, ...]: a batch per run
        self.step_sharding = setup.sharding(*lead, "data")
        self.chunk_sharding = setup.sharding(None, *lead, "data")  # [k, ...]: k steps
        self.wall_start = time.perf_counter()
        self.window_images, self.window_start = 0, time.perf_counter()
        self.skipped: set = set()  # unreadable files left out (--bad-images skip), this session
        self.input_restarts = 0    # dead input workers replaced, this session
        self.saved_step: Optional[int] = None

    def run(self, state, data_iter, step: int, on_steps=None):
        cfg = self.cfg
        if jax.process_index() == 0 and cfg.run.progress:
            print(f"evaluating on {self.setup.eval_split}: {self.setup.eval_arrays.describe()}",
                  file=sys.stderr)
        self.bar = tqdm(total=cfg.schedule.steps, initial=step, unit="step", dynamic_ncols=True,
                        disable=not cfg.run.progress or jax.process_index() != 0,
                        desc=cfg.model.name + (f" x {self.setup.seeds} seeds"
                                          if self.setup.together else ""))
        try:
            state, step = self.steps(state, data_iter, step, on_steps)
        finally:  # the input's workers and their shared memory, however the loop ends
            self.input_restarts = getattr(data_iter, "restarts", 0)
            getattr(data_iter, "close", lambda: None)()
        self.bar.close()
        for run in self.runs:
            run.ckpt.wait()
        return state, step

    def steps(self, state, data_iter, step: int, on_steps):
        """The compiled calls, each followed by its step's duties (`after_call`). Before
        each call the processes agree whether any must stop (`Stops`): then all save
        the steps this session made and stop together (`stop`)."""
        calls, data_state, first = self.calls(step), data_iter.get_state(), step
        with Stops().installed() as stops, \
                ChunkPrefetcher(data_iter, calls, self.to_device) as chunks, \
                self.finishing_saves_on_error():
            for k in calls:
                try:
                    inputs, next_data_state = next(chunks)
                    failed = None
                except BadInput as e:   # dying workers, a file the input must refuse
                    failed = e
                statuses = stops.agree(failed)
                if statuses.any():
                    self.stop(state, data_state, step, first, statuses, failed)
                state, metrics = self.call(state, inputs)
                step, data_state = step + k, next_data_state
                self.after_call(state, data_state, metrics, step, k, on_steps)
        return state, step

    def after_call(self, state, data_state, metrics, step: int, k: int, on_steps) -> None:
        """Log, evaluate and save on their exact steps; a save that failed stops the
        run here."""
        cfg = self.cfg
        self.metrics.add(metrics)
        self.window_images += k * cfg.optimiser.batch
        self.bar.update(k)
        if on_steps is not None:
            on_steps(k * self.setup.seeds)
        if step % cfg.run.log_every == 0 or step == cfg.schedule.steps:
            self.log_training(step)
        if step % cfg.evaluation.every == 0 or step == cfg.schedule.steps:
            self.log_evaluation(state, step)
        if step % cfg.run.checkpoint_every == 0 or step == cfg.schedule.steps:
            self.save(state, data_state, step)
        for run in self.runs:
            run.ckpt.check()

    def calls(self, step: int) -> list[int]:
        """Steps per compiled call: up to steps_per_call, stopping at every step that
        logs, evaluates or saves."""
        cfg, calls = self.cfg, []
        while step < cfg.schedule.steps:
            boundary = min(cfg.schedule.steps, *(math.floor(step / e + 1) * e for e in
                                        (cfg.run.log_every, cfg.evaluation.every, cfg.run.checkpoint_every)))
            calls.append(min(cfg.run.steps_per_call, boundary - step))
            step += calls[-1]
        return calls

    def call(self, state, inputs):
        if self.cfg.run.steps_per_call == 1:
            state, metrics = self.setup.step_one(state, inputs)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return self.setup.step_many(state, inputs)

    def to_device(self, host_batches):
        """k host batches -> the compiled call's input (runs on the prefetch thread)."""
        keys = training_keys(host_batches[0] if not self.setup.together else host_batches[0][0])
        for draw in host_batches:
            for b in (draw if self.setup.together else [draw]):
                self.skipped.update(b.get(SKIPPED, np.zeros(0, np.int64)).tolist())
        if self.setup.together:  # each draw holds one batch per run: [S, B, ...], stacked below
            host_batches = [{key: [b[key] for b in draw] for key in keys}
                            for draw in host_batches]
        if self.cfg.run.steps_per_call == 1:
            b = host_batches[0]
            return to_global_array({key: np.asarray(b[key]) for key in keys},
                                   self.step_sharding)
        return to_global_array(stack_batches(host_batches, keys), self.chunk_sharding)

    def run_state(self, state, i: int):
        """Run i's own state (unbatched) out of the joint one."""
        return jax.tree.map(lambda x: x[i], state) if self.setup.together else state

    # -------------------------------------------------------------- logging and evaluation
    def log_training(self, step: int) -> None:
        """Log the metrics of the steps since the last log line."""
        m = self.metrics.take(step, keep=False)
        if not len(m[OBJECTIVE]):
            return
        elapsed = time.perf_counter() - self.window_start
        for i, run in enumerate(self.runs):
            run.last_train = {
                "step": step, "epoch": step * self.cfg.optimiser.batch / len(self.setup.train_arrays),
                "lr": float(m["lr"][-1, i]),
                **{f"train_{k}": float(m[k][:, i].mean(dtype=np.float64))
                   for k in STEP_KEYS if k != "lr"},
                "img_per_s": self.window_images / elapsed if elapsed > 0 else None}
            if jax.process_index() == 0:
                run.log.write(run.last_train)
        self.window_images, self.window_start = 0, time.perf_counter()
        shown = self.runs[0].last_train
        self.bar.set_postfix_str(f"{in_words(shown, 'train_')} lr {shown['lr']:.3g}")

    def evaluate(self, state, dataset=None) -> list[dict]:
        """Each run's metrics (and count) on `dataset` (default: the evaluation split),
        single view, by the one evaluator."""
        ev = evaluate(lambda images: self.setup.eval_step(state, images),
                      self.setup.eval_arrays if dataset is None else dataset,
                      batch=self.setup.eval_batch, workers=self.cfg.run.workers,
                      to_device=lambda b: to_global_array(b, self.setup.sharding("data")))
        return ev.metrics

    def log_evaluation(self, state, step: int) -> None:
        split = self.setup.eval_split
        for run, ev in zip(self.runs, self.evaluate(state)):
            run.last_eval = {"step": step, **{f"eval_{k}": v for k, v in ev.items()},
                             "eval_split": split, "eval_images": len(self.setup.eval_arrays)}
            if jax.process_index() == 0:
                run.log.write(run.last_eval)
            seen = (f"train {in_words(run.last_train, 'train_')}  |  " if run.last_train
                    else "")
            seed = f"seed {run.cfg.run.seed}  " if self.setup.together else ""
            # inside a sweep (no bar of its own), lines of runs in parallel interleave
            name = "" if self.cfg.run.progress else f"{run.out.name}  "
            tqdm.write(f"{name}step {step:>7}  {seed}{seen}{split} "
                       f"({run.last_eval['eval_images']:,}) {in_words(run.last_eval, 'eval_')}",
                       file=sys.stderr)

    # -------------------------------------------------------------- checkpoints and stops
    def save(self, state, data_state, step: int) -> None:
        """Every run's checkpoint at `step`, with its metrics not yet logged; a state an
        update made non-finite is not saved."""
        merged = self.metrics.take(step)
        self.saved_step = step
        finite = np.asarray(finite_runs(state, self.setup.seeds))
        for i, run in enumerate(self.runs):
            if not finite[i]:
                self.finish_saves()  # first, so that the message names the last saved step
                raise Diverged(
                    f"the state became non-finite at step {step} (its loss, computed "
                    f"before the update, was still finite)"
                    f"{f' in {run.out}' if self.setup.together else ''}; stopped without "
                    f"saving. The last good checkpoint in {run.out / 'checkpoints'} is kept "
                    f"(step {run.ckpt.latest_step()}). Lower --lr or check the data.")
        for i, run in enumerate(self.runs):
            run.log.flush()
            unlogged = {k: v[:, i].tolist() for k, v in merged.items()}
            run.ckpt.save(step, self.run_state(state, i),
                          data_state[i] if self.setup.together else data_state,
                          {"config_digest": run.cfg.digest(), "config": run.cfg.to_json(),
                           "unlogged_metrics": unlogged,
                           "wall_s": run.wall_before + time.perf_counter() - self.wall_start})

    def finish_saves(self) -> None:
        """Let the checkpoints being written finish: a failure must not lose them."""
        for run in self.runs:
            with contextlib.suppress(Exception):
                run.ckpt.wait()

    @contextlib.contextmanager
    def finishing_saves_on_error(self):
        """On any exception (or SystemExit) inside, `finish_saves()` before it propagates."""
        try:
            yield
        except BaseException:
            self.finish_saves()
            raise

    def stop(self, state, data_state, step: int, first: int, statuses: np.ndarray,
             failed: Optional[BaseException]):
        """Stop every process after `step`, together: save the steps this session made
        (once, by all), then exit with the highest status any process asked for (a
        signal's 128 + n, else 2), each process saying why."""
        if step != first and self.saved_step != step:
            self.save(state, data_state, step)
        self.finish_saves()
        self.bar.close()
        me, status = int(statuses[jax.process_index()]), int(statuses.max())
        others = ", ".join(f"process {i} ({_reason(int(c))})" for i, c in enumerate(statuses)
                           if c and i != jax.process_index())
        resume = (f"re-run the same command{'s on every host' if len(statuses) > 1 else ''} "
                  f"to {f'resume from step {step} (saved)' if step else 'start again'}")
        if status == 2 and failed is not None:   # this process's input: its own words
            raise type(failed)(f"{failed}{f' (and {others})' if others else ''}, then "
                               f"{resume}.") from None
        if status == 2:
            raise BadInput(f"{others} stopped the run (its message says why); every "
                           f"process stopped after step {step}: {resume}.")
        saved = (f"saved step {step} to {', '.join(str(r.out / 'checkpoints') for r in self.runs)}"
                 if step else "stopped before the first step")
        print(f"{_reason(me) + ': ' if me else ''}{saved}"
              f"{f'; stopped for {others}' if others else ''}; {resume}", file=sys.stderr)
        raise SystemExit(status)


# ------------------------------------------------------------------ phase 6: results
def final_evaluations(setup: Setup, runs: list[_Run], loop: StepLoop, state, step: int) -> None:
    """The evaluation at the last step, if the loop did not log one; the test set once
    at the end when selection used a holdout; the training images themselves if asked."""
    cfg = setup.cfg
    if any(r.last_eval is None or r.last_eval["step"] != step for r in runs):
        for run, ev in zip(runs, loop.evaluate(state)):
            run.last_eval = {"step": step, **{f"eval_{k}": v for k, v in ev.items()}}
    if cfg.data.holdout:  # selection used the holdout; the test set is read once, at the end
        try:
            test = open_split(dataclasses.replace(cfg.data_spec(), holdout=0), "test")
        except DataError:  # an ImageFolder of the user's without test/ (or val/) images
            test = None
        if test is not None:
            for run, m in zip(runs, loop.evaluate(state, test)):
                run.last_eval.update({f"final_test_{k}": m[k] for k in REPORTED})
                run.last_eval["final_test_data"] = test.describe()
    if cfg.evaluation.train_set:  # how well the final weights fit the training images themselves
        for run, fit in zip(runs, loop.evaluate(state, setup.train_arrays)):
            run.last_eval.update({f"final_train_set_{k}": fit[k] for k in REPORTED})
            run.last_eval["final_train_set_data"] = setup.train_arrays.describe()


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


def write_results(setup: Setup, runs: list[_Run], loop: StepLoop, state, step: int,
                  command: str) -> list[dict]:
    """Each run's results.json (written atomically) and its content."""
    final_evaluations(setup, runs, loop, state, step)
    cfg, split, out = setup.cfg, setup.eval_split, []
    skipped = files_left_out(loop.skipped)
    restarts = int(multihost_utils.process_allgather(np.array(loop.input_restarts)).sum()) \
        if jax.process_count() > 1 else loop.input_restarts
    for i, run in enumerate(runs):
        own = loop.run_state(state, i)
        train_records = [r for r in run.log.read() if f"train_{OBJECTIVE}" in r]
        last_train = train_records[-1] if train_records else {}
        rates = [r["img_per_s"] for r in train_records if r.get("img_per_s")]
        results = {
            "model": cfg.model.name, "data": cfg.data.name, "params": setup.n_params, "steps": step,
            "seed": run.cfg.run.seed, "batch": cfg.optimiser.batch,
            **{f"final_train_{k}": last_train.get(f"train_{k}") for k in STEP_KEYS if k != "lr"},
            **{f"final_train_{a}": last_train.get(f"train_{k}") for a, k in ALIASES.items()},
            **{f"final_{split}_{k}": run.last_eval[f"eval_{k}"] for k in REPORTED},
            # what the final_<split>_ numbers scored: the split, its folder, its images
            "eval_split": split, "eval_data": setup.eval_arrays.describe(),
            "eval_images": len(setup.eval_arrays),
            **{k: v for k, v in run.last_eval.items() if k.startswith("final_")},
            "final_params_digest": params_digest(own.params),
            "warmup_end": int(jax.device_get(own.warmup_end)) if cfg.schedule.warmup_lr else None,
            "wall_s": run.wall_before + time.perf_counter() - loop.wall_start,
            "img_per_s": float(np.median(rates)) if rates else None,
            **({"trained_together": [r.cfg.run.seed for r in runs]} if setup.together else {}),
            "hardware": hardware(), "versions": versions(), "command": command,
            "conv_kernels": setup.conv_kernels, "config": run.cfg.to_json(),
            **({"skipped_images": skipped} if cfg.data.bad_images == "skip" else {}),
            "input_restarts": restarts,
        }
        if jax.process_index() == 0:
            write_atomic(run.out / "results.json", json.dumps(results, indent=1))
        run.ckpt.close()
        run.log.close()
        out.append(results)
    return out
