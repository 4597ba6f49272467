"""`train(config)`: from a model name, a dataset and a recipe to a trained network,
on one CPU, one GPU, many devices or many hosts, resumable to the bit.

Phases: mesh -> input -> model -> state (init or restore) -> loop (compiled steps,
logging, evaluation, checkpoints, signals) -> results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from cnn_jax.data.pipeline import (ChunkPrefetcher, eval_batches, stack_batches,
                                   to_global_array, train_dataset)
from cnn_jax.data.sources import DataError
from cnn_jax.models import create_model
from cnn_jax.train import schedules
from cnn_jax.train.checkpoint import Checkpointer, drop_modules, load_pretrained
from cnn_jax.train.config import TrainConfig, changed_fields, covers, module_names
from cnn_jax.train.inputs import (make_augment, make_input_fn, make_normaliser,
                                  model_input_shape, prepare_arrays, save_normaliser,
                                  split_arrays, subset, training_arrays)
from cnn_jax.train.metrics import MetricsLog, params_digest
from cnn_jax.train.state import TrainState, initial_variables
from cnn_jax.train.steps import (compile_steps, freeze, make_eval_step, make_optimizer,
                                 make_train_step)


class NonFiniteLoss(RuntimeError):
    pass


class ConfigMismatch(ValueError):
    pass


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop finishes its call, saves and exits."""

    def __init__(self):
        self.received: Optional[int] = None

    @contextlib.contextmanager
    def installed(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _handle(self, signum, frame):
        self.received = signum


def versions() -> dict:
    import flax
    import optax
    out = {"python": platform.python_version(), "jax": jax.__version__,
           "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}
    # the CPU kernels (cnn_jax.cpu_kernels, cnn_jax.train.conv_grad) change rounding
    out.update({k.lower(): os.environ[k] for k in ("XLA_FLAGS", "CNN_JAX_CONV_GRAD")
                if os.environ.get(k)})
    return out


def cpu_name() -> str:
    """The host CPU's model name and core count (for records of CPU timings)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def hardware() -> dict:
    d = jax.devices()
    backend = jax.default_backend()
    return {"backend": backend,
            "device": cpu_name() if backend == "cpu" else d[0].device_kind,
            "devices": len(d), "processes": jax.process_count(),
            "host": platform.node(), "cpu": cpu_name()}


def train(cfg: TrainConfig, command: Optional[str] = None,
          on_steps: Optional[Callable[[int], None]] = None) -> dict:
    """Train (or resume, or re-read a finished run) and return results.json's content.
    `on_steps(n)` is called after every compiled call with the steps it took (for an
    outer progress bar)."""
    cfg.validate()
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: not writable ({e.strerror})") from None
    command = command or " ".join(sys.argv)

    # ------------------------------------------------------------------ mesh
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    if cfg.batch % jax.device_count():
        raise ValueError(f"--batch {cfg.batch} is not divisible by the "
                         f"{jax.device_count()} devices")

    # ------------------------------------------------------------------ input
    train_arrays = training_arrays(cfg)
    eval_split = "val" if cfg.holdout else "test"
    eval_arrays = subset(split_arrays(cfg, eval_split), cfg.eval_subset)
    n_dev = jax.device_count()
    eval_batch = -(-min(cfg.eval_batch, len(eval_arrays)) // n_dev) * n_dev  # a multiple of n_dev
    eval_arrays = prepare_arrays(eval_arrays, cfg.input_pad)
    normaliser = make_normaliser(cfg.normalise, train_arrays.images, cfg.init_from)
    normalise = make_input_fn(normaliser, cfg.resize)
    input_shape = model_input_shape(train_arrays.images.shape[1:], cfg.resize)
    dataset = train_dataset(train_arrays, cfg.batch, cfg.seed, make_augment(cfg, train_arrays),
                            cfg.workers,
                            jax.process_index(), jax.process_count())

    # ------------------------------------------------------------------ model
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    model = create_model(cfg.model, num_classes=len(train_arrays.classes), dtype=dtype,
                         **cfg.model_options)
    tx = make_optimizer(cfg.momentum, cfg.weight_decay, cfg.nesterov, cfg.decay_norm_and_bias)
    lr_fn = schedules.with_warmup(
        schedules.make_schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.milestones), cfg.warmup_lr)
    trainable = module_names(cfg.trainable)
    if trainable:  # fine-tuning: frozen modules get no update (nor weight decay)
        tx = freeze(tx, trainable)
    train_step = make_train_step(model, tx, lr_fn, normalise, bn_group=cfg.bn_group,
                                 warmup_until_error=cfg.warmup_until_error,
                                 label_smoothing=cfg.label_smoothing, trainable=trainable,
                                 conv_grad=cfg.conv_grad)
    step_one, step_many, eval_step = compile_steps(train_step, make_eval_step(model, normalise),
                                                   mesh)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract["params"])))
    modules = list(abstract["params"])
    for flag, names in (("trainable", trainable), ("init_skip", module_names(cfg.init_skip))):
        for name in names:
            if not any(covers((name,), m) for m in modules):
                raise ValueError(f"--{flag.replace('_', '-')}: {name!r} names no module of "
                                 f"{cfg.model}; its modules: {', '.join(modules)}")

    # ------------------------------------------------------------------ state: init or restore
    def init_state(pretrained):
        _, step_rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
        variables = initial_variables(model, cfg.seed, input_shape, pretrained, cfg.init_from)
        return TrainState.create(variables, tx, step_rng)

    ckpt = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    pretrained = None
    if cfg.init_from and ckpt.latest_step() is None:  # a resumed run restores instead
        try:  # host arrays: the same on every process
            pretrained = jax.device_get(load_pretrained(cfg.init_from, cfg.model,
                                                        cfg.model_options))
        except FileNotFoundError as e:
            raise ValueError(f"--init-from: {e}") from None
        pretrained = drop_modules(pretrained, cfg.init_skip)
    state = jax.jit(init_state, out_shardings=replicated)(pretrained)
    log = MetricsLog(out / "metrics.jsonl")
    data_iter = iter(dataset)
    start = ckpt.latest_step()
    wall_before, restored_meta = 0.0, {}
    config_file = out / "config.json"
    if start is not None:
        meta = ckpt.read_meta(start)
        if meta["config_digest"] != cfg.digest():
            diff = changed_fields(meta["config"], cfg)
            raise ConfigMismatch(
                f"{out} holds a run with a different configuration (changed: "
                f"{', '.join(diff) or 'unknown'}); resuming would mix two runs. Use another "
                f"--out, or restore the original settings to resume.")
        state, data_state, restored_meta = ckpt.restore(start, state)
        wall_before = restored_meta.get("wall_s", 0.0)
        data_iter.set_state(data_state)
        if jax.process_index() == 0:
            log.truncate_after(start)
        print(f"resuming {out} from step {start}", file=sys.stderr)
    elif config_file.exists() and json.loads(config_file.read_text()).get("config_digest") \
            not in (None, cfg.digest()) and (out / "results.json").exists():
        raise ConfigMismatch(f"{out} holds finished results of a different configuration; "
                             f"use another --out")
    elif jax.process_index() == 0:
        log.truncate_after(0)  # lines of an attempt that died before its first checkpoint
    if jax.process_index() == 0:
        save_normaliser(out, normaliser, train_arrays.images.shape[1:])
        config_file.write_text(json.dumps({"config": cfg.to_json(), "config_digest": cfg.digest(),
                                           "command": command, "versions": versions(),
                                           "hardware": hardware()}, indent=1))
    step = int(jax.device_get(state.step))

    # ------------------------------------------------------------------ loop
    def next_boundary(s):
        return min(cfg.steps, *(math.floor(s / e + 1) * e for e in
                                (cfg.log_every, cfg.eval_every, cfg.checkpoint_every)))

    def evaluate(state, arrays=eval_arrays):
        sums = None
        for batch in eval_batches(arrays, eval_batch, jax.process_index(),
                                  jax.process_count()):
            del batch["index"]
            r = eval_step(state, to_global_array(batch, batch_sharding))
            sums = r if sums is None else jax.tree.map(jnp.add, sums, r)
        sums = jax.device_get(sums)
        return {"loss": float(sums["loss_sum"] / sums["count"]),
                "error": float(sums["error_sum"] / sums["count"]), "n": int(sums["count"])}

    def save(state, data_state, step_now):
        # metrics of steps not yet logged travel with the checkpoint, so a resumed run
        # logs exactly the lines an uninterrupted one would
        unlogged = {k: v.tolist() for k, v in materialise(step_now).items()}
        ckpt.save(step_now, state, data_state,
                  {"config_digest": cfg.digest(), "config": cfg.to_json(),
                   "unlogged_metrics": unlogged,
                   "wall_s": wall_before + time.perf_counter() - wall_start})

    pending: list = []   # per-step metrics not yet checked and logged
    unlogged = restored_meta.get("unlogged_metrics") if start is not None else None
    if unlogged and len(unlogged["loss"]):
        pending = [{k: np.asarray(v, np.float32) for k, v in unlogged.items()}]
    window_images, window_start = 0, time.perf_counter()
    wall_start = time.perf_counter()
    last_eval, last_train = None, None
    data_state = data_iter.get_state()
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not cfg.progress or jax.process_index() != 0, desc=cfg.model)

    def materialise(step_now) -> dict:
        """Pending per-step metrics to one host dict; stop on a non-finite loss."""
        nonlocal pending
        host = jax.device_get(pending)
        merged = {k: np.concatenate([np.asarray(m[k], np.float32).reshape(-1) for m in host]
                                    + [np.zeros(0, np.float32)]) for k in ("loss", "error", "lr")}
        pending = [merged]
        bad = np.flatnonzero(~np.isfinite(merged["loss"]))
        if len(bad):
            first = step_now - len(merged["loss"])
            raise NonFiniteLoss(
                f"loss became {merged['loss'][bad[0]]} at step {first + bad[0] + 1}; stopped "
                f"without saving. The last good checkpoint in {out / 'checkpoints'} is kept "
                f"(step {ckpt.latest_step()}). Lower --lr or check the data.")
        return merged

    def flush(step_now):
        """Log the metrics of the steps since the last log line."""
        nonlocal pending, window_images, window_start, last_train
        m = materialise(step_now)
        pending = []
        if not len(m["loss"]):
            return
        elapsed = time.perf_counter() - window_start
        last_train = {"step": step_now, "epoch": step_now * cfg.batch / len(train_arrays),
                      "lr": float(m["lr"][-1]),
                      "train_loss": float(m["loss"].mean(dtype=np.float64)),
                      "train_error": float(m["error"].mean(dtype=np.float64)),
                      "img_per_s": window_images / elapsed if elapsed > 0 else None}
        if jax.process_index() == 0:
            log.write(last_train)
        window_images, window_start = 0, time.perf_counter()
        bar.set_postfix(loss=f"{last_train['train_loss']:.3f}",
                        err=f"{last_train['train_error']:.3f}", lr=f"{last_train['lr']:.3g}")

    chunk_sharding = NamedSharding(mesh, P(None, "data"))

    def to_device(host_batches):
        """k host batches -> the compiled call's input (runs on the prefetch thread)."""
        if cfg.steps_per_call == 1:
            b = host_batches[0]
            return to_global_array({"image": b["image"], "label": b["label"]}, batch_sharding)
        return to_global_array(stack_batches(host_batches), chunk_sharding)

    calls, s = [], step  # steps per compiled call: k stops at every log/eval/save step
    while s < cfg.steps:
        calls.append(min(cfg.steps_per_call, next_boundary(s) - s))
        s += calls[-1]
    with _Signals().installed() as signals, \
            ChunkPrefetcher(data_iter, calls, to_device) as chunks:
        for k, (inputs, data_state) in zip(calls, chunks):
            if cfg.steps_per_call == 1:
                state, metrics = step_one(state, inputs)
                metrics = jax.tree.map(lambda m: m[None], metrics)
            else:
                state, metrics = step_many(state, inputs)
            pending.append(metrics)
            step += k
            window_images += k * cfg.batch
            bar.update(k)
            if on_steps is not None:
                on_steps(k)
            stopping = signals.received is not None
            if step % cfg.log_every == 0 or step == cfg.steps:
                flush(step)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = {"step": step, **{f"eval_{k}": v for k, v in evaluate(state).items()},
                             "eval_split": eval_split}
                if jax.process_index() == 0:
                    log.write(last_eval)
                seen = (f"train loss {last_train['train_loss']:.4f} err "
                        f"{100 * last_train['train_error']:.2f}%  |  " if last_train else "")
                tqdm.write(f"step {step:>7}  {seen}{eval_split} loss {last_eval['eval_loss']:.4f}"
                           f" err {100 * last_eval['eval_error']:.2f}%", file=sys.stderr)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                save(state, data_state, step)
            if stopping:
                ckpt.wait()
                bar.close()
                name = signal.Signals(signals.received).name
                print(f"{name}: saved step {step} to {out / 'checkpoints'}; re-run the same "
                      f"command to resume", file=sys.stderr)
                raise SystemExit(128 + signals.received)
    bar.close()
    ckpt.wait()

    # ------------------------------------------------------------------ results
    if last_eval is None or last_eval["step"] != step:
        last_eval = {"step": step, **{f"eval_{k}": v for k, v in evaluate(state).items()}}
    if cfg.holdout:  # selection used the holdout; the test set is read once, at the end
        try:
            test_arrays = split_arrays(dataclasses.replace(cfg, holdout=0), "test")
        except DataError:  # an ImageFolder of the user's without test/ (or val/) images
            test_arrays = None
        if test_arrays is not None:
            test = evaluate(state, prepare_arrays(test_arrays, cfg.input_pad))
            last_eval.update(final_test_loss=test["loss"], final_test_error=test["error"])
    history = log.read()
    train_records = [r for r in history if "train_loss" in r]
    rates = [r["img_per_s"] for r in train_records if r.get("img_per_s")]
    results = {
        "model": cfg.model, "data": cfg.data, "params": n_params, "steps": step,
        "seed": cfg.seed, "batch": cfg.batch,
        "final_train_loss": train_records[-1]["train_loss"] if train_records else None,
        "final_train_error": train_records[-1]["train_error"] if train_records else None,
        f"final_{eval_split}_loss": last_eval["eval_loss"],
        f"final_{eval_split}_error": last_eval["eval_error"],
        **{k: v for k, v in last_eval.items() if k.startswith("final_test")},
        "final_params_digest": params_digest(state.params),
        "warmup_end": int(jax.device_get(state.warmup_end)) if cfg.warmup_lr else None,
        "wall_s": wall_before + time.perf_counter() - wall_start,
        "img_per_s": float(np.median(rates)) if rates else None,
        "hardware": hardware(), "versions": versions(), "command": command,
        "config": cfg.to_json(),
    }
    if jax.process_index() == 0:
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out / "results.json")
    ckpt.close()
    return results
