"""Weight files: read them without unpickling anything, load them strictly into a model.

A leaf below the model factory (`sparseft.models`) and the offline backbones (`sparseft.hub`),
which both load weights through it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparseft.anatomy import head_parameter_names
from sparseft.errors import InputError
from sparseft.fileutil import sha256_file


class WeightsError(InputError):
    """A weight file that cannot be loaded safely or does not fit the model."""


def read_state_dict(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a weight file without unpickling arbitrary objects.

    `.safetensors` are read directly. Pickle-based `.pth/.pt/.bin` files are read with
    `torch.load(weights_only=True)` only; pass `sha256` to also verify the file's hash.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise WeightsError(f"{path}: sha256 {actual} does not match the expected {sha256}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path}: unreadable safetensors file ({err})") from err
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unpickling refusal as a weights error
        raise WeightsError(f"{path}: cannot read as a weights-only checkpoint ({err})") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a mapping of tensor names to tensors")
    return state


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
