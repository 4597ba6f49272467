"""What every experiment shares, written once: its command line, presets that any field
can override from it, the output folder (one recipe per folder; re-running resumes),
results.json / table.md / a PNG, and its claims checked and said in words.

An experiment file holds its method, its presets and its analysis:

    @dataclasses.dataclass(frozen=True)
    class Preset:                           # the recipe, as data: the experiment's own
        depths: tuple                       # knobs, and the training fields it sets
        train: dict = dataclasses.field(default_factory=dict)   # (TrainConfig's)
    PRESETS = {"paper": Preset(..., train=dict(steps=64_000, lr=0.1)), "smoke": ...}

    def run(ctx: Context) -> Report: ...    # the method: train, measure, compare

    EXPERIMENT = Experiment("plain_vs_resnet", __doc__, PRESETS, run, figure="curves.png")
    main = EXPERIMENT.main                  # python -m experiments.plain_vs_resnet

and the command line then takes, besides the experiment's own flags:

    --preset auto|NAME       auto: the accelerator preset on a GPU/TPU, the CPU one otherwise
    --set KEY=VALUE ...      a knob of the preset, or any training field (TrainConfig's),
                             e.g. --set steps=1000 lr=0.05 label_smoothing=0.1
    --out DIR                default runs/<name>-<preset>[-<overrides>]
    --data NAME --data-dir DIR --workers N --processes N
    --seeds N --seeds-together   (experiments that train several seeds)

Every run an experiment trains is `train_config(preset, ...)`: what the experiment
sets for that run, with the preset's training fields (its own, and --set's) on top,
so a training field set from the command line reaches every run's config.json. The
output folder is guarded with the preset's knobs and training fields as one flat
recipe (`recipe_of`): a folder trained with `--set label_smoothing=0.1` refuses the
same command without it, naming the key.

Bad input (a flag, a preset field, the data, the output folder) is a BadInput naming
it, exit status 2, and a refused command leaves no folder behind; any other error is
a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from matplotlib.figure import Figure

from cnn_jax.accelerator import warn_if_unused
from cnn_jax.data import search_dirs
from cnn_jax.data.sources import prepare
from cnn_jax.errors import BadInput, exit_on_bad_input
from cnn_jax.files import atomic, write_atomic
from cnn_jax.provenance import hardware, versions
from cnn_jax.train import distributed
from cnn_jax.recipe import flat_name, parse_value
from cnn_jax.train.config import FIELDS, TrainConfig, locate

# TrainConfig fields an experiment sets for each of its runs, and what sets them
PER_RUN = {"model": "the experiment's nets", "model_options": "the experiment's nets",
           "seed": "--seeds", "out": "--out", "data": "--data", "data_dir": "--data-dir",
           "workers": "--workers", "progress": "the experiment's progress bar"}
# ... and the rest: what a preset's `train` and --set may set (by flat name, or as
# section.field: `--set schedule.lr=0.05` is `--set lr=0.05`)
TRAIN_FIELDS = tuple(k for k in FIELDS if k not in PER_RUN)


def training_key(key: str) -> Optional[str]:
    """The flat name of a training field spelt either way, else None."""
    try:
        section, f = locate(key)
    except BadInput:
        return None
    return flat_name(f)


# ------------------------------------------------------------------ presets
def choose_preset(name: str, accelerator: str = "paper", cpu: str = "quick") -> tuple[str, str]:
    """'auto' -> the `accelerator` preset on a GPU/TPU, the `cpu` one otherwise; with
    the reason, for the experiment to print."""
    if name != "auto":
        return name, f"--preset {name}"
    backend = jax.default_backend()
    if backend in ("gpu", "tpu"):
        return accelerator, f"auto: found a {backend.upper()} ({jax.devices()[0].device_kind})"
    return cpu, (f"auto: no GPU or TPU found, so the CPU-sized `{cpu}` preset "
                 f"(use --preset {accelerator} to run the full recipe anyway)")


def knobs(preset) -> dict:
    """The experiment's own fields of a preset (all but `train`)."""
    return {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
            if f.name != "train"}


