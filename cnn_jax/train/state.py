"""The train state: everything a step needs and a checkpoint keeps, as arrays only."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from cnn_jax.train.checkpoint import merge_variables
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


def initial_variables(model, seed: int, input_shape: tuple, pretrained: Optional[dict] = None,
                      source: str = "") -> dict:
    """A run's variables at step 0: the model's init from the run's seed, with every
    variable that `pretrained` holds under the same name taken from it (--init-from)."""
    init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    example = jnp.zeros((1, *input_shape), jnp.float32)
    # compiled (as inside the training loop's own jit): op-by-op init is slow on CPU
    variables = jax.jit(model.init)({"params": init_rng, "dropout": init_rng}, example)
    if pretrained is not None:
        variables = {**variables, **merge_variables(variables, pretrained, source)}
    return variables
