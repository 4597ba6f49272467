"""What the network receives: the first training examples of a data recipe, as a grid.

    python -m cnn_jax.preview --data NAME [the data flags of cnn_jax.train] [--seed S]
        [--n N] --out grid.png [--json]

Draws the first N examples of the training stream exactly as a run with these data
flags and seed draws them (epoch 0, the run's shuffle, every op of the recipe), and
writes them as a PNG grid, un-normalised for display (the normalisation happens on the
device; colour shifts are added and the pixels clipped to 0-255 here). `--json` prints
one JSON object: the recipe as its op list, and per image its index, label, original
size and what each op decided (the crop box in original pixels, `flipped`, the colour
shift or PCA lighting added).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cnn_jax.data import ops
from cnn_jax.data.dataset import DataSpec, Dataset, check, open_split, with_pca
from cnn_jax.data.keys import EPOCH, IMAGE, INDEX, SHIFT
from cnn_jax.data.pipeline import train_dataset
from cnn_jax.errors import BadInput, exit_on_bad_input
from cnn_jax.files import atomic
from cnn_jax.recipe import add_arguments, flat_name


def first_examples(spec: DataSpec, n: int, seed: int) -> tuple[Dataset, dict]:
    """The training split and the first `n` examples a run of `spec` and `seed` draws."""
    check(spec)
    train = with_pca(open_split(spec, "train", training=True), spec)
    if not 0 < n <= len(train):
        raise BadInput(f"--n: between 1 and the {len(train)} training images; got {n}")
    it = iter(train_dataset(train, n, seed, workers=0))
    try:
        batch = next(it)
    finally:
        it.close()
    return train, batch


def shown(batch: dict) -> np.ndarray:
    """uint8 [N, H, W, C] as the network receives the images, before normalisation."""
    x = np.asarray(batch[IMAGE], np.float32)
    if SHIFT in batch:
        x = x + np.asarray(batch[SHIFT], np.float32)[:, None, None, :]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def op_json(op) -> dict:
    """An op as data: its name and its settings (a PCA basis by its eigenvalues)."""
    out = {"op": op.name}
    for f in dataclasses.fields(op):
        value = getattr(op, f.name)
        if isinstance(value, ops.PCABasis):
            value = {"eigenvalues": [round(float(v), 6) for v in value.eigenvalues]}
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def decisions(train: Dataset, batch: dict, seed: int) -> list[dict]:
    """Per image: its index, label, original size and each op's choice."""
    out = []
    for k, (i, e) in enumerate(zip(batch[INDEX], batch[EPOCH])):
        record, label = train.source.read(int(i))
        hw = [int(v) for v in ops.image_size(record, train.source.where(int(i)))]
        image = {"index": int(i), "epoch": int(e), "label": int(label),
                 "class": train.classes[int(label)], "size": hw}
        for op in train.ops:
            u = ops.uniforms(seed, [e], [i], op.stream, op.draws)[0] if op.draws else None
            image.update(op.decided(u, hw, train.side))
        image.setdefault("flipped", False)
        out.append(image)
    return out


def write_grid(images: np.ndarray, titles: list[str], path: Path, title: str) -> None:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    fig = Figure(figsize=(1.6 * cols, 1.75 * rows + 0.4))
    for k in range(rows * cols):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.axis("off")
        if k < len(images):
            img = images[k]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_title(titles[k], fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


@exit_on_bad_input
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn_jax.preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p.add_argument_group("data (the data section of cnn_jax.train)"), DataSpec,
                  prefix="data.")
    p.add_argument("--seed", type=int, default=0, help="the run's seed [default: 0]")
    p.add_argument("--n", type=int, default=16, help="examples shown [default: 16]")
    p.add_argument("--out", type=Path, required=True, help="the PNG grid to write")
    p.add_argument("--json", action="store_true", help="print the recipe and each image's "
                   "op decisions as one JSON object")
    args = p.parse_args(argv)
    spec = DataSpec(**{f.name: getattr(args, flat_name(f)) for f in dataclasses.fields(DataSpec)})
    train, batch = first_examples(spec, args.n, args.seed)
    found = decisions(train, batch, args.seed)
    recipe = [op_json(op) for op in train.ops]
    titles = [f"{d['class']}{' (flipped)' if d['flipped'] else ''}" for d in found]
    write_grid(shown(batch), titles, args.out,
               f"{spec.name}, --augment {spec.augment}: {' -> '.join(o['op'] for o in recipe)}"
               f" (seed {args.seed})")
    print(f"wrote {args.out}: the first {args.n} training examples of {spec.name}",
          file=sys.stderr)
    if args.json:
        print(json.dumps({"data": spec.name, "augment": spec.augment, "seed": args.seed,
                          "side": train.side, "recipe": recipe, "images": found}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
