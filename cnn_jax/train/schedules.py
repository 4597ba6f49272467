"""Learning-rate schedules as pure functions of the step (jit-friendly).

He et al. 2015, Sec. 4.2: "We start with a learning rate of 0.1, divide it by 10 at
32k and 48k iterations, and terminate training at 64k iterations" (batch 128). For
ResNet-110: "we use 0.01 to warm up the training until the training error is below
80% (about 400 iterations), and then go back to 0.1". The warm-up's end is a state
variable (`warmup_end`, the step at which the error first fell below the threshold),
so the schedule stays a pure function.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import optax

from cnn_jax.errors import BadInput

NEVER = 2**31 - 1  # warmup_end before the switch


def paper(base_lr: float, milestones: Sequence[int] = (32_000, 48_000), factor: float = 0.1):
    """0.1 -> 0.01 at 32k -> 0.001 at 48k: the lr for a step counted from 0."""
    def lr(step):
        drops = sum(jnp.asarray(step) >= m for m in milestones)
        return base_lr * factor ** drops
    return lr


def make_schedule(name: str, base_lr: float, steps: int,
                  milestones: Sequence[int] = (32_000, 48_000)):
    if name == "paper":
        return paper(base_lr, milestones)
    if name == "constant":
        return lambda step: jnp.asarray(base_lr, jnp.float32)
    if name == "cosine":
        return optax.cosine_decay_schedule(base_lr, steps)
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(steps, base_lr)
    raise BadInput(f"unknown schedule {name!r}")


def linear_warmup(schedule, steps: int):
    """The schedule scaled by (t + 1) / steps over its first `steps` steps (Goyal et al.
    2017's gradual warm-up), unchanged after; `steps=0`: unchanged."""
    if not steps:
        return schedule
    return lambda step: schedule(step) * jnp.minimum(1.0, (jnp.asarray(step) + 1) / steps)


def with_warmup(schedule, warmup_lr: float):
    """`warmup_lr` until `warmup_end`, then the schedule (He et al.'s ResNet-110 trick)."""
    if not warmup_lr:
        return lambda step, warmup_end: schedule(step)
    return lambda step, warmup_end: jnp.where(step < warmup_end, warmup_lr, schedule(step))


def of(sched):
    """The learning rate of a recipe's schedule section (cnn_jax.train.config's): a
    function of the step and the warm-up's end."""
    return with_warmup(linear_warmup(make_schedule(sched.kind, sched.lr, sched.steps,
                                                   sched.milestones), sched.warmup_steps),
                       sched.warmup_lr)
