"""The run configuration: one flat dataclass, saved as `config.json` and hashed so a
resumed run can refuse a configuration that would change its result."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

CONV_GRADS = ("auto", "xla", "matmul", "onednn")  # cnn_jax.train.conv_grad; "auto" first
NORMALISATIONS = ("per_pixel", "per_channel", "standard", "lecun", "imagenet", "inception",
                  "source", "none")  # cnn_jax.train.inputs.make_normaliser


@dataclasses.dataclass
class TrainConfig:
    # what to train on
    model: str = "resnet20"
    model_options: dict = dataclasses.field(default_factory=dict)
    data: str = "cifar10"
    data_dir: Optional[str] = None
    holdout: int = 0              # >0: train on train minus a stratified holdout, evaluate on it
    eval_subset: int = 0          # >0: evaluate on a fixed stratified subset of this many
    train_subset: int = 0         # >0: train on a fixed stratified subset of this many
    classes: str = ""             # train and evaluate on these classes only ("0,1,2", "cat,dog")
    image_size: int = 0           # >0: ImageFolder images resized to cover it, centre-cropped
    init_from: str = ""           # a run's --out, or torchvision/timm weights (.pth/.safetensors):
                                  # start from its variables where names match
    init_skip: str = ""           # top-level modules not taken from init_from (a new head: "fc")
    trainable: str = ""           # top-level module prefixes that train ("conv5,fc"); the rest
                                  # is frozen, its BatchNorm in inference mode. "": all
    # the recipe (He et al. 2015, Sec. 4.2 by default)
    steps: int = 64_000
    batch: int = 128
    seed: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True   # decay BN scale/bias and biases too (Torch/Caffe default)
    schedule: str = "paper"            # paper | constant | cosine | onecycle
    milestones: tuple = (32_000, 48_000)
    warmup_steps: int = 0              # >0: lr rises linearly over these first steps
    warmup_lr: float = 0.0             # >0: He et al.'s ResNet-110 warm-up (0.01 ...
    warmup_until_error: float = 0.8    # ... until training error < 80 %)
    label_smoothing: float = 0.0
    # input
    crop_pad: int = 4
    flip: bool = True
    colour_shift: float = 0.0
    pca_colour: bool = False
    normalise: str = "per_pixel"       # per_pixel | per_channel | standard | lecun | imagenet |
                                       # inception | source (init_from's own) | none
    input_pad: int = 0                 # zero-pad every image first (LeNet: MNIST 28 -> 32)
    resize: int = 0                    # >0: bilinear resize to resize x resize on the device
    # compute
    dtype: str = "float32"             # float32 | bfloat16 (compute; params stay float32)
    bn_group: int = 0                  # >0: BatchNorm statistics per group of this many examples
    steps_per_call: int = 1            # K steps inside one compiled call (lax.scan)
    conv_grad: str = "auto"            # auto | xla | matmul | onednn: the convolution
                                       # kernels (cnn_jax.train.conv_grad); auto: oneDNN's
                                       # on CPUs where they run, else matmul (float32 on
                                       # CPUs) or XLA's
    # cadence and output
    eval_batch: int = 1000             # evaluation batch (any size: results do not depend on it)
    eval_train_set: bool = False       # at the end, also the error on the (unaugmented)
                                       # training images, inference mode
    log_every: int = 100
    eval_every: int = 2_000
    checkpoint_every: int = 2_000
    keep_checkpoints: int = 3
    workers: Optional[int] = None
    out: str = "runs/train"
    progress: bool = True

    # fields that cannot change the numbers a run produces
    NON_RESULT_FIELDS = ("data_dir", "steps_per_call", "eval_batch", "eval_train_set",
                         "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                         "workers", "out", "progress")

    def result_fields(self) -> dict:
        # imported here, not at the top: `from cnn_jax.train import TrainConfig` stays
        # free of flax and jax
        from cnn_jax.models import canonical
        d = dataclasses.asdict(self)
        for k in self.NON_RESULT_FIELDS:
            d.pop(k, None)
        d["model"], d["model_options"] = canonical(self.model, self.model_options)
        if self.schedule in ("paper", "constant"):
            d.pop("steps")  # these schedules do not depend on the run's length
        d["milestones"] = list(d["milestones"])
        d.pop("conv_grad")  # a kernel choice, like the backend: same function, other rounding
        for k in ("input_pad", "resize", "eval_subset", "train_subset", "init_from", "classes",
                  "image_size", "init_skip", "trainable", "warmup_steps"):  # added later: absent when off, so older
            if not d[k]:                   # runs keep their digests and resume
                d.pop(k)
        return d

    def digest(self) -> str:
        blob = json.dumps(self.result_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    def seedless(self) -> dict:
        """Every field but the seed and the output folder: what runs trained together
        (cnn_jax.train.loop.train_together) must share."""
        return dataclasses.replace(self, seed=0, out="").to_json()

    @classmethod
    def of_run(cls, run_dir) -> "TrainConfig":
        """The configuration a run's --out folder was trained with."""
        try:
            saved = json.loads((Path(run_dir) / "config.json").read_text())
            return cls.from_json(saved["config"])
        except (OSError, ValueError, KeyError):
            raise ValueError(f"{run_dir}: expected the --out folder of a training run, "
                             f"holding config.json and checkpoints/") from None

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def validate(self) -> None:
        def bad(field, msg):
            raise ValueError(f"--{field.replace('_', '-')}: {msg}")
        if self.steps < 1:
            bad("steps", f"must be positive, got {self.steps}")
        if self.batch < 1:
            bad("batch", f"must be positive, got {self.batch}")
        if self.schedule not in ("paper", "constant", "cosine", "onecycle"):
            bad("schedule", f"must be paper, constant, cosine or onecycle; got {self.schedule!r}")
        if self.normalise not in NORMALISATIONS:
            bad("normalise", f"must be one of {', '.join(NORMALISATIONS)}; "
                             f"got {self.normalise!r}")
        if self.normalise == "source" and not self.init_from:
            bad("normalise", "'source' takes the normaliser of --init-from, which is not set")
        for f in ("input_pad", "resize", "eval_subset", "train_subset", "image_size",
                  "warmup_steps"):
            if getattr(self, f) < 0:
                bad(f, f"must be 0 or positive, got {getattr(self, f)}")
        if self.dtype not in ("float32", "bfloat16"):
            bad("dtype", f"must be float32 or bfloat16; got {self.dtype!r}")
        if self.conv_grad not in CONV_GRADS:
            bad("conv_grad", f"must be one of {', '.join(CONV_GRADS)}; got {self.conv_grad!r}")
        if self.steps_per_call < 1:
            bad("steps_per_call", f"must be positive, got {self.steps_per_call}")
        if self.bn_group and self.batch % self.bn_group:
            bad("bn_group", f"{self.bn_group} does not divide the batch {self.batch}")
        for f in ("log_every", "eval_every", "checkpoint_every", "eval_batch"):
            if getattr(self, f) < 1:
                bad(f, f"must be positive, got {getattr(self, f)}")


def module_names(spec: str) -> tuple[str, ...]:
    """'conv5, fc' (--trainable, --init-skip) -> ('conv5', 'fc')."""
    return tuple(n.strip() for n in spec.split(",") if n.strip())


def covers(names, module: str) -> bool:
    """Whether one of `names` names the top-level module `module`: a name covers itself
    and its numbered parts ('conv5' covers 'conv5_1', 'conv5_2'; 'conv1' does not
    cover 'conv13')."""
    return any(module == n or module.startswith(n + "_") for n in names)


def changed_fields(old: dict, new: TrainConfig) -> list[str]:
    """Result-affecting fields that differ between a saved config and this one."""
    old_cfg = TrainConfig.from_json(old).result_fields()
    new_cfg = new.result_fields()
    return sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
