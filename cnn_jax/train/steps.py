"""Pure train and eval steps, and their compiled, sharded forms.

One step: normalise the uint8 batch on the device, forward in train mode (batch
statistics, dropout), softmax cross-entropy (+0.3 x each auxiliary head's, for
GoogLeNet), backward, SGD with momentum and coupled L2 weight decay, exactly as
PyTorch's `SGD(weight_decay=...)`: v <- m v + (g + wd p); p <- p - lr v.

Compiled with `jax.jit` over a mesh whose `data` axis spans every device: the batch
is sharded along it, the state replicated, so BatchNorm statistics are those of the
global batch (`bn_group` asks for per-group statistics instead). `multi_step` runs K
steps in one call with `lax.scan` over a [K, B, ...] chunk of batches.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cnn_jax.data.keys import IMAGE, LABEL, MASK, SHIFT
from cnn_jax.data.pipeline import to_global_array, training_keys
from cnn_jax.models.inception import AUX_LOSS_WEIGHT
from cnn_jax.train.config import OPTIMIZER_OPTIONS, covers
from cnn_jax.train.conv_kernels import inference_convolutions, resolve, training_convolutions
from cnn_jax.train.metrics import OBJECTIVE, batch_means, cross_entropy
from cnn_jax.train.schedules import NEVER
from cnn_jax.train.state import TrainState


def decay_mask(params):
    """Weight decay on convolution and dense kernels only (when BN/bias decay is off)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", "") in ("kernel",), params)


def make_optimizer(opt) -> optax.GradientTransformation:
    """The direction of the update rule `opt.name` (the optimiser section: its options,
    momentum, weight decay), the learning rate left out: the step applies it, so that
    the schedule can depend on state such as the warm-up's end. As optax's own rules
    with the rate applied last (their momentum and trust ratios then see unscaled
    updates; the same function for a constant rate):
      sgd, nesterov  He et al.'s SGD, PyTorch's SGD(weight_decay): v <- m v + (g + wd p)
      adam           Kingma & Ba, with coupled L2 decay (g + wd p)
      adamw          Loshchilov & Hutter: Adam, then decoupled decay (+ wd p)
      rmsprop        Tieleman & Hinton, with momentum (the Inception recipes')
      lamb           You et al. 2020: Adam's direction, decoupled decay, trust ratio
      lars           You et al. 2017: the trust ratio of (g + wd p), then momentum
    """
    mask = None if opt.decay_norm_and_bias else decay_mask
    decay = optax.add_decayed_weights(opt.weight_decay, mask)
    o = {**OPTIMIZER_OPTIONS[opt.name], **opt.options}
    nesterov = opt.nesterov or opt.name == "nesterov"
    sgd = lambda: optax.chain(decay, optax.trace(decay=opt.momentum, nesterov=nesterov))  # noqa: E731
    return {
        "sgd": sgd, "nesterov": sgd,
        "adam": lambda: optax.chain(decay, optax.scale_by_adam(**o)),
        "adamw": lambda: optax.chain(optax.scale_by_adam(**o), decay),
        "rmsprop": lambda: optax.chain(decay, optax.scale_by_rms(**o),
                                       optax.trace(decay=opt.momentum)),
        "lamb": lambda: optax.chain(optax.scale_by_adam(**o), decay,
                                    optax.scale_by_trust_ratio()),
        "lars": lambda: optax.chain(decay, optax.scale_by_trust_ratio(**o),
                                    optax.trace(decay=opt.momentum, nesterov=nesterov)),
    }[opt.name]()


# ------------------------------------------------------------------ freezing (fine-tuning)
def is_trainable(module: str, trainable: Sequence[str]) -> bool:
    """Whether the top-level module `module` trains: all do when `trainable` is empty
    (names cover their numbered parts: config.covers)."""
    return not trainable or covers(trainable, module)


