"""Adapt a built backbone: its head, its input size, its data config (recorded, given or timm's)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.anatomy import head_module_name
from sparseft.errors import InputError
from sparseft.weights import RECORD_KEY, Checkpoint, WeightsError, weights_record


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


# -- a converted checkpoint's data config ------------------------------------------------------

DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def _config_value(key: str, value: Any, where: str) -> Any:
    """One data-config entry, checked and in timm's form (input_size a 3-tuple, mean/std 3-tuples)."""
    try:
        if key == "input_size":
            size = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            size = [3, size[0], size[0]] if len(size) == 1 else [3, *size] if len(size) == 2 else size
            ok = len(size) == 3 and all(v >= 1 for v in size)
            value = tuple(size)
        elif key in ("mean", "std"):
            value = tuple(float(v) for v in value)
            ok = len(value) == 3 and all(v == v and abs(v) != float("inf") for v in value) and (
                key == "mean" or all(v > 0 for v in value))
        elif key == "crop_pct":
            value = float(value)
            ok = 0 < value <= 1
        elif key == "interpolation":
            ok = value in INTERPOLATIONS
        else:
            ok = value in ("center", "squash", "border")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{where}: {key} {value!r} is not a valid data-config value")
    return value


def file_data_config(src: Path, ckpt: Checkpoint) -> tuple[dict[str, Any], str]:
    """The data config a checkpoint carries: an entry beside its weights, its metadata, or a JSON beside it."""
    found: tuple[Any, str] | None = None
    for key in ("data_config", "pretrained_cfg", "default_cfg", RECORD_KEY):
        value = ckpt.meta.get(key)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                continue
        if isinstance(value, Mapping):
            value = value.get("data_config", value)
            found = (value, f"{src.name} ({key})")
            break
    if found is None:
        for side, key in ((src.with_suffix(".json"), "data_config"), (src.parent / "config.json", "pretrained_cfg")):
            try:
                value = json.loads(side.read_text()).get(key) if side.is_file() else None
            except (OSError, ValueError, AttributeError):
                value = None
            if isinstance(value, Mapping):
                found = (value, f"{side.name} beside {src.name}")
                break
    if found is None:
        return {}, ""
    value, where = found
    return {k: _config_value(k, value[k], where) for k in DATA_KEYS if value.get(k) is not None}, where


def resolve_config(model: nn.Module, arch: str, from_file: dict[str, Any], where: str,
                   given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(data config, where each key came from, notes): the caller's values, else the file's, else timm's."""
    from timm.data import resolve_data_config

    config = {k: v for k, v in resolve_data_config({}, model=model).items() if k in DATA_KEYS}
    origin = dict.fromkeys(config, f"timm's pretrained config of {arch}")
    notes = []
    for key, value in from_file.items():
        config[key], origin[key] = value, where
    for key, value in given.items():
        if value is None:
            continue
        value = _config_value(key, value, f"--{key.replace('_', '-')}")
        if key in from_file and from_file[key] != value:
            notes.append(f"{key} {value} given overrides the {from_file[key]} recorded in {where}")
        config[key], origin[key] = value, "given"
    return config, origin, notes
