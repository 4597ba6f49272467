"""`train(config)`: from a model name, a dataset and a recipe to a trained network,
on one CPU, one GPU, many devices or many hosts, resumable to the bit;
`train_together(configs)`: several seeds of one recipe in one vmapped step.

Phases: setup (mesh -> input -> model and compiled steps: cnn_jax.train.setup) ->
start (each run's state from its seed or its newest checkpoint, `start`) -> the step
loop (`StepLoop`: compiled calls, logging, the declared evaluations, checkpoints, stops
agreed by every process) -> results (cnn_jax.train.results). The runs trained at once
are one state (stacked [S, ...] when S > 1): only the compiled step (its input and
output) and the checkpoint writer (cnn_jax.train.runs) look inside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cnn_jax.data.dataset import open_split
from cnn_jax.data.keys import SKIPPED
from cnn_jax.data.pipeline import ChunkPrefetcher, to_global_array
from cnn_jax.data.sources import MissingSplit
from cnn_jax.errors import BadInput
from cnn_jax.train.config import Evaluation, TrainConfig, evaluations
from cnn_jax.train.evaluator import evaluate
from cnn_jax.train.metrics import OBJECTIVE, STEP_KEYS, in_words
from cnn_jax.train.results import final_keys, write_results
from cnn_jax.train.runs import (ConfigMismatch, Runs, check_together,  # noqa: F401
                                check_writable)
from cnn_jax.train.setup import TRAIN_SET, Setup, build
from cnn_jax.train.start import Start, start
from cnn_jax.train.stops import Stops, halt


class Diverged(BadInput):
    """The loss, or the state about to be saved, is no longer finite: the recipe (a
    learning rate too high, bad data) is at fault, and the last good checkpoint is kept."""


def train(cfg: TrainConfig, command: Optional[str] = None,
          on_steps: Optional[Callable[[int], None]] = None) -> dict:
    """Train (or resume, or re-read a finished run) and return results.json's content.
    `on_steps(n)` is called after every compiled call with the steps it took (for an
    outer progress bar)."""
    return train_together([cfg], command, on_steps)[0]


def train_together(cfgs: list[TrainConfig], command: Optional[str] = None,
                   on_steps: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Train runs of one recipe that differ only in their seed at once, one vmapped
    step for all (on a GPU several small nets fill the chip better than one), each with
    its own data order, augmentation, initialisation, checkpoints, log and results in
    its own folder, exactly the files `train` writes. One configuration is `train`
    itself. Each run computes its own function: the same as trained alone up to
    rounding, and a resumed group repeats its uninterrupted self bit for bit."""
    if not cfgs:
        raise ValueError("train_together: no configuration given")
    for cfg in cfgs:
        cfg.validate()
    check_together(cfgs)
    for cfg in cfgs:
        check_writable(Path(cfg.run.out))
    command = command or " ".join(sys.argv)
    setup = build(cfgs)                                   # phases 1-3
    runs = Runs(cfgs)
    loop = StepLoop(setup, runs, start(setup, runs, command))   # phase 4
    state, step = loop.run(on_steps)                      # phase 5
    return write_results(setup, runs, loop, state, step, command)   # phase 6


