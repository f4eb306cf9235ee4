"""Shared fixtures: tiny randomly initialised models of every family and toy data."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

warnings.filterwarnings("ignore", category=UserWarning, module="timm")

TIMM_TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                                                   window_size=4)),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))),
    "resnet": ("resnet10t", dict()),
    "mobilenetv2": ("mobilenetv2_050", dict()),
    "efficientnet": ("tf_efficientnet_lite0", dict()),
}


def tiny_model(family: str, num_classes: int = 4, seed: int = 0) -> nn.Module:
    """A small randomly initialised model of `family` (also 'tv_mobilenet_v2' and 'mlp')."""
    torch.manual_seed(seed)
    if family == "tv_mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=0.25)
    if family == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(),
                             nn.Linear(32, num_classes))
    name, kwargs = TIMM_TINY[family]
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def toy_batches(n_batches: int = 2, batch: int = 8, classes: int = 4, size: int = 32, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images whose class shifts the mean of one colour channel, so labels carry signal."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        x = torch.randn(batch, 3, size, size, generator=g, dtype=dtype)
        x[:, 0] += y[:, None, None].to(dtype) * 0.5
        out.append((x, y))
    return out


@pytest.fixture
def vit() -> nn.Module:
    return tiny_model("vit")
