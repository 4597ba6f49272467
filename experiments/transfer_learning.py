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
class), `smoke` (seconds, for the tests), `auto`; `--set per_class=N` changes the number
of labelled images, `--set steps=N batch=N` the fine-tuning runs' length and batch, and
any other training field (`--set lr=0.05 label_smoothing=0.1`) reaches the finetune,
full and scratch runs. Re-running resumes: finished parts are re-read, not retrained.
Evidence: docs/results.md records the quick run.

On your own data (an ImageFolder: <root>/<class>/<image> or with train/ and val/
folders; without val/ or test/, 20 % of each class is held out), from a run of this
project or torchvision/timm weights (resnet18/34/50/101/152, vgg11-19[_bn], alexnet,
googlenet):

    python -m experiments.transfer_learning --data PATH --backbone CHECKPOINT_OR_WEIGHTS
        --mode {frozen,finetune,full} --out DIR [--seeds N] [--stages K] [--steps N] [--lr LR]
    python -m experiments.transfer_learning --predict IMAGES --out DIR [--mode M]

The demonstration's own dataset is --data NAME (default cifar10) without --backbone;
the flags of your own data's runs (--mode --arch --stages --steps --batch --lr
--epochs --augment) are refused there: the demonstration takes its settings from its
presets (--set).

Every mode run into one --out lands in DIR/<mode>/seed<k>/; the table and the plot
compare all of them (mean ± std over seeds) with the accuracy of always answering the
most common training class. DIR/data.json says which images were used, per class and
split, which were skipped and why, and which split was scored.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from cnn_jax.data import DataError
from cnn_jax.errors import BadInput, exit_on_bad_input
from cnn_jax.files import atomic, write_atomic
from cnn_jax.experiment import Context, Experiment, Report, figure, guard_out, mean_std
from cnn_jax.train import TrainConfig
from cnn_jax.data.dataset import subset
from cnn_jax.train.inputs import source_normaliser, split_of, training_split
from cnn_jax.train.checkpoint import load_variables
from cnn_jax.train.steps import is_trainable
from cnn_jax.train.sweep import run_all
from cnn_jax.trained import MODEL_FILE
from cnn_jax.transfer import (MODES, cached_features, head_of, load_backbone, predict,
                              save_classifier, train_softmax, trainable_for, with_head)

PRETRAIN_CLASSES = "0,1,2,3,4"   # airplane, automobile, bird, cat, deer
TARGET_CLASSES = "5,6,7,8,9"     # dog, frog, horse, ship, truck
DEMO_MODES = ("frozen", "finetune", "full", "scratch")


@dataclasses.dataclass(frozen=True)
class Preset:
    model: str
    pretrain_steps: int
    pretrain_batch: int
    per_class: int            # labelled training images per target class
    softmax_epochs: int = 100
    seeds: int = 1            # of every mode (the backbone is one)
    pretrain_subset: int = 0  # >0: pretrain on a fixed subset of the five classes
    test_subset: int = 0      # >0: accuracy on a fixed subset of the target test images
    data: str = "cifar10"
    # the finetune / full / scratch runs' training fields: steps, batch (and --set's)
    train: dict = dataclasses.field(default_factory=dict)


PRESETS = {
    "paper": Preset("resnet20", pretrain_steps=16_000, pretrain_batch=128, per_class=50,
                    train=dict(steps=500, batch=64)),
    "quick": Preset("resnet20", pretrain_steps=2_000, pretrain_batch=32, per_class=20,
                    seeds=3, train=dict(steps=150, batch=32)),
    "smoke": Preset("resnet8", pretrain_steps=20, pretrain_batch=16, per_class=8,
                    softmax_epochs=5, pretrain_subset=160, test_subset=100,
                    train=dict(steps=6, batch=16)),
}
LR = {"finetune": 0.01, "full": 0.01, "scratch": 0.1}
# a mode's settings (its folder's guard): these two, and the rest TrainConfig fields
MODE_KNOBS = ("stages", "augment")
USERS_FLAGS = ("mode", "arch", "stages", "steps", "batch", "lr", "epochs", "augment")