# ------------------------------------------------------------------ phase 5: the steps
@functools.partial(jax.jit, static_argnums=1)
def finite_runs(state, seeds: int):
    """Per run: whether every floating-point number of its state is finite. A step's
    loss is computed before its update, so a finite loss does not vouch for the state
    the update produced."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.isfinite(x).reshape(seeds, -1).all(1) for x in leaves]).all(0)


class StepLoop:
    """Phase 5: compiled calls of up to `steps_per_call` steps, their input prepared on
    a background thread; logging, the declared evaluations and checkpoints on their
    exact steps; a stop agreed by every process saves and exits; any error first lets
    the checkpoints being written finish."""

    def __init__(self, setup: Setup, runs: Runs, begun: Start):
        self.setup, self.runs, self.cfg = setup, runs, setup.cfg
        self.state, self.step, self.data, self.walls = begun.state, begun.step, begun.data, \
            begun.walls
        self.unlogged = [begun.unlogged] if begun.unlogged else []  # [k, S] per call
        self.evaluations = evaluations(self.cfg, setup.eval_split)
        self.datasets = {setup.eval_split: setup.eval_arrays, TRAIN_SET: setup.train_arrays}
        self.last = {e.name: [None] * len(runs) for e in self.evaluations}  # (step, metrics)
        self.wall_start = self.window_start = time.perf_counter()
        self.window_images, self.saved_step = 0, None
        self.skipped: set = set()  # unreadable files left out (--bad-images skip), this session
        self.input_restarts = 0    # dead input workers replaced, this session

    def run(self, on_steps=None):
        cfg = self.cfg
        if jax.process_index() == 0 and cfg.run.progress:
            print(f"evaluating on {self.setup.eval_split}: {self.setup.eval_arrays.describe()}",
                  file=sys.stderr)
        self.bar = tqdm(total=cfg.schedule.steps, initial=self.step, unit="step",
                        dynamic_ncols=True, desc=cfg.model.name + (
                            f" x {len(self.runs)} seeds" if len(self.runs) > 1 else ""),
                        disable=not cfg.run.progress or jax.process_index() != 0)
        try:
            self.steps(on_steps)
        finally:  # the input's workers and their shared memory, however the loop ends
            self.input_restarts = self.data.restarts
            self.data.close()
        self.bar.close()
        self.runs.wait()
        return self.state, self.step

    def steps(self, on_steps) -> None:
        """The compiled calls, each followed by its step's duties (`after_call`). Before
        each call the processes agree whether any must stop (cnn_jax.train.stops)."""
        calls, data_state, first = self.calls(self.step), self.data.get_state(), self.step
        with Stops().installed() as stops, \
                ChunkPrefetcher(self.data, calls, self.to_device) as chunks, \
                self.finishing_saves_on_error():
            for k in calls:
                try:
                    inputs, next_data_state = next(chunks)
                    failed = None
                except BadInput as e:   # dying workers, a file the input must refuse
                    failed = e
                statuses = stops.agree(failed)
                if statuses.any():
                    self.stop(data_state, first, statuses, failed)
                self.state, metrics = self.call(inputs, k)
                self.step, data_state = self.step + k, next_data_state
                self.after_call(data_state, metrics, k, on_steps)

    def after_call(self, data_state, metrics, k: int, on_steps) -> None:
        """Log, evaluate and save on their exact steps; a failed save stops the run."""
        cfg, step = self.cfg, self.step
        self.unlogged.append(metrics)
        self.window_images += k * cfg.optimiser.batch
        self.bar.update(k)
        if on_steps is not None:
            on_steps(k * len(self.runs))
        last = step == cfg.schedule.steps
        if step % cfg.run.log_every == 0 or last:
            self.log_training()
        for e in self.evaluations:
            if e.every and (step % e.every == 0 or last):
                self.log_evaluation(e)
        if step % cfg.run.checkpoint_every == 0 or last:
            self.save(data_state)
        self.runs.check()

    def calls(self, step: int) -> list[int]:
        """Steps per compiled call: up to steps_per_call, stopping at every step that
        logs, evaluates or saves."""
        cfg, calls = self.cfg, []
        every = [cfg.run.log_every, cfg.run.checkpoint_every,
                 *(e.every for e in self.evaluations if e.every)]
        while step < cfg.schedule.steps:
            boundary = min(cfg.schedule.steps, *(math.floor(step / e + 1) * e for e in every))
            calls.append(min(cfg.run.steps_per_call, boundary - step))
            step += calls[-1]
        return calls

    def call(self, inputs, k: int):
        """One compiled call; its metrics ([k] or [k, S] per key)."""
        if self.cfg.run.steps_per_call == 1:
            state, metrics = self.setup.step_one(self.state, inputs)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return self.setup.step_many(self.state, inputs)

    def to_device(self, draws):
        """k draws (each a list of one batch per run) -> the compiled call's input (runs
        on the prefetch thread); the unreadable files left out, counted."""
        for draw in draws:
            for b in draw:
                self.skipped.update(b.get(SKIPPED, np.zeros(0, np.int64)).tolist())
        return self.setup.put(draws)

    # -------------------------------------------------------------- logging and evaluation
    def take_unlogged(self, keep: bool = True) -> dict:
        """The metrics not yet logged as host arrays [steps, S] (kept unless `keep` is
        False); a non-finite loss stops the run, naming the step."""
        host = jax.device_get(self.unlogged)
        merged = {k: np.concatenate([np.asarray(m[k], np.float32).reshape(-1, len(self.runs))
                                     for m in host] + [np.zeros((0, len(self.runs)), np.float32)])
                  for k in STEP_KEYS}
        self.unlogged = [merged] if keep else []
        bad = np.argwhere(~np.isfinite(merged[OBJECTIVE]))
        if len(bad):
            (row, i), run = bad[0], self.runs.runs[bad[0][1]]
            self.finish_saves()
            raise Diverged(
                f"loss became {merged[OBJECTIVE][row, i]} at step "
                f"{self.step - len(merged[OBJECTIVE]) + row + 1}"
                f"{f' in {run.out}' if len(self.runs) > 1 else ''}; stopped without saving. "
                f"The last good checkpoint in {run.out / 'checkpoints'} is kept (step "
                f"{run.ckpt.latest_step()}). Lower --lr or check the data.")
        return merged

    def log_training(self) -> None:
        """Log the metrics of the steps since the last log line."""
        m = self.take_unlogged(keep=False)
        if not len(m[OBJECTIVE]):
            return
        elapsed = time.perf_counter() - self.window_start
        for i, run in enumerate(self.runs):
            record = {"step": self.step,
                      "epoch": self.step * self.cfg.optimiser.batch / len(self.setup.train_arrays),
                      "lr": float(m["lr"][-1, i]),
                      **{f"train_{k}": float(m[k][:, i].mean(dtype=np.float64))
                         for k in STEP_KEYS if k != "lr"},
                      "img_per_s": self.window_images / elapsed if elapsed > 0 else None}
            if jax.process_index() == 0:
                run.log.write(record)
            if i == 0:
                self.bar.set_postfix_str(f"{in_words(record, 'train_')} lr {record['lr']:.3g}")
        self.window_images, self.window_start = 0, time.perf_counter()

    def dataset(self, e: Evaluation):
        """The split an evaluation scores (opened when first asked for); None where the
        dataset has none (a holdout run's test set on a folder without test/)."""
        if e.split not in self.datasets:
            spec = self.cfg.data_spec()
            if e.split == "test" and spec.holdout:   # selection used the holdout
                spec = dataclasses.replace(spec, holdout=0)
            try:
                self.datasets[e.split] = open_split(spec, e.split, spec.eval_subset)
            except MissingSplit:
                self.datasets[e.split] = None
        return self.datasets[e.split]

    def evaluate(self, e: Evaluation) -> Optional[list]:
        """Each run's metrics of evaluation `e` (the one evaluator), or None."""
        dataset = self.dataset(e)
        if dataset is None:
            return None
        return evaluate(lambda images: self.setup.eval_step(self.state, images), dataset,
                        views=e.views, batch=self.setup.eval_batch,
                        workers=self.cfg.run.workers,
                        to_device=lambda b: to_global_array(b, self.setup.sharding("data"))
                        ).metrics

    def log_evaluation(self, e: Evaluation) -> None:
        found = self.evaluate(e)
        if found is None:
            return
        images = len(self.dataset(e))
        for i, (run, m) in enumerate(zip(self.runs, found)):
            self.last[e.name][i] = (self.step, m)
            record = {"step": self.step, **{f"eval_{k}": v for k, v in m.items()},
                      "eval_split": e.split, "eval_images": images} if e.main else \
                {"step": self.step, **{f"{e.name}_{k}": v for k, v in m.items()},
                 f"{e.name}_images": images}
            if jax.process_index() == 0:
                run.log.write(record)
            seed = f"seed {run.cfg.run.seed}  " if len(self.runs) > 1 else ""
            # inside a sweep (no bar of its own), lines of runs in parallel interleave
            name = "" if self.cfg.run.progress else f"{run.out.name}  "
            tqdm.write(f"{name}step {self.step:>7}  {seed}{e.name} ({images:,}) "
                       f"{in_words({f'x_{k}': v for k, v in m.items()}, 'x_')}", file=sys.stderr)

    def finals(self, state, step: int) -> list[dict]:
        """Each run's results.json keys of every declared evaluation at the last step:
        those not run at it yet (the end-only ones, a main one off its cadence) now."""
        out = [{} for _ in self.runs]
        for e in self.evaluations:
            if any(last is None or last[0] != step for last in self.last[e.name]):
                found = self.evaluate(e)
                if found is None:
                    continue
                self.last[e.name] = [(step, m) for m in found]
            for i, (_, m) in enumerate(self.last[e.name]):
                out[i].update(final_keys(e.split if e.main else e.name, m, self.dataset(e),
                                         e.main))
        return out

    # -------------------------------------------------------------- checkpoints and stops
    def save(self, data_state) -> None:
        """Every run's checkpoint at this step, with its metrics not yet logged; a state
        an update made non-finite is not saved."""
        unlogged = self.take_unlogged()
        self.saved_step = self.step
        finite = np.asarray(finite_runs(self.state, len(self.runs)))
        for i, run in enumerate(self.runs):
            if not finite[i]:
                self.finish_saves()  # first, so that the message names the last saved step
                raise Diverged(
                    f"the state became non-finite at step {self.step} (its loss, computed "
                    f"before the update, was still finite)"
                    f"{f' in {run.out}' if len(self.runs) > 1 else ''}; stopped without "
                    f"saving. The last good checkpoint in {run.out / 'checkpoints'} is kept "
                    f"(step {run.ckpt.latest_step()}). Lower --lr or check the data.")
        walls = [w + time.perf_counter() - self.wall_start for w in self.walls]
        self.runs.save(self.step, self.state, data_state, unlogged, walls)

    def finish_saves(self) -> None:
        """Let the checkpoints being written finish: a failure must not lose them."""
        with contextlib.suppress(Exception):
            self.runs.wait()

    @contextlib.contextmanager
    def finishing_saves_on_error(self):
        """On any exception (or SystemExit) inside, `finish_saves()` before it propagates."""
        try:
            yield
        except BaseException:
            self.finish_saves()
            raise

    def stop(self, data_state, first: int, statuses: np.ndarray,
             failed: Optional[BaseException]):
        """Stop every process after this step, together: save the steps this session made
        (once, by all), then exit with the highest status any process asked for (a
        signal's 128 + n, else 2), each process saying why."""
        step = self.step
        if step != first and self.saved_step != step:
            self.save(data_state)
        self.finish_saves()
        self.bar.close()
        halt(statuses, step, failed, [r.out / 'checkpoints' for r in self.runs])
