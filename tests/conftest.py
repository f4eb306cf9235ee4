"""Fixtures and markers; shared helpers are in helpers.py."""

from __future__ import annotations

import warnings

import pytest
from helpers import tiny_model
from torch import nn

warnings.filterwarnings("ignore", category=UserWarning, module="timm")

@pytest.fixture
def vit() -> nn.Module:
    return tiny_model("vit")
