"""The train state: everything a step needs and a checkpoint keeps, as arrays only."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from cnn_jax.train.schedules import NEVER


class TrainState(struct.PyTreeNode):
    step: jax.Array         # int32 scalar: steps taken
    params: Any
    batch_stats: Any        # BatchNorm running statistics ({} for nets without BN)
    opt_state: Any
    rng: jax.Array          # uint32[2] raw key; step t uses fold_in(rng, t)
    warmup_end: jax.Array   # int32: step the warm-up ended at (NEVER while it lasts)

    @classmethod
    def create(cls, variables, tx, rng) -> "TrainState":
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                   rng=rng, warmup_end=jnp.asarray(NEVER, jnp.int32))
