"""Host input pipeline vs training step: can the CPUs feed the accelerator?

Prints JSON: the grain pipeline's images/s for each worker count and augmentation
setting (CIFAR-10 from the local archive, or synthetic data with --data synthetic),
and, in the same run, the train-step rate of CIFAR ResNet-20 and ResNet-56 at batch
128 on the current backend, with the ratio pipeline / step.

    python scripts/bench_pipeline.py [--workers 0 2 4] [--batches 50] [--json]

The train step is the training engine's (`cnn_jax.train.steps`: forward, backward,
SGD with momentum and weight decay, BatchNorm statistics), one step per call, on
device-resident random data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def pipeline_rate(dataset, workers, batch, batches) -> float:
    from cnn_jax.data.pipeline import train_dataset
    it = iter(train_dataset(dataset, batch, seed=0, workers=workers))
    for _ in range(max(3, 2 * workers)):  # warm-up: workers started, buffers full
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t)
    del it
    return rate


def step_rate(model_name: str, batch: int, repeats: int) -> float:
    """images/s of the training engine's step (one step per call, float32, paper
    optimiser) on device-resident random uint8 data, compilation excluded."""
    import jax
    import jax.numpy as jnp
    from cnn_jax.models import create_model, input_shape
    from cnn_jax.train import schedules
    from cnn_jax.train.state import TrainState
    from cnn_jax.train.steps import make_optimizer, make_train_step
    from cnn_jax.train.config import OptimiserConfig

    model = create_model(model_name)
    shape = input_shape(model_name)
    x = jax.random.randint(jax.random.key(1), (batch, *shape), 0, 256).astype(jnp.uint8)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=1e-4))
    lr_fn = schedules.with_warmup(schedules.paper(0.1), 0.0)
    step = jax.jit(make_train_step(model, tx, lr_fn, lambda im: im.astype(jnp.float32) / 255),
                   donate_argnums=0)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape)))
    state = TrainState.create(variables, tx, jax.random.PRNGKey(3))
    batch_ = {"image": x, "label": y}
    state, m = step(state, batch_)
    m["loss"].block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, m = step(state, batch_)
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def normalise_placement(images: np.ndarray, repeats: int = 20) -> dict:
    """ms per batch: normalise on the host then send float32, vs send uint8 and
    normalise on the device (both end as float32 on the device)."""
    import jax
    from cnn_jax.data.ops import Normalizer

    norm = Normalizer.from_data(images, per_pixel=True)
    on_device = jax.jit(lambda x: norm(x))
    device = jax.devices()[0]

    def host_then_send():
        return jax.device_put(norm(images), device).block_until_ready()

    def send_then_device():
        return on_device(jax.device_put(images, device)).block_until_ready()

    out = {}
    for name, fn in (("host_float32", host_then_send), ("device_uint8", send_then_device)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name + "_ms"] = 1000 * statistics.median(times)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts to try (default: 0 and the default count)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--step-repeats", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import jax
    from cnn_jax.data.dataset import DataSpec, open_split, with_pca
    from cnn_jax.data.pipeline import default_workers

    spec = DataSpec(args.data, args.data_dir)
    settings = {
        "none": open_split(dataclasses.replace(spec, crop_pad=0, flip=False), "train"),
        "crop+flip": open_split(spec, "train"),
        "crop+flip+pca": with_pca(open_split(spec, "train"),
                                  dataclasses.replace(spec, pca_colour=True)),
    }
    arrays = settings["none"].source
    workers = args.workers or sorted({0, default_workers()})
    pipeline = []
    for w in workers:
        for name, dataset in settings.items():
            rate = pipeline_rate(dataset, w, args.batch, args.batches)
            pipeline.append({"workers": w, "augment": name, "img_per_s": rate})
            print(f"pipeline workers={w} augment={name}: {rate:,.0f} img/s", file=sys.stderr)
    steps = {}
    for m in args.models:
        steps[m] = step_rate(m, args.batch, args.step_repeats)
        print(f"train step {m} batch {args.batch}: {steps[m]:,.0f} img/s "
              f"({1000 * args.batch / steps[m]:.1f} ms/step)", file=sys.stderr)

    placement = normalise_placement(np.asarray(arrays.images[:args.batch]))
    print(f"normalise on host + float32 transfer {placement['host_float32_ms']:.2f} ms, "
          f"uint8 transfer + normalise on device {placement['device_uint8_ms']:.2f} ms",
          file=sys.stderr)
    full = [r for r in pipeline if r["augment"] == "crop+flip"]
    best = max(full, key=lambda r: r["img_per_s"])
    result = {
        "pipeline_img_per_s": best["img_per_s"],
        "workers": best["workers"],
        "augment": best["augment"],
        "step_img_per_s": steps[args.models[0]],
        "step_model": args.models[0],
        "ratio": best["img_per_s"] / steps[args.models[0]],
        "step_img_per_s_by_model": steps,
        "pipeline": pipeline,
        "normalise": placement,
        "batch": args.batch,
        "data": args.data,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    if not args.json:
        print(f"best pipeline {best['img_per_s']:,.0f} img/s ({best['workers']} workers) vs "
              f"{args.models[0]} step {steps[args.models[0]]:,.0f} img/s: "
              f"ratio {result['ratio']:.1f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
