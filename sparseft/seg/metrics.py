"""Segmentation metrics: IoU and Dice per class, dataset-level and per-image mean, pixel accuracy.

Per class c, with P the predicted pixels and G the ground-truth pixels of c (pixels whose target
is `ignore_index` removed from both): I = |P ∩ G|, U = |P ∪ G|, IoU = I / U, Dice = 2I / (|P| + |G|).

- **Dataset-level** (mmseg's `IoUMetric`): I, U, |P|, |G| are summed over every image, then divided
  per class. A class with U = 0 over the whole set (never predicted, never present) gets NaN and is
  left out of the mean.
- **Per-image mean** (torchmetrics' `MeanIoU` / `DiceScore(aggregation_level="samplewise")`, and what
  polyp papers usually report): IoU and Dice per (image, class); pairs with U = 0 (class neither in
  the image nor predicted) are skipped, so an image with an empty mask and an empty prediction counts
  for nothing, while an empty mask with a non-empty prediction scores 0. Averaged per class over the
  images that count, then over the classes.
- **The mean over classes**: every class except a background class, which is listed per class but
  left out of the mean (its IoU is near 1 and would inflate it). By default (`background="auto"`)
  class 0 is the background when it is named so (`background`, `bg`, `_background_`) or, without
  names, when the task is binary; so a binary task reports its foreground class only, as polyp
  papers do, and a multi-class set without a background class (Cityscapes / ADE20K style)
  averages all its classes, as mmseg does. `compute()["classes_in_mean"]` names the classes
  averaged.
- **Pixel accuracy**: correct valid pixels / valid pixels.

Why not the official GPS SAM evaluation: it calls mmseg's `eval_metrics(..., num_classes=2,
ignore_index=0)` and prints class 1. `ignore_index=0` removes every pixel whose *ground truth* is
background, so false positives are never counted: IoU₁ becomes TP/|G| (recall) and Dice₁
2TP/(TP + |G|), and predicting foreground everywhere scores 1.0 on both. Here `ignore_index` is a
void label (255 by default), never the background.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sparseft import distributed
from sparseft.data.segmentation import IGNORE_INDEX
from sparseft.errors import InputError

_AREAS = ("intersection", "union", "pred", "target")
#: names of class 0 that make it the background (left out of the mean) under background="auto"
BACKGROUND_NAMES = ("background", "bg", "_background_")


class SegMetrics:
    """Accumulates IoU / Dice statistics over batches of label maps; see the module docstring.

    `update(pred, target)` takes integer class maps [B, H, W] (or one [H, W] map); `compute()`
    returns the metrics. For several processes, `sync()` sums the accumulators over the ranks (or
    `merge(other)` / `merge(other.state())` adds another accumulator's counts).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX,
                 class_names: Sequence[str] | None = None, background: int | str | None = "auto") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be a whole number >= 1, not {num_classes!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise InputError(f"ignore_index {ignore_index} is one of the {num_classes} classes; it marks void pixels "
                             "(e.g. 255), never a class such as the background")
        if class_names is not None and len(class_names) != num_classes:
            raise InputError(f"{len(class_names)} class names for {num_classes} classes")
        if background == "auto":
            named = class_names is not None and str(class_names[0]).strip().lower() in BACKGROUND_NAMES
            background = 0 if named or (class_names is None and num_classes == 2) else None
        if background is not None and (isinstance(background, bool) or not isinstance(background, int)
                                       or not 0 <= background < num_classes):
            raise InputError(f"background must be 'auto', None or a class 0..{num_classes - 1}, not {background!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.background = background
        self.class_names = [str(n) for n in class_names] if class_names is not None else [
            str(c) for c in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        c = self.num_classes
        # rows: intersection, union, predicted area, ground-truth area; summed over all images
        self.areas = torch.zeros(len(_AREAS), c, dtype=torch.float64)
        # rows: sum of per-image IoU, sum of per-image Dice, number of images with a non-empty union
        self.per_image = torch.zeros(3, c, dtype=torch.float64)

    @property
    def classes_in_mean(self) -> list[int]:
        """The classes averaged into mIoU / mDice: all but the background class (if any)."""
        kept = [c for c in range(self.num_classes) if c != self.background]
        return kept or [0]

    # -- accumulating -------------------------------------------------------------------------

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: `pred` and `target` integer class maps of the same shape [B, H, W] or [H, W]."""
        pred, target, valid = self._check(pred, target)
        c = self.num_classes
        image = torch.arange(len(target), device=target.device)[:, None, None].expand_as(target)
        index = (image * c + target) * c + pred
        confusion = torch.bincount(index[valid], minlength=len(target) * c * c)
        confusion = confusion.reshape(len(target), c, c).to("cpu", torch.float64)  # [image, target, pred]
        inter = confusion.diagonal(dim1=1, dim2=2)
        gt = confusion.sum(2)
        pr = confusion.sum(1)
        union = pr + gt - inter
        self.areas += torch.stack([inter.sum(0), union.sum(0), pr.sum(0), gt.sum(0)])
        counted = union > 0
        iou = torch.where(counted, inter / union.clamp_min(1), 0.0)
        dice = torch.where(counted, 2 * inter / (pr + gt).clamp_min(1), 0.0)
        self.per_image += torch.stack([iou.sum(0), dice.sum(0), counted.sum(0).double()])

    def _check(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for what, t in (("pred", pred), ("target", target)):
            dtype = getattr(t, "dtype", None)
            if not isinstance(t, torch.Tensor) or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise TypeError(f"{what} must be an integer tensor of class indices (take logits.argmax(1)), "
                                f"got {dtype or type(t).__name__}")
        if pred.shape != target.shape or pred.dim() not in (2, 3):
            raise InputError(f"pred and target must be class maps of one shape [B, H, W] or [H, W], got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        pred, target = pred.long(), target.long().to(pred.device)
        c = self.num_classes
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        bad = target[((target < 0) | (target >= c)) & valid].unique()
        if bad.numel():
            raise InputError(f"target holds values {bad[:8].tolist()} outside the classes 0..{c - 1} and the ignore "
                             f"index {self.ignore_index}")
        bad = pred[(pred < 0) | (pred >= c)].unique()
        if bad.numel():
            raise InputError(f"pred holds values {bad[:8].tolist()} outside the classes 0..{c - 1}")
        return pred, target, valid

    # -- combining ------------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulators (copies): `areas` [4, C] (I, U, |P|, |G|) and `per_image` [3, C] (sums of per-image
        IoU and Dice, count of images with a non-empty union); `merge` adds them."""
        return {"areas": self.areas.clone(), "per_image": self.per_image.clone()}

    def merge(self, other: SegMetrics | Mapping[str, torch.Tensor]) -> SegMetrics:
        """Add another accumulator's counts (a `SegMetrics` of the same classes, or its `state()`); returns self."""
        state = other.state() if isinstance(other, SegMetrics) else other
        if isinstance(other, SegMetrics) and (other.num_classes, other.ignore_index) != (self.num_classes,
                                                                                       self.ignore_index):
            raise InputError("cannot merge metrics of another class count or ignore index")
        for key in ("areas", "per_image"):
            value = state[key]
            own = getattr(self, key)
            if tuple(value.shape) != tuple(own.shape):
                raise InputError(f"cannot merge '{key}' of shape {tuple(value.shape)} into {tuple(own.shape)}")
            own += value.to("cpu", torch.float64)
        return self

    def sync(self) -> SegMetrics:
        """Sum the accumulators over the ranks of the process group, in place (no-op for one process)."""
        distributed.all_reduce_sum(self.areas)
        distributed.all_reduce_sum(self.per_image)
        return self

    # -- results --------------------------------------------------------------------------------

    def compute(self) -> dict[str, Any]:
        """The metrics as plain numbers (NaN where undefined); see the module docstring for each definition.

        Keys: mIoU, mDice (dataset-level), mIoU_per_image, mDice_per_image, pixel_acc, per_class
        {name: {iou, dice, iou_per_image, dice_per_image}}, classes_in_mean (names), pixels (valid).
        """
        inter, union, pr, gt = self.areas
        nan = torch.full_like(inter, math.nan)
        iou = torch.where(union > 0, inter / union.clamp_min(1), nan)
        dice = torch.where(union > 0, 2 * inter / (pr + gt).clamp_min(1), nan)
        iou_sum, dice_sum, count = self.per_image
        iou_img = torch.where(count > 0, iou_sum / count.clamp_min(1), nan)
        dice_img = torch.where(count > 0, dice_sum / count.clamp_min(1), nan)
        keep = self.classes_in_mean
        pixels = float(gt.sum())

        def mean(values: torch.Tensor) -> float:
            v = values[keep]
            v = v[~v.isnan()]
            return float(v.mean()) if v.numel() else math.nan

        return {
            "mIoU": mean(iou),
            "mDice": mean(dice),
            "mIoU_per_image": mean(iou_img),
            "mDice_per_image": mean(dice_img),
            "pixel_acc": float(inter.sum()) / pixels if pixels else math.nan,
            "per_class": {name: {"iou": float(iou[c]), "dice": float(dice[c]), "iou_per_image": float(iou_img[c]),
                                 "dice_per_image": float(dice_img[c])}
                          for c, name in enumerate(self.class_names)},
            "classes_in_mean": [self.class_names[c] for c in keep],
            "pixels": int(pixels),
        }
