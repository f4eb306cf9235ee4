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

from sparseft.methods.base import (
    BATCHNORM_DEFAULT_BEFORE,
    METHODS,
    Method,
    MethodContext,
    NotApplicable,
    get_method,
    register,
)

__all__ = ["BATCHNORM_DEFAULT_BEFORE", "METHODS", "Method", "MethodContext", "NotApplicable", "get_method", "register"]

# register the built-in methods (each module registers its class with `register` from methods.base)
from sparseft.methods import adapter, baselines, gps, lora, rosa, sct, spiel, spt, ssf, vpt  # noqa: E402, F401
