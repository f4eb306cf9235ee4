"""Command-line flags generated from option dataclasses.

A dataclass field becomes a flag `--field-name`; its type decides how the value is read:

    int, float, str, Path    --name VALUE
    X | None                 like X (None is the "not given" default)
    bool                     --name / --no-name (argparse.BooleanOptionalAction)
    Literal["a", "b"]        --name {a,b}

Help text comes from `field(metadata={"help": ...})`, a choice list may be given with
`metadata={"choices": [...]}` and a reader of the flag's text with
`metadata={"convert": fn}`; the field's default is appended to the help. Every flag is
added with `default=argparse.SUPPRESS`, so the parsed namespace holds exactly the options
that were given: `given(args, cls)` returns them as a dict and `from_args(args, cls)` builds
the dataclass (the dataclass's own defaults fill the rest).

`add_shared_arguments` adds the fields of several dataclasses at once (e.g. the options of
every fine-tuning method): a field name several of them have becomes one flag whose help
lists each one's default, and `owned_options` turns a flag given for the wrong owner into a
`UsageError` that names it (`foreign_options` words it, for flags or for a suite's keys).

Values that arrive as data rather than text (a benchmark suite's YAML) are held to the same
fields: `type_rule` says what a value of the wrong type should be, and `require` (the rules the
dataclasses check) raises an `OptionValueError` that carries the field's name, rule and value.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from sparseft.errors import InputError, UsageError

__all__ = ["CliOption", "OptionValueError", "UsageError", "add_arguments", "add_shared_arguments", "cli_options",
           "flag_of", "foreign_options", "from_args", "given", "owned_options", "require", "type_rule"]


@dataclasses.dataclass(frozen=True)
class CliOption:
    """One dataclass field as a command-line flag."""

    name: str  # the field name
    flag: str  # --field-name
    convert: Callable[[str], Any] | None  # None for a bool flag
    choices: tuple[Any, ...] | None
    help: str
    default: Any  # dataclasses.MISSING for a required field

    @property
    def is_bool(self) -> bool:
        return self.convert is None


_SCALARS: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str, Path: Path}


def flag_of(name: str) -> str:
    """`--field-name` for the field `field_name`."""
    return "--" + name.replace("_", "-")


class OptionValueError(InputError):
    """A field's value breaks its rule. `name`, `rule` and `value` say which, so that a caller whose values
    come from elsewhere than flags (a suite file) can name its own key instead of the flag."""

    def __init__(self, message: str, *, name: str = "", rule: str = "", value: Any = None) -> None:
        super().__init__(message)
        self.name, self.rule, self.value = name, rule, value


def require(ok: bool, obj: Any, name: str, rule: str, owner: str = "") -> None:
    """Unless `ok`: `OptionValueError` "[owner: ]name (--flag) must be <rule>, not <value>" for the field `name`
    of `obj`."""
    if not ok:
        where = f"{owner}: " if owner else ""
        value = getattr(obj, name)
        raise OptionValueError(f"{where}{name} ({flag_of(name)}) must be {rule}, not {value!r}", name=name, rule=rule,
                               value=value)


def type_rule(cls: type, name: str, value: Any) -> str | None:
    """What the field `name` of dataclass `cls` must be when `value` is not of its type (None: it is).

    For values given as data, not text (a suite's YAML): each is held to the type its flag would read
    (`cli_options`): a whole number for `int` (not a bool), a number for `float`, text for `str` and
    `Path`, true/false for `bool`, one of the choices where the field lists them. Fields of other types
    are not checked here.
    """
    field_ = next(f for f in dataclasses.fields(cls) if f.name == name)
    try:
        tp, optional, choices = _field_type(cls, field_, typing.get_type_hints(cls))
    except TypeError:  # a type no flag reads: not checked here
        return None
    if value is None:
        return None if optional else "given (not empty)"
    kinds: dict[Any, tuple[Callable[[Any], bool], str]] = {
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
        float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
        str: (lambda v: isinstance(v, str), "text"),
        Path: (lambda v: isinstance(v, str), "a path"),
    }
    if tp not in kinds:
        return None
    fits, what = kinds[tp]
    if not fits(value):
        return what + (" or null" if optional else "")
    if choices is not None and value not in choices:
        return "one of " + ", ".join(repr(c) for c in choices)
    return None


def _field_type(cls: type, f: dataclasses.Field, hints: dict[str, Any]) -> tuple[Any, bool, tuple[Any, ...] | None]:
    """(scalar type, whether None is allowed, choices) of the dataclass field `f` of `cls`.

    `X | None` is X (None allowed); `Literal[...]` is its values' type, the values its choices
    (unless `metadata["choices"]` lists them). TypeError for a union of several types or a Literal
    of mixed types: no flag reads those.
    """
    where = f"{cls.__qualname__}.{f.name}"
    tp = hints[f.name]
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"{where}: no command-line flag for the type {tp}")
        optional, tp = len(members) < len(typing.get_args(tp)), members[0]
    choices = f.metadata.get("choices")
    if typing.get_origin(tp) is Literal:
        values = typing.get_args(tp)
        kinds = {type(v) for v in values}
        if len(kinds) != 1:
            raise TypeError(f"{where}: Literal values of mixed types {values}")
        choices = choices if choices is not None else values
        tp = kinds.pop()
    return tp, optional, tuple(choices) if choices is not None else None


def cli_options(cls: type) -> list[CliOption]:
    """The flags of a dataclass's init fields, in field order (types via `typing.get_type_hints`)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli", True) is False:
            continue
        tp, _, choices = _field_type(cls, f, hints)
        if "convert" in f.metadata:  # a flag that takes more than the field's type (e.g. --lr auto)
            convert = f.metadata["convert"]
        elif tp is bool:
            convert = None
        elif tp in _SCALARS:
            convert = _SCALARS[tp]
        else:
            raise TypeError(f"{cls.__qualname__}.{f.name}: no command-line flag for the type {tp}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(CliOption(name=f.name, flag=flag_of(f.name), convert=convert, choices=choices,
                             help=str(f.metadata.get("help", "")), default=default))
    return out


