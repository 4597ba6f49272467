"""Phase 4 of a training job: where the step loop begins. Each run's state from its
seed (and --init-from's variables) or from its newest checkpoint, the runs stacked [S,
...]; their input where that state left it; their config.json and normaliser written.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax

from cnn_jax.errors import BadInput
from cnn_jax.train.checkpoint import drop_modules, load_pretrained
from cnn_jax.train.config import TrainConfig
from cnn_jax.train.runs import Runs, stack_states
from cnn_jax.train.setup import Setup
from cnn_jax.train.state import TrainState, initial_variables


class RunsInput:
    """The runs' grain iterators drawn as one: a list of batches per draw (one per run),
    a list of input positions (each run's checkpoint stores its own)."""

    def __init__(self, iterators):
        self.iterators = iterators

    def __next__(self):
        return [next(it) for it in self.iterators]

    def get_state(self) -> list:
        return [it.get_state() for it in self.iterators]

    def set_state(self, states: list) -> None:
        for it, s in zip(self.iterators, states):
            it.set_state(s)

    @property
    def restarts(self) -> int:
        return sum(getattr(it, "restarts", 0) for it in self.iterators)

    def close(self) -> None:
        for it in self.iterators:
            getattr(it, "close", lambda: None)()


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the step loop begins: the runs' stacked state, their input, the step, the
    metrics not yet logged ([k, S]) and each run's wall time before this session."""
    state: object
    data: RunsInput
    step: int
    unlogged: dict
    walls: list


def start(setup: Setup, runs: Runs, command: str) -> Start:
    """Every run's state at its newest checkpoint, or at step 0 (from its seed, and
    --init-from's variables); its input where that state left it; its config.json and
    normaliser written."""
    step = runs.resume_step()
    make_state = jax.jit(functools.partial(_initial_state, setup), static_argnums=1,
                         out_shardings=setup.sharding())
    pretrained = _pretrained(setup.cfg) if step is None else None  # a resume restores
    states = [make_state(pretrained, run.cfg.run.seed) for run in runs]
    data = RunsInput([iter(d) for d in setup.datasets])
    if step is None:
        runs.start_fresh()
        begun = Start(stack_states(states, setup.sharding()), data, 0, {}, [0.0] * len(runs))
    else:
        restored = runs.restore(states, lambda s: stack_states(s, setup.sharding()))
        data.set_state(restored.data_states)
        begun = Start(restored.state, data, restored.step, restored.unlogged, restored.walls)
    runs.write_configs(setup.normaliser, setup.train_arrays.image_shape, setup.conv_kernels,
                       command)
    return begun


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
        variables = jax.device_get(load_pretrained(cfg.model.init_from, cfg.model.name,
                                                   cfg.model.options))
    except BadInput as e:
        raise BadInput(f"--init-from: {e}") from None
    return drop_modules(variables, cfg.model.init_skip)