def check_presets(name: str, presets: dict) -> None:
    """An experiment's presets: each with a `train` mapping of training fields. A knob
    may share a training field's name (plain_vs_resnet's `augment`: crop and mirror on
    or off): it then shadows it, `--set` reaches the knob, and the experiment derives
    the field from it, so `train` must not hold it too."""
    for preset_name, preset in presets.items():
        train = getattr(preset, "train", None)
        if not isinstance(train, dict):
            raise TypeError(f"{name} preset {preset_name!r}: needs a `train` dict of "
                            f"TrainConfig fields")
        shadowed = sorted(set(knobs(preset)) & set(train))
        wrong = sorted(k for k in train if training_key(k) != k or k not in TRAIN_FIELDS)
        if shadowed or wrong:
            raise TypeError(f"{name} preset {preset_name!r}: `train` sets fields its knobs "
                            f"shadow {shadowed}, or keys that are no training field {wrong}")


def override(preset, assignments: list[str]):
    """The preset with `KEY=VALUE` assignments applied: KEY one of its knobs, or a
    training field (set in its `train`); each value read as that field's own type
    (int, float, bool, str, a tuple as comma-separated values)."""
    own, train = knobs(preset), dict(preset.train)
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep:
            raise BadInput(f"--set {item!r}: expected KEY=VALUE")
        if key not in own:
            key = training_key(key) or key   # schedule.lr -> lr
        if key in PER_RUN and key not in own:
            raise BadInput(f"--set {key}: set for each run by {PER_RUN[key]}, not by --set")
        if key not in own and key not in TRAIN_FIELDS:
            raise BadInput(f"--set {item!r}: {key!r} is neither a field of this experiment's "
                           f"presets ({', '.join(own)}) nor a training field "
                           f"({', '.join(TRAIN_FIELDS)}, or as section.field)")
        like = own[key] if key in own else TrainConfig().get(key)
        try:
            value = parse_value(text, like)
        except ValueError:
            raise BadInput(f"--set {item!r}: {text!r} is not a {type(like).__name__}") from None
        (changes if key in own else train)[key] = value
    return dataclasses.replace(preset, **changes, train=train)


def train_config(preset, base: Optional[TrainConfig] = None, **fields) -> TrainConfig:
    """A run's TrainConfig: `base` (default TrainConfig's defaults) with what the
    experiment sets for this run (`fields`), then the preset's training fields (its own
    and --set's) over them."""
    return (base or TrainConfig()).replace(**{**fields, **preset.train})


def slug(assignments: list[str]) -> str:
    """A folder-name suffix for overrides: ['steps=1000', 'lr=0.05'] -> 'steps1000-lr0.05'."""
    return "-".join(a.replace("=", "").replace(",", "_").replace("/", "_") for a in assignments)


# ------------------------------------------------------------------ the output folder
class OutputInUse(BadInput):
    """An --out folder that cannot be written or holds another recipe's results."""


def recipe_of(preset_name: str, preset, data: Optional[str] = None, **extra) -> dict:
    """What an output folder is guarded with: the preset by name, its knobs and its
    training fields as one flat dict, the data (default: the preset's), and `extra`
    fields."""
    return {"preset": preset_name, **knobs(preset), **preset.train,
            "data": data or getattr(preset, "data", None), **extra}


