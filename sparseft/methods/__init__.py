"""Fine-tuning methods behind one life cycle (`sparseft.methods.base.Method`).

    method = get_method("gps", k=2)
    model = method.prepare(model, MethodContext(loader=...))

Methods expressible as "which entries train" (GPS, full, linear probing, BitFit) are a selection
for the sparse-delta engine; the others add modules (LoRA, adapters, SSF, VPT, SPT, SCT) through
`sparseft.methods.modules`. Each method has an options dataclass whose fields become
`sparseft train` flags (help text from the field metadata), so a method's settings are declared
once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparseft.methods.base import Method, MethodContext, NotApplicable

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


#: methods' BatchNorm defaults before 2026-12-01, for runs recorded before run folders kept their policy
BATCHNORM_DEFAULT_BEFORE = {"gps": "update"}


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


__all__ = ["METHODS", "Method", "MethodContext", "NotApplicable", "get_method", "register"]

# register the built-in methods
from sparseft.methods import adapter, baselines, gps, lora, rosa, sct, spiel, spt, ssf, vpt  # noqa: E402, F401
