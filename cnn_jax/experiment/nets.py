"""The nets experiments train and compare, named as the zoo names them, and He et al.'s
CIFAR recipe, which several experiments train their nets with.

    Net("resnet", 56).name, .label, .model()     # resnet56, ResNet-56, ("cifar_resnet", {...})
    Net("preact", 110).name                      # preact_resnet110 (a CIFAR family)
    Net("plain", 34, imagenet=True).name         # plain34 (ImageNet's Fig. 4 nets)
    cfg = he2015_cifar(Net("resnet", 20), HE2015["quick"], seed=0, out=...)
    records = sweep(nets, config_of, seeds, out, command)    # one record per net and seed

Records, tables, plots and claims (cnn_jax.experiment.report) key nets by name: a third
family of the CIFAR table compares with the others without code of its own.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cnn_jax.errors import BadInput
from cnn_jax.models import CIFAR_FAMILIES
from cnn_jax.models.resnet import IMAGENET_STAGES, cifar_blocks_per_stage
from cnn_jax.train import TrainConfig
from cnn_jax.train.sweep import curve, run_all

IMAGENET_LABELS = {"resnet": "ResNet", "plain": "plain"}


@dataclasses.dataclass(frozen=True)
class Net:
    """A net of the zoo by family and depth: a CIFAR family of the zoo's table
    (cnn_jax.models.CIFAR_FAMILIES, 6n+2 layers), or with `imagenet` ImageNet's ResNet-18
    .. 152 and plain-18/34 (He et al. 2015, Fig. 4)."""
    family: str
    depth: int
    imagenet: bool = False

    @property
    def name(self) -> str:
        """Its registry name and folder: resnet56, preact_resnet110, plain34."""
        if self.imagenet:
            return f"{self.family}{self.depth}"
        return f"{CIFAR_FAMILIES[self.family].prefix}{self.depth}"

    @property
    def label(self) -> str:
        """As tables and plots name it: ResNet-56, pre-act ResNet-110, plain-34."""
        label = IMAGENET_LABELS[self.family] if self.imagenet else \
            CIFAR_FAMILIES[self.family].label
        return f"{label}-{self.depth}"

    @property
    def residual(self) -> bool:
        return self.family != "plain"

    @property
    def paper_error(self) -> Optional[float]:
        """The CIFAR-10 test error (%) its paper reports, where it does."""
        if self.imagenet:
            return None
        return (CIFAR_FAMILIES[self.family].paper_error or {}).get(self.depth)

    def model(self) -> tuple[str, dict]:
        """The architecture as data: (registry name, options); never a name parsed
        back (CIFAR ResNet-50 is not the ImageNet resnet50)."""
        if self.imagenet:
            return self.name, {}
        return f"cifar_{self.family}", {"depth": self.depth}


def cifar_nets(families, depths, plain_up_to: int = 110) -> list[Net]:
    """Every family at every depth (6n+2; plain nets only up to `plain_up_to` layers,
    He et al.'s deepest), family by family in the table's order."""
    unknown = sorted(set(families) - set(CIFAR_FAMILIES))
    if unknown:
        raise BadInput(f"--families: {', '.join(unknown)} not in the CIFAR table; its "
                       f"families: {', '.join(CIFAR_FAMILIES)}")
    for d in depths:
        try:
            cifar_blocks_per_stage(d)
        except BadInput as e:
            raise BadInput(f"--depths: {e}") from None
    return [Net(f, d) for f in CIFAR_FAMILIES if f in families for d in sorted(set(depths))
            if f != "plain" or d <= plain_up_to]


def imagenet_nets(plain: tuple, residual: tuple) -> list[Net]:
    """ImageNet's plain nets (18, 34: Fig. 4) and ResNets (Table 1's depths)."""
    wrong = sorted(set(residual) - set(IMAGENET_STAGES))
    if wrong:
        raise BadInput(f"--depths: ImageNet ResNets have {sorted(IMAGENET_STAGES)} "
                       f"layers; got {wrong}")
    bad = sorted(set(plain) - {18, 34})
    if bad:
        raise BadInput(f"plain nets: the paper has plain-18 and plain-34 only (Fig. 4); "
                       f"got {bad}")
    return [Net("plain", d, True) for d in sorted(plain)] + \
        [Net("resnet", d, True) for d in sorted(residual)]


# ------------------------------------------------------------------ He et al.'s CIFAR recipe
# Sec. 4.2 as training fields: 64k iterations at batch 128, lr 0.1 divided by 10 at 32k
# and 48k; train_subset > 0 trains on (and reports the training error of) a fixed
# stratified subset, eval_subset > 0 tests on one; bn_group > 0: BatchNorm statistics
# per group of this many images.
PAPER = dict(steps=64_000, batch=128, lr=0.1, milestones=(32_000, 48_000), train_subset=0,
             eval_subset=0, log_every=100, eval_every=1_000, checkpoint_every=2_000,
             eval_batch=1_000, steps_per_call=1, bn_group=0, dtype="float32")
HE2015 = {
    # Batch 128 "on two GPUs": BatchNorm saw 64 images per GPU (docs/deviations.md)
    "paper": {**PAPER, "steps_per_call": 10, "bn_group": 64},
    # The optimisation claim at CPU scale (experiments.plain_vs_resnet): fit 1,000 images
    "quick": {**PAPER, "steps": 600, "batch": 32, "lr": 0.01, "milestones": (450,),
              "train_subset": 1_000, "eval_subset": 1_000, "log_every": 25, "eval_every": 600,
              "checkpoint_every": 200, "eval_batch": 500},
    "smoke": {**PAPER, "steps": 6, "batch": 16, "milestones": (10**9,), "log_every": 2,
              "eval_every": 3, "checkpoint_every": 3, "eval_batch": 500},
}


def he2015_cifar(net: Net, train: dict, seed: int, out: Path, *, data: str = "cifar10",
                 data_dir=None, workers=None, augment: bool = True, warmup_110: bool = True,
                 val: bool = False) -> TrainConfig:
    """A CIFAR net's run with He et al.'s recipe (Sec. 4.2): momentum 0.9, weight decay
    1e-4, the paper's schedule, the per-pixel mean subtracted, pad-and-crop with mirror
    (`augment`), ResNet-110's warm-up at 0.01 (`warmup_110`), 5,000 images held out
    (`val`); then `train`'s fields (a preset's, --set's) over them."""
    model, options = net.model()
    return TrainConfig().replace(**{
        "model": model, "model_options": options, "data": data, "data_dir": data_dir,
        "holdout": 5_000 if val else 0, "seed": seed, "momentum": 0.9, "weight_decay": 1e-4,
        "schedule": "paper", "warmup_lr": 0.01 if net.depth >= 110 and warmup_110 else 0.0,
        "crop_pad": 4 if augment else 0, "flip": augment, "normalise": "per_pixel",
        "eval_train_set": bool(train.get("train_subset")), "workers": workers,
        "out": str(out), "progress": False, **train})


