"""The run configuration: a recipe in sections, saved as `config.json` and hashed so
that a resumed run can refuse a configuration that would change its result.

    cfg = TrainConfig(model="resnet56", steps=1000)      # flat names, as the flags
    cfg = TrainConfig(**{"schedule.lr": 0.05})           # or section.field
    cfg.schedule.lr, cfg.data.augment, cfg.optimiser.momentum
    cfg.replace(lr=0.01), cfg.to_json(), TrainConfig.from_json(saved)

The sections, as a paper's method section reads:
    data        the dataset and its preprocessing (cnn_jax.data.dataset.DataSpec)
    model       the architecture, its options, where its weights start, its precision
    optimiser   the update rule, its batch and regularisation
    schedule    how long, and the learning rate over the steps
    evaluation  what is evaluated, when, and on which views
    run         the seed, the output folder, the cadence and the compute

Every field declares (cnn_jax.recipe) what it does to a run's numbers, what it means,
its choices and its flat name (its flag, its `--set` key, its key in the digest). A
config.json written flat, before the sections, still loads, resumes and keeps its
digest: a flat name is found in its section.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

from cnn_jax.data.dataset import DataSpec
from cnn_jax.errors import BadInput
from cnn_jax.recipe import (ADDED, OUTSIDE, added, coerce, declaration, default_of,
                            flat_name, outside, result)

CONV_KERNELS = ("auto", "xla", "matmul", "onednn")  # cnn_jax.train.conv_kernels; "auto" first
SCHEDULES = ("paper", "constant", "cosine", "onecycle")   # cnn_jax.train.schedules
# the update rules (cnn_jax.train.steps.make_optimizer) and their own options, by
# optax's names, with their defaults (--optimizer-option KEY=VALUE)
OPTIMIZER_OPTIONS = {
    "sgd": {}, "nesterov": {},
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "rmsprop": {"decay": 0.9, "eps": 1e-8},
    "lamb": {"b1": 0.9, "b2": 0.999, "eps": 1e-6},
    "lars": {"trust_coefficient": 0.001, "eps": 0.0},
}
OPTIMIZERS = tuple(OPTIMIZER_OPTIONS)
DTYPES = ("float32", "bfloat16")
# fields renamed since they were first written: old config.json files stay readable
RENAMED = {"conv_grad": "conv_kernels"}


def _length_free(cfg: "TrainConfig") -> bool:
    """The paper's steps and a constant rate do not depend on the run's length, so a
    run extended to more steps is the same run, resumed."""
    return cfg.schedule.kind in ("paper", "constant")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = result("resnet20", "the architecture: a name of cnn_jax.models.available() "
                       "(python -m cnn_jax.summary NAME shows it)", flat="model")
    options: dict = result({}, "the architecture's options, e.g. --option shortcut=B",
                           flat="model_options")
    init_from: str = added("", "start from these weights where names match: a run's --out "
                           "folder, or torchvision/timm weights (.pth, .safetensors)")
    init_skip: str = added("", "top-level modules not taken from --init-from (a new head: fc)")
    trainable: str = added("", "top-level module prefixes that train (conv5,fc); the rest is "
                           "frozen, its BatchNorm in inference mode; empty: all")
    dtype: str = result("float32", "compute precision; parameters stay float32",
                        choices=DTYPES)
    bn_group: int = result(0, ">0: BatchNorm statistics per group of this many images (He et "
                           "al.'s per-GPU batches)")


@dataclasses.dataclass(frozen=True)
class OptimiserConfig:
    name: str = added("sgd", "the update rule (the papers': SGD with momentum and coupled "
                      "weight decay)", choices=OPTIMIZERS, flat="optimizer")
    options: dict = added({}, "the update rule's other options, by optax's names (adam: b1, "
                          "b2, eps; lars: trust_coefficient)", flat="optimizer_options")
    batch: int = result(128, "images per step, over all devices and hosts")
    momentum: float = result(0.9, "SGD's momentum (sgd, nesterov, rmsprop, lars)")
    nesterov: bool = result(False, "Nesterov's momentum for sgd (--optimizer nesterov)")
    weight_decay: float = result(1e-4, "L2 weight decay (decoupled for adamw, lamb)")
    decay_norm_and_bias: bool = result(True, "decay BatchNorm scales and biases too (Torch and "
                                       "Caffe's default)")
    label_smoothing: float = result(0.0, "the targets' smoothing (Szegedy et al. 2016)")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    steps: int = result(64_000, "training steps (iterations)", unless=_length_free)
    kind: str = result("paper", "the learning rate over the steps: paper (divided by 10 at "
                       "--milestones), constant, cosine, onecycle", choices=SCHEDULES,
                       flat="schedule")
    lr: float = result(0.1, "the (peak) learning rate")
    milestones: tuple = result((32_000, 48_000), "paper schedule: steps at which the rate is "
                               "divided by 10")
    warmup_steps: int = added(0, ">0: the rate rises linearly over these first steps")
    warmup_lr: float = result(0.0, ">0: He et al.'s ResNet-110 warm-up: this rate until the "
                              "training error is below --warmup-until-error")
    warmup_until_error: float = result(0.8, "the training error that ends --warmup-lr")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    every: int = outside(2_000, "evaluate every this many steps (and at the end)",
                         flat="eval_every")
    batch: int = outside(1_000, "evaluation batch (results do not depend on it)",
                         flat="eval_batch")
    train_set: bool = outside(False, "at the end, also the error on the training images "
                              "themselves, unaugmented, in inference mode",
                              flat="eval_train_set")
    also: tuple = outside((), "more evaluations, each SPLIT[:VIEWS][@STEPS|@end] (split test, "
                          "val or train_set; views 1, 2, 10 or multiscale), e.g. test:10@end",
                          flat="evaluations")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int = result(0, "the seed of the initialisation, the data order and the "
                       "augmentation")
    out: str = outside("runs/train", "the output folder (re-running resumes)")
    workers: Optional[int] = outside(None, "input worker processes (default: cores - 1)")
    progress: bool = outside(True, "a progress bar")
    log_every: int = outside(100, "log the training metrics every this many steps")
    checkpoint_every: int = outside(2_000, "save a checkpoint every this many steps")
    keep_checkpoints: int = outside(3, "checkpoints kept")
    steps_per_call: int = outside(1, "steps inside one compiled call (lax.scan)")
    conv_kernels: str = outside("auto", "the kernels every convolution runs on (the same "
                                "function, other rounding): auto picks oneDNN's on CPUs where "
                                "they build", choices=CONV_KERNELS)


SECTIONS = {"data": DataSpec, "model": ModelConfig, "optimiser": OptimiserConfig,
            "schedule": ScheduleConfig, "evaluation": EvaluationConfig, "run": RunConfig}


def _fields() -> dict:
    """flat name -> (section, field); 'section.field' spellings resolve too (`locate`)."""
    out = {}
    for section, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            out[flat_name(f)] = (section, f)
    return out


FIELDS = _fields()


def locate(key: str) -> tuple[str, dataclasses.Field]:
    """(section, field) of a flat name ('eval_every') or 'section.field'
    ('evaluation.every'); BadInput naming the choices otherwise."""
    key = RENAMED.get(key, key)
    if key in FIELDS:
        return FIELDS[key]
    section, _, name = key.partition(".")
    if section in SECTIONS:
        for f in dataclasses.fields(SECTIONS[section]):
            if f.name == name:
                return section, f
    raise BadInput(f"unknown configuration field {key!r}; the fields: "
                   f"{', '.join(sorted(FIELDS))} (or section.field: "
                   f"{', '.join(f'{s}.*' for s in SECTIONS)})")


class TrainConfig:
    """A run's recipe: its sections (attributes `data`, `model`, `optimiser`,
    `schedule`, `evaluation`, `run`), immutable; `replace` makes a changed copy."""

    __slots__ = tuple(SECTIONS)

    def __init__(self, **fields):
        self._build({name: kind() for name, kind in SECTIONS.items()}, fields)

    def _build(self, values: dict, fields: dict) -> None:
        """`values` (a section object per section) with `fields` changed: a section by
        its name and object, or fields by flat name or section.field."""
        values = dict(values)
        changes: dict = {name: {} for name in SECTIONS}
        for key, value in fields.items():
            if key in SECTIONS and isinstance(value, SECTIONS[key]):
                values[key] = value
                continue
            section, f = locate(key)
            changes[section][f.name] = coerce(value, default_of(f))
        for section, changed in changes.items():
            if changed:
                values[section] = dataclasses.replace(values[section], **changed)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"TrainConfig is immutable: use replace({name}=...)")

    def __reduce__(self):  # pickled by its sections (runs trained in other processes)
        return (_rebuild, (tuple(getattr(self, s) for s in SECTIONS),))

    def __eq__(self, other) -> bool:
        return isinstance(other, TrainConfig) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{s}={getattr(self, s)!r}' for s in SECTIONS)})"

    # -------------------------------------------------------------- access
    def replace(self, **fields) -> "TrainConfig":
        """A copy with `fields` (flat names or section.field) changed."""
        copy = object.__new__(TrainConfig)
        copy._build({s: getattr(self, s) for s in SECTIONS}, fields)
        return copy

    def get(self, key: str) -> Any:
        """The value of a flat name or section.field."""
        section, f = locate(key)
        return getattr(getattr(self, section), f.name)

    def declared(self):
        """(section, field, its declaration, value) of every field, section by section."""
        for section, kind in SECTIONS.items():
            for f in dataclasses.fields(kind):
                yield section, f, declaration(f), getattr(getattr(self, section), f.name)

    def flat(self) -> dict:
        """{flat name: value}: the configuration as it was written before its sections."""
        return {flat_name(f): _plain(v) for _, f, _, v in self.declared()}

    # -------------------------------------------------------------- the digest
    def result_fields(self) -> dict:
        """The fields that make up the digest, by flat name, as their declarations say,
        with the architecture in its shortest spelling (cifar_resnet depth 56 is
        resnet56)."""
        # imported here, not at the top: `from cnn_jax.train import TrainConfig` stays
        # free of flax and jax
        from cnn_jax.models import canonical
        d = {}
        for _, f, decl, value in self.declared():
            if decl.role == OUTSIDE or (decl.role == ADDED and value == default_of(f)) \
                    or (decl.unless is not None and decl.unless(self)):
                continue
            d[flat_name(f)] = value
        d["model"], d["model_options"] = canonical(self.model.name, self.model.options)
        return d

    def digest(self) -> str:
        blob = json.dumps(self.result_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> None:
        """Refuse what cannot run and every setting this configuration would ignore."""
        validate(self)

    def data_spec(self, data_dir: Optional[str] = None) -> DataSpec:
        """The data section, with its folder overridden where `data_dir` is given."""
        return dataclasses.replace(self.data, data_dir=data_dir) if data_dir else self.data

    def seedless(self) -> dict:
        """Every field but the seed and the output folder: what runs trained together
        (cnn_jax.train.loop.train_together) must share."""
        return self.replace(seed=0, out="").flat()

    # -------------------------------------------------------------- saved form
    def to_json(self) -> dict:
        """{section: {field: value}}: config.json's `config`."""
        return {s: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, s)).items()}
                for s in SECTIONS}

    @classmethod
    def from_json(cls, d: dict, source="config.json") -> "TrainConfig":
        """A saved configuration: in sections (`to_json`), or flat as written before
        them. Fields renamed since (RENAMED) are read under their new names; fields
        this version does not know are refused by name: a newer version wrote them,
        and dropping them could change what a run of that configuration means."""
        nested = bool(d) and all(k in SECTIONS and isinstance(v, dict) for k, v in d.items())
        items = {f"{s}.{k}": v for s, fields in d.items() for k, v in fields.items()} \
            if nested else dict(d)
        unknown = []
        for key in items:
            try:
                locate(key)
            except BadInput:
                unknown.append(key)
        if unknown:
            raise BadInput(f"{source}: unknown configuration field(s) {', '.join(sorted(unknown))} "
                           f"(written by a newer version of cnn_jax?); this version knows "
                           f"{', '.join(sorted(FIELDS))}")
        return cls(**items)

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


