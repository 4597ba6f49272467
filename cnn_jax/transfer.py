"""Transfer learning: take a network someone already trained, keep what it learnt,
and teach it new classes from a few labelled images.

Backbones come from a run of this project (its --out folder) or from torchvision/timm
weights (`cnn_jax.models.convert`). Three modes:

- frozen:   the backbone runs once over the data; its penultimate activations (the
            input of the final classifier) are saved to disk as memory-mappable .npy
            files and a new softmax classifier trains on them. No augmentation: every
            epoch sees the same cached features.
- finetune: the last k stages and a new classifier train, the rest is frozen (no
            update, its BatchNorm statistics fixed and used as at test time).
- full:     everything trains, from the pretrained weights, with a smaller step.

The last two are ordinary runs of the training engine (`TrainConfig.init_from`,
`init_skip`, `trainable`), so they checkpoint, resume and log like any run. Every
mode ends as one network of the backbone's architecture with a new head, saved with
`model.json` beside it so that `predict` can label a folder of images.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from cnn_jax.data.ops import Normalizer
from cnn_jax.data.dataset import Dataset
from cnn_jax.data.pipeline import eval_batches
from cnn_jax.data.imagefolder import IMAGE_SUFFIXES, decode_image, fit_image, is_image_name
from cnn_jax.data.sources import Arrays
from cnn_jax.errors import BadInput
from cnn_jax.files import write_atomic
from cnn_jax.models import create_model
from cnn_jax.train.evaluator import evaluate
from cnn_jax.trained import MODEL_FILE, Trained, load_trained

MODES = ("frozen", "finetune", "full")


# ------------------------------------------------------------------ backbones
def load_backbone(source, arch: Optional[str] = None) -> Trained:
    """A run folder of this project, or a PyTorch weights file (the architecture
    detected from its keys unless `arch` names it), as a backbone (cnn_jax.trained)."""
    try:
        net = load_trained(source, arch)
    except BadInput as e:
        raise BadInput(f"--backbone {e}") from None
    if net.input_pad:
        raise BadInput(f"--backbone {source}: a run with --input-pad (zero-padded inputs) "
                       f"cannot serve as a backbone here")
    return net


def head_of(net: Trained) -> str:
    """The backbone's final classifier (traced once per architecture)."""
    return head_name(net.model_name, net.options, net.input_size)


def _top_level_calls(model, image_size: int, channels: int = 3) -> list[tuple[str, type]]:
    """(name, class) of the top-level submodules a forward pass calls, in order."""
    calls = []

    def record(next_fun, args, kwargs, context):
        path = context.module.scope.path if context.module.scope else ()
        if context.method_name == "__call__" and len(path) == 1:
            calls.append((path[0], type(context.module)))
        return next_fun(*args, **kwargs)

    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return calls


def _head(model_name: str, calls: list) -> str:
    dense = [n for n, cls in calls if issubclass(cls, nn.Dense)]
    if not dense:
        raise BadInput(f"{model_name}: no final dense layer to replace")
    return dense[-1]


def head_name(model_name: str, options: dict, image_size: int) -> str:
    """The final classifier: the last top-level Dense layer a forward pass calls."""
    return _head(model_name, _top_level_calls(create_model(model_name, **options), image_size))


def stages(model_name: str, options: dict, image_size: int) -> list[str]:
    """The top-level modules before the head, grouped into stages by name
    ('conv5_2' -> 'conv5', 'stage3_block4' -> 'stage3'), in forward order."""
    calls = _top_level_calls(create_model(model_name, **options), image_size)
    head, out = _head(model_name, calls), []
    for name, _ in calls:
        stage = name.split("_")[0]
        if name != head and stage not in out:
            out.append(stage)
    return out


def trainable_for(backbone: Trained, k: int) -> str:
    """TrainConfig.trainable for fine-tuning the last `k` stages and the new head."""
    names = stages(backbone.model_name, backbone.options, backbone.input_size)
    if not 1 <= k <= len(names):
        raise BadInput(f"--stages {k}: {backbone.model_name} has {len(names)} stages "
                       f"({', '.join(names)})")
    return ",".join(names[-k:] + [head_of(backbone)])


