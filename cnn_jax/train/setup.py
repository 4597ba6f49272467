"""What a training job builds before its first step, once: the mesh, the input, the
model and its compiled steps, as one frozen `Setup` (the loop's phases 1-3).

    setup = build(cfgs)       # cfgs: one run, or runs of one recipe differing in seed
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnn_jax.data.dataset import DataSpec, Dataset, open_split
from cnn_jax.data.ops import Normalizer
from cnn_jax.data.pipeline import default_workers, train_dataset
from cnn_jax.data.sources import MissingSplit
from cnn_jax.errors import BadInput
from cnn_jax.models import create_model
from cnn_jax.train import schedules
from cnn_jax.train.config import TrainConfig, covers, module_names
from cnn_jax.train.conv_kernels import resolve
from cnn_jax.train.inputs import (make_input_fn, make_normaliser, model_input_shape,
                                  training_split)
from cnn_jax.train.steps import (compile_steps, freeze, make_eval_step, make_optimizer,
                                 make_train_step)


TRAIN_SET = "train_set"  # the training images, unaugmented, in inference mode


@dataclasses.dataclass(frozen=True)
class Setup:
    cfg: TrainConfig             # the recipe all runs share (the first run's config)
    seeds: int                   # runs trained at once (1: a single run)
    mesh: Mesh
    # input
    train_arrays: Dataset        # the training split with its ops
    eval_arrays: Dataset         # the evaluation split
    eval_split: str              # "val" (a holdout), "test", or TRAIN_SET (no other split)
    eval_batch: int              # a multiple of the device count
    normaliser: Optional[Normalizer]
    input_shape: tuple           # (H, W, C) the model sees
    datasets: tuple              # one grain dataset per run (its own seed)
    # model and compiled steps
    model: Any
    tx: Any                      # the optimizer's direction (the step applies the lr)
    conv_kernels: str            # cnn_jax.train.conv_kernels: recorded, they change rounding
    step_one: Callable           # (state, batch) -> (state, metrics): [S, ...] for S > 1 runs
    step_many: Callable          # (state, [k] batches) -> (state, [k] metrics)
    put: Callable                # k draws (a host batch per run each) -> the call's input
    eval_step: Callable          # (state, images) -> logits [S, B, K]
    n_params: int

    def sharding(self, *spec) -> NamedSharding:
        return NamedSharding(self.mesh, P(*spec))


def build(cfgs: list[TrainConfig]) -> Setup:
    """Phases 1-3 for runs of one recipe (validated and checked by the caller)."""
    cfg = cfgs[0]
    mesh = make_mesh(cfg)
    inputs = build_input(cfgs, mesh)
    return Setup(cfg=cfg, seeds=len(cfgs), mesh=mesh, **inputs,
                 **build_model(cfg, len(cfgs), mesh, inputs["train_arrays"],
                               inputs["normaliser"], inputs["input_shape"]))


def make_mesh(cfg: TrainConfig) -> Mesh:
    """Phase 1: one `data` axis over every device (batch sharded, state replicated)."""
    if cfg.optimiser.batch % jax.device_count():
        raise BadInput(f"--batch {cfg.optimiser.batch} is not divisible by the "
                       f"{jax.device_count()} devices")
    return Mesh(np.array(jax.devices()), ("data",))


def build_input(cfgs: list[TrainConfig], mesh: Mesh) -> dict:
    """Phase 2: the training and evaluation splits, the normaliser (from the training
    images, or --init-from's) and one grain dataset per run; the runs share the host's
    worker processes."""
    cfg, seeds = cfgs[0], len(cfgs)
    spec = cfg.data_spec()
    train = training_split(cfg)
    eval_split, evaluation = evaluation_split(spec)
    n_dev = mesh.devices.size
    eval_batch = -(-min(cfg.evaluation.batch, len(evaluation)) // n_dev) * n_dev
    normaliser = make_normaliser(cfg.data.normalise, train.normaliser_images, cfg.model.init_from,
                                 cfg.model.name)
    workers = cfg.run.workers if seeds == 1 else \
        (cfg.run.workers if cfg.run.workers is not None else default_workers()) // seeds
    datasets = tuple(train_dataset(train, cfg.optimiser.batch, c.run.seed, workers, jax.process_index(),
                                   jax.process_count()) for c in cfgs)
    return {"train_arrays": train, "eval_arrays": evaluation, "eval_split": eval_split,
            "eval_batch": eval_batch, "normaliser": normaliser,
            "input_shape": model_input_shape(train.image_shape, cfg.data.resize),
            "datasets": datasets}


def evaluation_split(spec: DataSpec) -> tuple[str, Dataset]:
    """The split a run evaluates on and reports, named for what it is: its holdout
    ('val'), else the dataset's test/ ('test'), else its val/ ('val'); a dataset with
    none of them evaluates its training images (TRAIN_SET), and says so."""
    if spec.holdout:
        refuse_two_vals(spec)
        return "val", open_split(spec, "val", spec.eval_subset)
    for split in ("test", "val"):
        try:
            return split, open_split(spec, split, spec.eval_subset)
        except MissingSplit:
            continue
    print(f"{spec.name} has no test/ or val/ split: evaluating on the training images "
          f"(reported as train_set)", file=sys.stderr)
    return TRAIN_SET, open_split(spec, "train", spec.eval_subset)


def refuse_two_vals(spec: DataSpec) -> None:
    """A holdout is this run's 'val'; a dataset with a val/ of its own would make the
    name mean two things."""
    try:
        own = open_split(dataclasses.replace(spec, holdout=0, eval_subset=0), "val")
    except MissingSplit:
        return
    raise BadInput(f"--holdout {spec.holdout}: {spec.name} has a val/ split of its own "
                   f"({len(own):,} images), and 'val' names one split only; evaluate on "
                   f"its val/ (drop --holdout), or hold out images from a copy without val/")


def build_model(cfg: TrainConfig, seeds: int, mesh: Mesh, train_arrays: Dataset,
                normaliser: Optional[Normalizer], input_shape: tuple) -> dict:
    """Phase 3: the model, the optimizer and schedule, the convolution kernels, and the
    train and eval steps compiled over the mesh (`seeds` runs vmapped into one)."""
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    model = create_model(cfg.model.name, num_classes=len(train_arrays.classes), dtype=dtype,
                         **cfg.model.options)
    tx = make_optimizer(cfg.optimiser)
    lr_fn = schedules.of(cfg.schedule)
    trainable = module_names(cfg.model.trainable)
    if trainable:  # fine-tuning: frozen modules get no update (nor weight decay)
        tx = freeze(tx, trainable)
    conv_kernels = resolve(cfg.run.conv_kernels, seeds, cfg.model.dtype)
    normalise = make_input_fn(normaliser, cfg.data.resize)
    train_step = make_train_step(model, tx, lr_fn, normalise, bn_group=cfg.model.bn_group,
                                 warmup_until_error=cfg.schedule.warmup_until_error,
                                 label_smoothing=cfg.optimiser.label_smoothing, trainable=trainable,
                                 conv_kernels=conv_kernels)
    step_one, step_many, eval_step, put = compile_steps(
        train_step, make_eval_step(model, normalise, conv_kernels), mesh, seeds)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    check_module_names(cfg, list(abstract["params"]))
    if cfg.model.bn_group and not abstract.get("batch_stats"):
        raise BadInput(f"--bn-group: {cfg.model.name} has no BatchNorm: it would change "
                       f"nothing, so it is refused")
    return {"model": model, "tx": tx, "conv_kernels": conv_kernels, "step_one": step_one,
            "step_many": step_many, "eval_step": eval_step, "put": put,
            "n_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract["params"])))}


def check_module_names(cfg: TrainConfig, modules: list[str]) -> None:
    """--trainable and --init-skip must name modules the model has."""
    for flag, names in (("trainable", module_names(cfg.model.trainable)),
                        ("init_skip", module_names(cfg.model.init_skip))):
        for name in names:
            if not any(covers((name,), m) for m in modules):
                raise BadInput(f"--{flag.replace('_', '-')}: {name!r} names no module of "
                               f"{cfg.model.name}; its modules: {', '.join(modules)}")
