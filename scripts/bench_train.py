"""Our CIFAR ResNet train step against a PyTorch reference, side by side in one run.

For each model, batch, dtype and steps-per-call K: the training engine's step
(`cnn_jax.train.steps`: normalise on device, forward, backward, SGD with momentum and
coupled weight decay, BatchNorm statistics) on random uint8 images resident on the
device; compilation and warm-up excluded; the median of `--repeats` timed windows.
Every variant (and reference) is built first and the windows are taken round by round
(A B C, A B C, ...), so that drift on a shared, noisy machine hits each alike.
With `--reference torch` (torch installed), scripts/torch_reference.py times the same
network in PyTorch (eager float32, AMP bf16 channels_last, torch.compile) in the same
process. With `--pipeline`, the first variant is also fed by the real grain pipeline
(CIFAR-10, crop + mirror, host -> device through the training loop's prefetch thread):
end-to-end vs resident data, for each steps-per-call of the first model, batch, dtype.

    python scripts/bench_train.py --model resnet20 --batch 128 --dtype float32 \\
        --reference torch --json
    python scripts/bench_train.py --model resnet20 resnet56 resnet110 --batch 128 512 \\
        --dtype float32 bfloat16 --steps-per-call 1 10 --reference torch \\
        --torch-modes eager amp_bf16 compile --pipeline --json

`--seeds 1 5` also times 5 runs vmapped into one step (img/s then counts all five
runs' images: the throughput of training seeds together vs one after another; XLA's
kernel gradients are then computed seed by seed, "seedwise", as in training).

The last line is one JSON object: `ours_img_per_s` (the fastest of our variants in the
first model, batch, dtype and seed count), `reference_img_per_s` (PyTorch eager in
the matching precision: float32 -> eager, bfloat16 -> amp_bf16), `ratio` (ours /
reference), `backend`, and every variant. `--conv-kernels xla matmul` times both
kernel-gradient paths (cnn_jax.train.conv_kernels); `versions.xla_flags` records
XLA_FLAGS, which choose the CPU convolution library (cnn_jax.cpu_kernels).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from cnn_jax.train.config import CONV_KERNELS


def make_step(model_name: str, batch: int, dtype: str, k: int, kernels: str = "auto",
              seeds: int = 1):
    """The engine's jitted train step (k steps per call when k > 1; `seeds` runs
    vmapped into one step when seeds > 1), a fresh state and one resident batch of
    random uint8 images: (fn, state, data, the convolution kernels used)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from cnn_jax.models import create_model
    from cnn_jax.train import schedules
    from cnn_jax.train.conv_kernels import resolve
    from cnn_jax.train.state import TrainState
    from cnn_jax.train.steps import make_optimizer, make_train_step, multi_step, seeds_at_once
    from cnn_jax.train.config import OptimiserConfig

    model = create_model(model_name, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=1e-4))
    lr_fn = schedules.with_warmup(schedules.paper(0.1), 0.0)
    mean = jnp.asarray(np.random.default_rng(0).uniform(100, 150, (32, 32, 3)), jnp.float32)
    kernels = resolve(kernels, seeds, dtype)
    train_step = make_train_step(model, tx, lr_fn, lambda im: im.astype(jnp.float32) - mean,
                                 conv_kernels=kernels)
    if seeds > 1:
        train_step = seeds_at_once(train_step)
    fn = jax.jit(multi_step(train_step) if k > 1 else train_step, donate_argnums=0)
    init = jax.jit(model.init)
    states = [TrainState.create(init(jax.random.key(s), jnp.zeros((1, 32, 32, 3))), tx,
                                jax.random.PRNGKey(100 + s)) for s in range(seeds)]
    state = states[0] if seeds == 1 else jax.tree.map(lambda *x: jnp.stack(x), *states)
    lead = ((k,) if k > 1 else ()) + ((seeds,) if seeds > 1 else ()) + (batch,)
    data = {"image": jax.random.randint(jax.random.key(1), (*lead, 32, 32, 3), 0, 256
                                        ).astype(jnp.uint8),
            "label": jax.random.randint(jax.random.key(2), lead, 0, 10)}
    return fn, state, data, kernels


