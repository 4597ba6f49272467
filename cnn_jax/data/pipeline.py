"""The grain pipeline: shuffled, augmented batches on host CPUs, sharded onto devices.

Training order. A grain `MapDataset` of example *indices* is shuffled (reseeded every
epoch from the seed), repeated, and batched; each batch of indices then gathers its
images from the (memory-mapped) array and augments them as one vectorised numpy
operation, in `workers` processes that run ahead of the device. The random choices
depend only on (seed, epoch, example index), and the iterator's state is grain's own
(`get_state` / `set_state`), so a resumed run sees exactly the batches it would have.

Multi-host. Every process builds the same global order and keeps its own slice of
each global batch (`process_index` of `process_count`); `to_global_array` assembles
the global array over the mesh's data axis.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Iterator, Optional

import grain
import numpy as np
from absl import flags

from cnn_jax.data.augment import Augment
from cnn_jax.data.keys import EPOCH, IMAGE, INDEX, LABEL, MASK, SHIFT, TRAINING
from cnn_jax.data.sources import Arrays
from cnn_jax.data.streams import Stream
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


class _ImageStore:
    """The images, reopened lazily in each worker: a memory map of the cached .npy
    when there is one (nothing large is pickled to the workers), else the array."""

    def __init__(self, arrays: Arrays):
        self.path = arrays.path
        self.rows = arrays.indices
        self.array = None if arrays.path is not None else np.asarray(arrays.images)
        self.labels = np.asarray(arrays.labels)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path is not None:
            state["array"] = None
        return state

    def images(self, idx: np.ndarray) -> np.ndarray:
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r")
        rows = idx if self.rows is None else self.rows[idx]
        order = np.argsort(rows)  # sorted reads from the memory map, then restore order
        out = np.empty((len(rows), *self.array.shape[1:]), self.array.dtype)
        out[order] = self.array[rows[order]]
        return out


@dataclasses.dataclass
class _TrainingBatch:
    """This process's rows of a global batch of (index, epoch), made in the worker:
    gathered from the arrays and augmented, or decoded and transformed by a stream."""
    source: _ImageStore | Stream
    augment: Optional[Augment]   # arrays only: a stream transforms its own images
    seed: int
    process_index: int
    process_count: int

    def __call__(self, batch) -> dict:
        index, epoch = (np.asarray(v) for v in batch)
        per = len(index) // self.process_count
        mine = slice(self.process_index * per, (self.process_index + 1) * per)
        index, epoch = index[mine], epoch[mine]
        if isinstance(self.source, Stream):
            out = self.source.train_batch(index, epoch, self.seed)
        else:
            images = self.source.images(index)
            if self.augment is not None:
                images = self.augment(images, self.seed, epoch, index)
            out = {IMAGE: images, LABEL: self.source.labels[index]}
        return {**out, INDEX: index, EPOCH: epoch}


def train_dataset(arrays: Arrays | Stream, batch_size: int, seed: int,
                  augment: Optional[Augment] = None, workers: Optional[int] = None,
                  process_index: int = 0, process_count: int = 1):
    """An endless grain IterDataset of augmented training batches.

    `batch_size` is the global batch; each process gets batch_size / process_count
    rows. Batches run across epoch boundaries (iterations, not epochs, are the unit,
    as in He et al.); each example's epoch is passed to the augmentation. A Stream
    decodes and transforms its images in the workers; `augment` is for arrays.
    """

    if batch_size % process_count:
        raise BadInput(f"global batch {batch_size} is not divisible by the "
                       f"{process_count} processes")
    n = len(arrays)
    if batch_size > n:
        raise BadInput(f"batch size {batch_size} exceeds the {n} training examples")
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
    ds = ds.map_with_index(_PositionToEpoch(n))
    ds = ds.batch(batch_size, drop_remainder=True)
    source = arrays if isinstance(arrays, Stream) else _ImageStore(arrays)
    ds = ds.map(_TrainingBatch(source, augment, seed, process_index, process_count))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    workers = default_workers() if workers is None else workers
    if workers > 0:
        _ensure_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=2))
    return it


@dataclasses.dataclass
class _PositionToEpoch:
    n: int

    def __call__(self, position: int, index: int):
        return index, position // self.n


def eval_batches(arrays: Arrays | Stream, batch_size: int, process_index: int = 0,
                 process_count: int = 1, protocol: str = "single",
                 workers: Optional[int] = None) -> Iterator[dict]:
    """Every example exactly once, in order, in batches of `batch_size` (global); the
    last batch is padded by repeating example 0 and carries `mask` 0 on the padding.
    A Stream's batches are decoded by `workers` processes as the test `protocol`
    (cnn_jax.data.streams.PROTOCOLS) says, in order. Raises at the end if the count of
    real examples differs from the split's size."""
    n = len(arrays)
    if batch_size % process_count:
        raise BadInput(f"global batch {batch_size} is not divisible by the "
                       f"{process_count} processes")
    per = batch_size // process_count
    starts = list(range(0, n, batch_size))
    if isinstance(arrays, Stream):
        ds = grain.MapDataset.source(starts).map(
            _EvalViews(arrays, batch_size, n, protocol, process_index, per))
        batches = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        workers = default_workers() if workers is None else workers
        if workers > 0:
            _ensure_absl_flags()
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=2))
    else:
        batches = map(_EvalRows(_ImageStore(arrays), batch_size, n, process_index, per),
                      starts)
    seen = 0
    for batch in batches:
        seen += int(batch[MASK].sum()) if process_count == 1 else 0
        yield batch
    if process_count == 1 and seen != n:
        raise AssertionError(f"evaluation covered {seen} examples, expected {n}")


def _padded(start: int, batch_size: int, n: int, process_index: int, per: int):
    """This process's indices of the global batch at `start` (padding: example 0), mask."""
    index = np.arange(start, start + batch_size)
    mask = index < n
    mine = slice(process_index * per, (process_index + 1) * per)
    return np.where(mask, index, 0)[mine], mask[mine].astype(np.float32)


@dataclasses.dataclass
class _EvalRows:
    store: _ImageStore
    batch_size: int
    n: int
    process_index: int
    per: int

    def __call__(self, start: int) -> dict:
        index, mask = _padded(start, self.batch_size, self.n, self.process_index, self.per)
        return {IMAGE: self.store.images(index), LABEL: self.store.labels[index],
                MASK: mask, INDEX: index}


@dataclasses.dataclass
class _EvalViews:
    stream: Stream
    batch_size: int
    n: int
    protocol: str
    process_index: int
    per: int

    def __call__(self, start: int) -> dict:
        index, mask = _padded(start, self.batch_size, self.n, self.process_index, self.per)
        return {**self.stream.eval_batch(index, self.protocol), MASK: mask, INDEX: index}


# ------------------------------------------------------------------ devices
def to_global_array(batch: dict, sharding) -> dict:
    """This process's rows -> global jax arrays sharded along the mesh's data axis."""
    import jax  # here, not at the top: grain's worker processes import this module
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def training_keys(batch: dict) -> tuple:
    """What of a host batch a training step receives."""
    return TRAINING + ((SHIFT,) if SHIFT in batch else ())


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
