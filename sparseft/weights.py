"""Weight files: read them without unpickling anything, load them strictly into a model.

A leaf below the model factory (`sparseft.models`) and the offline backbones (`sparseft.hub`),
which both load weights through it.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.anatomy import head_parameter_names
from sparseft.errors import InputError
from sparseft.fileutil import sha256_file


class WeightsError(InputError):
    """A weight file that cannot be loaded safely or does not fit the model."""


WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network")
"""Keys under which training scripts nest the weights (`{"epoch": 3, "state_dict": {...}}`), tried in order."""

RECORD_KEY = "sparseft_weights"
"""The safetensors metadata entry of a converted weight file (`sparseft weights convert`): JSON."""


@dataclass
class Checkpoint:
    """The tensors of a weight file and what was stored beside them.

    `tensors`: names (nested dicts joined with ".") to tensors, in the order the file keeps
    (`ordered`: False for safetensors, which store tensors sorted, so their order says nothing).
    `meta`: the other entries, e.g. `{"epoch": 3, "pretrained_cfg": {...}}` beside a
    `state_dict`, or a safetensors file's metadata strings. `nested`: the wrapper keys walked.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    nested: tuple[str, ...] = ()
    ordered: bool = True


def read_checkpoint(path: str | Path, sha256: str | None = None) -> Checkpoint:
    """Read a weight file without unpickling arbitrary objects.

    `.safetensors` are read directly, `.npz` with `allow_pickle=False`; anything else (`.pth`,
    `.pt`, `.bin`, ...) with `torch.load(weights_only=True)` only: a pickle that holds other
    Python objects is refused, naming the first one, and is never run. Weights nested under a
    `WRAPPER_KEYS` entry are taken out; pass `sha256` to also verify the file's hash.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weight file")
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise WeightsError(f"{path}: sha256 {actual} does not match the expected {sha256}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                metadata = dict(f.metadata() or {})
            return Checkpoint(load_file(str(path)), metadata, ordered=False)
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path}: unreadable safetensors file ({err})") from err
    if path.suffix == ".npz":
        return _read_npz(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(err))
        if culprit is None:  # the file is no pickle at all
            detail = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            raise WeightsError(f"{path}: not a PyTorch checkpoint ({' '.join(detail.split())})") from err
        raise WeightsError(f"{path}: holds a Python object ({culprit.group(1)}) that only full unpickling could "
                           "rebuild, and unpickling can run any code, so sparseft reads tensors only; if you trust "
                           "the file, load it yourself (torch.load(FILE, weights_only=False)) and torch.save only "
                           "its state dict") from err
    except Exception as err:  # noqa: BLE001 - any other failure means the file is not a checkpoint
        raise WeightsError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    return _unwrap(state, path)


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, Mapping) and any(
        isinstance(v, torch.Tensor) or _holds_tensors(v) for v in value.values())


def _unwrap(state: Any, path: Path) -> Checkpoint:
    """The tensors of a loaded pickle: out of its wrapper keys, nested dicts flattened with "."."""
    meta: dict[str, Any] = {}
    nested: list[str] = []
    while isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in WRAPPER_KEYS if _holds_tensors(state.get(k))), None)
        if key is None:
            break
        meta.update({str(k): v for k, v in state.items()
                     if k != key and not isinstance(v, torch.Tensor) and not _holds_tensors(v)})
        nested.append(key)
        state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a mapping of tensor names to tensors")
    tensors: dict[str, torch.Tensor] = {}

    def walk(prefix: str, mapping: Mapping) -> None:
        for k, v in mapping.items():
            name = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                tensors[name] = v
            elif _holds_tensors(v):
                walk(name + ".", v)
            else:
                meta[name] = v

    walk("", state)
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors")
    return Checkpoint(tensors, meta, tuple(nested))


def _read_npz(path: Path) -> Checkpoint:
    import numpy as np

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    try:
        with np.load(str(path), allow_pickle=False) as archive:
            for name in archive.files:
                array = archive[name]
                if array.dtype.kind in "biufc":
                    tensors[name] = torch.from_numpy(np.ascontiguousarray(array).copy())
                else:
                    meta[name] = array.tolist()
    except ValueError as err:  # an object array: only pickle could read it
        raise WeightsError(f"{path}: holds Python objects that only unpickling could read ({err}); "
                           "sparseft reads numeric arrays only") from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise WeightsError(f"{path}: not a readable .npz archive ({err})") from err
    if not tensors:
        raise WeightsError(f"{path}: holds no numeric arrays")
    return Checkpoint(tensors, meta)


def read_state_dict(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, read as `read_checkpoint` reads it (nothing unpickled)."""
    return read_checkpoint(path, sha256).tensors


def weights_record(path: str | Path) -> dict[str, Any] | None:
    """The record a converted weight file carries (architecture, data config, source), or None.

    Only `sparseft weights convert` writes one (safetensors metadata `RECORD_KEY`); any other
    file, or a file that is not safetensors, gives None. A malformed record raises `WeightsError`.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(RECORD_KEY)
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: unreadable safetensors file ({err})") from err
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: malformed {RECORD_KEY} record in its metadata ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("architecture"), str):
        raise WeightsError(f"{path}: its {RECORD_KEY} record names no architecture")
    return record


def load_weights(model: nn.Module, path: str | Path, sha256: str | None = None) -> nn.Module:
    """Load backbone weights strictly; a head of another class count is left as initialised."""
    state = read_state_dict(path, sha256)
    own = model.state_dict()
    head = set(head_parameter_names(model))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for key in list(state):
        if key in head and key in own and state[key].shape != own[key].shape:
            del state[key]
    own_shapes = {k: tuple(v.shape) for k, v in own.items()}
    wrong = [f"{k} {tuple(v.shape)} (model {own_shapes[k]})" for k, v in state.items()
             if k in own_shapes and tuple(v.shape) != own_shapes[k]]
    if wrong:
        raise WeightsError(f"{path}: tensors of another shape than the model's: {', '.join(wrong[:4])}"
                           f"{'…' if len(wrong) > 4 else ''}; these weights are for another architecture or size")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise WeightsError(f"{path}: does not fit the model; missing {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}")
    return model
