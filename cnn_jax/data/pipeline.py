"""The grain pipeline: shuffled, augmented batches on host CPUs, sharded onto devices.

Training order. A grain `MapDataset` of example *indices* is shuffled (reseeded every
epoch from the seed), repeated, and batched; each batch of indices is then made by
the dataset's ops (cnn_jax.data.dataset: a vectorised gather and augmentation of
decoded arrays, or images decoded and cut one by one), in `workers` processes that
run ahead of the device. The random choices
depend only on (seed, epoch, example index), and the iterator's state is grain's own
(`get_state` / `set_state`), so a resumed run sees exactly the batches it would have.

Multi-host. Every process builds the same global order and keeps its own slice of
each global batch (`process_index` of `process_count`); `to_global_array` assembles
the global array over the mesh's data axis.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import multiprocessing
import os
import queue
import re
import secrets
import signal
import sys
import threading
from multiprocessing import shared_memory
from typing import Iterator, Optional

import grain
import numpy as np
from absl import flags

from cnn_jax.data.dataset import Dataset
from cnn_jax.data.keys import EPOCH, INDEX, MASK, PADDING, SHIFT, SKIPPED, TRAINING
from cnn_jax.errors import BadInput


def default_workers() -> int:
    """Leave one CPU for the training process; none on a 1-2 core machine, where
    worker processes cost more than they bring. CPUs: those this process may use."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return 0 if n <= 2 else min(n - 1, 16)


def _ensure_absl_flags():
    # grain reads absl flags in its worker processes; scripts that do not use absl
    # would otherwise fail with UnparsedFlagAccessError.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class _TrainingBatch:
    """This process's rows of a global batch of (index, epoch), made in the worker by
    the dataset's training ops."""
    dataset: Dataset
    seed: int
    process_index: int
    process_count: int

    def __call__(self, batch) -> dict:
        index, epoch = (np.asarray(v) for v in batch)
        per = len(index) // self.process_count
        mine = slice(self.process_index * per, (self.process_index + 1) * per)
        index, epoch = index[mine], epoch[mine]
        return {**self.dataset.train_batch(index, epoch, self.seed), INDEX: index, EPOCH: epoch}


def _check_batch(batch_size: int, process_count: int) -> None:
    if batch_size % process_count:
        raise BadInput(f"global batch {batch_size} is not divisible by the "
                       f"{process_count} processes")


class InputWorkersDied(BadInput):
    """Input worker processes kept dying: most likely killed for memory."""


# this many worker deaths within this many batches stop a run instead of restarting
DEATHS, WITHIN = 3, 100
_DIED = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")
_SHM = "/dev/shm"
_opened = itertools.count()


@dataclasses.dataclass
class Supervised:
    """A grain MapDataset made into batches by worker processes; its iterators outlive
    a dead worker (SupervisedIterator)."""
    dataset: object
    workers: int

    def __iter__(self) -> "SupervisedIterator":
        return SupervisedIterator(self.dataset, self.workers)


