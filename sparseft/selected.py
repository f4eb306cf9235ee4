"""`Selection`: which entries of which parameters a task trains.

A selection names, per parameter, the flat (row-major) indices of the entries that become
trainable sparse deltas, plus the parameters trained in full (biases, the head, layer-scale).
Everything else stays frozen. It is plain data: JSON-describable and saved as safetensors
(index tensors + a JSON header), so it can be inspected, compared and reused across runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparseft.errors import InputError
from sparseft.fileutil import atomic_path, read_tagged_safetensors

FORMAT = "sparseft.selection/1"


class SelectionError(InputError):
    """A selection that does not fit a model, or a selection file that cannot be read."""


@dataclass
class Selection:
    """Per-parameter flat indices to train as sparse deltas, and parameters trained in full."""

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    full: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {}
        for name, idx in self.indices.items():
            if name not in self.shapes:
                raise SelectionError(f"selection: no shape given for parameter '{name}'")
            idx = torch.as_tensor(idx).reshape(-1).to(torch.int64)
            numel = _numel(self.shapes[name])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise SelectionError(
                    f"selection: index out of range for '{name}' (shape {tuple(self.shapes[name])}, "
                    f"indices span {int(idx.min())}..{int(idx.max())})")
            idx = torch.unique(idx)  # sorted, without repeats: row-major order helps the kernels
            clean[name] = idx
        self.indices = clean
        self.shapes = {k: tuple(int(d) for d in v) for k, v in self.shapes.items()}
        self.full = sorted(set(self.full))
        overlap = set(self.full) & set(self.indices)
        if overlap:
            raise SelectionError(f"selection: parameters both sparse and full: {sorted(overlap)}")

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_sparse(self) -> int:
        """Number of individually selected weight entries."""
        return sum(int(i.numel()) for i in self.indices.values())

    def per_row_counts(self, name: str) -> torch.Tensor:
        """How many entries of each neuron (row of the 2-D view) are selected."""
        shape = self.shapes[name]
        rows = self.indices[name] // row_length(shape)
        return torch.bincount(rows, minlength=shape[0])

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: counts per parameter and in total."""
        return {
            "format": FORMAT,
            "meta": self.meta,
            "num_sparse": self.num_sparse,
            "sparse": {n: {"shape": list(self.shapes[n]), "selected": int(i.numel()),
                           "of": _numel(self.shapes[n])} for n, i in self.indices.items()},
            "full": self.full,
        }

    # -- checks ------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise SelectionError when a named parameter is missing or has another shape."""
        params = dict(model.named_parameters())
        for name in [*self.indices, *self.full]:
            if name not in params:
                raise SelectionError(f"selection names parameter '{name}', which the model does not have")
        for name, shape in self.shapes.items():
            if name in params and tuple(params[name].shape) != tuple(shape):
                raise SelectionError(
                    f"selection: parameter '{name}' has shape {tuple(params[name].shape)} in the model "
                    f"but {tuple(shape)} in the selection")

    # -- files -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the selection as safetensors (one int64 index tensor per parameter)."""
        header = {"shapes": {k: list(v) for k, v in self.shapes.items()}, "full": self.full, "meta": self.meta}
        tensors = {f"index/{n}": i.contiguous() for n, i in self.indices.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "selection": json.dumps(header)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read a selection written by `save`; raises SelectionError naming the file on any problem."""
        path = Path(path)
        header, tensors = read_tagged_safetensors(path, FORMAT, "selection", SelectionError, "selection")
        indices = {k.removeprefix("index/"): v for k, v in tensors.items() if k.startswith("index/")}
        missing = set(header["shapes"]) - set(indices)
        if missing:
            raise SelectionError(f"{path}: index tensors missing for {sorted(missing)}")
        return cls(indices=indices, shapes={k: tuple(v) for k, v in header["shapes"].items()},
                   full=header.get("full", []), meta=header.get("meta", {}))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def row_length(shape: tuple[int, ...]) -> int:
    """Entries per neuron: a weight of shape [out, ...] is viewed as [out, prod(rest)]."""
    return _numel(shape[1:]) if len(shape) > 1 else 1
