"""The head-free selection loss: supervised contrastive (SupCon) over pooled features.

Below both GPS's scoring pass (`sparseft.selection.scores`) and the segmentation losses
(`sparseft.selection.regions`), which use it over images and over class regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseft.errors import InputError


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), all anchors against all samples.

    `features` [N, D] holds every view of every image (views stacked along N), `labels` [N].
    Each anchor's positives are the other samples with its label (its own other view included).
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise InputError(f"supcon_loss needs features [N, D] and labels [N], got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.t() / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(1)
    has_pos = count > 0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos] / count[has_pos]
    return -mean_log_prob.mean()
