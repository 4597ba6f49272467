"""`train(config)`: from a model name, a dataset and a recipe to a trained network,
on one CPU, one GPU, many devices or many hosts, resumable to the bit;
`train_together(configs)`: several seeds of one recipe in one vmapped step.

Phases: mesh -> input -> model -> state (init or restore) -> loop (compiled steps,
logging, evaluation, checkpoints, signals) -> results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
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

from cnn_jax import onednn
from cnn_jax.data.pipeline import (ChunkPrefetcher, default_workers, eval_batches,
                                   stack_batches, to_global_array, train_dataset)
from cnn_jax.data.sources import DataError
from cnn_jax.models import create_model
from cnn_jax.train import schedules
from cnn_jax.train.checkpoint import Checkpointer, drop_modules, load_pretrained
from cnn_jax.train.config import TrainConfig, changed_fields, covers, module_names
from cnn_jax.train.conv_grad import resolve
from cnn_jax.train.inputs import (make_augment, make_input_fn, make_normaliser,
                                  model_input_shape, prepare_arrays, save_normaliser,
                                  split_arrays, subset, training_arrays)
from cnn_jax.train.metrics import MetricsLog, params_digest
from cnn_jax.train.processes import available_cores
from cnn_jax.train.state import TrainState, initial_variables
from cnn_jax.train.steps import (compile_steps, freeze, make_eval_step, make_optimizer,
                                 make_train_step)


class NonFiniteLoss(RuntimeError):
    """The loss, or the state about to be saved, is no longer finite."""


@contextlib.contextmanager
def _finishing_saves_on_error(finish_saves: Callable[[], None]):
    """On any exception (or SystemExit) inside, `finish_saves()` before it propagates."""
    try:
        yield
    except BaseException:
        finish_saves()
        raise


@functools.partial(jax.jit, static_argnums=1)
def finite_runs(state, seeds: int):
    """Per run (leading axis when `seeds` runs train together, else one): whether every
    floating-point number of its state is finite. A step's loss is computed before its
    update, so a finite loss does not vouch for the state the update produced."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = [jnp.isfinite(x).reshape(seeds, -1).all(1) if seeds > 1 else
             jnp.isfinite(x).all()[None] for x in leaves]
    return jnp.stack(flags).all(0)


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
    # the CPU kernels (cnn_jax.cpu_kernels, cnn_jax.train.conv_grad, cnn_jax.onednn)
    # change rounding
    out.update({k.lower(): os.environ[k] for k in ("XLA_FLAGS", "CNN_JAX_CONV_GRAD")
                if os.environ.get(k)})
    if jax.default_backend() == "cpu" and onednn.library_version():
        out["onednn"] = onednn.library_version()
    return out


def _cpuinfo(text: str | None = None) -> dict:
    """The first processor's "key: value" fields of /proc/cpuinfo (or of `text`); {}
    where there is none (not Linux)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The host CPU's model name and core count (for records of CPU timings)."""
    name = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


# Vector extensions that change how fast XLA's CPU code runs and how it rounds: the same
# command gives other digits on an AVX-512 CPU than on an AVX2 one (docs/results.md).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_bf16", "asimd", "sve")


def cpu_features(cpuinfo: str | None = None) -> str:
    """The CPU's family/model and which of CPU_FEATURES it has (Linux; else "")."""
    fields = _cpuinfo(cpuinfo)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = " ".join(f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model")
                     if fields.get(k))
    return " ".join(filter(None, [model] + [f for f in CPU_FEATURES if f in flags]))


def hardware() -> dict:
    d = jax.devices()
    backend = jax.default_backend()
    return {"backend": backend,
            "device": cpu_name() if backend == "cpu" else d[0].device_kind,
            "devices": len(d), "processes": jax.process_count(),
            "host": platform.node(), "cpu": cpu_name(), "cpu_features": cpu_features(),
            "cores": len(available_cores())}  # this process's: they change CPU rounding


def train(cfg: TrainConfig, command: Optional[str] = None,
          on_steps: Optional[Callable[[int], None]] = None) -> dict:
    """Train (or resume, or re-read a finished run) and return results.json's content.
    `on_steps(n)` is called after every compiled call with the steps it took (for an
    outer progress bar)."""
    return train_together([cfg], command, on_steps)[0]


