"""Training checkpoints without pickle: trainable tensors + optimizer state + a JSON record.

A checkpoint is `<stem>.json` (epoch, step, history, optimizer hyper-parameters, the name and
sha256 of its tensor file) and `<stem>-e<epoch>.safetensors` (tensors). Only what training
changes is stored: trainable parameters, buffers (BatchNorm statistics) and the optimizer's
per-parameter state, so a checkpoint is as small as the task. Each save writes a new tensor
file, then replaces the JSON atomically, then deletes older tensor files: an interruption at any
point leaves a complete checkpoint. Loading checks the hash and every shape before it changes
anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparseft.errors import InputError
from sparseft.fileutil import atomic_path, read_json, sha256_file, write_text_atomic


class CheckpointError(InputError):
    """A checkpoint that does not exist, is damaged, or does not fit the model."""


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(stem: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    record: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write `<stem>.safetensors` and `<stem>.json`; `record` must be JSON-serialisable; `extra`
    tensors (a training hook's state) are kept under `hook/` and handed back by `load_checkpoint`."""
    stem = Path(stem)
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in _trainable(model).items()}
    tensors.update({f"hook/{k}": t.detach().cpu().contiguous() for k, t in (extra or {}).items()})
    tensors.update({f"buffer/{n}": b.detach().cpu().contiguous() for n, b in model.named_buffers()
                    if b is not None and "sparse_delta." not in n})
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensor_path = stem.parent / f"{stem.name}-e{record.get('epoch', 0)}.safetensors"
    with atomic_path(tensor_path) as tmp:
        save_file(tensors, str(tmp))
    meta = {**record, "param_groups": opt_state["param_groups"], "opt_scalars": scalars,
            "tensors": tensor_path.name, "tensors_sha256": sha256_file(tensor_path)}
    write_text_atomic(stem.with_suffix(".json"), json.dumps(meta, indent=1))
    for old in stem.parent.glob(f"{stem.name}-e*.safetensors"):
        if old != tensor_path:
            old.unlink(missing_ok=True)


def load_checkpoint(stem: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    restore_extra: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict[str, Any]:
    """Restore model tensors and optimizer state in place; returns the JSON record.

    `restore_extra` gets the `extra` tensors `save_checkpoint` kept, before any parameter is written
    (a drop-and-regrow hook puts its entries back first, so the values land on them)."""
    stem = Path(stem)
    json_path = stem.with_suffix(".json")
    if not json_path.is_file():
        raise CheckpointError(f"{stem}: no complete checkpoint ({json_path.name}) found")
    meta = read_json(json_path, CheckpointError, "checkpoint record")
    tensor_path = stem.parent / str(meta.get("tensors", ""))
    if not meta.get("tensors") or not tensor_path.is_file():
        raise CheckpointError(f"{json_path}: its tensor file {meta.get('tensors')!r} is missing")
    if sha256_file(tensor_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensor_path}: does not match the hash in {json_path.name} (damaged or mixed up)")
    try:
        tensors = load_file(str(tensor_path))
    except SafetensorError as err:
        raise CheckpointError(f"{tensor_path}: unreadable ({err})") from err
    params = _trainable(model)
    expected = {f"param/{n}" for n in params}
    present = {k for k in tensors if k.startswith("param/")}
    if expected != present:
        raise CheckpointError(f"{tensor_path}: trainable parameters differ from the model's "
                              f"(missing {sorted(expected - present)[:5]}, extra {sorted(present - expected)[:5]})")
    buffers = dict(model.named_buffers())
    targets = {**{f"param/{n}": p for n, p in params.items()},
               **{f"buffer/{n}": b for n, b in buffers.items() if f"buffer/{n}" in tensors}}
    wrong = [f"'{k}' {tuple(tensors[k].shape)} vs {tuple(t.shape)}" for k, t in targets.items()
             if tuple(tensors[k].shape) != tuple(t.shape)]
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = t
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, entry in state.items():
        for name, t in entry.items():
            if t.dim() and (idx >= len(ordered) or tuple(t.shape) != tuple(ordered[idx].shape)):
                wrong.append(f"'opt/{idx}/{name}' {tuple(t.shape)}")
    if wrong:
        raise CheckpointError(f"{tensor_path}: shapes do not fit the model: {wrong[:5]}")
    if restore_extra is not None:
        restore_extra({k.removeprefix("hook/"): t for k, t in tensors.items() if k.startswith("hook/")})
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
    for idx, values in meta.get("opt_scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