def _show(value: Any) -> str:
    return "required" if value is dataclasses.MISSING else str(value)


def _note(opt: CliOption) -> str:
    """`default: ...` for the help, unless the help already says what the default is."""
    return "" if "default:" in opt.help else f"default: {_show(opt.default)}"


def _add(container: Any, opt: CliOption, dest: str, note: str) -> argparse.Action:
    text = opt.help.replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                              "help": f"{text} ({note})".lstrip() if note else text}
    if opt.is_bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = opt.convert
        if opt.choices is not None:
            kwargs["choices"] = opt.choices
        else:
            kwargs["metavar"] = opt.name.upper()
    return container.add_argument(opt.flag, **kwargs)


def add_arguments(container: Any, cls: type, *, only: Iterable[str] | None = None, prefix: str = "") -> list[CliOption]:
    """Add the fields of dataclass `cls` (or just those in `only`) to a parser or argument group.

    Each flag stores into `prefix + field name` and is absent from the namespace when not given.
    """
    options = cli_options(cls)
    if only is not None:
        wanted = list(only)
        unknown = set(wanted) - {o.name for o in options}
        if unknown:
            raise InputError(f"{cls.__qualname__} has no field(s) {sorted(unknown)}")
        options = [o for o in options if o.name in wanted]
    for opt in options:
        _add(container, opt, prefix + opt.name, _note(opt))
    return options