class _Run:
    """One run's own part of a training job: its folder, checkpoints, log, input."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.ckpt: Optional[Checkpointer] = None
        self.log: Optional[MetricsLog] = None
        self.wall_before, self.restored_meta = 0.0, {}
        self.last_train: Optional[dict] = None
        self.last_eval: Optional[dict] = None


class _Together:
    """Several runs' grain iterators drawn as one: a list of batches per draw, a list
    of states (each run's checkpoint stores its own)."""

    def __init__(self, iterators):
        self.iterators = iterators

    def __next__(self):
        return [next(it) for it in self.iterators]

    def get_state(self):
        return [it.get_state() for it in self.iterators]


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written, creating nothing: a refused run (bad
    model, data or folder) leaves no folder behind."""
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: not writable ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: not writable ({existing} is read-only)")


def check_together(cfgs: list[TrainConfig]) -> None:
    """Runs trained at once must share everything but the seed and the folder."""
    outs = [str(Path(c.out).absolute()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ValueError(f"runs trained together need their own --out folders; got {outs}")
    base = cfgs[0].seedless()
    for c in cfgs[1:]:
        other = c.seedless()
        diff = sorted(k for k in base if base[k] != other[k])
        if diff:
            raise ValueError(f"runs trained together may differ only in seed and --out; "
                             f"{c.out} differs from {cfgs[0].out} in {', '.join(diff)}")


def train_together(cfgs: list[TrainConfig], command: Optional[str] = None,
                   on_steps: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Train runs of one recipe that differ only in their seed at once, one vmapped
    step for all (`seeds_at_once`; on a GPU several small nets fill the chip better than
    one), each with its own data order, augmentation, initialisation, checkpoints, log
    and results in its own folder, exactly the files `train` writes. One configuration
    is `train` itself. Each run computes its own function: the same as trained alone
    up to rounding (batched kernels sum in another order), and a resumed group repeats
    its uninterrupted self bit for bit. `on_steps(n)` counts the steps of all runs."""
    if not cfgs:
        raise ValueError("train_together: no configuration given")
    for cfg in cfgs:
        cfg.validate()
    if len(cfgs) > 1:
        check_together(cfgs)
    runs = [_Run(c) for c in cfgs]
    cfg, seeds, together = cfgs[0], len(cfgs), len(cfgs) > 1
    for run in runs:
        check_writable(run.out)
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
    augment = make_augment(cfg, train_arrays)
    # the runs share the host's worker processes
    workers = cfg.workers if not together else \
        (cfg.workers if cfg.workers is not None else default_workers()) // seeds
    datasets = [train_dataset(train_arrays, cfg.batch, run.cfg.seed, augment, workers,
                              jax.process_index(), jax.process_count()) for run in runs]

    # ------------------------------------------------------------------ model
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    model = create_model(cfg.model, num_classes=len(train_arrays.classes), dtype=dtype,
                         **cfg.model_options)
    tx = make_optimizer(cfg.momentum, cfg.weight_decay, cfg.nesterov, cfg.decay_norm_and_bias)
    lr_fn = schedules.with_warmup(schedules.linear_warmup(
        schedules.make_schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.milestones),
        cfg.warmup_steps), cfg.warmup_lr)
    trainable = module_names(cfg.trainable)
    if trainable:  # fine-tuning: frozen modules get no update (nor weight decay)
        tx = freeze(tx, trainable)
    conv_kernels = resolve(cfg.conv_grad, seeds, cfg.dtype)  # recorded: they change rounding
    train_step = make_train_step(model, tx, lr_fn, normalise, bn_group=cfg.bn_group,
                                 warmup_until_error=cfg.warmup_until_error,
                                 label_smoothing=cfg.label_smoothing, trainable=trainable,
                                 conv_grad=conv_kernels)
    step_one, step_many, eval_step = compile_steps(
        train_step, make_eval_step(model, normalise, conv_kernels), mesh, seeds)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract["params"])))
    modules = list(abstract["params"])
    for flag, names in (("trainable", trainable), ("init_skip", module_names(cfg.init_skip))):
        for name in names:
            if not any(covers((name,), m) for m in modules):
                raise ValueError(f"--{flag.replace('_', '-')}: {name!r} names no module of "
                                 f"{cfg.model}; its modules: {', '.join(modules)}")

    # ------------------------------------------------------------------ state: init or restore
    def init_state(pretrained, seed):
        _, step_rng = jax.random.split(jax.random.PRNGKey(seed))
        variables = initial_variables(model, seed, input_shape, pretrained, cfg.init_from)
        return TrainState.create(variables, tx, step_rng)

    for run in runs:  # the first files of each run: nothing was written before this
        run.out.mkdir(parents=True, exist_ok=True)
        run.ckpt = Checkpointer(run.out / "checkpoints", cfg.keep_checkpoints)
        run.log = MetricsLog(run.out / "metrics.jsonl")
    starts = {run.ckpt.latest_step() for run in runs}
    if len(starts) > 1:
        raise ValueError(f"runs trained together must resume from the same step; their "
                         f"latest checkpoints are at steps {[r.ckpt.latest_step() for r in runs]} "
                         f"({', '.join(str(r.out) for r in runs)}): train them one by one")
    start = starts.pop()
    pretrained = None
    if cfg.init_from and start is None:  # a resumed run restores instead
        try:  # host arrays: the same on every process
            pretrained = jax.device_get(load_pretrained(cfg.init_from, cfg.model,
                                                        cfg.model_options))
        except FileNotFoundError as e:
            raise ValueError(f"--init-from: {e}") from None
        pretrained = drop_modules(pretrained, cfg.init_skip)
    make_state = jax.jit(init_state, static_argnums=1, out_shardings=replicated)
    states = [make_state(pretrained, run.cfg.seed) for run in runs]
    data_iters = [iter(d) for d in datasets]
    for i, run in enumerate(runs):
        config_file = run.out / "config.json"
        if start is not None:
            meta = run.ckpt.read_meta(start)
            if meta["config_digest"] != run.cfg.digest():
                diff = changed_fields(meta["config"], run.cfg)
                raise ConfigMismatch(
                    f"{run.out} holds a run with a different configuration (changed: "
                    f"{', '.join(diff) or 'unknown'}); resuming would mix two runs. Use "
                    f"another --out, or restore the original settings to resume.")
            states[i], data_state, run.restored_meta = run.ckpt.restore(start, states[i])
            run.wall_before = run.restored_meta.get("wall_s", 0.0)
            data_iters[i].set_state(data_state)
            if jax.process_index() == 0:
                run.log.truncate_after(start)
            print(f"resuming {run.out} from step {start}", file=sys.stderr)
        elif config_file.exists() and json.loads(config_file.read_text()).get(
                "config_digest") not in (None, run.cfg.digest()) \
                and (run.out / "results.json").exists():
            raise ConfigMismatch(f"{run.out} holds finished results of a different "
                                 f"configuration; use another --out")
        elif jax.process_index() == 0:
            run.log.truncate_after(0)  # lines of an attempt that died before its first checkpoint
        if jax.process_index() == 0:
            save_normaliser(run.out, normaliser, train_arrays.images.shape[1:])
            config_file.write_text(json.dumps(
                {"config": run.cfg.to_json(), "config_digest": run.cfg.digest(),
                 "command": command, "versions": versions(), "hardware": hardware(),
                 "conv_kernels": conv_kernels,
                 **({"trained_together": [r.cfg.seed for r in runs]} if together else {})},
                indent=1))
    if together:
        state = jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                        out_shardings=replicated)(*states)
        data_iter = _Together(data_iters)
    else:
        state, data_iter = states[0], data_iters[0]
    del states
    step = start or 0

    def run_state(state, i):
        """Run i's own state (unbatched) out of the joint one."""
        return jax.tree.map(lambda x: x[i], state) if together else state

    # ------------------------------------------------------------------ loop
    def next_boundary(s):
        return min(cfg.steps, *(math.floor(s / e + 1) * e for e in
                                (cfg.log_every, cfg.eval_every, cfg.checkpoint_every)))

    def evaluate(state, arrays=eval_arrays) -> list[dict]:
        """Each run's loss and error on `arrays`."""
        sums = None
        for batch in eval_batches(arrays, eval_batch, jax.process_index(),
                                  jax.process_count()):
            del batch["index"]
            r = eval_step(state, to_global_array(batch, batch_sharding))
            sums = r if sums is None else jax.tree.map(jnp.add, sums, r)
        sums = {k: np.asarray(v).reshape(seeds) for k, v in jax.device_get(sums).items()}
        return [{"loss": float(sums["loss_sum"][i] / sums["count"][i]),
                 "error": float(sums["error_sum"][i] / sums["count"][i]),
                 "n": int(sums["count"][i])} for i in range(seeds)]

    def save(state, data_state, step_now):
        # metrics of steps not yet logged travel with the checkpoint, so a resumed run
        # logs exactly the lines an uninterrupted one would
        merged = materialise(step_now)
        finite = np.asarray(finite_runs(state, seeds if together else 1))
        for i, run in enumerate(runs):
            if not finite[i]:
                finish_saves()  # first, so that the message names the last saved step
                raise NonFiniteLoss(
                    f"the state became non-finite at step {step_now} (its loss, computed "
                    f"before the update, was still finite){f' in {run.out}' if together else ''}"
                    f"; stopped without saving. The last good checkpoint in "
                    f"{run.out / 'checkpoints'} is kept (step {run.ckpt.latest_step()}). "
                    f"Lower --lr or check the data.")
        for i, run in enumerate(runs):
            run.log.flush()
            unlogged = {k: v[:, i].tolist() for k, v in merged.items()}
            run.ckpt.save(step_now, run_state(state, i),
                          data_state[i] if together else data_state,
                          {"config_digest": run.cfg.digest(), "config": run.cfg.to_json(),
                           "unlogged_metrics": unlogged,
                           "wall_s": run.wall_before + time.perf_counter() - wall_start})

    pending: list = []   # per-step metrics ([k] or [k, S]) not yet checked and logged
    if start is not None:
        restored = [r.restored_meta.get("unlogged_metrics") or {} for r in runs]
        if restored[0] and len(restored[0]["loss"]):
            pending = [{k: np.stack([np.asarray(u[k], np.float32) for u in restored], axis=-1)
                        for k in ("loss", "error", "lr")}]
    window_images, window_start = 0, time.perf_counter()
    wall_start = time.perf_counter()
    data_state = data_iter.get_state()
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not cfg.progress or jax.process_index() != 0,
               desc=cfg.model + (f" x {seeds} seeds" if together else ""))

    def finish_saves() -> None:
        """Let the checkpoints being written finish: a failure must not lose them."""
        for run in runs:
            with contextlib.suppress(Exception):
                run.ckpt.wait()

    def materialise(step_now) -> dict:
        """Pending per-step metrics to host arrays [steps, S]; stop on a non-finite loss."""
        nonlocal pending
        host = jax.device_get(pending)
        merged = {k: np.concatenate([np.asarray(m[k], np.float32).reshape(-1, seeds)
                                     for m in host] + [np.zeros((0, seeds), np.float32)])
                  for k in ("loss", "error", "lr")}
        pending = [merged]
        for i, run in enumerate(runs):
            bad = np.flatnonzero(~np.isfinite(merged["loss"][:, i]))
            if len(bad):
                first = step_now - len(merged["loss"])
                finish_saves()
                raise NonFiniteLoss(
                    f"loss became {merged['loss'][bad[0], i]} at step {first + bad[0] + 1}"
                    f"{f' in {run.out}' if together else ''}; stopped without saving. The "
                    f"last good checkpoint in {run.out / 'checkpoints'} is kept (step "
                    f"{run.ckpt.latest_step()}). Lower --lr or check the data.")
        return merged

    def flush(step_now):
        """Log the metrics of the steps since the last log line."""
        nonlocal pending, window_images, window_start
        m = materialise(step_now)
        pending = []
        if not len(m["loss"]):
            return
        elapsed = time.perf_counter() - window_start
        for i, run in enumerate(runs):
            run.last_train = {
                "step": step_now, "epoch": step_now * cfg.batch / len(train_arrays),
                "lr": float(m["lr"][-1, i]),
                "train_loss": float(m["loss"][:, i].mean(dtype=np.float64)),
                "train_error": float(m["error"][:, i].mean(dtype=np.float64)),
                "img_per_s": window_images / elapsed if elapsed > 0 else None}
            if jax.process_index() == 0:
                run.log.write(run.last_train)
        window_images, window_start = 0, time.perf_counter()
        shown = runs[0].last_train
        bar.set_postfix(loss=f"{shown['train_loss']:.3f}", err=f"{shown['train_error']:.3f}",
                        lr=f"{shown['lr']:.3g}")

    # [S, B, ...] per step when runs train together; [k, ...] chunks for k steps a call
    lead = (None,) if together else ()
    step_sharding = NamedSharding(mesh, P(*lead, "data"))
    chunk_sharding = NamedSharding(mesh, P(None, *lead, "data"))

    def to_device(host_batches):
        """k host batches -> the compiled call's input (runs on the prefetch thread)."""
        keys = ("image", "label")
        if together:  # each draw holds one batch per run: [S, B, ...], stacked below
            host_batches = [{key: [b[key] for b in draw] for key in keys}
                            for draw in host_batches]
        if cfg.steps_per_call == 1:
            b = host_batches[0]
            return to_global_array({key: np.asarray(b[key]) for key in keys}, step_sharding)
        return to_global_array(stack_batches(host_batches, keys), chunk_sharding)

    calls, s = [], step  # steps per compiled call: k stops at every log/eval/save step
    while s < cfg.steps:
        calls.append(min(cfg.steps_per_call, next_boundary(s) - s))
        s += calls[-1]
    with _Signals().installed() as signals, \
            ChunkPrefetcher(data_iter, calls, to_device) as chunks, \
            _finishing_saves_on_error(finish_saves):
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
                on_steps(k * seeds)
            stopping = signals.received is not None
            if step % cfg.log_every == 0 or step == cfg.steps:
                flush(step)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                for run, ev in zip(runs, evaluate(state)):
                    run.last_eval = {"step": step, **{f"eval_{k}": v for k, v in ev.items()},
                                     "eval_split": eval_split}
                    if jax.process_index() == 0:
                        run.log.write(run.last_eval)
                    seen = (f"train loss {run.last_train['train_loss']:.4f} err "
                            f"{100 * run.last_train['train_error']:.2f}%  |  "
                            if run.last_train else "")
                    seed = f"seed {run.cfg.seed}  " if together else ""
                    # inside a sweep (no bar of its own), lines of runs in parallel interleave
                    name = "" if cfg.progress else f"{run.out.name}  "
                    tqdm.write(f"{name}step {step:>7}  {seed}{seen}{eval_split} loss "
                               f"{run.last_eval['eval_loss']:.4f} err "
                               f"{100 * run.last_eval['eval_error']:.2f}%", file=sys.stderr)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                save(state, data_state, step)
            if stopping:
                for run in runs:
                    run.ckpt.wait()
                bar.close()
                name = signal.Signals(signals.received).name
                print(f"{name}: saved step {step} to "
                      f"{', '.join(str(r.out / 'checkpoints') for r in runs)}; re-run the "
                      f"same command to resume", file=sys.stderr)
                raise SystemExit(128 + signals.received)
    bar.close()
    for run in runs:
        run.ckpt.wait()

    # ------------------------------------------------------------------ results
    if any(r.last_eval is None or r.last_eval["step"] != step for r in runs):
        for run, ev in zip(runs, evaluate(state)):
            run.last_eval = {"step": step, **{f"eval_{k}": v for k, v in ev.items()}}
    if cfg.holdout:  # selection used the holdout; the test set is read once, at the end
        try:
            test_arrays = split_arrays(dataclasses.replace(cfg, holdout=0), "test")
        except DataError:  # an ImageFolder of the user's without test/ (or val/) images
            test_arrays = None
        if test_arrays is not None:
            for run, test in zip(runs, evaluate(state, prepare_arrays(test_arrays,
                                                                       cfg.input_pad))):
                run.last_eval.update(final_test_loss=test["loss"],
                                     final_test_error=test["error"])
    if cfg.eval_train_set:  # how well the final weights fit the training images themselves
        for run, fit in zip(runs, evaluate(state, train_arrays)):
            run.last_eval.update(final_train_set_loss=fit["loss"],
                                 final_train_set_error=fit["error"])
    out = []
    for i, run in enumerate(runs):
        own = run_state(state, i)
        history = run.log.read()
        train_records = [r for r in history if "train_loss" in r]
        rates = [r["img_per_s"] for r in train_records if r.get("img_per_s")]
        results = {
            "model": cfg.model, "data": cfg.data, "params": n_params, "steps": step,
            "seed": run.cfg.seed, "batch": cfg.batch,
            "final_train_loss": train_records[-1]["train_loss"] if train_records else None,
            "final_train_error": train_records[-1]["train_error"] if train_records else None,
            f"final_{eval_split}_loss": run.last_eval["eval_loss"],
            f"final_{eval_split}_error": run.last_eval["eval_error"],
            **{k: v for k, v in run.last_eval.items() if k.startswith("final_")},
            "final_params_digest": params_digest(own.params),
            "warmup_end": int(jax.device_get(own.warmup_end)) if cfg.warmup_lr else None,
            "wall_s": run.wall_before + time.perf_counter() - wall_start,
            "img_per_s": float(np.median(rates)) if rates else None,
            **({"trained_together": [r.cfg.seed for r in runs]} if together else {}),
            "hardware": hardware(), "versions": versions(), "command": command,
            "conv_kernels": conv_kernels, "config": run.cfg.to_json(),
        }
        if jax.process_index() == 0:
            tmp = run.out / "results.json.tmp"
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(run.out / "results.json")
        run.ckpt.close()
        run.log.close()
        out.append(results)
    return out
