"""GPS's selection objectives, one per kind of target: what the scoring pass differentiates.

A task kind (`sparseft.kinds`) names its objective; `sparseft.selection.scores.gradient_scores`
calls it and never asks which kind it has:

- `ImageObjective` (classification): SupCon over the head-free features of two views per image,
  or cross-entropy through the head; one class label per image.
- `RegionObjective` (segmentation): SupCon over class regions of the last feature map, or
  per-pixel cross-entropy (`sparseft.selection.regions`); one mask per view.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseft.anatomy import feature_fn
from sparseft.selection import regions
from sparseft.selection.losses import supcon_loss
from sparseft.selection.scores import class_labels


class SelectionObjective:
    """What GPS's scoring pass needs of a kind: the features SupCon sees, the targets of a batch, the loss."""

    def features(self, model: nn.Module, head: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def targets(self, labels: Any, views: list[torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets of every view, concatenated in the order of `views`; whether the batch holds two classes)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, out: torch.Tensor, y: torch.Tensor, loss: str,
             temperature: float) -> torch.Tensor:
        raise NotImplementedError


class ImageObjective(SelectionObjective):
    """One class label per image: SupCon over the images' features, or cross-entropy."""

    def features(self, model: nn.Module, head: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return feature_fn(model, head)

    def targets(self, labels: Any, views: list[torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = class_labels(labels, views, step)
        return labels.repeat(len(views)), (labels[1:] != labels[:1]).any()

    def loss(self, model: nn.Module, out: torch.Tensor, y: torch.Tensor, loss: str,
             temperature: float) -> torch.Tensor:
        return supcon_loss(out, y, temperature) if loss == "supcon" else F.cross_entropy(out.float(), y.long())


class RegionObjective(SelectionObjective):
    """One mask per view: SupCon over class regions of the feature map, or per-pixel cross-entropy."""

    def features(self, model: nn.Module, head: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return model.features

    def targets(self, labels: Any, views: list[torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        masks = labels[:len(views)] if isinstance(labels, (list, tuple)) else labels  # ce: the first view's
        y = regions.dense_targets(masks, views, step)
        return y, regions.has_two_classes(y)

    def loss(self, model: nn.Module, out: torch.Tensor, y: torch.Tensor, loss: str,
             temperature: float) -> torch.Tensor:
        return (regions.region_supcon_loss(out, y, model.num_classes, temperature) if loss == "supcon"
                else regions.pixel_cross_entropy(out, y))