def our_timer(model_name: str, batch: int, dtype: str, k: int, steps: int,
              kernels: str = "auto", seeds: int = 1):
    """The step compiled and warmed up: (info, window), where window(source) times
    about `steps` steps fed by source() (default: the resident batch) and returns
    seconds per step."""
    import jax

    fn, state, data, kernels = make_step(model_name, batch, dtype, k, kernels, seeds)
    calls, run = max(1, steps // k), {"state": state}

    def window(source=lambda: data) -> float:
        t = time.perf_counter()
        for _ in range(calls):
            run["state"], _ = fn(run["state"], source())
        jax.block_until_ready(run["state"])
        return (time.perf_counter() - t) / (calls * k)

    for _ in range(2):  # compile + warm-up
        run["state"], _ = fn(run["state"], data)
    jax.block_until_ready(run["state"])
    return {"impl": "ours", "model": model_name, "batch": batch, "dtype": dtype,
            "steps_per_call": k, "conv_kernels": kernels, "seeds": seeds}, window


def pipeline_ms(window, batch: int, k: int, calls: int, repeats: int, data_dir=None) -> float:
    """Median ms per step of `window` fed by the training loop's input path: grain
    (CIFAR-10, crop + mirror) -> prefetch thread -> device."""
    import jax
    from cnn_jax.data.dataset import DataSpec, open_split
    from cnn_jax.data.pipeline import ChunkPrefetcher, stack_batches, train_dataset
    it = iter(train_dataset(open_split(DataSpec("cifar10", data_dir), "train"), batch, 0))

    def to_device(bs):  # as the training loop's: [k, B, ...] chunks, or one batch
        host = stack_batches(bs) if k > 1 else {key: bs[0][key] for key in ("image", "label")}
        return jax.device_put(host)

    with ChunkPrefetcher(it, [k] * (calls * (repeats + 1)), to_device) as chunks:
        window(lambda: next(chunks)[0])  # warm-up: the workers start
        return 1000 * statistics.median(window(lambda: next(chunks)[0])
                                        for _ in range(repeats))


def interleaved(timers: list, repeats: int, progress: bool = False) -> list[float]:
    """Median ms per step of each timer's window, the windows taken round by round
    (A B C, A B C, ...) so that a shared machine's drift hits every variant alike."""
    from tqdm.auto import tqdm
    times = [[] for _ in timers]
    for _ in tqdm(range(repeats), desc="timing rounds", unit="round", disable=not progress):
        for t, window in zip(times, timers):
            t.append(window())
    return [1000 * statistics.median(t) for t in times]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["resnet20"])
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"])
    p.add_argument("--steps-per-call", type=int, nargs="+", default=[1])
    p.add_argument("--conv-kernels", "--conv-grad", nargs="+", choices=CONV_KERNELS,
                   default=["auto"], help="the convolutions' kernels (cnn_jax.train."
                   "conv_kernels; auto: the training default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1],
                   help="independent runs vmapped into one step (cnn_jax.train.steps."
                   "seeds_at_once); img/s then counts the images of all of them")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reference", choices=["none", "torch"], default="none")
    p.add_argument("--torch-modes", nargs="+", choices=["eager", "amp_bf16", "compile"],
                   default=None, help="default: eager, plus amp_bf16 for bfloat16")
    p.add_argument("--pipeline", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="only the JSON line")
    a = p.parse_args(argv)

    import jax
    from cnn_jax.provenance import hardware, versions
    ours, timers = [], []  # every variant built first, then timed round by round
    for model in a.model:
        for batch in a.batch:
            for dtype in a.dtype:
                for k, cg, n in [(k, cg, n) for k in a.steps_per_call for cg in a.conv_kernels
                                 for n in a.seeds]:
                    t = time.perf_counter()
                    info, window = our_timer(model, batch, dtype, k, max(a.steps, k), cg, n)
                    ours.append(info)
                    timers.append(window)
                    if not a.json:
                        print(f"built {info} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    reference = []
    if a.reference == "torch":
        try:
            import torch_reference  # scripts/ is on sys.path when run as a script
        except ImportError:
            sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
            import torch_reference
        modes = a.torch_modes or (["eager"] + (["amp_bf16"] if "bfloat16" in a.dtype else []))
        for model in a.model:
            depth = int(model.removeprefix("resnet"))  # CIFAR ResNets only
            for batch in a.batch:
                for mode in modes:
                    try:
                        info, window = torch_reference.step_timer(depth, batch, mode, a.steps)
                        timers.append(window)
                    except Exception as e:  # e.g. torch.compile without a C++ compiler
                        info = {"mode": mode, "depth": depth, "batch": batch,
                                "error": f"{type(e).__name__}: {str(e)[:200]}"}
                    reference.append({"impl": "torch", "model": model, **info})
    timed = [r for r in ours + reference if "error" not in r]
    for r, ms in zip(timed, interleaved(timers, a.repeats, progress=not a.json)):
        r.update(ms_per_step=ms, img_per_s=r.get("seeds", 1) * r["batch"] / ms * 1000)
    if a.pipeline:  # the first model, batch and dtype, each steps-per-call, one seed
        for r, window in zip(ours, timers):
            if (r["model"], r["batch"], r["dtype"], r["seeds"]) == \
                    (a.model[0], a.batch[0], a.dtype[0], 1):
                k = r["steps_per_call"]
                e2e = pipeline_ms(window, r["batch"], k, max(1, max(a.steps, k) // k),
                                  a.repeats, a.data_dir)
                r.update(pipeline_ms_per_step=e2e, pipeline_img_per_s=r["batch"] / e2e * 1000,
                         pipeline_over_resident=r["ms_per_step"] / e2e)
    if not a.json:
        for r in ours + reference:
            print(json.dumps(r), file=sys.stderr)
    first = max((r for r in ours if (r["model"], r["batch"], r["dtype"], r["seeds"]) ==
                 (ours[0]["model"], ours[0]["batch"], ours[0]["dtype"], ours[0]["seeds"])),
                key=lambda r: r["img_per_s"])
    want = "amp_bf16" if first["dtype"] == "bfloat16" else "eager"
    ref = next((r for r in reference if r["model"] == first["model"] and
                r["batch"] == first["batch"] and r["mode"] == want and "error" not in r), None)
    print(json.dumps({
        "ours_img_per_s": first["img_per_s"], "ours_variant": first,
        "reference_img_per_s": ref["img_per_s"] if ref else None,
        "ratio": first["img_per_s"] / ref["img_per_s"] if ref else None,
        "reference_mode": want if ref else None,
        "backend": jax.default_backend(), "variants": ours, "reference": reference,
        "hardware": hardware(), "versions": versions(),
        "command": "python scripts/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
