"""A recipe as data: sections of declared fields.

A run's configuration (cnn_jax.train.TrainConfig) is made of sections (data, model,
optimiser, schedule, evaluation, run), each a frozen dataclass whose fields declare,
where they are defined, three things:

  * what they do to a run's numbers, and so whether they are part of its digest:
        result(default)             changes the numbers: always in the digest
        result(default, unless=f)   ... except for configurations where f(config) holds
        added(default)              added after the first release: in the digest only
                                    while not at its default, so that runs written
                                    before it existed keep their digests and resume
        outside(default)            cannot change the numbers (where, how often, on
                                    which kernels): never in the digest
  * what they mean (`help`, which `--help` prints) and their `choices`, where closed;
  * their flat name: the command-line flag and `--set` key they have always had
    (`--eval-every` / `eval_every` for `evaluation.every`), which is also their key in
    the digest, so that digests do not depend on how the sections are arranged.

A new field therefore leaves every existing digest alone exactly when it is declared
`added` (or `outside`); tests/test_config.py pins the digests of known configurations.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, Optional

RESULT, ADDED, OUTSIDE = "result", "added", "outside"


@dataclasses.dataclass(frozen=True)
class Declared:
    role: str                         # RESULT, ADDED or OUTSIDE
    help: str
    choices: Optional[tuple] = None
    flat: Optional[str] = None        # the flag / --set / digest name, if not the field's
    unless: Optional[Callable] = None  # RESULT only: left out of the digest where it holds


def _declared(role: str, default, help: str, choices, flat, unless) -> dataclasses.Field:
    metadata = {"declared": Declared(role, help, tuple(choices) if choices else None, flat,
                                     unless)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def result(default, help: str = "", *, choices=None, flat: Optional[str] = None,
           unless: Optional[Callable[[Any], bool]] = None):
    """A field that changes the numbers a run produces: in its digest (unless
    `unless(config)`)."""
    return _declared(RESULT, default, help, choices, flat, unless)


def added(default, help: str = "", *, choices=None, flat: Optional[str] = None):
    """A field added after the first release: in the digest only while not at its
    default (older runs, which never set it, keep their digests)."""
    return _declared(ADDED, default, help, choices, flat, None)


def outside(default, help: str = "", *, choices=None, flat: Optional[str] = None):
    """A field that cannot change the numbers a run produces: never in its digest."""
    return _declared(OUTSIDE, default, help, choices, flat, None)


def declaration(f: dataclasses.Field) -> Declared:
    found = f.metadata.get("declared")
    if found is None:
        raise TypeError(f"field {f.name} does not declare what it does to a run's numbers: "
                        f"define it with result(...), added(...) or outside(...)")
    return found


def flat_name(f: dataclasses.Field) -> str:
    return declaration(f).flat or f.name


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def coerce(value, like):
    """A value read from JSON or a command line as its field's type: lists become the
    tuples a tuple field holds."""
    if isinstance(like, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def parse_value(text: str, like: Any):
    """A command line's text as the type of `like` (a field's default): bool (true /
    false / 1 / 0 / yes / no), a tuple of comma-separated values, a dict of key=value
    pairs, None or a string for a None default, else int, float or str. ValueError
    when it is not one."""
    if isinstance(like, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("true", "1", "yes")
    if isinstance(like, tuple):
        items = [t for t in text.split(",") if t.strip()]
        kind = type(like[0]) if like else (int if all(t.strip().isdigit() for t in items) else str)
        return tuple(parse_value(t.strip(), kind()) for t in items)
    if isinstance(like, dict):
        pairs = [t.partition("=") for t in text.split(",") if t.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError(text)
        return {k.strip(): literal(v.strip()) for k, _, v in pairs}
    if like is None:
        return None if text.lower() == "none" else text
    return type(like)(text)


def literal(text: str):
    """A Python literal where the text is one (1e-3, True, (1, 2)), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def add_arguments(group, kind, multi: Optional[dict] = None, aliases: Optional[dict] = None,
                  prefix: str = "") -> None:
    """One command-line option per field of the section `kind`, named by its flat name
    (`--eval-every`), its help from its declaration (what it does, its choices, its
    section.field and default), its value read as the field's type. `multi`: flat name
    -> the flag of a KEY=VALUE option given several times (a dict field); `aliases`:
    flat name -> an older flag that still works."""
    import argparse
    multi, aliases = multi or {}, aliases or {}
    for f in dataclasses.fields(kind):
        name, decl, default = flat_name(f), declaration(f), default_of(f)
        flags = ["--" + n.replace("_", "-") for n in (name, aliases.get(name)) if n]
        text = f"{decl.help} [{prefix}{f.name}; default: {default!r}]".replace("%", "%%")
        if name in multi:
            group.add_argument(multi[name], dest=name, action="append", default=[],
                               metavar="KEY=VALUE", help=text)
        elif isinstance(default, bool):
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                               default=default, help=text)
        elif isinstance(default, tuple):
            kind_of = type(default[0]) if default else str
            group.add_argument(*flags, dest=name, nargs="*", type=kind_of, default=list(default),
                               help=text)
        else:
            # choices shown, checked by the recipe's validation (one message for all)
            kind_of = (int if "int" in str(f.type) else str) if default is None else type(default)
            metavar = "{" + ",".join(decl.choices) + "}" if decl.choices else None
            group.add_argument(*flags, dest=name, type=kind_of, default=default,
                               metavar=metavar, help=text)
