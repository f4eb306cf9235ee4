"""GPS's selection losses for masks: what replaces one label per image.

`loss="supcon"` (head-free, as in the paper): every class region of every view is one sample; its
feature is the backbone's last feature map averaged over the region (the mask's one-hot map
area-pooled to the feature grid, so small objects keep a fractional weight), and SupCon pulls
regions of one class together across images and views. `loss="ce"`: per-pixel cross-entropy
through the model's randomly initialised decoder (the official SAM code's kind of loss, which
there goes through SAM's pretrained decoder). Ignored pixels (255) count for neither.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sparseft.data.segmentation import IGNORE_INDEX
from sparseft.selected import SelectionError
from sparseft.selection.losses import supcon_loss


def dense_targets(masks: Any, views: list[torch.Tensor], step: int) -> torch.Tensor:
    """The masks of every view, concatenated [N, H, W] in the order of `views`, or SelectionError."""
    if isinstance(masks, torch.Tensor) and len(views) > 1:
        raise SelectionError(f"selection batch {step}: {len(views)} views of the images but one mask batch; views "
                             "made from the images alone no longer match their masks: give the loader paired views "
                             "([view1, view2], [mask1, mask2]) as sparseft's segmentation loaders do, or use loss='ce'")
    per_view = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if len(per_view) != len(views) or not all(isinstance(m, torch.Tensor) for m in per_view):
        raise SelectionError(f"selection batch {step}: a segmentation batch needs one mask tensor per view "
                             f"({len(views)} views)")
    for view, mask in zip(views, per_view):
        if mask.dim() != 3 or mask.shape[0] != view.shape[0] or mask.dtype.is_floating_point:
            raise SelectionError(f"selection batch {step}: masks must be integer class maps [B, H, W] matching "
                                 f"the views' batch, got {tuple(mask.shape)} ({mask.dtype})")
    return torch.cat(per_view)


def has_two_classes(masks: torch.Tensor) -> torch.Tensor:
    """Whether the masks hold at least two classes (SupCon then has negatives)."""
    present = masks[masks != IGNORE_INDEX].unique()
    return torch.tensor(present.numel() >= 2)


def region_features(fmap: torch.Tensor, masks: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [R, C], class [R]) of every (image, class) region present in `masks`.

    `fmap` [N, C, h, w]; `masks` [N, H, W] class ids (IGNORE_INDEX dropped). Each region's feature
    is the feature map weighted by the region's area share in each cell of the h×w grid.
    """
    n, _, h, w = fmap.shape
    valid = masks != IGNORE_INDEX
    onehot = F.one_hot(torch.where(valid, masks, num_classes).long(), num_classes + 1)[..., :num_classes]
    weights = F.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2).float(), (h, w))  # [N, K, h, w]
    mass = weights.sum((2, 3))  # [N, K]
    pooled = torch.einsum("nchw,nkhw->nkc", fmap.float(), weights) / mass.clamp_min(1e-12)[..., None]
    keep = mass > 0
    labels = torch.arange(num_classes, device=masks.device).expand(n, num_classes)
    return pooled[keep], labels[keep]


def region_supcon_loss(fmap: torch.Tensor, masks: torch.Tensor, num_classes: int,
                       temperature: float = 0.07) -> torch.Tensor:
    """SupCon over the class regions of a batch of views (see the module docstring)."""
    features, labels = region_features(fmap, masks, num_classes)
    if len(labels) < 2:
        return fmap.sum() * 0.0  # one region: no pair, no gradient
    return supcon_loss(features, labels, temperature)


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel cross-entropy over the valid pixels."""
    return F.cross_entropy(logits.float(), masks.long(), ignore_index=IGNORE_INDEX)
