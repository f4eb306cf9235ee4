"""Preprocessing per protocol, from the backbone's timm data config.

- VTAB-1k: resize to the model's (square) input size, no augmentation, normalise with the
  backbone's mean/std; train and test are the same.
- FGVC: RandomResizedCrop + horizontal flip for training; resize to size/crop_pct and centre
  crop for testing (timm's evaluation transform).
- `TwoViews`: the SimCLR-style pair of views GPS scores weights with.

`img_size` overrides the config's input size (CPU runs use small inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from sparseft.errors import InputError

Protocol = Literal["vtab", "fgvc"]

DEFAULT_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                  "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}


def data_config(source: nn.Module | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The preprocessing config (input_size, interpolation, mean, std, crop_pct) of a backbone.

    `source` is a timm model (its pretrained config, with input_size taken from the model's
    actual patch-embedding size when it was built for another size), a timm pretrained_cfg
    dict, or None for ImageNet defaults at 224 px.
    """
    from timm.data import resolve_data_config

    if source is None:
        return dict(DEFAULT_CONFIG)
    if isinstance(source, nn.Module):
        cfg = resolve_data_config({}, model=source)
        img_size = getattr(getattr(source, "patch_embed", None), "img_size", None)
        if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
            cfg["input_size"] = (3, *img_size)
    else:
        cfg = resolve_data_config(pretrained_cfg=dict(source))
    out = dict(DEFAULT_CONFIG)
    out.update({k: v for k, v in cfg.items() if v is not None})
    return out


def _size(config: Mapping[str, Any], img_size: int | Sequence[int] | None) -> tuple[int, int]:
    if img_size is None:
        _, h, w = config["input_size"]
        return int(h), int(w)
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


def _interpolation(config: Mapping[str, Any]) -> T.InterpolationMode:
    name = str(config.get("interpolation") or "bilinear")
    try:
        return T.InterpolationMode(name)
    except ValueError:
        return T.InterpolationMode.BILINEAR


def _to_tensor(config: Mapping[str, Any]) -> list[Callable]:
    return [T.ToTensor(), T.Normalize(mean=tuple(config["mean"]), std=tuple(config["std"]))]


def build_transform(data_config: Mapping[str, Any], protocol: Protocol, train: bool,
                    img_size: int | Sequence[int] | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The image -> normalised tensor transform for `protocol` ("vtab" or "fgvc")."""
    h, w = _size(data_config, img_size)
    interp = _interpolation(data_config)
    if protocol == "vtab":
        steps: list[Callable] = [T.Resize((h, w), interpolation=interp, antialias=True)]
    elif protocol == "fgvc":
        if train:
            steps = [T.RandomResizedCrop((h, w), interpolation=interp, antialias=True), T.RandomHorizontalFlip()]
        else:
            crop_pct = float(data_config.get("crop_pct") or 0.875)
            scaled = (int(h / crop_pct), int(w / crop_pct))
            resize = scaled[0] if h == w else scaled  # shorter side keeps the aspect ratio for square crops
            steps = [T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop((h, w))]
    else:
        raise InputError(f"unknown protocol {protocol!r}; use 'vtab' or 'fgvc'")
    return T.Compose(steps + _to_tensor(data_config))


class TwoViews:
    """Two independent SimCLR-style augmentations of one image: `[view1, view2]`.

    RandomResizedCrop (scale 0.2-1 by default; the official code's 0.08-1 with GPS's `view_scale`),
    horizontal flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale p=0.2, then tensor +
    normalisation: what GPS scores weights on. A DataLoader over a dataset with this transform yields
    `([v1, v2], labels)`, the multi-view batch `sparseft.select` accepts.
    """

    def __init__(self, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float], *,
                 scale: tuple[float, float] = (0.2, 1.0), interpolation: str = "bicubic"):
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=scale, interpolation=_interpolation({"interpolation": interpolation}),
                                antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(mean=tuple(mean), std=tuple(std)),
        ])

    @classmethod
    def from_config(cls, data_config: Mapping[str, Any], img_size: int | Sequence[int] | None = None, *,
                    scale: tuple[float, float] = (0.2, 1.0)) -> TwoViews:
        """TwoViews at the config's input size (or `img_size`) with its mean/std; `scale`: the crops' range."""
        return cls(_size(data_config, img_size), data_config["mean"], data_config["std"], scale=scale,
                   interpolation=str(data_config.get("interpolation") or "bicubic"))

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.transform(img), self.transform(img)]

    def __repr__(self) -> str:
        return f"TwoViews({self.transform})"