# ------------------------------------------------------------------ one mode
def engine_config(mode: str, base, backbone, settings: dict, out: Path, n_train: int,
                  seed: int = 0):
    """The TrainConfig of a finetune / full / scratch run on `base`'s data (`n_train`
    training images: the batch is at most that): the mode's recipe, then the training
    fields of its `settings` (lr, steps, batch and any --set) over it."""
    pretrained, augment = mode != "scratch", settings["augment"]
    train = {k: v for k, v in settings.items() if k not in MODE_KNOBS}
    steps = train["steps"]
    fields = dict(
        model=backbone.model_name, model_options=dict(backbone.options), seed=seed,
        init_from=backbone.source if pretrained else "",
        init_skip=head_of(backbone) if pretrained else "",
        trainable=trainable_for(backbone, settings["stages"]) if mode == "finetune" else "",
        normalise="source" if pretrained else "per_pixel", resize=backbone.resize,
        momentum=0.9, weight_decay=5e-4, schedule="cosine",
        crop_pad=max(1, backbone.input_size // 8) if augment else 0, flip=augment,
        log_every=max(1, steps // 10), eval_every=steps, checkpoint_every=steps,
        eval_batch=250, out=str(out), progress=False)
    return base.replace(**{**fields, **train, "batch": min(train["batch"], n_train)})


def trained_params(variables: dict, trainable: str) -> int:
    names = tuple(t for t in trainable.split(",") if t)
    return int(sum(np.size(leaf) for k, tree in variables["params"].items()
                   if is_trainable(k, names) for leaf in jax.tree_util.tree_leaves(tree)))


def run_frozen(base, backbone, out: Path, epochs: int, eval_split: str, seed: int = 0,
               features: Optional[Path] = None) -> dict:
    """Mode 1: cached penultimate features (in `features`, default out/features: the
    seeds of a study share them) + a new softmax. A finished one (its result.json
    beside model.json) is re-read, not retrained."""
    done = out / "result.json"
    if done.exists() and (out / MODEL_FILE).exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    train = training_split(base)
    val = subset(split_of(base, eval_split), base.data.eval_subset)
    features = features or out / "features"
    f_train, info = cached_features(features, "train", backbone, train)
    f_val, _ = cached_features(features, eval_split, backbone, val)
    head, timing = train_softmax(f_train, train.labels, len(train.classes), epochs=epochs,
                                 seed=seed)
    logits = np.asarray(f_val) @ head["kernel"] + head["bias"]
    accuracy = float(np.mean(logits.argmax(-1) == val.labels))
    variables = with_head(backbone, head)
    save_classifier(out, model=backbone.model_name, options=backbone.options,
                    classes=train.classes, image_size=backbone.image_shape[0],
                    resize=backbone.resize, normaliser=backbone.normaliser, variables=variables)
    extract = info["extract_s"]
    row = {"mode": "frozen", "seed": seed, "val_accuracy": accuracy,
           "wall_s": time.perf_counter() - start,
            "trained_params": int(head["kernel"].size + head["bias"].size),
            "feature_dim": int(f_train.shape[1]), "epochs": epochs,
            "features_cached": info["cached"], "feature_extraction_s": extract,
            "epoch_s_cached": timing["epoch_s"],
            "epoch_s_recomputed": extract + timing["epoch_s"],
            "speedup_per_epoch": (extract + timing["epoch_s"]) / timing["epoch_s"],
            "n_train": len(train), "n_val": len(val)}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(done, json.dumps(row, indent=1))
    return row


def run_engine(mode: str, cfg, backbone, command: str, eval_split: str, out: Path,
               train) -> dict:
    """Modes 2 and 3 (and training from scratch): a run of the training engine in
    `cfg.run.out`, a folder inside `out` (where model.json goes); `train`: its images."""
    res = run_all([cfg], command, [mode])[0]
    run = Path(cfg.run.out)
    normaliser = source_normaliser(str(run))  # the run saved what it used
    save_classifier(out, model=cfg.model.name, options=cfg.model.options, classes=train.classes,
                    image_size=backbone.image_shape[0], resize=cfg.data.resize, normaliser=normaliser,
                    run=str(run.relative_to(out)))
    row = {"mode": mode, "seed": cfg.run.seed, "val_accuracy": 1 - res[f"final_{eval_split}_error"],
           "wall_s": res["wall_s"],
            "trained_params": trained_params(load_variables(run), cfg.model.trainable),
            "trainable": cfg.model.trainable or "all", "steps": cfg.schedule.steps, "batch": cfg.optimiser.batch,
            "lr": cfg.schedule.lr, "augmentation": f"crop (pad {cfg.data.crop_pad}) + mirror",
           "img_per_s": res["img_per_s"], "n_train": len(train)}
    write_atomic(out / "result.json", json.dumps(row, indent=1))
    return row


def run_mode(mode: str, base, backbone, study: Path, seed: int, eval_split: str, train,
             command: str, settings: dict) -> dict:
    """One mode and seed of a study in study/<mode>/seed<seed>/ (a finished one is
    re-read); the mode's settings guard study/<mode>/ (another setting: another --out)."""
    guard_out(study / mode, settings)
    out = study / mode / f"seed{seed}"
    if mode == "frozen":
        return run_frozen(base, backbone, out, settings["epochs"], eval_split, seed,
                          features=study / mode / "features")
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = engine_config(mode, base, backbone, settings, out / "run", len(train), seed=seed)
    return run_engine(mode, cfg, backbone, command, eval_split, out, train)


def study_rows(study: Path) -> list[dict]:
    """Every mode and seed run in `study` (folder order: the modes' order of DEMO_MODES)."""
    rows = [json.loads(f.read_text()) for f in study.glob("*/seed*/result.json")]
    order = {m: i for i, m in enumerate(DEMO_MODES)}
    return sorted(rows, key=lambda r: (order.get(r["mode"], 99), r["seed"]))


def by_mode(rows: list[dict]) -> dict:
    """mode -> its rows (seeds), in the rows' order."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["mode"], []).append(r)
    return out


# ------------------------------------------------------------------ the data, said plainly
def data_report(train, evaluation, scored: str) -> dict:
    """Per class: training images used, evaluation images, files skipped (and why)."""
    def per_class(arrays):
        counts = np.bincount(arrays.labels, minlength=len(arrays.classes))
        return dict(zip(arrays.classes, counts.tolist()))
    skipped = [{"file": f, "reason": why} for f, why in train.skipped + evaluation.skipped]
    majority = int(np.bincount(train.labels, minlength=len(train.classes)).argmax())
    return {"scored": scored, "classes": train.classes, "train": per_class(train),
            "evaluated": per_class(evaluation), "skipped": skipped,
            "majority_class": train.classes[majority],
            "majority_accuracy": float(np.mean(evaluation.labels == majority))}


def print_report(report: dict) -> None:
    width = max(len(c) for c in report["classes"])
    print(f"scored on {report['scored']}", file=sys.stderr)
    print(f"  {'class':<{width}}  training images  evaluated", file=sys.stderr)
    for c in report["classes"]:
        print(f"  {c:<{width}}  {report['train'][c]:>15,}  {report['evaluated'][c]:>9,}",
              file=sys.stderr)
    if report["skipped"]:
        print(f"  skipped {len(report['skipped'])} file(s) (all listed in data.json):",
              file=sys.stderr)
        for s in report["skipped"][:5]:
            print(f"    {s['file']}: {s['reason']}", file=sys.stderr)
    print(f"  always answering the most common class ({report['majority_class']}) would "
          f"score {100 * report['majority_accuracy']:.1f} %", file=sys.stderr)


# ------------------------------------------------------------------ outputs
WHAT = {"frozen": "new softmax on cached features", "finetune": "last stage(s) + new softmax",
        "full": "everything, from pretrained", "scratch": "everything, from random"}


def table(rows: list[dict], report: dict, note: str) -> str:
    lines = ["| mode | what trains | accuracy (%) | seeds | wall time per seed (s) | "
             "trained params |", "|---|---|---:|---:|---:|---:|"]
    for mode, rs in by_mode(rows).items():
        lines.append(f"| {mode} | {WHAT[mode]} | {mean_std([100 * r['val_accuracy'] for r in rs])}"
                     f" | {len(rs)} | {np.mean([r['wall_s'] for r in rs]):.1f} | "
                     f"{rs[0]['trained_params']:,} |")
    lines.append(f"| baseline | always the most common training class "
                 f"({report['majority_class']}) | {100 * report['majority_accuracy']:.2f} | - | "
                 f"- | 0 |")
    frozen = by_mode(rows).get("frozen", [None])[0]
    if frozen:
        lines += ["", f"Frozen mode: features extracted once in {frozen['feature_extraction_s']:.2f} s; "
                      f"one softmax epoch on cached features {1000 * frozen['epoch_s_cached']:.1f} ms "
                      f"vs {1000 * frozen['epoch_s_recomputed']:.1f} ms recomputing them "
                      f"({frozen['speedup_per_epoch']:.0f}x faster per epoch)."]
    return "\n".join(lines + ["", f"Scored on {report['scored']}. " + note])


def plot(rows: list[dict], report: dict, path: Path, title: str) -> None:
    """Accuracy per mode (mean, ± std over seeds, each seed a dot) against the
    majority-class baseline; wall time per mode."""
    modes = by_mode(rows)
    x = np.arange(len(modes))
    colours = [f"C{i}" for i in range(len(modes))]
    acc = [100 * np.array([r["val_accuracy"] for r in rs]) for rs in modes.values()]
    with figure(path, title, 1, 2, figsize=(10, 3.8)) as (ax, bx):
        ax.bar(x, [a.mean() for a in acc], color=colours, capsize=4,
               yerr=[a.std(ddof=1) if len(a) > 1 else 0 for a in acc])
        for i, a in enumerate(acc):
            ax.plot(np.full(len(a), i), a, "k.", markersize=4)
        ax.axhline(100 * report["majority_accuracy"], color="k", linestyle="--", linewidth=1,
                   label=f"always '{report['majority_class']}'")
        ax.set_xticks(x, list(modes))
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
        bx.bar(x, [np.mean([r["wall_s"] for r in rs]) for rs in modes.values()], color=colours)
        bx.set_xticks(x, list(modes))
        bx.set_ylabel("wall time per seed (s)")
        bx.grid(axis="y", alpha=0.3)


def report_of(out: Path, payload: dict, data: dict, note: str, title: str) -> Report:
    """What the study in `out` has to say: every mode and seed run in it, the data
    report (also kept as data.json), the table and the plot."""
    rows = study_rows(out)
    write_atomic(out / "data.json", json.dumps(data, indent=1))
    return Report(results={**payload, "data": data, "runs": rows}, table=table(rows, data, note),
                  plot=lambda path: plot(rows, data, path, title))


# ------------------------------------------------------------------ the demonstration
def pretrain_config(preset: Preset, out: Path, **common) -> TrainConfig:
    """The backbone's run: the preset's model on the five pretraining classes."""
    steps = preset.pretrain_steps
    return TrainConfig(
        model=preset.model, classes=PRETRAIN_CLASSES, train_subset=preset.pretrain_subset,
        eval_subset=preset.test_subset, steps=steps, batch=preset.pretrain_batch, lr=0.1,
        momentum=0.9, weight_decay=5e-4, schedule="cosine", crop_pad=4, flip=True,
        normalise="per_pixel", log_every=max(1, steps // 20), eval_every=steps,
        checkpoint_every=max(1, min(2_000, steps // 2)), eval_batch=500, out=str(out),
        **common)


def demonstration(ctx: Context) -> Report:
    args, preset, seeds = ctx.args, ctx.preset, ctx.seeds
    out, data = ctx.out, args.data or ctx.preset.data
    common = dict(data=data, data_dir=args.data_dir, workers=args.workers, progress=False)
    pretrain = pretrain_config(preset, out / "pretrain", **common)
    print(f"pretraining {preset.model} on classes {PRETRAIN_CLASSES} into {out / 'pretrain'} "
          f"(the backbone)", file=sys.stderr)
    pre = run_all([pretrain], ctx.command, ["pretrain"])[0]
    backbone = load_backbone(out / "pretrain")
    target = TrainConfig(model=preset.model, classes=TARGET_CLASSES,
                         train_subset=5 * preset.per_class, eval_subset=preset.test_subset,
                         out="", **common)
    train = training_split(target)
    test = subset(split_of(target, "test"), preset.test_subset)
    report = data_report(train, test, f"the test/ folder ({len(test):,} images of the five "
                                      f"new classes)")
    print_report(report)
    for mode in args.modes:
        for seed in range(seeds):
            print(f"{mode}, seed {seed}: {preset.per_class} images per class", file=sys.stderr)
            settings = {"epochs": preset.softmax_epochs} if mode == "frozen" else {
                "lr": LR[mode], "stages": 1, "augment": True, **preset.train}
            run_mode(mode, target, backbone, out, seed, "test", train, ctx.command, settings)
    note = (f"Data: {data}" + (" (the local JPEG re-encoded copy)" if data == "cifar10" else "") +
            f". Backbone: {preset.model} pretrained on classes {PRETRAIN_CLASSES} (airplane, "
            f"automobile, bird, cat, deer) for {preset.pretrain_steps} iterations at batch "
            f"{preset.pretrain_batch} (test accuracy on those classes "
            f"{100 * (1 - pre['final_test_error']):.2f} %), in `{out / 'pretrain'}`. Task: "
            f"classes {TARGET_CLASSES} (dog, frog, horse, ship, truck) from "
            f"{preset.per_class} training images per class (a fixed stratified subset); "
            f"accuracy after the last step (no selection on the test images); seeds "
            f"0..{seeds - 1} of each mode (the backbone is one). Command: `{ctx.command}`.")
    return report_of(out, {"pretrain": {"test_accuracy": 1 - pre["final_test_error"],
                                        "wall_s": pre["wall_s"], "classes": PRETRAIN_CLASSES,
                                        "run": str(out / "pretrain")}},
                     report, note, f"{preset.model}: transfer to 5 new CIFAR-10 classes with "
                                   f"{preset.per_class} images each (preset {ctx.preset_name}, "
                                   f"{seeds} seeds)")


# ------------------------------------------------------------------ the user's own data
def evaluation_split(base):
    """(config, split, what it is in words): the data's own test/, else its val/, else a
    fixed stratified 20 % of train/ (named 'val': the split is what its name says)."""
    for split in ("test", "val"):
        try:
            held = split_of(base, split)
            return base, split, f"its {split}/ folder ({len(held):,} images)"
        except DataError:
            continue
    train = training_split(base)
    holdout = max(len(train.classes), round(0.2 * len(train)))
    return (base.replace(holdout=holdout), "val",
            f"a fixed stratified 20 % of its train/ images ({holdout:,}; there is no "
            f"val/ or test/ folder)")


def mode_settings(ctx: Context) -> dict:
    """What the user's mode trains with (its folder's guard): the flags (their defaults
    where not given) and --set's training fields."""
    args, mode = ctx.args, ctx.args.mode or "frozen"
    if mode == "frozen":
        return {"epochs": args.epochs or 100}
    return {"lr": args.lr or LR[mode], "steps": args.steps or 300, "batch": args.batch or 32,
            "stages": args.stages or 1, "augment": args.augment is not False,
            **ctx.training_overrides}


def users_run(ctx: Context) -> Report:
    args, mode = ctx.args, ctx.args.mode or "frozen"
    backbone = load_backbone(args.backbone, args.arch)
    data = f"imagefolder:{Path(args.data).expanduser()}"
    base = TrainConfig(model=backbone.model_name, data=data, image_size=backbone.image_shape[0],
                       workers=args.workers, out="", progress=False)
    base, eval_split, scored = evaluation_split(base)
    train = training_split(base)
    report = data_report(train, split_of(base, eval_split), scored)
    print(f"{backbone.model_name} from {backbone.source}: {len(train.classes)} classes, "
          f"{len(train)} training images", file=sys.stderr)
    print_report(report)
    if mode == "frozen":
        print("frozen mode: the features are computed once and cached, so augmentation "
              "is off" + (" (--augment ignored; " if args.augment else " (") +
              "use --mode finetune or full to augment)", file=sys.stderr)
    for seed in range(args.seeds or 1):
        run_mode(mode, base, backbone, ctx.out, seed, eval_split, train, ctx.command,
                 mode_settings(ctx))
    note = (f"Data: {args.data}; backbone {backbone.model_name} from {backbone.source}. Every "
            f"mode run into `{ctx.out}` is listed. Command of the last: `{ctx.command}`.")
    return report_of(ctx.out, {"config": {"backbone": str(args.backbone), "data": data,
                                          mode: mode_settings(ctx)},
                               "classes": train.classes}, report, note,
                     f"{backbone.model_name} -> {Path(args.data).name}")


def predictions(args) -> int:
    study = Path(args.out)
    if (study / MODEL_FILE).exists():     # a classifier folder itself
        chosen = study
    else:
        rows = [r for r in study_rows(study) if not args.mode or r["mode"] == args.mode]
        if not rows:
            raise BadInput(f"--out {study}: no {MODEL_FILE} and no trained mode"
                           f"{' ' + args.mode if args.mode else ''} in it (expected the "
                           f"--out folder of a transfer_learning run)")
        best = max(rows, key=lambda r: r["val_accuracy"])
        chosen = study / best["mode"] / f"seed{best['seed']}"
        print(f"predicting with {best['mode']} seed {best['seed']} (accuracy "
              f"{100 * best['val_accuracy']:.1f} %; --mode picks another)", file=sys.stderr)
    rows = predict(chosen, Path(args.predict))
    target = study / f"predictions-{Path(args.predict).name}.csv"
    with atomic(target) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "class", "probability"])
        w.writeheader()
        w.writerows(rows)
    for r in rows[:20]:
        print(f"{r['file']}\t{r['class']}\t{r['probability']:.3f}")
    if len(rows) > 20:
        print(f"... {len(rows) - 20} more")
    print(f"wrote {target}")
    return 0


