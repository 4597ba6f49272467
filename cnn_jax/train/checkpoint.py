"""Orbax checkpoints: the train state, the data iterator's state and run metadata.

Saves are asynchronous (the device-to-host copy blocks, the writing does not) and
atomic (orbax writes into a temporary folder and renames it); `wait()` before exit.
A save that fails (a full disk, a read-only folder) raises CheckpointWriteFailed at
the next `check()`, naming the folder and the cause, and leaves the previous
checkpoints as they were. Each checkpoint carries the digest of its state, so a
restore that reads damaged files, or silently different bytes, is refused (`Damaged`)
and the caller can fall back to an older one (`set_aside`).
Restoring onto a target whose arrays carry the current mesh's shardings lets a
checkpoint written on 8 devices load on 1 and the reverse. Many hosts: every process
saves and restores together (orbax coordinates them; --out must be a filesystem they
all see), and the data item holds every process's iterator state.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging as absl_logging
from flax import traverse_util

from cnn_jax.errors import BadInput
from cnn_jax.files import DISK_ERRORS, WriteFailed
from cnn_jax.models.convert import WEIGHT_SUFFIXES, load_torch_weights
from cnn_jax.train.config import covers, module_names
from cnn_jax.train.metrics import params_digest

DAMAGED = "damaged_checkpoints"   # beside checkpoints/: those set aside, kept for a look
# what a failed write says, for the one line that reports it
_CAUSES = re.compile(r"No space left on device|Read-only file system|Disk quota exceeded|"
                     r"Permission denied")


class CheckpointWriteFailed(WriteFailed):
    """A checkpoint could not be written; the previous ones are kept."""


class Damaged(Exception):
    """A checkpoint that does not restore, or restores other bytes than were saved."""


class _QuietSaveErrors(logging.Filter):
    """orbax logs a failed save's error from each of its threads (and asyncio each of
    its unawaited writes: "Future exception was never retrieved", with the disk's
    OSError), tracebacks and all; the checkpointer reports it once
    (CheckpointWriteFailed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        error = record.exc_info[1] if record.exc_info else None
        disk = isinstance(error, OSError) and error.errno in DISK_ERRORS
        return not (disk or "/orbax/" in record.pathname or "/orbax/" in record.getMessage())


def _quiet_closed_loops(hook):
    """After a failed save orbax closes its event loop while tensorstore still
    completes the other writes; their callbacks then raise 'Event loop is closed' as
    unraisable exceptions, noise after the one error the checkpointer reports."""
    def quiet(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)
    quiet.quiets_closed_loops = True
    return quiet


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 3):
        # a save cut short leaves a temporary folder: removed when the run starts again
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))
        self.saving: Optional[int] = None   # the step of the last save asked for
        for logger in map(logging.getLogger, ("absl", "asyncio")):
            if not any(isinstance(f, _QuietSaveErrors) for f in logger.filters):
                logger.addFilter(_QuietSaveErrors())
        if not getattr(sys.unraisablehook, "quiets_closed_loops", False):
            sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Every process calls this at the same step; the data item holds every
        process's iterator state (`every_process`), the meta item the state's digest."""
        self.saving = step
        meta = {**meta, "state_digest": params_digest(state)}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(every_process(data_state)),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            raise self._failed(e) from None

    def check(self) -> None:
        """Raise CheckpointWriteFailed if a save in the background has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failed(e) from None

    def _failed(self, e: Exception) -> CheckpointWriteFailed:
        chain, cause = [], e
        while cause is not None:
            chain.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        known = _CAUSES.search(" ".join(chain))
        why = known.group(0) if known else f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        self.manager.reload()
        kept = self.manager.latest_step()
        return CheckpointWriteFailed(
            f"cannot write the checkpoint of step {self.saving} to {self.directory}: {why}. "
            f"The previous checkpoint ({f'step {kept}' if kept is not None else 'none'}) "
            f"is kept; free space (or make the folder writable), then re-run the same "
            f"command to resume.")

    def restore(self, step: int, target) -> tuple[Any, dict, dict]:
        """`target`: the state (or its abstract shapes) with the wanted shardings.
        Raises Damaged when the files do not restore or give other bytes than were
        saved (the digest saved with them; checkpoints from before it are trusted)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise Damaged(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        saved = out["meta"].get("state_digest")
        if saved is not None and params_digest(out["state"]) != saved:
            raise Damaged("its arrays differ from those saved (the digest stored with "
                          "them does not match)")
        data = own_state(out["data"], self.directory / str(step))
        return out["state"], data, out["meta"]

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise Damaged(f"its metadata does not read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from e

    def set_aside(self, step: int) -> Path:
        """Move a damaged checkpoint out of orbax's sight, into damaged_checkpoints/
        beside the checkpoints (process 0 moves; every process then rereads)."""
        where = self.directory.parent / DAMAGED / str(step)
        if jax.process_index() == 0:
            n = 1
            while where.exists():
                where, n = where.with_name(f"{step}.{n}"), n + 1
            where.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(where))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"cnn_jax set aside {step}")
        self.manager.reload()
        return where

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from None

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
