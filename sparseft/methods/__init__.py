"""Fine-tuning methods behind one interface.

A method turns a base model into a trainable one (`prepare`), and writes / reads / merges the
small task file. Methods expressible as "which entries train" (GPS, full, linear probing,
BitFit) all use the sparse-delta engine and its delta file; the others (issue #4) add modules.

Each method has an options dataclass; its fields become `sparseft train` flags (help text from
the field metadata), so a method's settings are declared once.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

import sparseft
from sparseft.deltafile import load_delta, save_delta


class NotApplicable(ValueError):
    """The method cannot be used on this architecture (raised before the model is changed)."""


@dataclass
class MethodContext:
    """What `prepare` may use: task data (by kind) and run settings.

    `loader("select")` yields two views per training image (GPS's selection pass);
    `loader("train")` yields plain preprocessed training batches.
    """

    loader: Callable[[str], Iterable]
    seed: int = 0
    progress: bool = True
    bf16: bool = False
    run_dir: Path | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # what prepare reports (timings, counts)


class Method:
    """Base class: a sparse-delta method; subclasses set `name`, `Options`, `prepare`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    mergeable: ClassVar[bool] = True
    file_suffix: ClassVar[str] = "delta.safetensors"

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        return save_delta(model, path, extra={"method": self.name, "options": dataclasses.asdict(self.options),
                                              **(extra or {})})

    def load(self, model: nn.Module, path: str | Path) -> nn.Module:
        return load_delta(model, path)

    def merge(self, model: nn.Module) -> nn.Module:
        return sparseft.merge(model)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options: Any) -> Method:
    """An instance of the method `name` with the given options (unknown options are an error)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(fields)}")
    return cls(cls.Options(**options))


def add_option_arguments(parser: argparse.ArgumentParser, methods: Iterable[type[Method]] | None = None) -> None:
    """Add the methods' options as flags (default None: each method's own default applies).

    An option shared by several methods (same field name) becomes one flag.
    """
    seen: dict[str, str] = {}
    for cls in (METHODS.values() if methods is None else methods):
        group = parser.add_argument_group(f"{cls.name} options")
        for f in dataclasses.fields(cls.Options):
            flag = "--" + f.name.replace("_", "-")
            if f.name in seen:
                continue
            seen[f.name] = cls.name
            kwargs: dict[str, Any] = {"default": None, "dest": f"opt_{f.name}",
                                      "help": f"{f.metadata.get('help', '')} (default: {f.default})"}
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.type in ("bool", bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = f.name.upper()
                kwargs["type"] = {"int": int, "float": float, "str": str, "int | None": int,
                                  "float | None": float, "str | None": str}.get(str(f.type), str)
            group.add_argument(flag, **kwargs)


def options_from_args(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The options of method `name` that were given on the command line."""
    fields = {f.name for f in dataclasses.fields(METHODS[name].Options)}
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None and k[4:] in fields}


# register the built-in methods
from sparseft.methods import adapter, baselines, gps, lora, sct, spt, ssf, vpt  # noqa: E402, F401
