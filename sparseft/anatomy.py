"""What sparseft must know about any model: where its head is, its pooled features, its fingerprint.

sparseft works on any `torch.nn.Module`. Two things it must know about a model are where the
classification head is (trained in full, excluded from the base fingerprint) and how to get
the pooled pre-logit features (GPS scores weights with a head-free loss on them). For timm
models both come from timm's own API; for anything else the head is the last `nn.Linear`
unless named, and the features are whatever enters the head. (A leaf below the model factory,
`sparseft.models`, so that the backbone builders in `sparseft.hub` can use it.)
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparseft.errors import InputError
from sparseft.fileutil import tensor_bytes


def head_module_name(model: nn.Module, head: str | None = None) -> str | None:
    """Name of the classification head module ('' never; None when the model has none).

    Order: an explicit `head`; timm's `get_classifier()`; the last `nn.Linear` in the model.
    """
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules:
            raise InputError(f"head module '{head}' not found in the model")
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
        raise InputError("cannot find the model's head to take features from; pass head=...")
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
    exclude = exclude or set()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if name in exclude or "sparse_delta." in name:
            continue
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        h.update(tensor_bytes(tensor))
    return h.hexdigest()


def head_prefix(model: nn.Module) -> str | None:
    """'<head module>.' so modules inside the classifier can be left out (None: no head)."""
    name = head_module_name(model)
    return None if name is None else name + "."


def in_head(name: str, prefix: str | None) -> bool:
    """Whether module `name` is the head or inside it (`prefix` from `head_prefix`)."""
    return prefix is not None and (name + ".").startswith(prefix)


def note_build(model: nn.Module, name: str, img_size: int | None) -> nn.Module:
    """Remember on `model` the name and input size it was built with (`create_model` does), so that a
    task file made for another base can say what differs; returns the model."""
    model.__dict__["_sparseft_built_as"] = {"model": name, "img_size": img_size}
    return model


def built_as(model: nn.Module) -> dict[str, Any]:
    """What a model is, as far as it tells: `model` (the name it was built with, else timm's
    architecture), `img_size` (the size it was built for, else a ViT's patch-embedding size) and
    `num_classes` (its head's outputs, 0 without a head); None where unknown."""
    noted = model.__dict__.get("_sparseft_built_as", {})
    name = noted.get("model") or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    size = noted.get("img_size")
    if size is None:
        embed = next((m for m in model.modules() if hasattr(m, "patch_size") and hasattr(m, "img_size")), None)
        grid = getattr(embed, "img_size", None)
        size = int(grid[0]) if isinstance(grid, (tuple, list)) and grid and grid[0] == grid[-1] else None
    classes = getattr(model, "num_classes", None)
    if not isinstance(classes, int):
        weights = [p for n, p in model.named_parameters() if n in set(head_parameter_names(model)) and p.dim() > 1]
        classes = int(weights[0].shape[0]) if weights else 0 if head_module_name(model) is None else None
    return {"model": name, "img_size": size, "num_classes": classes}
# -- naming a model and its layers --------------------------------------------------------------

def model_name(model: nn.Module) -> str:
    """The model's name for messages: timm's architecture (`mobilenetv2_100`, also for the offline
    backbones), else its class name (`MobileNetV2`)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(architecture) if architecture else type(model).__name__


def layer_kind(module: nn.Module) -> str | None:
    """How LoRA sees a layer: 'linear' (Linear or a 1x1 conv), 'conv' (kxk conv), 'grouped' (grouped
    or depthwise conv) or None (anything else, e.g. timm's Conv2dSame)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward:  # not e.g. timm's Conv2dSame
        if module.groups != 1:
            return "grouped"
        return "linear" if tuple(module.kernel_size) == (1, 1) else "conv"
    return None


def layer_type(module: nn.Module) -> str:
    """A layer's type as a listing shows it: `Linear`, `Conv2d 1x1`, `Conv2d 3x3 depthwise`, `LayerNorm`."""
    name = type(module).__name__
    if isinstance(module, nn.Conv2d):
        size = "x".join(str(k) for k in module.kernel_size)
        groups = "" if module.groups == 1 else (" depthwise" if module.groups == module.in_channels
                                                 else f" groups={module.groups}")
        return f"{name} {size}{groups}"
    return name


@dataclass
class LayerGroup:
    """Layers of one type that one name selects (`--lora-targets` takes `target`).

    `target`: the shortest dotted name suffix that selects exactly these layers (`qkv`, `attn.proj`);
    the layer's last name when that also selects layers of another type. `names`: the modules.
    """

    target: str
    type: str
    kind: str | None  # layer_kind of the layers
    names: list[str]
    params: int
    in_head: bool = False


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's layers with parameters of their own, grouped by last name and type, in model order.

    A last name of digits (a Sequential's `0`) keeps the names before it up to one that is not:
    `layer1.0.downsample.0` is grouped as `downsample.0`, which LoRA matches as it is.
    """
    head = head_prefix(model)
    owners = [(n, m) for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    groups: dict[tuple[str, str, bool], list[tuple[str, nn.Module]]] = {}
    for name, module in owners:
        parts = name.split(".")
        start = max((i for i, part in enumerate(parts) if not part.isdigit()), default=0)
        key = (".".join(parts[start:]), layer_type(module), in_head(name, head))
        groups.setdefault(key, []).append((name, module))
    every = [n for n, _ in owners]
    out = []
    for (key, kind_text, head_layer), members in groups.items():
        names = [n for n, _ in members]
        params = sum(p.numel() for _, m in members for p in m.parameters(recurse=False))
        out.append(LayerGroup(target=_target(key, names, every), type=kind_text, kind=layer_kind(members[0][1]),
                              names=names, params=params, in_head=head_layer))
    return out


def _target(key: str, names: list[str], every: list[str]) -> str:
    """The shortest dotted suffix, at least `key` and starting with a name that is not digits, that
    selects exactly `names` among `every` (`key` when none does)."""
    parts = [n.split(".") for n in names]
    for depth in range(key.count(".") + 1, min(len(p) for p in parts) + 1):
        suffixes = {".".join(p[-depth:]) for p in parts}
        if len(suffixes) != 1:
            break
        suffix = suffixes.pop()
        if suffix.split(".")[0].isdigit():
            continue
        if {n for n in every if _matches(n, suffix)} == set(names):
            return suffix
    return key
