"""Joint augmentation of segmentation pairs: the same crop and flip for an image and its mask.

Read by `sparseft.data.segmentation` (which re-exports `SegTransform` and `collate_pairs`); see
docs/data.md, "Segmentation data".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from sparseft.errors import InputError


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=generator))


def random_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, w, h), drawn from `generator`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(*scale, generator)
        aspect = math.exp(_uniform(*log_ratio, generator))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    aspect = width / height  # fallback: the central crop, as torchvision does
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class SegTransform:
    """The same geometry for image and mask; then image -> normalised float, mask -> long.

    Training: random resized crop (scale 0.5-1, ratio 3/4-4/3) to `size` and a horizontal flip
    with p=0.5, drawn from the `generator` given to each call; evaluation: the image resized to
    `size`, the mask kept at the data's own size (`native_mask`, the default for evaluation: the
    model's logits are resized to it, so metrics are measured at the data's resolution, as mmseg
    does) or resized with it (`native_mask=False`). Images are resampled bilinearly, masks by
    nearest neighbour (class ids are never mixed).
    """

    def __init__(self, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float], train: bool, *,
                 scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: float = 0.5, native_mask: bool | None = None):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mean, self.std = tuple(mean), tuple(std)
        self.train, self.scale, self.ratio, self.flip = train, scale, ratio, flip
        self.native_mask = (not train) if native_mask is None else bool(native_mask)
        if train and self.native_mask:
            raise InputError("native_mask is for evaluation: training crops image and mask together")

    @classmethod
    def from_config(cls, data_config: Mapping[str, Any], train: bool,
                    img_size: int | Sequence[int] | None = None) -> SegTransform:
        """At the backbone's input size (or `img_size`) with its mean/std (see `data_config`)."""
        size = img_size if img_size is not None else tuple(data_config["input_size"][1:])
        return cls(size, data_config["mean"], data_config["std"], train)

    def __call__(self, image: Image.Image, mask: np.ndarray | Image.Image,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8), "L")
        box = (0, 0, image.width, image.height)
        mirror = False
        if self.train:
            left, top, w, h = random_crop_box(image.width, image.height, self.scale, self.ratio, generator)
            box = (left, top, left + w, top + h)
            mirror = _uniform(0.0, 1.0, generator) < self.flip
        out_size = (self.size[1], self.size[0])  # PIL wants (width, height)
        image = image.resize(out_size, Image.BILINEAR, box=box)
        if not self.native_mask:
            m = m.resize(out_size, Image.NEAREST, box=box)
        if mirror:
            image, m = image.transpose(Image.FLIP_LEFT_RIGHT), m.transpose(Image.FLIP_LEFT_RIGHT)
        x = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        return x, torch.from_numpy(np.array(m, dtype=np.int64))

    def __repr__(self) -> str:
        return f"SegTransform(size={self.size}, train={self.train}, native_mask={self.native_mask})"


def collate_pairs(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, Any]:
    """A batch of (image, mask) pairs: images stacked; masks stacked when they share a size, else
    a list (evaluation at each image's own resolution)."""
    images = torch.stack([b[0] for b in batch])
    masks = [b[1] for b in batch]
    if all(m.shape == masks[0].shape for m in masks):
        return images, torch.stack(masks)
    return images, masks