class SupervisedIterator:
    """A grain iterator over `dataset` (a MapDataset) made by `workers` processes,
    which replaces a dead worker and leaves no shared memory behind.

    grain ends an iterator for good when one of its workers dies (the kernel's
    out-of-memory killer sends SIGKILL to a large process). This one counts the
    elements it has handed out (its state: {"position": n}); when a worker dies it
    closes the broken iterator and opens a new one on `dataset[n:]`, whose elements
    are those an undisturbed run draws next (each depends only on its index: the
    seed, the epochs and the examples). The position, rather than grain's own
    set_state, also serves resumes: grain's set_state waits for every worker to
    acknowledge it and hangs when one dies first. `restarts` counts the deaths;
    DEATHS of them within WITHIN elements raise InputWorkersDied instead.

    Shared memory: a batch's segments are unlinked as soon as it arrives (its pages
    stay mapped while its arrays live), and the workers name theirs with this
    iterator's prefix, so that what a dead or stopped worker left is found and
    unlinked on close. No segment outlives the iterator, and Python's resource
    tracker has nothing to report at exit."""

    def __init__(self, dataset, workers: int):
        self.dataset, self.workers = dataset, workers
        self.restarts, self.position, self._deaths = 0, 0, []
        self._open()

    def _open(self) -> None:
        ds = self.dataset[self.position:] if self.position else self.dataset
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        self._prefix, self._procs = f"psm_cnn_jax_{os.getpid()}_{next(_opened)}_", None
        if self.workers > 0:
            _ensure_absl_flags()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=2),
                worker_init_fn=functools.partial(_name_shared_memory, self._prefix))
        self._known = {p.pid for p in multiprocessing.active_children()}
        self._it = iter(it)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                batch = next(self._it)
            except RuntimeError as e:
                died = _DIED.search(str(e))
                if died is None:
                    raise
                self._replace(int(died.group(1)))
                continue
            if self._procs is None:  # grain starts its workers at the first batch
                self._procs = sorted((p for p in multiprocessing.active_children()
                                      if p.pid not in self._known), key=lambda p: p.pid)
            _unlink_received(batch)
            self.position += 1
            return batch

    def _replace(self, code: int) -> None:
        self.restarts += 1
        self._deaths = [d for d in self._deaths if d > self.position - WITHIN] + [self.position]
        how = (f"killed by {signal.Signals(-code).name}" if code < 0 and
               -code in signal.valid_signals() else f"exit code {code}")
        dead = [i for i, p in enumerate(self._procs or []) if p.exitcode not in (None, 0)]
        who = (f"input worker {dead[0]} of {self.workers} (pid {self._procs[dead[0]].pid})"
               if dead else f"an input worker (of {self.workers})")
        self.close()
        if len(self._deaths) >= DEATHS:
            raise InputWorkersDied(
                f"input workers died {len(self._deaths)} times within {WITHIN} batches "
                f"(the last: {who}, {how}). The likely cause is memory: each worker holds "
                f"its share of the batches in flight. Lower --workers (now "
                f"{self.workers}) or --batch")
        print(f"warning: {who} died ({how}); restarted the input from the last batch "
              f"used (restart {self.restarts})", file=sys.stderr, flush=True)
        self._open()

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        """Continue at a saved state: ours, or grain's own from checkpoints written
        before this iterator kept its position (their position is its next index)."""
        self.close()
        self.position = _position(state)
        self._open()

    def close(self) -> None:
        """Stop the workers; unlink what they made ahead or left when they died."""
        getattr(self._it, "close", lambda: None)()
        if self.workers > 0 and os.path.isdir(_SHM):
            for name in os.listdir(_SHM):
                if name.startswith(self._prefix):
                    with contextlib.suppress(FileNotFoundError):
                        shared_memory.SharedMemory(name).unlink()


def _position(state: dict) -> int:
    """The elements consumed, from our state or grain's: a plain iterator's next
    index, or the sum of its workers' (worker k makes elements k, k + W, ...)."""
    if "position" in state:
        return int(state["position"])
    if "next_index" in state:
        return int(state["next_index"])
    if "iterators_in_use_states" in state and not state.get("future_states"):
        return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
    raise BadInput(f"an input position that this version cannot read: {state}")


def _name_shared_memory(prefix: str, worker_index: int, worker_count: int) -> None:
    """In each worker (grain's worker_init_fn): name the shared memory it makes with
    `prefix`, so that its iterator can find what the worker leaves behind. (The
    standard library picks the names in this private function; grain offers no hook.)"""
    shared_memory._make_filename = lambda: f"/{prefix}{secrets.token_hex(8)}"


def _unlink_received(batch: dict) -> None:
    """Unlink the shared memory of a batch just received from a worker (grain would do
    it when the arrays are collected, on a thread that may not run before exit)."""
    for leaf in batch.values():
        if getattr(leaf, "_unlink_on_del", False) and getattr(leaf, "shm", None) is not None:
            leaf.shm.unlink()
            leaf._unlink_on_del = False


def train_dataset(dataset: Dataset, batch_size: int, seed: int, workers: Optional[int] = None,
                  process_index: int = 0, process_count: int = 1):
    """An endless grain IterDataset of augmented training batches, whose iterators
    replace a worker process that dies (`Supervised`).

    `batch_size` is the global batch; each process gets batch_size / process_count
    rows. Batches run across epoch boundaries (iterations, not epochs, are the unit,
    as in He et al.); each example's epoch is passed to the augmentation.
    """
    _check_batch(batch_size, process_count)
    n = len(dataset)
    if batch_size > n:
        raise BadInput(f"batch size {batch_size} exceeds the {n} training examples")
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
    ds = ds.map_with_index(_PositionToEpoch(n))
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_TrainingBatch(dataset, seed, process_index, process_count))
    return Supervised(ds, default_workers() if workers is None else workers)


