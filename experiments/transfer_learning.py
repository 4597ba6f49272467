"""Transfer learning with a few labelled images: frozen features, fine-tuning, or
training from scratch.

The lecture's advice, tested: with little data, take a network trained on something
else, freeze it and train only a new softmax on its features (computed once and kept
on disk); with more data, unfreeze more layers; train from scratch last.

Method (the demonstration, with the data we have). A CIFAR ResNet is pretrained on
five CIFAR-10 classes (airplane, automobile, bird, cat, deer). The task is the other
five (dog, frog, horse, ship, truck) from only `per_class` labelled training images
each; accuracy is measured on all their CIFAR-10 test images. Four ways to learn it:

  frozen     the pretrained net's penultimate activations (64 numbers per image),
             cached to disk, and a new softmax trained on them (SGD, 100 epochs)
  finetune   the last stage (stage3: 6 of the 19 conv layers) and a new softmax train,
             the rest frozen with its BatchNorm statistics fixed (lr 0.01)
  full       every layer trains from the pretrained weights with a smaller step (lr 0.01)
  scratch    the same net from random weights, the usual step (lr 0.1)

finetune, full and scratch take the same number of steps of the same batch, crop +
mirror augmentation, cosine schedule; the frozen mode sees no augmentation (its
features are computed once). The pretrained net sees its inputs normalised as in its
own training (its per-pixel mean); scratch uses the per-pixel mean of its 250 images.

Presets: `quick` (CPU: ResNet-20 pretrained for 2,000 iterations at batch 32, 20
images per target class, 150 iterations per mode; about 14 minutes on a 2-core CPU),
`paper` (GPU: ResNet-20 pretrained for 16k iterations at batch 128, 50 images per
class), `smoke` (seconds, for the tests), `auto`; `--per-class N` changes the number
of labelled images. Re-running resumes: finished parts are re-read, not retrained.
Evidence: docs/results.md records the quick run.

On your own data (an ImageFolder: <root>/<class>/<image> or with train/ and val/
folders; without val/, 20 % of each class is held out), from a run of this project or
torchvision/timm weights (resnet18/34/50/101/152, vgg11-19[_bn], alexnet, googlenet):

    python -m experiments.transfer_learning --data PATH --backbone CHECKPOINT_OR_WEIGHTS
        --mode {frozen,finetune,full} --out DIR [--stages K] [--steps N] [--lr LR]
    python -m experiments.transfer_learning --predict IMAGES --out DIR
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

PRETRAIN_CLASSES = "0,1,2,3,4"   # airplane, automobile, bird, cat, deer
TARGET_CLASSES = "5,6,7,8,9"     # dog, frog, horse, ship, truck
DEMO_MODES = ("frozen", "finetune", "full", "scratch")


@dataclasses.dataclass(frozen=True)
class Preset:
    model: str
    pretrain_steps: int
    pretrain_batch: int
    per_class: int            # labelled training images per target class
    steps: int                # finetune / full / scratch
    batch: int
    softmax_epochs: int = 100
    pretrain_subset: int = 0  # >0: pretrain on a fixed subset of the five classes
    test_subset: int = 0      # >0: accuracy on a fixed subset of the target test images
    data: str = "cifar10"


PRESETS = {
    "paper": Preset("resnet20", pretrain_steps=16_000, pretrain_batch=128, per_class=50,
                    steps=500, batch=64),
    "quick": Preset("resnet20", pretrain_steps=2_000, pretrain_batch=32, per_class=20,
                    steps=150, batch=32),
    "smoke": Preset("resnet8", pretrain_steps=20, pretrain_batch=16, per_class=8, steps=6,
                    batch=16, softmax_epochs=5, pretrain_subset=160, test_subset=100),
}
LR = {"finetune": 0.01, "full": 0.01, "scratch": 0.1}


# ------------------------------------------------------------------ one mode
def engine_config(mode: str, base, backbone, lr: float, steps: int, batch: int,
                  stages: int, out: Path, n_train: int, augment: bool = True):
    """The TrainConfig of a finetune / full / scratch run on `base`'s data (`n_train`
    training images: the batch is at most that)."""
    from cnn_jax.transfer import trainable_for
    pretrained = mode != "scratch"
    return dataclasses.replace(
        base, model=backbone.model, model_options=dict(backbone.options),
        init_from=backbone.source if pretrained else "",
        init_skip=backbone.head if pretrained else "",
        trainable=trainable_for(backbone, stages) if mode == "finetune" else "",
        normalise=backbone.normalise if pretrained else "per_pixel",
        resize=backbone.resize, steps=steps, batch=min(batch, n_train), lr=lr,
        momentum=0.9, weight_decay=5e-4, schedule="cosine",
        crop_pad=max(1, backbone.input_size // 8) if augment else 0, flip=augment,
        log_every=max(1, steps // 10), eval_every=steps, checkpoint_every=steps,
        eval_batch=250, out=str(out), progress=False)


def trained_params(variables: dict, trainable: str) -> int:
    import jax
    from cnn_jax.train.steps import is_trainable
    names = tuple(t for t in trainable.split(",") if t)
    return int(sum(np.size(leaf) for k, tree in variables["params"].items()
                   if is_trainable(k, names) for leaf in jax.tree_util.tree_leaves(tree)))


def run_frozen(base, backbone, out: Path, epochs: int, eval_split: str) -> dict:
    """Mode 1: cached penultimate features + a new softmax. A finished one (its
    result.json beside model.json) is re-read, not retrained."""
    from cnn_jax.train.inputs import split_arrays, subset, training_arrays
    from cnn_jax.transfer import (MODEL_FILE, cached_features, save_classifier,
                                  train_softmax, with_head)
    done = out / "result.json"
    if done.exists() and (out / MODEL_FILE).exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    train = training_arrays(base)
    val = subset(split_arrays(base, eval_split), base.eval_subset)
    f_train, info = cached_features(out / "features", "train", backbone, train)
    f_val, _ = cached_features(out / "features", eval_split, backbone, val)
    head, timing = train_softmax(f_train, train.labels, len(train.classes), epochs=epochs)
    logits = np.asarray(f_val) @ head["kernel"] + head["bias"]
    accuracy = float(np.mean(logits.argmax(-1) == val.labels))
    variables = with_head(backbone, head)
    save_classifier(out, model=backbone.model, options=backbone.options, classes=train.classes,
                    image_size=backbone.image_size, resize=backbone.resize,
                    normaliser=backbone.normaliser(), variables=variables)
    extract = info["extract_s"]
    row = {"mode": "frozen", "val_accuracy": accuracy, "wall_s": time.perf_counter() - start,
            "trained_params": int(head["kernel"].size + head["bias"].size),
            "feature_dim": int(f_train.shape[1]), "epochs": epochs,
            "features_cached": info["cached"], "feature_extraction_s": extract,
            "epoch_s_cached": timing["epoch_s"],
            "epoch_s_recomputed": extract + timing["epoch_s"],
            "speedup_per_epoch": (extract + timing["epoch_s"]) / timing["epoch_s"],
            "n_train": len(train), "n_val": len(val)}
    done.write_text(json.dumps(row, indent=1))
    return row


def run_engine(mode: str, cfg, backbone, command: str, eval_split: str, out: Path,
               train) -> dict:
    """Modes 2 and 3 (and training from scratch): a run of the training engine in
    `cfg.out`, a folder inside `out` (where model.json goes); `train`: its images."""
    from cnn_jax.train.checkpoint import load_variables
    from cnn_jax.train.inputs import source_normaliser
    from cnn_jax.train.sweep import run_all
    from cnn_jax.transfer import save_classifier
    res = run_all([cfg], command, [mode])[0]
    run = Path(cfg.out)
    normaliser = source_normaliser(str(run))  # the run saved what it used
    save_classifier(out, model=cfg.model, options=cfg.model_options, classes=train.classes,
                    image_size=backbone.image_size, resize=cfg.resize, normaliser=normaliser,
                    run=str(run.relative_to(out)))
    return {"mode": mode, "val_accuracy": 1 - res[f"final_{eval_split}_error"],
            "wall_s": res["wall_s"],
            "trained_params": trained_params(load_variables(run), cfg.trainable),
            "trainable": cfg.trainable or "all", "steps": cfg.steps, "batch": cfg.batch,
            "lr": cfg.lr, "augmentation": f"crop (pad {cfg.crop_pad}) + mirror",
            "img_per_s": res["img_per_s"], "n_train": len(train)}


# ------------------------------------------------------------------ outputs
def table(rows: list[dict], note: str) -> str:
    lines = ["| mode | what trains | val accuracy (%) | wall time (s) | trained params |",
             "|---|---|---:|---:|---:|"]
    what = {"frozen": "new softmax on cached features", "finetune": "last stage + new softmax",
            "full": "everything, from pretrained", "scratch": "everything, from random"}
    for r in rows:
        lines.append(f"| {r['mode']} | {what[r['mode']]} | {100 * r['val_accuracy']:.2f} | "
                     f"{r['wall_s']:.1f} | {r['trained_params']:,} |")
    frozen = next((r for r in rows if r["mode"] == "frozen"), None)
    if frozen:
        lines += ["", f"Frozen mode: features extracted once in {frozen['feature_extraction_s']:.2f} s; "
                      f"one softmax epoch on cached features {1000 * frozen['epoch_s_cached']:.1f} ms "
                      f"vs {1000 * frozen['epoch_s_recomputed']:.1f} ms recomputing them "
                      f"({frozen['speedup_per_epoch']:.0f}x faster per epoch)."]
    return "\n".join(lines + ["", note])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["mode"] for r in rows]
    x = np.arange(len(rows))
    ax.bar(x, [100 * r["val_accuracy"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    ax.set_xticks(x, names)
    ax.set_ylabel("accuracy on the new classes (%)")
    ax.grid(axis="y", alpha=0.3)
    bx.bar(x, [r["wall_s"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    bx.set_xticks(x, names)
    bx.set_ylabel("wall time (s)")
    bx.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, payload: dict, rows: list, note: str, title: str) -> None:
    (out / "results.json").write_text(json.dumps({**payload, "runs": rows}, indent=1))
    (out / "table.md").write_text(table(rows, note) + "\n")
    plot(rows, out / "transfer.png", title)
    print(table(rows, note))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'transfer.png'}")


# ------------------------------------------------------------------ the demonstration
def demonstration(args, preset_name: str, preset: Preset, why: str) -> int:
    from cnn_jax.train import TrainConfig
    from cnn_jax.train.inputs import training_arrays
    from cnn_jax.train.loop import hardware, versions
    from cnn_jax.train.sweep import guard_out, run_all
    from cnn_jax.transfer import load_backbone

    out = Path(args.out or f"runs/transfer_learning-{preset_name}")
    data = args.data_name or preset.data
    guard_out(out, {"preset": preset_name, **dataclasses.asdict(preset), "data": data})
    common = dict(data=data, data_dir=args.data_dir, workers=args.workers, progress=False)
    pretrain = TrainConfig(
        model=preset.model, classes=PRETRAIN_CLASSES, train_subset=preset.pretrain_subset,
        eval_subset=preset.test_subset, steps=preset.pretrain_steps, batch=preset.pretrain_batch,
        lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", crop_pad=4, flip=True,
        normalise="per_pixel", log_every=max(1, preset.pretrain_steps // 20),
        eval_every=preset.pretrain_steps, checkpoint_every=max(1, min(2_000, preset.pretrain_steps // 2)),
        eval_batch=500, out=str(out / "pretrain"), **common)
    print(f"pretraining {preset.model} on classes {PRETRAIN_CLASSES}", file=sys.stderr)
    pre = run_all([pretrain], args.command, ["pretrain"])[0]
    backbone = load_backbone(out / "pretrain")
    target = TrainConfig(model=preset.model, classes=TARGET_CLASSES,
                         train_subset=5 * preset.per_class, eval_subset=preset.test_subset,
                         out="", **common)
    train = training_arrays(target)
    rows = []
    for mode in args.modes:
        print(f"{mode}: {preset.per_class} images per class", file=sys.stderr)
        if mode == "frozen":
            rows.append(run_frozen(target, backbone, out / mode, preset.softmax_epochs, "test"))
        else:
            cfg = engine_config(mode, target, backbone, LR[mode], preset.steps, preset.batch,
                                1, out / mode / "run", len(train))
            rows.append(run_engine(mode, cfg, backbone, args.command, "test", out / mode, train))
    note = (f"Data: {data}" + (" (the local JPEG re-encoded copy)" if data == "cifar10" else "") +
            f". Backbone: {preset.model} pretrained on classes {PRETRAIN_CLASSES} (airplane, "
            f"automobile, bird, cat, deer) for {preset.pretrain_steps} iterations at batch "
            f"{preset.pretrain_batch} (test accuracy on those classes "
            f"{100 * (1 - pre['final_test_error']):.2f} %). Task: classes {TARGET_CLASSES} (dog, "
            f"frog, horse, ship, truck) from {preset.per_class} training images per class (a "
            f"fixed stratified subset); accuracy on "
            f"{'a fixed ' + str(preset.test_subset) + '-image subset of ' if preset.test_subset else 'all '}"
            f"their test images, after the last step (no selection on it). One seed (0). "
            f"Command: `{args.command}`.")
    write(out, {"preset": preset_name, "preset_reason": why, "command": args.command,
                "versions": versions(), "hardware": hardware(),
                "pretrain": {"test_accuracy": 1 - pre["final_test_error"], "wall_s": pre["wall_s"],
                             "classes": PRETRAIN_CLASSES}},
          rows, note, f"{preset.model}: transfer to 5 new CIFAR-10 classes with "
                      f"{preset.per_class} images each (preset {preset_name})")
    return 0


# ------------------------------------------------------------------ the user's own data
def users_run(args) -> int:
    from cnn_jax.data import DataError
    from cnn_jax.train import TrainConfig
    from cnn_jax.train.inputs import split_arrays, training_arrays
    from cnn_jax.train.loop import hardware, versions
    from cnn_jax.train.sweep import guard_out
    from cnn_jax.transfer import load_backbone

    if not args.backbone:
        raise ValueError("--data needs --backbone (a run folder of this project or a "
                         "torchvision/timm .pth/.safetensors file)")
    backbone = load_backbone(args.backbone, args.arch)
    data = f"imagefolder:{Path(args.data).expanduser()}"
    base = TrainConfig(model=backbone.model, data=data, image_size=backbone.image_size,
                       workers=args.workers, out="", progress=False)
    train = training_arrays(base)
    try:
        split_arrays(base, "test")
        eval_split, note_split = "test", "its own val/ (or test/) folder"
    except DataError:  # no held-out folder: 20 % of each class, fixed
        holdout = max(len(train.classes), round(0.2 * len(train)))
        base = dataclasses.replace(base, holdout=holdout)
        eval_split, note_split = "val", f"a fixed stratified holdout of {holdout} training images"
    out = Path(args.out)
    guard_out(out, {"mode": args.mode, "backbone": str(args.backbone), "data": data,
                    "steps": args.steps, "lr": args.lr, "stages": args.stages,
                    "epochs": args.epochs, "augment": args.augment})
    print(f"{backbone.model} from {backbone.source}: {len(train.classes)} classes "
          f"({', '.join(train.classes[:10])}{', ...' if len(train.classes) > 10 else ''}), "
          f"{len(train)} training images, evaluated on {note_split}", file=sys.stderr)
    if args.mode == "frozen":
        print("frozen mode: the features are computed once and cached, so augmentation "
              "is off" + (" (--augment ignored; " if args.augment else " (") +
              "use --mode finetune or full to augment)", file=sys.stderr)
        row = run_frozen(base, backbone, out, args.epochs, eval_split)
    else:
        if base.holdout:
            train = training_arrays(base)  # without the held-out images
        cfg = engine_config(args.mode, base, backbone, args.lr or LR[args.mode], args.steps,
                            args.batch, args.stages, out / "run", len(train),
                            augment=args.augment is not False)
        row = run_engine(args.mode, cfg, backbone, args.command, eval_split, out, train)
    note = (f"Data: {args.data}; backbone {backbone.model} from {backbone.source}; evaluated on "
            f"{note_split}. Command: `{args.command}`.")
    write(out, {"command": args.command, "versions": versions(), "hardware": hardware(),
                "classes": train.classes}, [row], note,
          f"{backbone.model} -> {Path(args.data).name} ({args.mode})")
    return 0


def predictions(args) -> int:
    from cnn_jax.transfer import predict
    rows = predict(Path(args.out), Path(args.predict))
    target = Path(args.out) / f"predictions-{Path(args.predict).name}.csv"
    with open(target, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "class", "probability"])
        w.writeheader()
        w.writerows(rows)
    for r in rows[:20]:
        print(f"{r['file']}\t{r['class']}\t{r['probability']:.3f}")
    if len(rows) > 20:
        print(f"... {len(rows) - 20} more")
    print(f"wrote {target}")
    return 0


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    from cnn_jax.data import DataError
    from cnn_jax.models.convert import WeightsMismatch
    from cnn_jax.train.loop import ConfigMismatch
    from cnn_jax.train.sweep import choose_preset
    from cnn_jax.transfer import MODES

    p = argparse.ArgumentParser(prog="python -m experiments.transfer_learning",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="the demonstration's size (without --data)")
    p.add_argument("--modes", nargs="+", choices=DEMO_MODES, default=list(DEMO_MODES),
                   help="the demonstration's modes")
    p.add_argument("--per-class", type=int, default=None,
                   help="the demonstration's labelled images per new class (default per preset)")
    p.add_argument("--data", default=None, help="your ImageFolder (dir or archive)")
    p.add_argument("--backbone", default=None,
                   help="a run folder of this project, or torchvision/timm weights")
    p.add_argument("--arch", default=None, help="the weights' architecture (default: detected)")
    p.add_argument("--mode", choices=MODES, default="frozen")
    p.add_argument("--stages", type=int, default=1, help="finetune: stages that train")
    p.add_argument("--steps", type=int, default=300, help="finetune/full steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default 0.01 (finetune, full)")
    p.add_argument("--epochs", type=int, default=100, help="frozen: softmax epochs")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="crop + mirror (finetune/full: on by default; frozen: impossible)")
    p.add_argument("--predict", default=None, metavar="DIR",
                   help="label every image in DIR with the model trained in --out")
    p.add_argument("--out", default=None)
    p.add_argument("--data-name", default=None, help="the demonstration's dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    args.command = " ".join(["python -m experiments.transfer_learning",
                             *(sys.argv[1:] if argv is None else argv)])
    if (args.data or args.predict) and not args.out:
        p.error("--data and --predict need --out")
    if min(args.steps, args.epochs, args.stages, args.batch, args.per_class or 1) < 1:
        p.error("--steps, --epochs, --stages, --batch and --per-class must be positive")
    try:
        if args.predict:
            return predictions(args)
        if args.data:
            return users_run(args)
        preset_name, why = choose_preset(args.preset)
        print(f"preset {preset_name} ({why})", file=sys.stderr)
        preset = PRESETS[preset_name]
        if args.per_class:
            preset = dataclasses.replace(preset, per_class=args.per_class)
        return demonstration(args, preset_name, preset, why)
    except (DataError, ConfigMismatch, WeightsMismatch, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