def freeze(tx: optax.GradientTransformation, trainable: Sequence[str]):
    """`tx` on the trainable modules' parameters, no update at all on the others."""
    def labels(params):
        return {k: jax.tree.map(lambda _: "train" if is_trainable(k, trainable) else "frozen", v)
                for k, v in params.items()}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def frozen_batchnorm(trainable: Sequence[str]):
    """A method interceptor under which the BatchNorms of frozen modules normalise with
    their running statistics (inference mode) and leave them unchanged, whatever the
    `train` flag: a frozen layer computes in training exactly what it computes at test
    time (as Keras does for frozen BN layers)."""
    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if (not isinstance(m, nn.BatchNorm) or context.method_name != "__call__"
                or is_trainable(m.scope.path[0], trainable)):
            return next_fun(*args, **kwargs)
        x = args[0]
        mean = m.get_variable("batch_stats", "mean")
        var = m.get_variable("batch_stats", "var")
        y = (x - mean) * jax.lax.rsqrt(var + m.epsilon)
        if m.use_scale:
            y = y * m.get_variable("params", "scale")
        if m.use_bias:
            y = y + m.get_variable("params", "bias")
        return y.astype(m.dtype or x.dtype)
    return nn.intercept_methods(intercept)


def make_train_step(model, tx, lr_fn: Callable, normalise: Callable, *,
                    bn_group: int = 0, warmup_until_error: float = 0.8,
                    label_smoothing: float = 0.0, trainable: Sequence[str] = (),
                    conv_kernels: str = "auto"):
    """train_step(state, batch) -> (state, metrics); batch = {image: uint8, label}; the
    metrics are cnn_jax.train.metrics.STEP_KEYS (the objective, the declared metrics'
    batch means, the learning rate).
    `trainable`: top-level module prefixes that learn; the rest is frozen (no gradient
    is computed for it, its BatchNorms run in inference mode); empty: all learn.
    `conv_kernels`: the kernels every nn.Conv of the step runs on, the same function
    either way (the table in cnn_jax.train.conv_kernels: "xla", "matmul", "seedwise",
    "onednn"; "auto" resolves to oneDNN on CPUs where it runs, else matmul for float32
    on CPUs, else XLA's)."""
    conv_kernels = resolve(conv_kernels, dtype=getattr(model, "dtype", None) or "float32")

    def forward(params, batch_stats, images, rng):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        # the two module overrides of a step: what every nn.Conv computes (the kernel
        # choice, cnn_jax.train.conv_kernels) and, when fine-tuning, what a frozen BatchNorm does
        with training_convolutions(conv_kernels), \
                frozen_batchnorm(trainable) if trainable else contextlib.nullcontext():
            return model.apply(variables, images, train=True, rngs={"dropout": rng},
                               mutable=["batch_stats", "intermediates"])

    def grouped_forward(params, batch_stats, images, rng):
        # He et al. computed BN statistics per GPU: here per group of `bn_group`
        # examples; the running averages are the mean of the groups' updates.
        groups = images.reshape(-1, bn_group, *images.shape[1:])
        rngs = jax.random.split(rng, groups.shape[0])
        logits, new = jax.vmap(forward, in_axes=(None, None, 0, 0))(
            params, batch_stats, groups, rngs)
        new = {"batch_stats": jax.tree.map(lambda a: a.mean(0), new.get("batch_stats", {})),
               "intermediates": jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]),
                                             new.get("intermediates", {}))}
        return logits.reshape(-1, logits.shape[-1]), new

    run = grouped_forward if bn_group else forward

    def mean(values, weights):
        """The batch mean; with weights (a mask leaving out unreadable files), over them."""
        if weights is None:
            return values.mean()
        return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def loss_fn(params, batch_stats, images, labels, rng, weights=None):
        if trainable:  # frozen weights are constants: XLA drops their gradients' work
            params = {k: v if is_trainable(k, trainable) else jax.lax.stop_gradient(v)
                      for k, v in params.items()}
        logits, new = run(params, batch_stats, normalise(images), rng)
        loss = mean(cross_entropy(logits, labels, label_smoothing), weights)
        for aux in new.get("intermediates", {}).get("aux_logits", ()):
            loss = loss + AUX_LOSS_WEIGHT * mean(cross_entropy(aux, labels, label_smoothing),
                                                 weights)
        return loss, (logits, new.get("batch_stats", {}))

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        images = batch[IMAGE]
        if SHIFT in batch:  # colour ops of full-size images: one RGB shift per image
            images = images.astype(jnp.float32) + batch[SHIFT][:, None, None, :]
        weights = batch.get(MASK)  # present only where unreadable files are left out
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, images, batch[LABEL], rng, weights)
        metrics = batch_means(logits, batch[LABEL], weights)
        lr = lr_fn(state.step, state.warmup_end)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
        warming = (state.warmup_end == NEVER) & (metrics["error"] < warmup_until_error)
        warmup_end = jnp.where(warming, state.step + 1, state.warmup_end)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, warmup_end=warmup_end)
        return new_state, {OBJECTIVE: loss, **metrics, "lr": jnp.asarray(lr, jnp.float32)}

    return train_step


