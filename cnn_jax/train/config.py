"""The run configuration: one flat dataclass, saved as `config.json` and hashed so a
resumed run can refuse a configuration that would change its result.

Every field declares, where it is defined, what it does to a run's numbers, and so
whether it is part of the configuration's digest (`TrainConfig.digest`):

    result(default)         changes the numbers: always in the digest
    result(default, unless=f)   ... except for configurations where f(config) holds
    added(default)          added after the first release: in the digest only while
                            it is not at its default, so that runs written before it
                            existed keep their digests and resume
    outside(default)        cannot change the numbers (where, how often, on which
                            kernels): never in the digest

A new field therefore leaves every existing digest alone exactly when it is declared
`added` (or `outside`); tests/test_config.py pins the digests of known configurations
and says so when one shifts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

from cnn_jax.data.dataset import DataSpec
from cnn_jax.data.ops import AUGMENTS, BAD_IMAGES
from cnn_jax.errors import BadInput

CONV_KERNELS = ("auto", "xla", "matmul", "onednn")  # cnn_jax.train.conv_kernels; "auto" first
NORMALISATIONS = ("per_pixel", "per_channel", "standard", "lecun", "imagenet", "inception",
                  "source", "none")  # cnn_jax.train.inputs.make_normaliser
# fields renamed since they were first written: old config.json files stay readable
RENAMED = {"conv_grad": "conv_kernels"}

RESULT, ADDED, OUTSIDE = "result", "added", "outside"


def _declared(role: str, default, unless: Optional[Callable] = None):
    metadata = {"digest": role, "unless": unless}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def result(default, unless: Optional[Callable[["TrainConfig"], bool]] = None):
    """A field that changes the numbers a run produces: in its digest (unless
    `unless(config)`)."""
    return _declared(RESULT, default, unless)


def added(default):
    """A field added after the first release: in the digest only while not at its
    default (older runs, which never set it, keep their digests)."""
    return _declared(ADDED, default)


def outside(default):
    """A field that cannot change the numbers a run produces: never in its digest."""
    return _declared(OUTSIDE, default)


def _length_free(cfg: "TrainConfig") -> bool:
    """The paper's steps and a constant rate do not depend on the run's length, so a
    run extended to more steps is the same run, resumed."""
    return cfg.schedule in ("paper", "constant")


@dataclasses.dataclass
class TrainConfig:
    # what to train on
    model: str = result("resnet20")
    model_options: dict = result({})
    data: str = result("cifar10")
    data_dir: Optional[str] = outside(None)
    holdout: int = result(0)        # >0: train on train minus a stratified holdout, evaluate on it
    eval_subset: int = added(0)     # >0: evaluate on a fixed stratified subset of this many
    train_subset: int = added(0)    # >0: train on a fixed stratified subset of this many
    classes: str = added("")        # train and evaluate on these classes only ("0,1", "cat,dog")
    # >0: the side S of the square images delivered to the network (before input_pad
    # and resize): decoded ImageFolder images are stored covering S, centre-cropped;
    # streamed ones are cut to S. 0: a decoded dataset's own size; 224 for streams
    image_size: int = added(0)
    # a run's --out, or torchvision/timm weights (.pth/.safetensors): start from its
    # variables where names match
    init_from: str = added("")
    init_skip: str = added("")      # top-level modules not taken from init_from (a new head: "fc")
    # top-level module prefixes that train ("conv5,fc"); the rest is frozen, its
    # BatchNorm in inference mode. "": all
    trainable: str = added("")
    # the recipe (He et al. 2015, Sec. 4.2 by default)
    steps: int = result(64_000, unless=_length_free)
    batch: int = result(128)
    seed: int = result(0)
    lr: float = result(0.1)
    momentum: float = result(0.9)
    nesterov: bool = result(False)
    weight_decay: float = result(1e-4)
    decay_norm_and_bias: bool = result(True)  # decay BN scale/bias, biases (Torch/Caffe default)
    schedule: str = result("paper")           # paper | constant | cosine | onecycle
    milestones: tuple = result((32_000, 48_000))
    warmup_steps: int = added(0)              # >0: lr rises linearly over these first steps
    warmup_lr: float = result(0.0)            # >0: He et al.'s ResNet-110 warm-up (0.01 ...
    warmup_until_error: float = result(0.8)   # ... until training error < 80 %)
    label_smoothing: float = result(0.0)
    # input. augment: cifar (the arrays' crop_pad, flip, colour_shift, pca_colour below),
    # or the papers' ImageNet transforms on streamed images: resnet | inception | alexnet,
    # or center (streamed, no augmentation: the single test view)
    augment: str = added("cifar")
    bad_images: str = added("refuse")         # an unreadable file: refuse (stop) | skip it
    crop_pad: int = result(4)
    flip: bool = result(True)
    colour_shift: float = result(0.0)
    pca_colour: bool = result(False)
    # per_pixel | per_channel | standard | lecun | imagenet | inception | source
    # (init_from's own) | none
    normalise: str = result("per_pixel")
    input_pad: int = added(0)                 # zero-pad every image first (LeNet: MNIST 28 -> 32)
    resize: int = added(0)                    # >0: bilinear resize to resize x resize on the device
    # compute
    dtype: str = result("float32")            # float32 | bfloat16 (compute; params stay float32)
    bn_group: int = result(0)                 # >0: BatchNorm statistics per group of this many
    steps_per_call: int = outside(1)          # K steps inside one compiled call (lax.scan)
    # auto | xla | matmul | onednn: the kernels every convolution and its gradients run
    # on (cnn_jax.train.conv_kernels): the same function, other rounding, like the
    # backend. auto: oneDNN's on CPUs where they run, else matmul (float32 on CPUs) or XLA's
    conv_kernels: str = outside("auto")
    # cadence and output
    eval_batch: int = outside(1000)           # evaluation batch (results do not depend on it)
    # at the end, also the error on the (unaugmented) training images, inference mode
    eval_train_set: bool = outside(False)
    log_every: int = outside(100)
    eval_every: int = outside(2_000)
    checkpoint_every: int = outside(2_000)
    keep_checkpoints: int = outside(3)
    workers: Optional[int] = outside(None)
    out: str = outside("runs/train")
    progress: bool = outside(True)

    def result_fields(self) -> dict:
        """The fields that make up the digest, as their declarations say, with the
        architecture in its shortest spelling (cifar_resnet depth 56 is resnet56)."""
        # imported here, not at the top: `from cnn_jax.train import TrainConfig` stays
        # free of flax and jax
        from cnn_jax.models import canonical
        d = {}
        for f in dataclasses.fields(self):
            role, unless, value = f.metadata.get("digest"), f.metadata.get("unless"), \
                getattr(self, f.name)
            if role not in (RESULT, ADDED, OUTSIDE):
                raise TypeError(f"TrainConfig.{f.name} does not declare what it does to a "
                                f"run's numbers: define it with result(...), added(...) (a "
                                f"new field that changes them) or outside(...)")
            if role == OUTSIDE or (role == ADDED and value == _default(f)) \
                    or (unless is not None and unless(self)):
                continue
            d[f.name] = value
        d["model"], d["model_options"] = canonical(self.model, self.model_options)
        return d

    def digest(self) -> str:
        blob = json.dumps(self.result_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    def data_spec(self, data_dir: Optional[str] = None) -> DataSpec:
        """What this run's data is (cnn_jax.data.dataset.DataSpec): the fields it holds."""
        return DataSpec(self.data, data_dir or self.data_dir, self.holdout, self.classes,
                        self.train_subset, self.eval_subset, self.image_size, self.augment,
                        self.crop_pad, self.flip, self.colour_shift, self.pca_colour,
                        self.input_pad, self.bad_images)

    def seedless(self) -> dict:
        """Every field but the seed and the output folder: what runs trained together
        (cnn_jax.train.loop.train_together) must share."""
        return dataclasses.replace(self, seed=0, out="").to_json()

    @classmethod
    def of_run(cls, run_dir) -> "TrainConfig":
        """The configuration a run's --out folder was trained with."""
        config_file = Path(run_dir) / "config.json"
        try:
            saved = json.loads(config_file.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            raise BadInput(f"{run_dir}: expected the --out folder of a training run, "
                           f"holding config.json and checkpoints/") from None
        return cls.from_json(saved, config_file)

    @classmethod
    def from_json(cls, d: dict, source="config.json") -> "TrainConfig":
        """A saved configuration (`to_json`); fields renamed since (RENAMED) are read
        under their new names, and fields this version does not know are refused by
        name: a newer version wrote them, and dropping them could change what a run
        of that configuration means."""
        d = {RENAMED.get(k, k): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadInput(f"{source}: unknown configuration field(s) {', '.join(unknown)} "
                           f"(written by a newer version of cnn_jax?); this version knows "
                           f"{', '.join(sorted(known))}")
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def validate(self) -> None:
        def bad(field, msg):
            raise BadInput(f"--{field.replace('_', '-')}: {msg}")
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
        if self.augment not in AUGMENTS:
            bad("augment", f"must be one of {', '.join(AUGMENTS)}; got {self.augment!r}")
        if self.bad_images not in BAD_IMAGES:
            bad("bad_images", f"must be one of {', '.join(BAD_IMAGES)}; got {self.bad_images!r}")
        if self.dtype not in ("float32", "bfloat16"):
            bad("dtype", f"must be float32 or bfloat16; got {self.dtype!r}")
        if self.conv_kernels not in CONV_KERNELS:
            bad("conv_kernels", f"must be one of {', '.join(CONV_KERNELS)}; "
                                f"got {self.conv_kernels!r}")
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


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def changed_fields(old: dict, new: TrainConfig, source="config.json") -> list[str]:
    """Result-affecting fields that differ between a saved config and this one."""
    old_cfg = TrainConfig.from_json(old, source).result_fields()
    new_cfg = new.result_fields()
    return sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