def _rebuild(sections: tuple) -> TrainConfig:
    cfg = object.__new__(TrainConfig)
    cfg._build(dict(zip(SECTIONS, sections)), {})
    return cfg


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def module_names(spec: str) -> tuple[str, ...]:
    """'conv5, fc' (--trainable, --init-skip) -> ('conv5', 'fc')."""
    return tuple(n.strip() for n in spec.split(",") if n.strip())


def covers(names, module: str) -> bool:
    """Whether one of `names` names the top-level module `module`: a name covers itself
    and its numbered parts ('conv5' covers 'conv5_1', 'conv5_2'; 'conv1' does not
    cover 'conv13')."""
    return any(module == n or module.startswith(n + "_") for n in names)


def changed_fields(old: dict, new: TrainConfig, source="config.json") -> list[str]:
    """Result-affecting fields that differ between a saved config and this one."""
    old_cfg = TrainConfig.from_json(old, source).result_fields()
    new_cfg = new.result_fields()
    return sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))


# ------------------------------------------------------------------ evaluations
EVAL_SPLITS = ("val", "test", "train_set")
EVAL_VIEWS = ("1", "2", "10", "multiscale")
_EVALUATION = re.compile(r"^(?P<split>[a-z_]+)(?::(?P<views>[a-z0-9]+))?"
                         r"(?:@(?P<every>\d+|end))?$")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation a run declares: what it scores (a split: 'val', 'test', or
    'train_set', the training images unaugmented), with which views, and how often
    (`every` steps and at the end; 0: once, at the end). The main one is the run's
    evaluation split, logged as eval_* (the curves, the progress lines)."""
    split: str
    views: str = "1"
    every: int = 0
    main: bool = False

    @property
    def name(self) -> str:
        """Its key in results.json (final_<name>_<metric>) and metrics.jsonl."""
        return self.split if self.views == "1" else f"{self.split}_{self.views}views"

    @classmethod
    def parse(cls, text: str) -> "Evaluation":
        """SPLIT[:VIEWS][@STEPS|@end], e.g. 'test:10@end', 'val@500'."""
        m = _EVALUATION.match(text.strip())
        if m is None or m["split"] not in EVAL_SPLITS or (m["views"] or "1") not in EVAL_VIEWS:
            raise BadInput(f"--evaluations {text!r}: expected SPLIT[:VIEWS][@STEPS|@end] with "
                           f"SPLIT one of {', '.join(EVAL_SPLITS)} and VIEWS one of "
                           f"{', '.join(EVAL_VIEWS)}, e.g. test:10@end")
        every = m["every"] or "end"
        return cls(m["split"], m["views"] or "1", 0 if every == "end" else int(every))


def evaluations(cfg: "TrainConfig", main_split: str) -> list[Evaluation]:
    """What a run of `cfg` evaluates, the main one first: its evaluation split every
    `evaluation.every` steps; the test set once at the end where selection used a
    holdout; the training images at the end where asked (`evaluation.train_set`); and
    the declared ones (`evaluation.also`)."""
    out = [Evaluation(main_split, "1", cfg.evaluation.every, main=True)]
    if cfg.data.holdout:
        out.append(Evaluation("test"))
    if cfg.evaluation.train_set:
        out.append(Evaluation("train_set"))
    for text in cfg.evaluation.also:
        found = Evaluation.parse(text)
        if found.name not in {e.name for e in out}:
            out.append(found)
    return out


# ------------------------------------------------------------------ validation
POSITIVE = ("batch", "steps", "steps_per_call", "log_every", "eval_every", "checkpoint_every",
            "eval_batch", "keep_checkpoints")
NON_NEGATIVE = ("holdout", "input_pad", "resize", "eval_subset", "train_subset", "image_size",
                "warmup_steps", "bn_group", "crop_pad", "colour_shift", "weight_decay",
                "label_smoothing", "warmup_lr", "lr")
MOMENTUM_RULES = ("sgd", "nesterov", "rmsprop", "lars")   # the optimisers with a momentum


def validate(cfg: TrainConfig) -> None:
    """Refuse what cannot run, and every setting this configuration would ignore: a
    field set away from its default either changes what the run does or is refused,
    naming the field and why (tests/test_knobs.py)."""
    def bad(key, msg):
        raise BadInput(f"--{key.replace('_', '-')}: {msg}")
    for _, f, decl, value in cfg.declared():
        if decl.choices and value not in decl.choices:
            bad(flat_name(f), f"must be one of {', '.join(decl.choices)}; got {value!r}")
    for key in POSITIVE:
        if cfg.get(key) < 1:
            bad(key, f"must be positive, got {cfg.get(key)}")
    for key in NON_NEGATIVE:
        if cfg.get(key) < 0:
            bad(key, f"must be 0 or positive, got {cfg.get(key)}")
    data, model, opt = cfg.data, cfg.model, cfg.optimiser
    if data.normalise == "source" and not model.init_from:
        bad("normalise", "'source' takes the normaliser of --init-from, which is not set")
    if model.bn_group and opt.batch % model.bn_group:
        bad("bn_group", f"{model.bn_group} does not divide the batch {opt.batch}")
    unknown = sorted(set(opt.options) - set(OPTIMIZER_OPTIONS[opt.name]))
    if unknown:
        known = ", ".join(OPTIMIZER_OPTIONS[opt.name]) or "none"
        bad("optimizer_options", f"{', '.join(unknown)}: not an option of {opt.name} (its "
                                 f"options: {known})")
    for text in cfg.evaluation.also:
        Evaluation.parse(text)
    for key, why in ignored(cfg):
        bad(key, f"{why}: it would change nothing, so it is refused")


def ignored(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(field, why) of every field set away from its default that this configuration
    would not use."""
    from cnn_jax.data.dataset import ignored_by_recipe  # the data section's own rules
    default = TrainConfig()
    opt, sched, model = cfg.optimiser, cfg.schedule, cfg.model
    out = list(ignored_by_recipe(cfg.data))
    if sched.warmup_until_error != default.schedule.warmup_until_error and not sched.warmup_lr:
        out.append(("warmup_until_error", "it ends the --warmup-lr warm-up, which is off"))
    if sched.kind != "paper" and sched.milestones != default.schedule.milestones and \
            any(m < sched.steps for m in sched.milestones):   # (beyond the run: inert anyway)
        out.append(("milestones", f"the {sched.kind} schedule has no milestones (paper's has)"))
    if not opt.decay_norm_and_bias and not opt.weight_decay:
        out.append(("decay_norm_and_bias", "--weight-decay is 0"))
    if opt.nesterov and opt.name != "sgd":
        out.append(("nesterov", f"it is SGD's; --optimizer {opt.name} has no such option"))
    if opt.nesterov and not opt.momentum:
        out.append(("nesterov", "--momentum is 0"))
    if opt.momentum != default.optimiser.momentum and opt.name not in MOMENTUM_RULES:
        out.append(("momentum", f"--optimizer {opt.name} has no momentum (its own options: "
                                f"--optimizer-options)"))
    if model.init_skip and not model.init_from:
        out.append(("init_skip", "--init-from is not set"))
    return out
