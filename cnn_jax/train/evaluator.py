"""The one evaluator: predictions and the declared metrics of one network, several
trained together, or an ensemble, on any views of any split, batched.

    ev = evaluate(scores, dataset, views="10", members="ensemble")
    ev.metrics[0]["error"], ev.skipped

`scores(images)` maps a batch of uint8 images [N, H, W, C] to logits [M, N, K] of M
networks. With one view and members="each" the metrics are those of the logits
themselves; otherwise of the softmax averaged over the views (Krizhevsky et al. 2012,
Sec. 4.1; He et al. 2015's 10-crop and multi-scale tests) and, for an ensemble, over
the networks. Every process evaluates its own rows of each global batch: `to_device`
makes them one global array (the training loop's sharded evaluation) and the sums come
out global; without it each process sums its own and the sums are added up.
Unreadable files left out by --bad-images skip are counted once each and reported.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from cnn_jax.data.dataset import Dataset
from cnn_jax.data.keys import IMAGE, INDEX, LABEL, MASK, PADDING, SKIPPED
from cnn_jax.data.pipeline import eval_batches
from cnn_jax.train.metrics import METRICS, masked_sums, means

EACH, ENSEMBLE = "each", "ensemble"
PER_CLASS = "per_class_"


def _means(sums: dict) -> dict:
    """Every metric's mean, and each rate's mean per class (None for a class without
    examples)."""
    out = means({k: v for k, v in sums.items() if not k.startswith(PER_CLASS)})
    count = sums[f"{PER_CLASS}count"]
    for m in METRICS:
        if m.rate:
            out[f"{PER_CLASS}{m.name}"] = [float(v / c) if c else None for v, c in
                                            zip(sums[f"{PER_CLASS}{m.name}"], count)]
    return out


@dataclasses.dataclass
class Evaluation:
    metrics: list            # one dict per network (each) or one (ensemble): means, "n",
                             # and per_class_<rate> lists
    skipped: int             # unreadable files left out (over all processes)
    predicted: Optional[np.ndarray] = None  # [N] classes, in the split's order (one process)


@functools.partial(jax.jit, static_argnames=("views", "ensemble", "raw"))
def _reduce(logits, labels, mask, views: int, ensemble: bool, raw: bool):
    """logits [M, B*V, K] -> per network (or the ensemble) every metric's masked sum,
    and each example's predicted class."""
    m, k = logits.shape[0], logits.shape[-1]
    logits = logits.astype(jnp.float32).reshape(m, -1, views, k)
    if raw:      # one view, each network alone: the logits themselves
        scores = logits[:, :, 0]
    else:        # the log of the softmax averaged over the views (and the networks)
        logp = jax.nn.log_softmax(logits, -1)
        axes = (0, 2) if ensemble else (2,)
        scores = jax.nn.logsumexp(logp, axis=axes, keepdims=True) - jnp.log(
            np.prod([logp.shape[a] for a in axes]))
        scores = scores[:, :, 0]
    onehot = jax.nn.one_hot(labels, k) * mask[:, None]

    def sums_of(s):
        out = masked_sums(s, labels, mask)
        out.update({f"{PER_CLASS}{m.name}": m.per_example(s, labels) @ onehot
                    for m in METRICS if m.rate})
        return {**out, f"{PER_CLASS}count": onehot.sum(0)}
    return jax.vmap(sums_of)(scores), jnp.argmax(scores[0], -1)


def _scores_of_views(scores: Callable, images) -> np.ndarray:
    """Logits [M, B*V, K] of views [B, V, H, W, C] or [B, H, W, C]."""
    return scores(images.reshape(-1, *images.shape[-3:]))


def _multiscale_scores(scores: Callable, per_image: list) -> np.ndarray:
    """Logits [M, B*5, K] of each image's views (a list of arrays of different shapes):
    views of one shape run together, padded to a power-of-two count so that few
    shapes are compiled; an unreadable image (None) scores zeros (its mask is 0)."""
    items: dict = {}
    n_views = next(len(v) for v in per_image if v is not None)
    for i, views in enumerate(per_image):
        for j, view in enumerate(views or ()):
            items.setdefault(view.shape, []).append((i * n_views + j, view))
    out = None
    for group in items.values():
        stack = np.stack([v for _, v in group])
        padded = 1 << (len(stack) - 1).bit_length()
        stack = np.concatenate([stack, np.repeat(stack[:1], padded - len(stack), 0)])
        logits = np.asarray(scores(stack))[:, :len(group)]
        if out is None:
            out = np.zeros((logits.shape[0], len(per_image) * n_views, logits.shape[-1]),
                           np.float32)
        out[:, [pos for pos, _ in group]] = logits
    return out


def evaluate(scores: Callable, dataset: Dataset, *, views: str = "1", members: str = EACH,
             batch: int = 1000, workers: Optional[int] = None,
             to_device: Optional[Callable] = None, predictions: bool = False,
             progress: bool = False) -> Evaluation:
    """Metrics of `scores` on every example of `dataset` (see the module docstring).
    `batch` is global; `to_device(dict)` -> global arrays (None: process-local)."""
    pi, pc = jax.process_index(), jax.process_count()
    n_views = {"1": 1, "2": 2, "10": 10, "multiscale": 5}[views]
    ensemble = members == ENSEMBLE
    totals, skipped, predicted = None, set(), []
    bar = tqdm(total=len(dataset), unit="img", disable=not progress or pi != 0,
               desc="evaluating", leave=False)
    for b in eval_batches(dataset, batch, pi, pc, views=views, workers=workers):
        skipped.update(b[SKIPPED].tolist())
        if views == "multiscale":
            logits = _multiscale_scores(scores, b[IMAGE])
            arrays = {LABEL: b[LABEL], MASK: b[MASK]}
        else:
            arrays = {IMAGE: b[IMAGE], LABEL: b[LABEL], MASK: b[MASK]}
            if to_device is not None:
                arrays = to_device(arrays)
            logits = _scores_of_views(scores, arrays.pop(IMAGE))
        sums, best = _reduce(logits, arrays[LABEL], arrays[MASK], n_views, ensemble,
                             n_views == 1 and not ensemble)
        sums = jax.device_get(sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        if predictions:
            predicted.append((b[INDEX][b[PADDING] > 0], np.asarray(best)[b[PADDING] > 0]))
        bar.update(int(b[PADDING].sum()) * (pc if to_device is not None else 1))
    bar.close()
    if to_device is None and pc > 1:  # each process summed its own rows
        totals = {k: multihost_utils.process_allgather(np.asarray(v)).sum(0)
                  for k, v in totals.items()}
    n_skipped = len(skipped)
    if pc > 1:
        n_skipped = int(multihost_utils.process_allgather(np.array(n_skipped)).sum())
    metrics = [_means({k: np.asarray(v)[i] for k, v in totals.items()})
               for i in range(len(totals["count"]))]
    order = None
    if predictions:
        order = np.full(len(dataset), -1, np.int64)
        for index, best in predicted:
            order[index] = best
    return Evaluation(metrics, n_skipped, order)
