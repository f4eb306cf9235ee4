"""Adapt a built offline backbone: its head, its input size, its data config."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.anatomy import head_module_name
from sparseft.errors import InputError
from sparseft.weights import WeightsError, weights_record


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give `model` a fresh classification head with `num_classes` outputs (0: no head, features out).

    timm models use their own `reset_classifier`; other models get their last `nn.Linear`
    (the head, as `sparseft.anatomy.head_module_name` finds it) replaced by a new one, or by
    `nn.Identity` for 0 classes.
    """
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return model
    name = head_module_name(model)
    if name is None:
        raise InputError("the model has no nn.Linear head to replace")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    new: nn.Module = nn.Linear(old.in_features, num_classes) if num_classes > 0 else nn.Identity()
    setattr(parent, attr, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a ViT position embedding [1, prefix + H*W, D] to another patch grid.

    Bicubic without antialiasing, as Hugging Face's DINOv2 (and so the exported ONNX graph the
    DINOv2 weights come from) interpolates; timm's default would antialias when shrinking.
    """
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False)


def set_vit_img_size(model: nn.Module, img_size: int) -> nn.Module:
    """Change a timm ViT's input size in place, resampling its position embedding (see above).

    Raises `ValueError` for models without an absolute position embedding or for a size that
    is not a multiple of the patch size.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(model, "pos_embed", None) is None or not hasattr(model, "set_input_size"):
        raise InputError(f"{type(model).__name__} has no absolute position embedding to resample")
    patch = tuple(patch_embed.patch_size)
    if img_size <= 0 or img_size % patch[0] or img_size % patch[1]:
        raise InputError(f"img_size {img_size} is not a positive multiple of the patch size {patch[0]}")
    old_grid = tuple(patch_embed.grid_size)
    new_grid = (img_size // patch[0], img_size // patch[1])
    if new_grid == old_grid:
        return model
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    with torch.no_grad():
        pos = resample_pos_embed(model.pos_embed.detach(), new_grid, old_grid, prefix)
        model.set_input_size(img_size=(img_size, img_size))  # patch grid + timm's bookkeeping
        model.pos_embed.copy_(pos)
    return model


def attach_data_config(model: nn.Module, data_config: Mapping[str, Any], **extra: Any) -> nn.Module:
    """Set `model.pretrained_cfg` so `timm.data.resolve_data_config(model=model)` returns `data_config`.

    Keeps timm's non-data entries (first_conv, classifier) and drops its hub/url entries,
    which describe other weights than the ones loaded.
    """
    old = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg = {k: old[k] for k in ("first_conv", "classifier", "pool_size") if k in old}
    cfg.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()})
    cfg.update(extra)
    model.pretrained_cfg = cfg
    if hasattr(model, "default_cfg"):
        model.default_cfg = cfg
    return model


def recorded_data_config(weights: str | Path, architecture: str) -> dict[str, Any] | None:
    """The data config a converted weight file records (`sparseft weights convert`), or None.

    Refuses a file converted for another architecture than `architecture` (pretrained tags such
    as `.a1_in1k` aside), before any tensor is loaded.
    """
    record = weights_record(weights)
    if record is None:
        return None
    recorded = record["architecture"]
    if recorded.split(".")[0] != architecture.split(".")[0]:
        raise WeightsError(f"{weights}: converted for {recorded}, not {architecture}; use --model "
                           f"{recorded.split('.')[0]} (or convert the checkpoint for {architecture})")
    config = record.get("data_config")
    return dict(config) if isinstance(config, Mapping) else None


def use_data_config(model: nn.Module, config: Mapping[str, Any] | None, img_size: int | None,
                    **extra: Any) -> nn.Module:
    """Attach `config` (default: the model's own) with its input size set to `img_size` when given.

    The model's data config then says the size it is trained and served at: a run's
    `config.json` shows `--img-size`, not the size the weights were pretrained at.
    """
    if config is None and img_size is None:
        return model
    config = dict(config if config is not None else (getattr(model, "pretrained_cfg", None) or {}))
    if img_size is not None:
        config["input_size"] = (3, img_size, img_size)
    return attach_data_config(model, config, **extra)


def checkpoint_filter(model: nn.Module) -> Callable[[dict[str, torch.Tensor], nn.Module], Any] | None:
    """timm's `checkpoint_filter_fn` for the model's architecture (maps original checkpoints' names), or None."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return fn if callable(fn) else None
