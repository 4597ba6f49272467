"""metrics.jsonl (one JSON object per logged step or evaluation), the same scalars for
TensorBoard (`tensorboard --logdir RUN/tensorboard`), and the final parameters' digest."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter

# metrics.jsonl keys -> TensorBoard tags (the evaluation's split is added to eval_*)
TAGS = {"train_loss": "train/loss", "train_error": "train/error", "lr": "train/lr",
        "img_per_s": "train/images_per_s", "eval_loss": "loss", "eval_error": "error"}


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
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is None:
            self._writer = SummaryWriter(str(self.path.parent / "tensorboard"),
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
