"""Evaluate trained runs: one view or several per image, one network or an ensemble.

    python -m cnn_jax.evaluate --checkpoint RUN [--checkpoint RUN ...] --views {1,2,10}
        [--data NAME] [--data-dir DIR] [--split test|val] [--crop SIZE] [--json]

The prediction for an image is the softmax averaged over its views and over the
networks (Krizhevsky et al. 2012, Sec. 4.1 and 6; Szegedy et al. 2015, Sec. 7).

Views (cnn_jax.data.ops, the same for decoded arrays and streamed files):
  * images of the networks' input size (CIFAR-10's 32x32): the four corner crops and
    the centre crop of the image zero-padded by 4 pixels on each side (the padding of
    the training augmentation), each also mirrored. The centre crop is the image
    itself, so `--views 1` is the plain single view and `--views 2` adds its mirror.
  * any other image, the ImageNet way: the shorter side resized to 256 / 224 of the
    view (antialiased, rounded as torchvision), then the four corner crops and the
    centre crop, each mirrored; `--views 1` is the centre crop, `--views 2` with its
    mirror; `--views multiscale` the whole image at five scales (He et al. 2015),
    aspect ratios kept within 1 %, normalised per channel.
Every test image is used exactly once (the count is checked); with --bad-images skip
an unreadable file is left out, counted once (`skipped_images`), never replaced. Networks that
share an architecture and an input transform are evaluated together: one compiled
call maps over their stacked parameters. The metrics come from the one evaluator
(cnn_jax.train.evaluator), as the training loop's.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.accelerator import warn_if_unused
from cnn_jax.data.ops import BAD_IMAGES, VIEWS
from cnn_jax.errors import BadInput, exit_on_bad_input
from cnn_jax.files import write_atomic
from cnn_jax.train.evaluator import ENSEMBLE
from cnn_jax.train.evaluator import evaluate as evaluate_with
from cnn_jax.train.metrics import METRICS, in_words
from cnn_jax.trained import Trained, load_trained

MULTISCALE = "multiscale"           # He et al.'s fully-convolutional multi-scale test


def parse_views(views) -> str:
    """--views: 1, 2, 10 or multiscale."""
    if str(views) not in VIEWS:
        raise BadInput(f"--views must be one of {', '.join(VIEWS)}; got {views!r}")
    return str(views)


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
    forward: object   # jitted: (stacked variables, uint8 [N, H, W, C]) -> logits [M, N, K]
    stacked: dict


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
            lambda variables: net.apply(variables, images).astype(jnp.float32), stacked))
        out.append(Group(ms, forward, stacked))
    return out


def ensemble_scores(groups: list[Group]):
    """uint8 images -> logits [M, N, K] of every member, in the groups' order."""
    return lambda images: jnp.concatenate([g.forward(g.stacked, images) for g in groups])


def for_views(members: list[Trained], dataset, views: str, crop: Optional[int]):
    """The dataset at the views' side, and the members normalised for views of any
    size (the per-pixel mean's channel average) where their size is not the trained one."""
    sides = {m.image_shape[0] for m in members}
    if len(sides) > 1:
        raise BadInput(f"--checkpoint: networks trained on images of sides {sorted(sides)}; "
                       f"ensemble networks of one input side")
    if crop:
        dataset = dataclasses.replace(dataset, side=crop)
    if views == MULTISCALE or dataset.image_shape[0] != sides.pop():
        members = [dataclasses.replace(m, normaliser=m.normaliser.per_channel())
                   if m.normaliser is not None else m for m in members]
    return dataset, members


def evaluate(run_dirs: list, views="1", data: Optional[str] = None,
             data_dir: Optional[str] = None, split: str = "test", batch: int = 250,
             crop: Optional[int] = None, progress: bool = False,
             predictions: bool = False, workers: Optional[int] = None,
             bad_images: Optional[str] = None) -> dict:
    """Error of the ensemble of `run_dirs` (training runs' --out folders or weights
    files) with `views` views per image; `predictions`: also each image's predicted
    class (`predicted`, in the split's order)."""
    views = parse_views(views)
    members = [load_member(r) for r in run_dirs]
    dataset = members[0].split(split, data, data_dir)
    if bad_images is not None:
        if bad_images not in BAD_IMAGES:
            raise BadInput(f"--bad-images must be one of {', '.join(BAD_IMAGES)}; got "
                           f"{bad_images!r}")
        dataset = dataclasses.replace(dataset, bad_images=bad_images)
    data = data or members[0].data
    dataset, members = for_views(members, dataset, views, crop)
    groups = build_groups(members)
    ordered = [m for g in groups for m in g.members]
    start = time.perf_counter()
    ev = evaluate_with(ensemble_scores(groups), dataset, views=views, members=ENSEMBLE,
                       batch=batch, workers=workers, predictions=predictions,
                       progress=progress)
    wall = time.perf_counter() - start
    m = ev.metrics[0]
    result = {**m, "n_examples": m["n"], "skipped_images": ev.skipped}
    if predictions:
        result["predicted"] = ev.predicted.tolist()
    n_views = 5 if views == MULTISCALE else int(views)
    return {**result, "classes": dataset.classes, "views": views, "models": len(members),
            "checkpoints": [m.source for m in ordered], "data": data, "split": split,
            "scored": dataset.describe(),
            "images_per_s": m["n"] / wall, "forward_passes_per_s":
                m["n"] * n_views * len(members) / wall,
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
    p.add_argument("--views", default="1", choices=VIEWS,
                   help="views per image: 1 (centre), 2 (and its mirror), 10 (corners and "
                        "centre, mirrored), multiscale (full-size images: the whole image "
                        "at five scales, He et al. 2015)")
    p.add_argument("--data", default=None, help="default: the runs' training dataset "
                                                "(required for weights files)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="test: the dataset's test/; val: the run's holdout where it had one, "
                        "else the dataset's own val/ (refused where there is neither); "
                        "train: the training images (for a dataset with only train/)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding a streamed dataset (default: cores - 1)")
    p.add_argument("--bad-images", default=None, choices=BAD_IMAGES,
                   help="an unreadable file: refuse (stop, naming it) or skip (leave it out, "
                        "counted); default: the run's own setting, refuse for weights files")
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
    warn_if_unused()
    r = evaluate(args.checkpoint, args.views, args.data, args.data_dir, args.split,
                 args.batch, args.crop, progress=not args.json, workers=args.workers,
                 bad_images=args.bad_images)
    if args.split == "train":
        print("note: these are the training images, not held-out data", file=sys.stderr)
    left_out = f", {r['skipped_images']} unreadable left out" if r["skipped_images"] else ""
    print(f"{r['models']} model(s), {r['views']} view(s), {r['split']}: {r['scored']}"
          f"{left_out}: {in_words(r, '')}  ({r['images_per_s']:,.0f} images/s)",
          file=sys.stderr)
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
        write_atomic(out, json.dumps(r, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    except OSError as e:
        print(f"warning: could not write {out} ({e.strerror})", file=sys.stderr)
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