def make_eval_step(model, normalise: Callable, conv_kernels: str = "xla"):
    """eval_step(state, images) -> logits [B, K] in inference mode: the scores the
    evaluator (cnn_jax.train.evaluator) turns into the declared metrics.
    `conv_kernels="onednn"`: the convolutions on oneDNN, as the train step's (CPUs; the
    other kernel choices differ in gradients only)."""

    def eval_step(state: TrainState, images):
        variables = {"params": state.params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        with inference_convolutions(conv_kernels):
            return model.apply(variables, normalise(images), train=False)

    return eval_step


def multi_step(train_step):
    """K steps in one call: scan over a [K, B, ...] chunk; metrics come back [K]."""
    def run(state, batches):
        return jax.lax.scan(train_step, state, batches)
    return run


def seeds_at_once(train_step):
    """S independent runs (their own parameters, data and randomness) as one step:
    `vmap` over a leading seed axis of the state and the batch, [S, ...] in and out.
    Every kernel then does S runs' work: a CIFAR ResNet's step on a GPU is ~1,000
    kernels too small to fill the chip (docs/benchmarks.md), so S seeds together cost
    less there than S steps one after another (on an H100, 5 ResNet-56 seeds: 1.4x the
    throughput; on CPUs they cost more). Each run's BatchNorm statistics stay its own.
    Kernel gradients should be "seedwise" on GPUs (`resolve(..., seeds=S)` picks it):
    vmap turns XLA's into a grouped convolution that cuDNN runs group by group."""
    return jax.vmap(train_step)


def compile_steps(train_step, eval_step, mesh, seeds: int = 1):
    """jit with the state replicated, batches sharded along `data`, state donated. The
    runs axis lives here (and in the checkpoint writer, cnn_jax.train.runs): S runs
    trained at once (seeds_at_once) are a state [S, ...] stepped on batches [S, B, ...],
    their metrics [S]; one run is the state and batch as they are (S = 1: no axis, the
    program a run alone compiles). `put(draws)`: k draws, each a list of one host
    batch per run, as the compiled call's input ([k, ...] when k > 1). The eval step's
    logits come out [S, B, K] (S = 1 for one run), sharded as the batch."""
    replicated = NamedSharding(mesh, P())
    lead = (None,) if seeds > 1 else ()
    batch = NamedSharding(mesh, P(*lead, "data"))
    chunk = NamedSharding(mesh, P(None, *lead, "data"))
    if seeds > 1:
        train_step = seeds_at_once(train_step)
        eval_step = jax.vmap(eval_step, in_axes=(0, None))
    else:
        eval_step = (lambda step: lambda state, images: step(state, images)[None])(eval_step)
    one = jax.jit(train_step, in_shardings=(replicated, batch),
                  out_shardings=(replicated, replicated), donate_argnums=0)
    many = jax.jit(multi_step(train_step), in_shardings=(replicated, chunk),
                   out_shardings=(replicated, replicated), donate_argnums=0)
    evaluate = jax.jit(eval_step, in_shardings=(replicated, NamedSharding(mesh, P("data"))),
                       out_shardings=NamedSharding(mesh, P(None, "data")))

    def put(draws: list) -> dict:
        keys = training_keys(draws[0][0])
        per_draw = [{k: np.stack([b[k] for b in draw]) if seeds > 1 else np.asarray(draw[0][k])
                     for k in keys} for draw in draws]
        if len(per_draw) == 1:
            return to_global_array(per_draw[0], batch)
        return to_global_array({k: np.stack([d[k] for d in per_draw]) for k in keys}, chunk)
    return one, many, evaluate, put
