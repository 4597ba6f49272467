"""The paper presets' compiled step as a GPU or TPU runs it, tried on CPU devices: run by
tests/test_accelerator.py in a process with 8 forced host devices
(--xla_force_host_platform_device_count=8). For each preset: its run's TrainConfig as
the experiment makes it (bn_group, steps_per_call, dtype, batch), a small net on small
synthetic images, XLA's own convolutions (auto's choice on a GPU or TPU), one compiled
call on a 1-device mesh and on the 8-device mesh from the same state and batches.
Prints one JSON line: per preset, what each mesh saw (shardings, per-step losses) and
how far the two meshes' losses and variables are apart."""
import importlib
import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cnn_jax.train import setup as setup_lib
from cnn_jax.train.start import _initial_state

PRESETS = {
    # He et al. 2015 on CIFAR-10: batch 128 "on two GPUs", BN over 64, 10 steps a call
    "plain_vs_resnet/paper": ("experiments.plain_vs_resnet", "resnet", 20),
    # Sec. 3.4 on ImageNet: batch 256, bfloat16, one step a call
    "imagenet/paper": ("experiments.imagenet", "resnet", 18),
}
SMALL = dict(model="resnet8", model_options={}, data="synthetic:16x16x3:10:512:64",
             image_size=0, augment="cifar", crop_pad=4, flip=True, normalise="per_pixel",
             workers=0, conv_kernels="xla", eval_subset=0, progress=False)


def preset_config(name: str, out: Path):
    """The preset's run of its net, as the experiment configures it, made small."""
    module, family, depth = PRESETS[name]
    E = importlib.import_module(module)
    net = E.Net(family, depth, imagenet=module.endswith("imagenet"))
    return E.run_config(net, E.PRESETS["paper"], 0, out).replace(**SMALL, out=str(out))


def one_call(cfg, devices: int):
    """The preset's compiled call (k = steps_per_call steps) on the first `devices`
    devices: the state after it, and the shardings of its input and state."""
    setup_lib.make_mesh = lambda c: Mesh(np.array(jax.devices()[:devices]), ("data",))
    s = setup_lib.build([cfg])
    state = jax.jit(lambda seed: _initial_state(s, None, seed), static_argnums=0,
                    out_shardings=s.sharding())(cfg.run.seed)
    it = iter(s.datasets[0])
    k = cfg.run.steps_per_call
    batch = s.put([[next(it)] for _ in range(k)])
    it.close()
    image = batch["image"]
    state, metrics = (s.step_many if k > 1 else s.step_one)(state, batch)
    leaves = jax.tree.leaves(state)
    seen = {
        "input_spec": list(image.sharding.spec),
        "input_devices": len(image.sharding.device_set),
        "input_shard": list(image.addressable_shards[0].data.shape),
        "state_replicated": all(x.sharding.is_fully_replicated for x in leaves),
        "state_devices": sorted({len(x.sharding.device_set) for x in leaves}),
        "state_spec": [list(x.sharding.spec) for x in leaves[:1]],
        "dtype": str(s.model.dtype.__name__ if hasattr(s.model.dtype, "__name__")
                     else s.model.dtype),
        "loss": np.asarray(metrics["loss"], np.float64).reshape(-1).tolist(),  # per step
    }
    assert isinstance(image.sharding, NamedSharding)
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats}), seen


def max_diff(a, b) -> float:
    """The largest difference of any variable (they are of order 0.01-1 here; a
    relative one would weigh the rounding of BN biases near 0 after a step)."""
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    report = {}
    for name in PRESETS:
        cfg = preset_config(name, Path(out) / name.replace("/", "-"))
        (one, seen1), (eight, seen8) = one_call(cfg, 1), one_call(cfg, 8)
        report[name] = {"batch": cfg.optimiser.batch, "bn_group": cfg.model.bn_group,
                        "steps_per_call": cfg.run.steps_per_call, "dtype": cfg.model.dtype,
                        "one": seen1, "eight": seen8,
                        "loss_rel_diff": float(np.max(np.abs(
                            np.subtract(seen1["loss"], seen8["loss"])) / np.abs(seen1["loss"]))),
                        "params_diff": max_diff(one["params"], eight["params"]),
                        "batch_stats_diff": max_diff(one["batch_stats"],
                                                     eight["batch_stats"])}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
