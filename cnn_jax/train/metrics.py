"""The metrics, declared once, and where they are written: metrics.jsonl (one JSON
object per logged step or evaluation), the same scalars for TensorBoard
(`tensorboard --logdir RUN/tensorboard`), and the final parameters' digest.

A metric is a per-example value computed from the logits and the integer labels; a
split's value is its mean, summed over the unmasked examples with exact counts (so
padding and the evaluation batch size never change it). Everything that reports a
metric takes it from METRICS: the train step (`batch_means`; its `loss` is what the
step minimises, OBJECTIVE), evaluation (`masked_sums`, `means`), the log lines,
TensorBoard's tags, results.json's `final_<split>_<metric>` keys and cnn_jax.evaluate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_jax.files import DISK_ERRORS, write_atomic, write_failed


def summary_writer():
    """tensorboardX's SummaryWriter, imported when a run first logs. tensorboardX
    imports PyTorch where it is installed, only to name a type (2 s a process): it is
    hidden for that import; a later `import torch` is unaffected."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def cross_entropy(logits, labels, smoothing: float = 0.0):
    """Softmax cross-entropy per example, in float32 (label smoothing optional)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def top1_error(logits, labels):
    """1 where the highest-scoring class is not the label."""
    return (jnp.argmax(logits, -1) != labels).astype(jnp.float32)


def top5_error(logits, labels):
    """1 where the label is not among the five highest-scoring classes (ILSVRC's
    measure; 0 with five classes or fewer)."""
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    return 1.0 - jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    per_example: Callable        # (logits [B, K], labels [B]) -> [B] float32
    rate: bool = False           # a fraction of examples: shown in %, reported per class
                                 # by cnn_jax.evaluate


METRICS = (
    Metric("loss", cross_entropy),
    Metric("error", top1_error, rate=True),
    Metric("top5_error", top5_error, rate=True),
)
NAMES = tuple(m.name for m in METRICS)
# other names results files give a metric under: `error` is top-1 (the ImageNet papers' word)
ALIASES = {"top1_error": "error"}
REPORTED = NAMES + tuple(ALIASES)  # results.json's final_<split>_<name> keys
# In training, `loss` is the step's objective: the cross-entropy with label smoothing
# and auxiliary heads, what the gradient is of; the other metrics are as declared.
OBJECTIVE = "loss"
STEP_METRICS = tuple(m for m in METRICS if m.name != OBJECTIVE)
STEP_KEYS = (OBJECTIVE, *(m.name for m in STEP_METRICS), "lr")  # what a train step returns


def batch_means(logits, labels, weights=None) -> dict:
    """The train step's metrics but its objective: means over the batch (over the
    examples of weight 1, where unreadable files are left out)."""
    if weights is None:
        return {m.name: jnp.mean(m.per_example(logits, labels)) for m in STEP_METRICS}
    n = jnp.maximum(jnp.sum(weights), 1.0)
    return {m.name: jnp.sum(m.per_example(logits, labels) * weights) / n for m in STEP_METRICS}


def masked_sums(logits, labels, mask) -> dict:
    """Every metric summed over the examples where mask is 1, and their count."""
    return {**{m.name: jnp.sum(m.per_example(logits, labels) * mask) for m in METRICS},
            "count": jnp.sum(mask)}


def means(sums: dict) -> dict:
    """masked_sums (host arrays, summed over batches) -> {metric: mean, "n": count}."""
    out = {name: float(sums[name] / sums["count"]) for name in NAMES}
    return {**out, **{alias: out[name] for alias, name in ALIASES.items()},
            "n": int(sums["count"])}


def in_words(record: dict, prefix: str) -> str:
    """'loss 2.3026 error 10.00%': the metrics of a log record (keys prefix + name)."""
    return " ".join(f"{m.name} {100 * record[prefix + m.name]:.2f}%" if m.rate else
                    f"{m.name} {record[prefix + m.name]:.4f}"
                    for m in METRICS if prefix + m.name in record)


# metrics.jsonl keys -> TensorBoard tags (the evaluation's split is added to eval_*)
TAGS = {**{f"train_{k}": f"train/{k}" for k in STEP_KEYS if k != "lr"},
        "lr": "train/lr", "img_per_s": "train/images_per_s",
        **{f"eval_{name}": name for name in NAMES}}


def _parses(line: str) -> bool:
    """A whole record (a write cut short by a full disk leaves part of one)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class MetricsLog:
    """metrics.jsonl, the record of a run, and its TensorBoard copy in tensorboard/ beside
    it (written as lines are; on resume, TensorBoard drops its events after the restored
    step, as the truncated metrics.jsonl does)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._writer = None
        self._purge_step = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps the restored checkpoint has not reached,
        so the log reads as one uninterrupted run."""
        self._purge_step = step + 1
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if _parses(line) and json.loads(line).get("step", 0) <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a line cut short is dropped on resume (truncate_after)
            raise (write_failed(self.path, e) if e.errno in DISK_ERRORS else e) from None
        if self._writer is None:
            self._writer = summary_writer()(str(self.path.parent / "tensorboard"),
                                            purge_step=self._purge_step, flush_secs=30)
        split = record.get("eval_split", "eval")
        for key, value in record.items():
            if key in TAGS and isinstance(value, (int, float)):
                tag = TAGS[key] if not key.startswith("eval_") else f"{split}/{TAGS[key]}"
                self._writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]


def params_digest(params) -> str:
    """SHA-256 over every parameter's bytes, in sorted path order."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        local = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
        arr = np.ascontiguousarray(np.asarray(local))
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