def given(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` that were given on the command line, by field name."""
    return {o.name: getattr(args, prefix + o.name) for o in cli_options(cls) if hasattr(args, prefix + o.name)}


def from_args(args: argparse.Namespace, cls: type, *, prefix: str = "", **overrides: Any) -> Any:
    """An instance of `cls` from the given flags; fields not given keep the dataclass default."""
    return cls(**{**given(args, cls, prefix=prefix), **overrides})


def add_shared_arguments(parser: argparse.ArgumentParser, owners: Mapping[str, type], *, prefix: str = "",
                         title: str = "{} options") -> dict[str, list[str]]:
    """Add the fields of several dataclasses (owner name -> dataclass) as one set of flags.

    A field name several owners have becomes one flag (the types must agree; the choices are
    their union) whose help shows each owner's own default when they differ, e.g.
    `(default: gps: None, spt-lora: 16)`. Flags are grouped by the owners that take them
    (`title` formats the comma-joined owner names) and use the longest of the owners' help
    texts. Returns field name -> owners.
    """
    holders: dict[str, list[tuple[str, CliOption]]] = {}
    for owner, cls in owners.items():
        for opt in cli_options(cls):
            holders.setdefault(opt.name, []).append((owner, opt))
    groups: dict[tuple[str, ...], Any] = {}
    for name, held in holders.items():
        first = held[0][1]
        for owner, opt in held[1:]:
            if (opt.convert, opt.is_bool) != (first.convert, first.is_bool):
                raise TypeError(f"option {name!r}: {held[0][0]} and {owner} declare different types")
        choices: tuple[Any, ...] | None = None
        if all(opt.choices is not None for _, opt in held):
            choices = tuple(dict.fromkeys(c for _, opt in held for c in opt.choices))
        shared = dataclasses.replace(first, choices=choices, help=max((opt.help for _, opt in held), key=len))
        defaults = [opt.default for _, opt in held]
        if all(d == defaults[0] and type(d) is type(defaults[0]) for d in defaults):
            note = _note(shared)
        else:
            note = "default: " + ", ".join(f"{owner}: {_show(opt.default)}" for owner, opt in held)
        key = tuple(owner for owner, _ in held)
        if key not in groups:
            groups[key] = parser.add_argument_group(title.format(", ".join(key)))
        _add(groups[key], shared, prefix + name, note)
    return {name: [owner for owner, _ in held] for name, held in holders.items()}


def foreign_options(owner: str, given_names: Iterable[str], owners: Mapping[str, type], *, kind: str = "method",
                    show: Callable[[str], str] = flag_of) -> str | None:
    """Why some of `given_names` are not options of `owner` (None: all are): names them (`show` writes a
    name: a flag, or a suite's key), whose they are, and what `owner` takes."""
    mine = [o.name for o in cli_options(owners[owner])]
    foreign = [n for n in dict.fromkeys(given_names) if n not in mine]
    if not foreign:
        return None
    belongs = [o for o, cls in owners.items() if any(c.name in foreign for c in cli_options(cls))]
    shown = ", ".join(show(n) for n in foreign)
    one = len(foreign) == 1
    whose = (f"{'it belongs' if one else 'they belong'} to {', '.join(belongs)}" if belongs else
             f"no {kind} takes {'it' if one else 'them'}")
    what = (f"{shown} is not an option of {kind} {owner!r} ({whose})" if one else
            f"{shown} are not options of {kind} {owner!r} ({whose})")
    everyones = set.intersection(*({o.name for o in cli_options(cls)} for cls in owners.values()))
    own = [n for n in mine if n not in everyones] + [n for n in mine if n in everyones]  # its own first
    takes = ", ".join(show(n) for n in own) if own else "no options"
    return f"{what}; {owner} takes {takes}"


def owned_options(args: argparse.Namespace, owner: str, owners: Mapping[str, type], *, prefix: str = "",
                  kind: str = "method") -> dict[str, Any]:
    """The options of `owner` given on the command line (flags added by `add_shared_arguments`).

    A flag that only other owners take raises `UsageError`, naming it, whose it is, and what
    `owner` takes.
    """
    names = list(dict.fromkeys(o.name for cls in owners.values() for o in cli_options(cls)))
    present = [n for n in names if hasattr(args, prefix + n)]
    problem = foreign_options(owner, present, owners, kind=kind)
    if problem:
        raise UsageError(problem)
    return {n: getattr(args, prefix + n) for n in present}
