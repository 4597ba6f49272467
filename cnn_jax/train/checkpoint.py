"""Orbax checkpoints: the train state, the data iterator's state and run metadata.

Saves are asynchronous (the device-to-host copy blocks, the writing does not) and
atomic (orbax writes into a temporary folder and renames it); `wait()` before exit.
Restoring onto a target whose arrays carry the current mesh's shardings lets a
checkpoint written on 8 devices load on 1 and the reverse. Many hosts: every process
saves and restores together (orbax coordinates them; --out must be a filesystem they
all see), and the data item holds every process's iterator state.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging as absl_logging
from flax import traverse_util

from cnn_jax.errors import BadInput
from cnn_jax.models.convert import WEIGHT_SUFFIXES, load_torch_weights
from cnn_jax.train.config import covers, module_names


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Every process calls this at the same step; the data item holds every
        process's iterator state (`every_process`)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(every_process(data_state)),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, target) -> tuple[Any, dict, dict]:
        """`target`: the state (or its abstract shapes) with the wanted shardings."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        data = own_state(out["data"], Path(self.manager.directory) / str(step))
        return out["state"], data, out["meta"]

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ------------------------------------------------------------------ the data iterators
PROCESSES = "processes"  # a many-host checkpoint's data item: {PROCESSES: [state, ...]}


def every_process(data_state: dict) -> dict:
    """This process's data iterator state, or on many hosts every process's, gathered
    (process 0 writes the checkpoint's JSON items)."""
    if jax.process_count() == 1:
        return data_state
    raw = np.frombuffer(json.dumps(data_state, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size])).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return {PROCESSES: [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]}


def own_state(saved: dict, where: Path) -> dict:
    """This process's data iterator state in a checkpoint's data item. Each process
    keeps its rows of the one global order, so the processes' positions agree and a
    run may resume on another number of processes; positions that disagree are
    refused."""
    if PROCESSES not in saved:
        return saved
    states = saved[PROCESSES]
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    if any(s != states[0] for s in states):
        raise BadInput(f"{where}: written by {len(states)} processes whose data positions "
                       f"differ; resume it with {len(states)} processes")
    return states[0]


def saved_step(run_dir: Path) -> Optional[int]:
    """The step of a run's latest finished checkpoint, None if it has none (reads only:
    creates nothing)."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(directory.absolute(), item_names=("state", "data", "meta"))
    try:
        return manager.latest_step()
    finally:
        manager.close()


def load_variables(run_dir: Path, step: Optional[int] = None) -> dict:
    """{'params', 'batch_stats'} of a run's checkpoint (latest by default) as host
    arrays, for evaluation and comparison without rebuilding the train state."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise BadInput(f"{run_dir}: no checkpoints folder (expected the --out "
                       f"directory of a training run)")
    step = saved_step(run_dir) if step is None else step
    if step is None:
        raise BadInput(f"{directory}: holds no finished checkpoint")
    # a target on this process's first device, so a checkpoint written on any number
    # of devices loads here
    path = directory.absolute() / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    # reading one item of a composite checkpoint directly: orbax warns that the
    # composite's own metadata file is not in the item's folder, which is expected
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        shapes = checkpointer.metadata(path).item_metadata
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                              dict(shapes))
        state = checkpointer.restore(path, target)
    finally:
        absl_logging.set_verbosity(level)
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


def load_pretrained(source: str, model: str, options: dict) -> dict:
    """{'params', 'batch_stats'} to start a run of `model` from: a run's latest
    checkpoint, or a PyTorch weights file converted to our layout. A file converts into
    the architecture it holds (detected from its keys, e.g. resnet20), whose variables
    the run then takes by name: a grown net (extra_blocks) keeps its new blocks' own."""
    path = Path(source)
    if path.suffix not in WEIGHT_SUFFIXES:
        return load_variables(path)
    name, detected, variables = load_torch_weights(path)
    if name != model or any(options.get(k, v) != v for k, v in detected.items()):
        return load_torch_weights(path, model, options)[2]  # as asked, or names the mismatch
    return variables


def drop_modules(variables: dict, names: str) -> dict:
    """`variables` without the top-level modules in the comma-separated `names` (a
    name covers its numbered parts: 'conv5' drops 'conv5_1', 'conv5_2', ...)."""
    skip = module_names(names)
    return {col: {k: v for k, v in tree.items() if not covers(skip, k)}
            for col, tree in variables.items()}


def merge_variables(fresh: dict, loaded: dict, source: str) -> dict:
    """`fresh` (a model's initial variables) with every array that `loaded` holds under
    the same name taken from `loaded`: a trained net's variables inside a grown one.
    A name present in both with different shapes is an error, as is no name shared."""
    flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
    flat_loaded = traverse_util.flatten_dict(
        {k: v for k, v in loaded.items() if k in fresh}, sep="/")
    taken = 0
    for key, value in flat_loaded.items():
        if key not in flat_fresh:
            continue
        if tuple(flat_fresh[key].shape) != tuple(value.shape):
            raise BadInput(f"--init-from {source}: {key} has shape {tuple(value.shape)} "
                           f"there but {tuple(flat_fresh[key].shape)} in this model")
        flat_fresh[key] = value.astype(flat_fresh[key].dtype)
        taken += 1
    if not taken:
        raise BadInput(f"--init-from {source}: none of its variables' names occur in "
                       f"this model (a different architecture?)")
    return traverse_util.unflatten_dict(flat_fresh, sep="/")
