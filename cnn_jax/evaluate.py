"""Evaluate trained runs: one view or several per image, one network or an ensemble.

    python -m cnn_jax.evaluate --checkpoint RUN [--checkpoint RUN ...] --views {1,2,10}
        [--data NAME] [--data-dir DIR] [--split test|val] [--crop SIZE] [--json]

The prediction for an image is the softmax averaged over its views and over the
networks (Krizhevsky et al. 2012, Sec. 4.1 and 6; Szegedy et al. 2015, Sec. 7).

Views, on the stored uint8 image:
  * images of the networks' input size (CIFAR-10's 32x32): the four corner crops and
    the centre crop of the image zero-padded by 4 pixels on each side (the padding of
    the training augmentation), each also mirrored. The centre crop is the image
    itself, so `--views 1` is the plain single view and `--views 2` adds its mirror.
  * larger images, the ImageNet way: resize so that the shorter side is crop / 0.875
    (256 for 224), then the four corner crops and the centre crop, each mirrored;
    `--views 1` is the centre crop, `--views 2` the centre crop and its mirror.
Every test image is used exactly once (the count is checked). Networks that share an
architecture and an input transform are evaluated together: one compiled call maps
over their stacked parameters.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cnn_jax.data.augment import ten_crop
from cnn_jax.data.keys import IMAGE, INDEX, LABEL, MASK
from cnn_jax.data.pipeline import eval_batches
from cnn_jax.data.streams import Stream
from cnn_jax.errors import BadInput, exit_on_bad_input
from cnn_jax.train.metrics import ALIASES, METRICS, in_words
from cnn_jax.trained import Trained, load_trained

VIEW_COUNTS = (1, 2, 10)
MULTISCALE = "multiscale"           # streams: He et al.'s fully-convolutional multi-scale test
CENTRE, CENTRE_MIRRORED = 4, 9      # positions in ten_crop's order
IMAGENET_RESIZE = 1 / 0.875         # resize side = crop / 0.875 (256 for 224)


# ------------------------------------------------------------------ views
def parse_views(views) -> int | str:
    """--views: 1, 2, 10 or multiscale."""
    if str(views) == MULTISCALE:
        return MULTISCALE
    if str(views).isdigit() and int(views) in VIEW_COUNTS:
        return int(views)
    raise BadInput(f"--views must be one of {', '.join(map(str, VIEW_COUNTS))} or "
                   f"{MULTISCALE}; got {views!r}")


def pick(views_10: np.ndarray, n: int) -> np.ndarray:
    """The first-n-views subset of a [B, 10, ...] ten-crop stack: centre, its mirror,
    or all ten."""
    if n not in VIEW_COUNTS:
        raise BadInput(f"--views must be one of {VIEW_COUNTS}; got {n}")
    return {1: views_10[:, [CENTRE]], 2: views_10[:, [CENTRE, CENTRE_MIRRORED]],
            10: views_10}[n]


def resize_shorter_side(images: np.ndarray, side: int) -> np.ndarray:
    h, w = images.shape[1:3]
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    out = jax.image.resize(jnp.asarray(images, jnp.float32),
                           (images.shape[0], *size, images.shape[3]), "bilinear")
    return np.asarray(jnp.clip(jnp.round(out), 0, 255)).astype(np.uint8)


def make_views(images: np.ndarray, n: int, crop: int, pad: int = 4) -> np.ndarray:
    """[B, n, crop, crop, C] views of a uint8 batch (see the module docstring)."""
    h, w = images.shape[1:3]
    if (h, w) == (crop, crop):
        return pick(ten_crop(images, crop, pad_by=pad), n)
    if min(h, w) < crop:
        raise BadInput(f"images of {h}x{w} are smaller than the {crop}x{crop} views")
    resized = resize_shorter_side(images, round(crop * IMAGENET_RESIZE))
    return pick(ten_crop(resized, crop), n)


# ------------------------------------------------------------------ members
def load_member(source) -> Trained:
    try:
        return load_trained(source)
    except BadInput as e:
        raise BadInput(f"--checkpoint {e}") from None


def _group_key(m: Trained) -> str:
    """Members with equal keys share an architecture and an input transform."""
    normaliser = None if m.normaliser is None else \
        [np.asarray(m.normaliser.mean).tobytes().hex(), np.asarray(m.normaliser.std).tobytes().hex()]
    return json.dumps([m.model_name, m.options, m.dtype, m.num_classes, normaliser,
                       m.input_pad, m.resize, list(m.image_shape), m.kernels],
                      sort_keys=True, default=str)


@dataclasses.dataclass
class Group:
    members: list
    forward: object   # jitted: (stacked variables, uint8 [N, H, W, C]) -> probs [M, N, K]
    stacked: dict
    train_shape: tuple        # the stored training images' (H, W, C)
    crop_pad: int


def build_groups(members: list[Trained]) -> list[Group]:
    groups: dict[str, list[Trained]] = {}
    for m in members:
        groups.setdefault(_group_key(m), []).append(m)
    out = []
    for ms in groups.values():
        shapes = {jax.tree.structure(m.variables) for m in ms}
        if len(shapes) != 1:
            raise BadInput("runs of the same architecture hold differently shaped "
                           "variables: " + ", ".join(m.source for m in ms))
        stacked = jax.tree.map(lambda *v: jnp.stack([jnp.asarray(x) for x in v]),
                               *[m.variables for m in ms])
        # lax.map, not vmap: vmapping a convolution over M kernels makes an M-group
        # convolution, several times slower on CPU than M ordinary ones in sequence
        forward = jax.jit(lambda stacked, images, net=ms[0]: jax.lax.map(
            lambda variables: net.probabilities(variables, images), stacked))
        crop_pad = ms[0].config.crop_pad if ms[0].config is not None else 0
        out.append(Group(ms, forward, stacked, ms[0].image_shape, crop_pad or 4))
    return out


# ------------------------------------------------------------------ evaluation
def view_probabilities(groups: list[Group], arrays, views, batch: int = 250,
                       crop: Optional[int] = None, workers: Optional[int] = None
                       ) -> Iterator[dict]:
    """Per batch: labels, mask, and softmax probabilities [M, B, V, K] of every member
    (in the order of the groups' members) on every view."""
    if isinstance(arrays, Stream):
        yield from stream_probabilities(groups, arrays, views, batch, workers)
        return
    if views == MULTISCALE:
        raise BadInput(f"--views {MULTISCALE} is the test of full-size images as they "
                       f"stream (imagenet_sample, imagefolder:PATH, ...); these are arrays")
    for b in eval_batches(arrays, batch):
        per_group = []
        for g in groups:
            size = crop or g.train_shape[0]
            v = make_views(b[IMAGE], views, size, g.crop_pad)          # [B, V, h, w, C]
            per_group.append(group_probabilities(g, v))
        yield {LABEL: b[LABEL], MASK: b[MASK], INDEX: b[INDEX],
               "probs": np.concatenate(per_group, axis=0)}


def group_probabilities(g: Group, v: np.ndarray) -> np.ndarray:
    """[M, B, V, K] of views [B, V, h, w, C]."""
    p = np.asarray(g.forward(g.stacked, v.reshape(-1, *v.shape[2:])))    # [M, B*V, K]
    return p.reshape(p.shape[0], *v.shape[:2], p.shape[-1])


def stream_probabilities(groups: list[Group], stream: Stream, views, batch: int,
                         workers: Optional[int]) -> Iterator[dict]:
    """view_probabilities of a stream: its views are made as it is decoded (single
    centre crop, 10-crop, or the five scales of the multi-scale test)."""
    sides = {g.train_shape[0] for g in groups}
    if sides != {stream.side}:
        raise BadInput(f"--checkpoint: networks of input side {sorted(sides)} evaluated on "
                       f"views of side {stream.side}; ensemble networks of one input side")
    protocol = {1: "single", 2: "ten", 10: "ten", MULTISCALE: MULTISCALE}[views]
    for b in eval_batches(stream, batch, protocol=protocol, workers=workers):
        if protocol == MULTISCALE:
            probs = np.concatenate([multiscale_probabilities(g, b[IMAGE]) for g in groups])
        else:
            v = b[IMAGE][:, None] if protocol == "single" else b[IMAGE]
            v = v[:, [CENTRE, CENTRE_MIRRORED]] if views == 2 else v
            probs = np.concatenate([group_probabilities(g, v) for g in groups])
        yield {LABEL: b[LABEL], MASK: b[MASK], INDEX: b[INDEX], "probs": probs}


def multiscale_probabilities(g: Group, per_image: list) -> np.ndarray:
    """[M, B, scales, K]: each image's views of every scale; views of one shape run
    together, padded to a power-of-two count so that few shapes are compiled."""
    out = None
    by_shape: dict = {}
    for i, scales in enumerate(per_image):
        for j, view in enumerate(scales):
            by_shape.setdefault(view.shape, []).append((i, j, view))
    for items in by_shape.values():
        stack = np.stack([v for _, _, v in items])
        padded = 1 << (len(stack) - 1).bit_length()
        stack = np.concatenate([stack, np.repeat(stack[:1], padded - len(stack), 0)])
        p = np.asarray(g.forward(g.stacked, stack))[:, :len(items)]       # [M, n, K]
        if out is None:
            out = np.zeros((p.shape[0], len(per_image), len(per_image[0]), p.shape[-1]))
        for k, (i, j, _) in enumerate(items):
            out[:, i, j] = p[:, k]
    return out


def summarise(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Every declared metric (cnn_jax.train.metrics) of averaged probabilities [N, K],
    their logarithms standing for the logits (the same softmax), and each rate's value
    per class (`per_class_<metric>`, None for a class without examples)."""
    logits = jnp.log(jnp.maximum(jnp.asarray(probs, jnp.float32), np.finfo(np.float32).tiny))
    out = {}
    for m in METRICS:
        values = np.asarray(m.per_example(logits, jnp.asarray(labels)), np.float64)
        out[m.name] = float(values.mean())
        if m.rate:
            out[f"per_class_{m.name}"] = [float(values[labels == k].mean())
                                          if np.any(labels == k) else None
                                          for k in range(num_classes)]
    return {**out, **{alias: out[name] for alias, name in ALIASES.items()},
            "n_examples": int(len(labels))}


def evaluate(run_dirs: list, views: int = 1, data: Optional[str] = None,
             data_dir: Optional[str] = None, split: str = "test", batch: int = 250,
             crop: Optional[int] = None, progress: bool = False,
             predictions: bool = False, workers: Optional[int] = None) -> dict:
    """Error of the ensemble of `run_dirs` (training runs' --out folders or weights
    files) with `views` views per image; `predictions`: also each image's predicted
    class (`predicted`, in the split's order)."""
    views = parse_views(views)
    members = [load_member(r) for r in run_dirs]
    first = members[0]
    arrays = first.arrays(split, data, data_dir)
    data = data or first.data
    groups = build_groups(members)
    ordered = [m for g in groups for m in g.members]
    mean_probs, labels, order, seen = [], [], [], 0
    start = time.perf_counter()
    bar = tqdm(total=len(arrays), unit="img", disable=not progress, desc="evaluating")
    for out in view_probabilities(groups, arrays, views, batch, crop, workers):
        keep = out[MASK] > 0
        mean_probs.append(out["probs"][:, keep].mean(axis=(0, 2)))   # over models, views
        labels.append(out[LABEL][keep])
        order.append(out[INDEX][keep])
        seen += int(keep.sum())
        bar.update(int(keep.sum()))
    bar.close()
    wall = time.perf_counter() - start
    if seen != len(arrays):
        raise AssertionError(f"evaluated {seen} images, expected {len(arrays)}")
    probs = np.concatenate(mean_probs)
    result = summarise(probs, np.concatenate(labels), len(arrays.classes))
    if predictions:
        predicted = np.empty(len(arrays), np.int64)
        predicted[np.concatenate(order)] = probs.argmax(-1)
        result["predicted"] = predicted.tolist()
    return {**result, "classes": arrays.classes, "views": views, "models": len(members),
            "checkpoints": [m.source for m in ordered], "data": data, "split": split,
            "images_per_s": seen / wall, "forward_passes_per_s":
                seen * (5 if views == MULTISCALE else views) * len(members) / wall,
            "wall_s": wall, "backend": jax.default_backend()}


# ------------------------------------------------------------------ CLI
WEIGHTS_OUTPUT = Path("runs") / "evaluate"  # under the working directory


def default_output(r: dict) -> Path:
    """evaluate_<split>_<v>views_<m>models_<members' hash>.json in the first run's
    folder; for released weights under runs/evaluate/ of the working directory, never
    beside the weights file (a folder of downloads, maybe shared or read-only)."""
    tag = hashlib.sha256("\n".join(r["checkpoints"]).encode()).hexdigest()[:8]
    first = Path(r["checkpoints"][0])
    folder = first if first.is_dir() else WEIGHTS_OUTPUT
    return folder / (f"evaluate_{r['split']}_{r['views']}views_{r['models']}models_{tag}.json")


@exit_on_bad_input
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="RUN",
                   help="a training run's --out folder, or a PyTorch weights file "
                        "(.pth/.th/.safetensors, with --data); repeat for an ensemble")
    p.add_argument("--views", default="1", choices=[*map(str, VIEW_COUNTS), MULTISCALE],
                   help="views per image: 1 (centre), 2 (and its mirror), 10 (corners and "
                        "centre, mirrored), multiscale (full-size images: the whole image "
                        "at five scales, He et al. 2015)")
    p.add_argument("--data", default=None, help="default: the runs' training dataset "
                                                "(required for weights files)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="train: the training images (for a dataset with only train/)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding a streamed dataset (default: cores - 1)")
    p.add_argument("--crop", type=int, default=None,
                   help="view size (default: the training images' size)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--out", default=None, help="JSON file (default: evaluate_<split>_"
                   "<views>views_<models>models_<hash>.json in the first checkpoint's folder, "
                   "or in runs/evaluate/ for a weights file)")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be positive")
    r = evaluate(args.checkpoint, args.views, args.data, args.data_dir, args.split,
                 args.batch, args.crop, progress=not args.json, workers=args.workers)
    if args.split == "train":
        print("note: these are the training images, not held-out data", file=sys.stderr)
    print(f"{r['models']} model(s), {r['views']} view(s), {r['n_examples']:,} {r['split']} "
          f"images: {in_words(r, '')}  ({r['images_per_s']:,.0f} images/s)", file=sys.stderr)
    width = max(len(c) for c in r["classes"])
    rates = [m.name for m in METRICS if m.rate]
    print(f"  {'per class':<{width}}  " + "  ".join(f"{name:>8}" for name in rates),
          file=sys.stderr)
    for k, name in enumerate(r["classes"]):
        values = [r[f"per_class_{m}"][k] for m in rates]
        if values[0] is not None:
            print(f"  {name:<{width}}  " + "  ".join(f"{100 * v:7.2f}%" for v in values),
                  file=sys.stderr)
    out = Path(args.out) if args.out else default_output(r)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    except OSError as e:
        print(f"warning: could not write {out} ({e.strerror})", file=sys.stderr)
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