# ------------------------------------------------------------------ sweeps and records
def sweep(nets: list[Net], config_of: Callable[[Net, int, Path], TrainConfig], seeds: int,
          out: Path, command: str, *, together: bool = False,
          processes: Optional[int] = None) -> list[tuple[Net, int, TrainConfig, dict]]:
    """Train (or re-read) every net for `seeds` seeds into out/nets/<net>-seed<k>, the
    deepest first (`together`: each net's seeds at once); (net, seed, config, results)
    per net and seed, nets in the given order."""
    jobs = [(net, seed) for seed in range(seeds) for net in nets]
    configs = [config_of(net, seed, out / "nets" / f"{net.name}-seed{seed}")
               for net, seed in jobs]
    deepest_first = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].depth)
    results = run_all([configs[i] for i in deepest_first], command,
                      [f"{jobs[i][0].name} seed {jobs[i][1]}" for i in deepest_first],
                      together=together, processes=processes)
    results = [results[deepest_first.index(i)] for i in range(len(jobs))]
    return [(net, seed, cfg, res) for (net, seed), cfg, res in zip(jobs, configs, results)]


def record(net: Net, seed: int, cfg: TrainConfig, res: dict) -> dict:
    """One net's line of an experiment's results.json: what it is, its final errors
    (and what they scored), its curves, its cost."""
    split = res.get("eval_split", "test")
    return {
        "name": net.name, "label": net.label, "family": net.family, "depth": net.depth,
        "residual": net.residual, "params": res["params"], "seed": seed,
        "steps": res["steps"], "final_train_error": res["final_train_error"],
        "final_train_set_error": res.get("final_train_set_error"),
        "final_test_error": res.get("final_test_error"),
        **({"final_val_error": res["final_val_error"]} if split == "val" else {}),
        "paper_error": net.paper_error, "scored": res.get("eval_data"),
        "curve": curve(Path(cfg.run.out), split),
        "wall_s": res["wall_s"], "img_per_s": res["img_per_s"],
        "hardware": res["hardware"], "conv_kernels": res.get("conv_kernels"),
        "run_dir": str(Path(cfg.run.out)),
    }


def training_error(run: dict) -> float:
    """A net's final training error, in %: on its whole training subset with the final
    weights where it trained on one (`final_train_set_error`), else the error on the
    last iterations' training batches."""
    fit = run.get("final_train_set_error")
    return 100 * (fit if fit is not None else run["final_train_error"])


def mean_train_errors(runs: list[dict]) -> dict:
    """net name -> final training error in %, averaged over seeds."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(r["name"], []).append(training_error(r))
    return {k: float(np.mean(v)) for k, v in groups.items()}


def net_named(name: str) -> Net:
    """The CIFAR family net a registry name means (resnet20, preact_resnet110, plain56),
    from the families table, never by stripping letters off it."""
    for key, family in sorted(CIFAR_FAMILIES.items(), key=lambda kv: -len(kv[1].prefix)):
        depth = name[len(family.prefix):]
        if name.startswith(family.prefix) and depth.isdigit():
            return cifar_nets([key], [int(depth)])[0]
    raise BadInput(f"{name!r} is no CIFAR net of the zoo's table (its families: "
                   f"{', '.join(f.prefix + 'N' for f in CIFAR_FAMILIES.values())})")


def found_or_trained(nets: list[Net], config_of: Callable[[Net, int, Path], TrainConfig],
                     seeds: int, out: Path, command: str, elsewhere: Optional[Path] = None,
                     **sweep_options) -> list[tuple[Net, int, TrainConfig, dict]]:
    """Like `sweep`, but a net already trained with the same recipe in another
    experiment's output folder (`elsewhere`/nets/<net>-seed<k>, e.g. a main experiment
    run) is read there and left as it is; the others are trained into `out`."""
    from cnn_jax.train.sweep import finished  # (one way to know a run is done)
    found, todo = {}, []
    for net in nets:
        for seed in range(seeds):
            there = None if elsewhere is None else \
                config_of(net, seed, Path(elsewhere) / "nets" / f"{net.name}-seed{seed}")
            res = finished(there) if there is not None else None
            if res is not None:
                found[(net.name, seed)] = (net, seed, there, res)
            elif net not in todo:
                todo.append(net)
    trained = {(n.name, s): (n, s, c, r) for n, s, c, r in
               (sweep(todo, config_of, seeds, out, command, **sweep_options) if todo else [])}
    return [found.get((net.name, seed)) or trained[(net.name, seed)]
            for seed in range(seeds) for net in nets]
