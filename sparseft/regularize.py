"""What the official training scripts add around the optimizer step: model EMA and mixup/cutmix.

Both are timm's own implementations, switched on by `TrainConfig` (off by default):

- `WeightAverage` keeps timm's `ModelEmaV3` of the model (fixed decay, no warm-up: the update rule of
  timm's `ModelEmaV2`, which the official GPS script uses): after each optimizer step every
  floating-point entry of the state dict becomes `decay * ema + (1 - decay) * current`. Its state
  travels in the run's checkpoint (`state_tensors` / `load_state_tensors`), so a resumed run
  continues the same average.
- `make_mixup` builds timm's `Mixup` (batch mode, probability 1, switch probability 0.5: timm's and
  the official scripts' defaults); its targets are soft, label smoothing included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparseft.errors import InputError

EMA_PREFIX = "ema/"  # the average's tensors in a checkpoint's extra tensors


class WeightAverage:
    """An exponential moving average of a model's weights (timm `ModelEmaV3`, constant decay)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay)  # a deep copy, in eval mode
        self.ema.module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, model: nn.Module) -> None:
        """One step of the average (call after each optimizer step)."""
        self.ema.update(model)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {EMA_PREFIX + k: v for k, v in self.ema.module.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k.removeprefix(EMA_PREFIX): v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        if not state:
            raise InputError("the checkpoint holds no model EMA (the run was started without --ema-decay); resume "
                             "with the original settings or start a new run folder")
        self.ema.module.load_state_dict(state)


def make_mixup(mixup: float, cutmix: float, label_smoothing: float, model: nn.Module) -> Any:
    """timm's `Mixup` for the model's classes, or None when both alphas are 0."""
    if not (mixup > 0 or cutmix > 0):
        return None
    from timm.data import Mixup

    classes = getattr(model, "num_classes", None)
    if not isinstance(classes, int) or classes < 2:
        raise InputError("mixup/cutmix (--mixup, --cutmix) need a classifier with a class count (model.num_classes)")
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=classes)


def mix_batch(mixup: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch through timm's Mixup (soft targets); a clear error for the odd batch timm cannot pair."""
    if len(x) % 2:
        raise InputError(f"mixup/cutmix pair the images of a batch, and this batch has {len(x)}: use an even "
                         "--batch-size with --drop-last")
    return mixup(x, y)
