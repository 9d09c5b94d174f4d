"""Options declared once, as a dataclass per record (an ensemble method, a mixer architecture, a
base-model family): each field is one option, with its default, its help text and its choices.

Everything else is derived from those fields: the command line's flags (pipeline.cli), the keys
an experiment file accepts, the checking and typing of given values (`build`), and what a run
folder records (`as_dict`). An option is therefore named, typed and explained in one place.

    @dataclass(frozen=True)
    class BlendOptions:
        step: float = option(0.05, "grid step on the weight simplex (must divide 1)")
        objective: str = option("museval", "what the search maximises", choices=("museval", "usdr"))
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from core.errors import PipelineError

# tuple: a list of floats ("2,1,1" on the command line); list: a list of strings (a repeatable
# flag; declared as tuple[str, ...])
KINDS = (bool, int, float, str, tuple, list)


def option(default, help: str, *, choices: tuple = (), flags: tuple[str, ...] = (),
           cli: bool = True, key: str | None = None, refers: str | None = None):
    """One option as a dataclass field.

    choices: the values allowed (checked by `build`); flags: the command line's spellings when not
    `--name-with-dashes` (e.g. ("-T",), ("--with-mixture/--without-mixture",)); cli: False for
    options only experiment files and the Python API set; key: the experiment-file key when it
    differs from the field name; refers: "run" for a run folder or run name (in an experiment
    file: the name of a system listed before), "run:METHOD" for a run of that method.
    """
    return field(default=default, metadata={"help": help, "choices": tuple(choices),
                                            "flags": tuple(flags), "cli": cli, "key": key,
                                            "refers": refers})


@dataclass(frozen=True)
class Spec:
    """An option as the command line, experiment files and checks see it."""

    name: str              # the field name (the Python API's keyword)
    kind: type             # one of KINDS
    optional: bool         # None is a value (e.g. "the model's own")
    default: Any
    help: str
    choices: tuple = ()
    flags: tuple[str, ...] = ()
    cli: bool = True
    key: str | None = None
    refers: str | None = None

    @property
    def experiment_key(self) -> str:
        return self.key or self.name

    @property
    def flag(self) -> str:
        return self.flags[0] if self.flags else "--" + self.name.replace("_", "-")


def _kind(annotation) -> tuple[type, bool]:
    """(kind, None allowed) of a field annotation such as `float`, `str | None`, `tuple[float, ...]`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        kind, _ = _kind(rest[0])
        return kind, len(rest) < len(args)
    if typing.get_origin(annotation) is tuple or annotation is tuple:
        return (list if args and args[0] is str else tuple), False
    if annotation in KINDS:
        return annotation, False
    raise TypeError(f"option type {annotation!r}: use bool, int, float, str, tuple[float, ...] "
                    f"or tuple[str, ...]")


def specs(cls) -> list[Spec]:
    """The options of an options dataclass, in declaration order."""
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, optional = _kind(hints[f.name])
        m = f.metadata
        out.append(Spec(f.name, kind, optional or f.default is None, f.default, m.get("help", ""),
                        m.get("choices", ()), m.get("flags", ()), m.get("cli", True), m.get("key"),
                        m.get("refers")))
    return out


def coerce(name: str, value, kind: type, optional: bool = False):
    """`value` as `kind` (strings from the command line or a URL-style spec included)."""
    if value is None:
        if optional:
            return None
        raise PipelineError(f"option {name}: a value is required")
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(v) for v in items)
        if kind is list:
            items = [value] if isinstance(value, str) else list(value)
            if not all(isinstance(v, str) and v for v in items):
                raise ValueError(value)
            return tuple(items)
        return str(value)
    except (TypeError, ValueError):
        what = {tuple: "numbers separated by commas, e.g. 2,1,1",
                list: "a list of names"}.get(kind, kind.__name__)
        raise PipelineError(f"option {name}={value!r}: expected {what}") from None


def build(cls, values: Mapping[str, Any] | None, where: str = "options"):
    """An instance of the options dataclass `cls` from `values` (experiment keys or field names;
    None values take the default); unknown keys, wrong types and values outside the choices are
    one-line errors naming `where`."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    table = {s.experiment_key: s for s in specs(cls)}
    table.update({s.name: s for s in specs(cls)})
    unknown = sorted(k for k in values if k not in table)
    if unknown:
        known = ", ".join(s.experiment_key for s in specs(cls)) or "none"
        raise PipelineError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {known})")
    given = {}
    for k, v in values.items():
        s = table[k]
        v = coerce(s.experiment_key, v, s.kind, s.optional)
        if s.choices and v not in s.choices:
            raise PipelineError(f"{where}: {s.experiment_key} {v!r}: choose one of "
                                f"{', '.join(map(str, s.choices))}")
        given[s.name] = v
    return cls(**given)


def as_dict(options) -> dict:
    """The options as plain JSON-able values (tuples as lists), by field name."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()}


def combine(name: str, *classes: type | None) -> type:
    """One options dataclass holding the fields of `classes` (None skipped), in order."""
    fields = []
    for cls in classes:
        if cls is None:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields.append((f.name, hints[f.name],
                           dataclasses.field(default=f.default, metadata=f.metadata)))
    return dataclasses.make_dataclass(name, fields, frozen=True)


def union(owners: Iterable[tuple[str, type]]) -> list[tuple[Spec, dict[str, Any]]]:
    """The options of several records as one list (a command line offering all of them): each
    option once, first declaration first, with {owner: its default} of every record having it.
    Two records declaring one name with different kinds is a programming error."""
    merged: dict[str, tuple[Spec, dict[str, Any]]] = {}
    for owner, cls in owners:
        for s in specs(cls):
            if s.name in merged:
                first = merged[s.name][0]
                if (first.kind, first.flag) != (s.kind, s.flag):
                    raise TypeError(f"option {s.name}: {owner} declares it as {s.kind.__name__} "
                                    f"{s.flag}, another record as {first.kind.__name__} {first.flag}")
                merged[s.name][1][owner] = s.default
            else:
                merged[s.name] = (s, {owner: s.default})
    return list(merged.values())