@dataclasses.dataclass
class _PositionToEpoch:
    n: int

    def __call__(self, position: int, index: int):
        return index, position // self.n


def eval_batches(dataset: Dataset, batch_size: int, process_index: int = 0,
                 process_count: int = 1, views: str = "1",
                 workers: Optional[int] = None) -> Iterator[dict]:
    """Every example exactly once, in order, in batches of `batch_size` (global), as
    the test `views` say (ops.VIEWS); the last batch is padded by repeating example 0
    and carries `mask` 0 on the padding (and on files left out as unreadable). Decoded
    arrays are gathered here; other images are decoded by `workers` processes, in
    order. Raises at the end if the count of examples differs from the split's size."""
    n = len(dataset)
    _check_batch(batch_size, process_count)
    per = batch_size // process_count
    starts = list(range(0, n, batch_size))
    views_of = _EvalViews(dataset, batch_size, n, views, process_index, per)
    batches = map(views_of, starts) if dataset.batched else \
        SupervisedIterator(grain.MapDataset.source(starts).map(views_of),
                           default_workers() if workers is None else workers)
    seen = 0
    try:
        for batch in batches:
            seen += len(batch[INDEX][batch[PADDING] > 0]) if process_count == 1 else 0
            yield batch
    finally:  # also when abandoned: the workers' shared memory is freed
        getattr(batches, "close", lambda: None)()
    if process_count == 1 and seen != n:
        raise AssertionError(f"evaluation covered {seen} examples, expected {n}")


@dataclasses.dataclass
class _EvalViews:
    dataset: Dataset
    batch_size: int
    n: int
    views: str
    process_index: int
    per: int

    def __call__(self, start: int) -> dict:
        """This process's part of the global batch at `start` (padding: example 0)."""
        index = np.arange(start, start + self.batch_size)
        real = index < self.n
        mine = slice(self.process_index * self.per, (self.process_index + 1) * self.per)
        index, real = np.where(real, index, 0)[mine], real[mine].astype(np.float32)
        batch = self.dataset.eval_batch(index, self.views)
        mask = real * batch.get(MASK, 1.0)
        skipped = batch.get(SKIPPED, np.zeros(0, np.int64))
        return {**batch, MASK: np.asarray(mask, np.float32), PADDING: real, INDEX: index,
                SKIPPED: np.unique(skipped[np.isin(skipped, index[real > 0])])}


# ------------------------------------------------------------------ devices
def to_global_array(batch: dict, sharding) -> dict:
    """This process's rows -> global jax arrays sharded along the mesh's data axis."""
    import jax  # here, not at the top: grain's worker processes import this module
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def training_keys(batch: dict) -> tuple:
    """What of a host batch a training step receives."""
    return TRAINING + tuple(k for k in (SHIFT, MASK) if k in batch)


def stack_batches(batches: list[dict], keys: tuple = TRAINING) -> dict:
    """k host batches -> one [k, B, ...] chunk of `keys`: the input of k steps in one
    compiled call (`cnn_jax.train.steps.multi_step`). A batch's entry may itself be a
    list of arrays (one per run trained together): [k, S, B, ...], still one copy."""
    return {k: np.array([b[k] for b in batches]) for k in keys}


class ChunkPrefetcher:
    """The training loop's input, prepared on a background thread.

    For each k of `sizes` (the steps of each compiled call, known in advance): draw k
    batches from the grain iterator `it`, hand them to `put` (stack, host -> device)
    and record the iterator's state after them: what a checkpoint taken after that
    call stores, so a resumed run sees the same batches whether or not chunks were
    prepared ahead. Up to `ahead` chunks wait ready, so gathering, augmenting and
    transferring the next call's inputs overlap the device's work on this one instead
    of sitting between two calls. An error on the thread is raised by `next`.

        with ChunkPrefetcher(it, sizes, put) as chunks:
            for inputs, data_state in chunks: ...
    """

    _END = object()

    def __init__(self, it, sizes, put, ahead: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(it, list(sizes), put),
                                        name="chunk-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, it, sizes, put):
        try:
            for k in sizes:
                batches = [next(it) for _ in range(k)]
                item = (put(batches), it.get_state())
                if not self._offer(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._offer(e)
            return
        self._offer(self._END)

    def _offer(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)  # at most one chunk in progress to finish

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