# ------------------------------------------------------------------ the command line
def run(ctx: Context) -> Report:
    return users_run(ctx) if ctx.args.backbone else demonstration(ctx)


def add_arguments(p) -> None:
    p.add_argument("--modes", nargs="+", choices=DEMO_MODES, default=list(DEMO_MODES),
                   help="the demonstration's modes")
    p.add_argument("--backbone", default=None,
                   help="with --data PATH (your ImageFolder): a run folder of this project, "
                        "or torchvision/timm weights")
    p.add_argument("--arch", default=None, help="the weights' architecture (default: detected)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="with --backbone: the mode to run (default frozen); with --predict: "
                        "the mode to predict with (default: the most accurate in --out)")
    p.add_argument("--stages", type=int, default=None,
                   help="with --backbone, finetune: stages that train (default 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="with --backbone: finetune/full steps (default 300)")
    p.add_argument("--batch", type=int, default=None, help="with --backbone (default 32)")
    p.add_argument("--lr", type=float, default=None,
                   help="with --backbone (default 0.01 for finetune and full)")
    p.add_argument("--epochs", type=int, default=None,
                   help="with --backbone, frozen: softmax epochs (default 100)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="crop + mirror (finetune/full: on by default; frozen: impossible)")
    p.add_argument("--predict", default=None, metavar="DIR",
                   help="label every image in DIR with the model trained in --out")


def recipe(ctx: Context) -> dict:
    """The study's guard: your data and backbone, or the demonstration's preset; and the
    checks of the flags that only some paths use."""
    args = ctx.args
    given = [f for f in ("steps", "epochs", "stages", "batch") if getattr(args, f) is not None]
    if any(getattr(args, f) < 1 for f in given):
        raise BadInput("--steps, --epochs, --stages and --batch must be positive")
    if args.backbone:
        if not args.data or not args.out:
            raise BadInput("--backbone trains on your data: it needs --data PATH and --out")
        return {"backbone": str(args.backbone), "data": f"imagefolder:{Path(args.data).expanduser()}"}
    if args.data and Path(args.data).expanduser().exists():
        raise BadInput(f"--data {args.data}: a folder of your images needs --backbone (a run "
                       f"folder of this project or a torchvision/timm weights file)")
    ignored = [f"--{f}" for f in USERS_FLAGS if getattr(args, f) is not None]
    if ignored:
        raise BadInput(f"{', '.join(ignored)}: used with --backbone (your own data) only; the "
                       f"demonstration takes its settings from its presets, e.g. --set "
                       f"steps=300 batch=32 lr=0.02 per_class=50")
    return ctx.recipe()


EXPERIMENT = Experiment("transfer_learning", __doc__, PRESETS, run, figure="transfer.png",
                        add_arguments=add_arguments, recipe=recipe)


def main(argv=None) -> int:
    ctx = EXPERIMENT.context(argv)
    if ctx.args.predict:  # labels a folder with a trained study: nothing else runs
        if not ctx.args.out:
            print("error: --predict needs --out (the folder of a transfer_learning run)",
                  file=sys.stderr)
            return 2
        return exit_on_bad_input(predictions)(ctx.args)
    return EXPERIMENT.main(argv)


if __name__ == "__main__":
    sys.exit(main())
