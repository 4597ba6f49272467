"""Parameters and multiply-accumulates per layer, traced from the real modules.

`profile(model, (H, W, C))` runs the model's inference forward pass under
`jax.eval_shape` (no arithmetic, no memory) with a flax method interceptor that
records every leaf module call: its path, type, output shape, parameters and MACs.
MACs count the multiplications of convolutions and dense layers (one per weight per
output position, grouped convolutions included); a module with other arithmetic may
define `multiply_accumulates(in_shape, out_shape)`. Batch size is 1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn


@dataclasses.dataclass
class LayerCost:
    path: str
    kind: str
    output_shape: tuple
    params: int
    macs: int


@dataclasses.dataclass
class ModelCost:
    model: str
    input_shape: tuple
    layers: list[LayerCost]
    params: int            # every trainable parameter of the model
    inference_params: int  # those used by the inference pass (the rows' sum)
    macs: int
    state: int             # non-trainable variables (BatchNorm running statistics)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        for row in d["layers"]:
            row["output_shape"] = list(row["output_shape"])
        return d


def layer_macs(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one call of a leaf module, batch included."""
    own = getattr(module, "multiply_accumulates", None)
    if own is not None:
        return int(own(in_shape, out_shape)) * int(in_shape[0])
    if isinstance(module, nn.Conv):
        in_ch = in_shape[-1] // module.feature_group_count
        return int(np.prod(out_shape)) * int(np.prod(module.kernel_size)) * in_ch
    if isinstance(module, nn.Dense):
        return int(np.prod(out_shape)) * int(in_shape[-1])
    return 0


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def profile(model: nn.Module, input_shape: Sequence[int], name: Optional[str] = None,
            **call_kwargs: Any) -> ModelCost:
    """Trace one inference pass of `model` on a [1, *input_shape] batch."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, **call_kwargs), x)

    rows: list[LayerCost] = []
    stack: list[list[bool]] = []  # per open call: [has_children]

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if stack:
            stack[-1][0] = True
        stack.append([False])
        out = next_fun(*args, **kwargs)
        has_children = stack.pop()[0]
        module = context.module
        if not has_children and args and hasattr(args[0], "shape") and hasattr(out, "shape"):
            own = module.variables.get("params", {})
            rows.append(LayerCost("/".join(module.path) or type(module).__name__,
                                  type(module).__name__, tuple(out.shape[1:]), _count(own),
                                  layer_macs(module, args[0].shape, out.shape)))
        return out

    def forward(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, **call_kwargs)

    jax.eval_shape(forward, variables, x)
    params = _count(variables.get("params", {}))
    state = _count({k: v for k, v in variables.items() if k != "params"})
    return ModelCost(name or type(model).__name__, tuple(input_shape), rows, params,
                     sum(r.params for r in rows), sum(r.macs for r in rows), state)


def format_table(cost: ModelCost) -> str:
    """A readable per-layer table with totals."""
    header = f"{'layer':<40} {'type':<18} {'output':>16} {'params':>12} {'MACs':>16}"
    lines = [f"{cost.model}  input {'x'.join(map(str, cost.input_shape))}", header,
             "-" * len(header)]
    for r in cost.layers:
        shape = "x".join(map(str, r.output_shape))
        lines.append(f"{r.path[:40]:<40} {r.kind[:18]:<18} {shape:>16} {r.params:>12,} "
                     f"{r.macs:>16,}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<40} {'':<18} {'':>16} {cost.inference_params:>12,} "
                 f"{cost.macs:>16,}")
    if cost.params != cost.inference_params:
        lines.append(f"trainable parameters: {cost.params:,} (of which "
                     f"{cost.params - cost.inference_params:,} only in training-time heads)")
    else:
        lines.append(f"trainable parameters: {cost.params:,}")
    if cost.state:
        lines.append(f"non-trainable state (BatchNorm statistics): {cost.state:,}")
    lines.append(f"multiply-accumulates: {cost.macs:,} ({cost.macs / 1e9:.3f} G)")
    return "\n".join(lines)
