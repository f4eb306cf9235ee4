"""sparseft: task-adaptive parameter-efficient fine-tuning with lean sparse deltas.

    sel = sparseft.select(model, loader, k=1)       # GPS: score weights, top-K per neuron
    sparseft.apply(model, sel)                      # only the selected entries train
    ...train with any loop...
    sparseft.save_delta(model, "task.safetensors")  # kilobytes to a few MB
    sparseft.load_delta(fresh_base, "task.safetensors")
    sparseft.merge(model)                           # plain model, zero extra cost
"""

__version__ = "0.1.0"

from sparseft.delta import (  # noqa: E402
    DeltaError,
    apply,
    base_weights,
    forget_base,
    merge,
    parameter_summary,
    sync,
    trainable_parameters,
    unmerge,
)
from sparseft.deltafile import DeltaFileError, load_delta, read_delta, save_delta  # noqa: E402
from sparseft.select import Eligibility, Selection, SelectionError, select  # noqa: E402

__all__ = [
    "DeltaError", "DeltaFileError", "Eligibility", "Selection", "SelectionError", "apply", "base_weights",
    "forget_base", "load_delta", "merge", "parameter_summary", "read_delta", "save_delta", "select", "sync",
    "trainable_parameters", "unmerge", "__version__",
]