def guard_out(out: Path, recipe: dict) -> None:
    """Create `out` (or check it is writable) and record `recipe` in out/config.json,
    refusing a folder whose config.json holds a different recipe."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("")
        (out / ".write_test").unlink()
    except OSError as e:
        raise OutputInUse(f"--out {out}: not writable ({e.strerror})") from None
    recipe = json.loads(json.dumps(recipe))
    saved_file = out / "config.json"
    if saved_file.exists():
        try:
            old = json.loads(saved_file.read_text())
        except ValueError:
            raise OutputInUse(f"--out {out}: config.json is not JSON; nothing was changed. "
                              f"Use another --out.") from None
        if old != recipe:
            diff = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            raise OutputInUse(
                f"--out {out} holds results of a different configuration (differs in: "
                f"{', '.join(diff)}); nothing was changed. Use another --out.")
    write_atomic(saved_file, json.dumps(recipe, indent=1))


@contextlib.contextmanager
def removed_if_refused(out: Path):
    """A folder this command creates is removed again if bad input stops it before
    anything but its config.json was written."""
    existed = out.exists()
    try:
        yield
    except BadInput:
        if not existed and out.is_dir() and {p.name for p in out.iterdir()} <= {"config.json"}:
            shutil.rmtree(out, ignore_errors=True)
        raise


# ------------------------------------------------------------------ claims
def claim(name: str, statement: str, measured: dict, required: str, holds: bool,
          seeds: int, **extra) -> dict:
    """One checked claim of an experiment, as results.json `claims` holds it: what is
    claimed, the numbers it was decided on, what they had to satisfy, and whether they
    did."""
    return {"claim": name, "statement": statement, "measured": measured,
            "required": required, "seeds": seeds, "pass": bool(holds), **extra}


def claims_in_words(claims: list[dict], heading: str) -> str:
    """The checks as a newcomer reads them, one line each, and a plain word when any
    fails."""
    if not claims:
        return ""
    lines = [heading]
    for c in claims:
        numbers = ", ".join(f"{k} {v:.4g}{c.get('unit', '')}" for k, v in c["measured"].items())
        lines.append(f"  {'HOLDS ' if c['pass'] else 'FAILS '} {c['statement']}: {numbers} "
                     f"(needed: {c['required']})")
    if not all(c["pass"] for c in claims):
        lines.append("  Not every claim holds in this run: docs/results.md says what this "
                     "preset shows over seeds, and why.")
    return "\n".join(lines)


def mean_std(values) -> str:
    """'1.23 ± 0.04' over seeds, or '1.23' for one; values in percent."""
    v = np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


# ------------------------------------------------------------------ plots
@contextlib.contextmanager
def figure(path: Path, title: str, rows: int = 1, cols: int = 1, **kwargs):
    """The axes of a matplotlib figure (`Figure.subplots(rows, cols, **kwargs)`; figsize
    among kwargs), titled, laid out and written to `path` as PNG when the block ends.
    No pyplot, so no GUI backend is chosen or changed (notebooks keep theirs)."""
    fig = Figure(figsize=kwargs.pop("figsize", (10, 4)))
    axes = fig.subplots(rows, cols, **kwargs)
    yield axes
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


# ------------------------------------------------------------------ one experiment
@dataclasses.dataclass
class Context:
    """What a run of an experiment gets: the parsed flags, the chosen preset (with its
    overrides), where to write, and the command that asked."""
    args: argparse.Namespace
    preset_name: str
    preset: Any
    why: str
    out: Path
    command: str

    @property
    def seeds(self) -> int:
        """--seeds, else the preset's own count (1 if it has none)."""
        return getattr(self.args, "seeds", None) or getattr(self.preset, "seeds", 1)

    @property
    def training_overrides(self) -> dict:
        """The training fields --set assigned: what runs made from another experiment's
        presets (the main experiment's nets) must be trained with too."""
        keys = {item.partition("=")[0] for item in self.args.set}
        return {k: v for k, v in self.preset.train.items() if k in keys}

    def recipe(self, **extra) -> dict:
        """What the output folder is guarded with (`recipe_of`), plus an experiment's
        `extra` fields."""
        return {**recipe_of(self.preset_name, self.preset, self.args.data), **extra}


@dataclasses.dataclass
class Report:
    """What an experiment's method returns: the payload of results.json (beside the
    common keys), its table, its claims, and how to draw its figure."""
    results: dict
    table: str
    claims: list = dataclasses.field(default_factory=list)
    heading: str = "Claims:"          # the claims' first line, in words
    words: str = ""                   # anything more to say after the claims
    plot: Optional[Callable[[Path], None]] = None