# ------------------------------------------------------------------ features
def features(net: Trained, head: str, variables, images):
    """jit-able: the input of `head` (the penultimate activations) for uint8 images, in
    inference mode (Trained.apply)."""
    captured = {}

    def grab(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.scope.path == (head,):
            captured["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        net.apply(variables, images)
    return captured["x"].astype(jnp.float32)


def cached_features(directory: Path, split: str, backbone: Trained, arrays: Dataset,
                    batch: int = 100, progress: bool = True) -> tuple[np.ndarray, dict]:
    """The backbone's penultimate activations of `arrays`, computed once and kept in
    `directory/<split>.npy` (memory-mapped when read back). A file made by another
    backbone, other images or another preprocessing is detected and rebuilt.
    Returns (features [N, D], {'cached': bool, 'extract_s': seconds the backbone took
    over these images, when they were computed})."""
    norm = backbone.normaliser
    key = {"backbone": backbone.digest(), "model": backbone.model_name,
           "options": backbone.options, "source": backbone.source, "resize": backbone.resize,
           "normaliser": None if norm is None else
           hashlib.sha256(np.asarray(norm.mean).tobytes() + np.asarray(norm.std).tobytes()).hexdigest()[:16],
           "kernels": backbone.kernels, "data": arrays.digest(), "n": len(arrays),
           "image_shape": list(arrays.image_shape)}
    file, meta_file = directory / f"{split}.npy", directory / f"{split}.json"
    if file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            return np.load(file, mmap_mode="r"), {"cached": True, "extract_s": meta["seconds"]}
        print(f"{file}: cached features of another backbone or data; rebuilding")
    directory.mkdir(parents=True, exist_ok=True)
    forward = jax.jit(functools.partial(features, backbone, head_of(backbone)))
    variables = backbone.variables
    # compiled before the clock starts: the time is what every epoch would pay again
    jax.block_until_ready(forward(variables, np.zeros((batch, *arrays.image_shape), np.uint8)))
    start = time.perf_counter()
    tmp = directory / f".{split}.{os.getpid()}.npy"
    out = None
    bar = tqdm(total=len(arrays), unit="img", desc=f"features ({split})", disable=not progress,
               leave=False)
    for b in eval_batches(arrays, batch):  # one compiled shape: the last batch padded
        keep = b["mask"] > 0
        f = np.asarray(forward(variables, b["image"]))[keep]
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                            shape=(len(arrays), f.shape[-1]))
        out[b["index"][keep]] = f
        bar.update(len(f))
    bar.close()
    out.flush()
    del out
    seconds = time.perf_counter() - start
    os.replace(tmp, file)  # complete files only: a killed extraction leaves no stale cache
    write_atomic(meta_file, json.dumps({"key": key, "seconds": seconds}, indent=1))
    return np.load(file, mmap_mode="r"), {"cached": False, "extract_s": seconds}


# ------------------------------------------------------------------ the new softmax
def train_softmax(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                  epochs: int = 100, batch: int = 64, lr: float = 0.1,
                  weight_decay: float = 5e-4, seed: int = 0) -> tuple[dict, dict]:
    """A softmax classifier on fixed features (SGD, momentum 0.9, cosine schedule).
    Features are standardised for the optimisation and the scaling is folded back
    into the weights, so the result is a plain dense layer on the raw features.
    Returns ({'kernel', 'bias'}, timing)."""
    x = np.asarray(features, np.float32)
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    n, d = x.shape
    steps_per_epoch = -(-n // batch)
    tx = optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch), 0.9))
    params = {"kernel": jnp.zeros((d, num_classes)), "bias": jnp.zeros((num_classes,))}
    state = tx.init(params)

    def loss_fn(p, xb, yb, mask):
        logits = xb @ p["kernel"] + p["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1)

    @jax.jit
    def step(p, s, xb, yb, mask):
        g = jax.grad(loss_fn)(p, xb, yb, mask)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    rng = np.random.default_rng(seed)
    epoch_seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = rng.permutation(n)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            xb = np.zeros((batch, d), np.float32)
            yb = np.zeros(batch, np.int32)
            mask = np.zeros(batch, np.float32)
            xb[:len(idx)] = (x[idx] - mu) / sigma
            yb[:len(idx)], mask[:len(idx)] = labels[idx], 1.0
            params, state = step(params, state, xb, yb, mask)
        jax.block_until_ready(params)
        epoch_seconds.append(time.perf_counter() - start)
    kernel = np.asarray(params["kernel"]) / sigma[:, None]
    bias = np.asarray(params["bias"]) - mu @ kernel
    # the first epoch includes compilation
    return ({"kernel": kernel, "bias": bias},
            {"epoch_s": float(np.median(epoch_seconds[1:] or epoch_seconds))})


def with_head(backbone: Trained, head: dict) -> dict:
    """The backbone's variables with its final classifier replaced by `head`."""
    params = dict(backbone.variables["params"])
    params[head_of(backbone)] = {"kernel": np.asarray(head["kernel"]),
                                 "bias": np.asarray(head["bias"])}
    return {"params": params, "batch_stats": backbone.variables.get("batch_stats", {})}


# ------------------------------------------------------------------ a trained classifier on disk
def save_classifier(out: Path, *, model: str, options: dict, classes: list, image_size: int,
                    resize: int, normaliser: Optional[Normalizer],
                    variables: Optional[dict] = None, run: Optional[str] = None) -> None:
    """MODEL_FILE (+ the variables, unless they live in the engine run `run`): a folder
    `cnn_jax.trained.load_trained` reads back."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "options": options, "classes": list(classes),
            "image_size": image_size, "resize": resize, "run": run,
            "normaliser": None if normaliser is None else
            {"mean": np.asarray(normaliser.mean).tolist(), "std": np.asarray(normaliser.std).tolist()}}
    if variables is not None:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save((out / "classifier").absolute(), jax.tree.map(np.asarray, variables),
                      force=True)
    write_atomic(out / MODEL_FILE, json.dumps(meta, indent=1))


def read_images(folder: Path, image_size: int) -> tuple[list[str], np.ndarray]:
    """Every image under `folder` (sorted), fitted to image_size x image_size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"--predict {folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if is_image_name(p.name))
    if not files:
        raise BadInput(f"--predict {folder}: no image files in it ({', '.join(IMAGE_SUFFIXES)})")
    images = [fit_image(decode_image(p.read_bytes(), str(p), 3), (image_size, image_size),
                        crop=True) for p in files]
    return [str(p.relative_to(folder)) for p in files], np.stack(images)


def predict(classifier: Path, folder: Path, batch: int = 64) -> list[dict]:
    """Class and probability for every image under `folder`."""
    net = load_trained(classifier)
    names, images = read_images(folder, net.image_shape[0])
    forward = jax.jit(net.probabilities)
    unlabelled = Dataset(Arrays(images, np.zeros(len(images), np.int32), list(net.classes)),
                         images.shape[1])
    probs = np.concatenate([np.asarray(forward(net.variables, b["image"]))[b["mask"] > 0]
                            for b in eval_batches(unlabelled, min(batch, len(images)))])
    return [{"file": f, "class": net.classes[int(p.argmax())], "probability": float(p.max())}
            for f, p in zip(names, probs)]


def accuracy(net: Trained, variables: dict, dataset: Dataset, batch: int = 250) -> float:
    """Single-view accuracy of `variables` (of `net`'s architecture) on `dataset`, by
    the one evaluator."""
    forward = jax.jit(lambda v, x: net.apply(v, x)[None])
    return 1.0 - evaluate(lambda x: forward(variables, x), dataset, batch=batch).metrics[0]["error"]


__all__ = ["MODES", "load_backbone", "head_of", "head_name", "stages", "trainable_for",
           "features", "cached_features", "train_softmax", "with_head", "save_classifier",
           "predict", "accuracy"]