@dataclasses.dataclass
class Experiment:
    name: str
    doc: str
    presets: dict
    run: Callable[[Context], Report]
    figure: str = "results.png"                 # the PNG's file name in --out
    auto: Optional[tuple] = ("paper", "quick")  # (accelerator, cpu) presets for auto; None: no auto
    seeds: bool = True                          # --seeds and --seeds-together
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    recipe: Optional[Callable[[Context], dict]] = None  # what --out is guarded with
    multihost: bool = False                     # many-host flags (cnn_jax.train.distributed)
    set_by: tuple = ()   # flags of add_arguments that set the preset's knob of their name

    def __post_init__(self):
        check_presets(self.name, self.presets)

    def parser(self) -> argparse.ArgumentParser:
        own = knobs(next(iter(self.presets.values())))
        p = argparse.ArgumentParser(
            prog=f"python -m experiments.{self.name}", description=self.doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="--set takes the presets' own fields (" + ", ".join(own) + ") and any "
                   "training field (" + ", ".join(TRAIN_FIELDS) + "; python -m "
                   "cnn_jax.train --help says what each does)")
        choices = ([] if self.auto is None else ["auto"]) + list(self.presets)
        p.add_argument("--preset", choices=choices, default=choices[0])
        p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override fields of the preset or training fields, e.g. --set "
                            "steps=1000 lr=0.05 label_smoothing=0.1")
        p.add_argument("--out", default=None,
                       help=f"default runs/{self.name}-<preset>[-<overrides>]")
        p.add_argument("--data", default=None, help="the dataset (default: the preset's)")
        p.add_argument("--data-dir", default=None)
        p.add_argument("--workers", type=int, default=None, help="grain worker processes")
        p.add_argument("--processes", type=int, default=None,
                       help="runs trained at once in parallel processes (default: one per "
                            "core on a CPU, one on a GPU/TPU)")
        if self.seeds:
            p.add_argument("--seeds", type=int, default=None, help="default: the preset's")
            p.add_argument("--seeds-together", action="store_true",
                           help="train the seeds of each configuration at once, in one "
                                "vmapped step: faster on GPUs, slower on CPUs "
                                "(docs/benchmarks.md)")
        if self.add_arguments:
            self.add_arguments(p)
        if self.multihost:
            distributed.add_arguments(p)
        return p

    def context(self, argv=None) -> Context:
        """Parse the command line into a Context (exits 2 on bad flags)."""
        p = self.parser()
        args = p.parse_args(argv)
        if self.multihost:  # before anything asks JAX for its devices
            distributed.initialize(args)
        warn_if_unused()
        if getattr(args, "seeds", None) is not None and args.seeds < 1:
            p.error("--seeds must be at least 1")
        if args.processes is not None and args.processes < 1:
            p.error("--processes must be at least 1")
        command = " ".join([f"python -m experiments.{self.name}",
                            *(sys.argv[1:] if argv is None else argv)])
        if self.auto is None:
            name, why = args.preset, f"--preset {args.preset}"
        else:
            name, why = choose_preset(args.preset, *self.auto)
        try:
            # section.field spellings by their flat names: one recipe, one folder name
            args.set = [f"{training_key(k) or k}{sep}{v}" for k, sep, v in
                        (item.partition("=") for item in args.set)]
            for knob in self.set_by:   # e.g. --families a b: the knob `families`, as --set
                if getattr(args, knob, None):
                    args.set.append(f"{knob}={','.join(map(str, getattr(args, knob)))}")
            preset = override(self.presets[name], args.set)
        except BadInput as e:
            p.error(str(e))
        suffix = f"-{slug(args.set)}" if args.set else ""
        out = Path(args.out or f"runs/{self.name}-{name}{suffix}")
        return Context(args, name, preset, why, out, command)

    def main(self, argv=None) -> int:
        return exit_on_bad_input(self._main)(argv)

    def _main(self, argv=None) -> int:
        ctx = self.context(argv)
        print(f"preset {ctx.preset_name} ({ctx.why})" +
              (f", with {' '.join(ctx.args.set)}" if ctx.args.set else ""), file=sys.stderr)
        with removed_if_refused(ctx.out):
            search_dirs(ctx.args.data_dir)  # a mistyped --data-dir: refused before anything
            # data on first use: fetched once here, before any run (or refused in one line)
            prepare(ctx.args.data or getattr(ctx.preset, "data", None), ctx.args.data_dir)
            recipe = self.recipe(ctx) if self.recipe else ctx.recipe()
            if jax.process_index() == 0:  # many hosts: process 0 writes, the others train
                guard_out(ctx.out, recipe)
            report = self.run(ctx)
        if jax.process_index() == 0:
            self.write(ctx, report)
        if jax.process_count() > 1:  # every host ends together, none while others write
            multihost_utils.sync_global_devices(f"cnn_jax: {self.name} done")
        return 0

    def write(self, ctx: Context, report: Report) -> None:
        """results.json, table.md (with the claims in words) and the figure."""
        words = "\n".join(filter(None, [claims_in_words(report.claims, report.heading),
                                        report.words]))
        results = {"experiment": self.name, "preset": ctx.preset_name, "preset_reason": ctx.why,
                   "overrides": ctx.args.set, "config": {**knobs(ctx.preset),
                                                         **ctx.preset.train},
                   "command": ctx.command, "versions": versions(), "hardware": hardware(),
                   "claims": report.claims, **report.results}
        write_atomic(ctx.out / "results.json", json.dumps(results, indent=1, default=str))
        write_atomic(ctx.out / "table.md", report.table + ("\n\n" + words if words else "") + "\n")
        written = [ctx.out / "results.json", ctx.out / "table.md"]
        if report.plot is not None:
            report.plot(ctx.out / self.figure)
            written.append(ctx.out / self.figure)
        print(report.table)
        if words:
            print()
            print(words)
        print(f"wrote {', '.join(map(str, written))}")
