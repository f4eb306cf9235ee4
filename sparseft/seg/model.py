"""Segmentation models: a timm backbone plus a light FPN decoder that trains in full like a head.

    model = create_segmentation_model("vit_small_patch14_dinov2", num_classes=2, img_size=224)
    logits = model(images)                        # [B, num_classes, H, W]

The backbone is the plain timm classification model with its classifier removed, kept as
`model.backbone`, so its parameter names are the classification model's under `backbone.`:
GPS's eligibility rules (norms, embeddings, biases) and sparseft's weight-key maps read them as
they read a classifier. Its feature maps come from timm's `forward_intermediates`:

- plain ViTs (every level at the patch stride): four evenly spaced blocks (blocks 2, 5, 8, 11 of a
  12-block ViT), each through the final norm (as DINOv2's dense heads take them);
- SAM image encoders (`samvit_*`): the same blocks, the last one through SAM's neck
  (B, 256, H/16, W/16), so the neck's pretrained convolutions are used;
- hierarchical models (CNNs, Swin, ConvNeXt): the last four levels of `model.feature_info`
  (strides 4 to 32 for most CNNs).

`prune_intermediate_layers` then drops what the levels never reach (the classifier, a CNN's final
1x1 conv and norm, a hierarchical model's final norm), so every parameter left is used.

The decoder, `model.decode_head`, is what `model.get_classifier()` returns, so
`sparseft.models.head_parameter_names(model)` is exactly its parameters and GPS trains it in full
(`parameter_roles` gives "full"), as it does a classification head.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseft.anatomy import note_build
from sparseft.errors import InputError
from sparseft.hub.build import attach_data_config
from sparseft.hub.registry import REGISTRY
from sparseft.models import create_model
from sparseft.weights import WeightsError, load_weights, read_state_dict


class FPNDecoder(nn.Module):
    """A small FPN: 1x1 lateral convs to `width`, top-down upsample-and-add, a 3x3 conv + GroupNorm +
    ReLU, `upsample` progressive x2 steps (3x3 conv + GroupNorm + ReLU each), a 1x1 classifier.

    GroupNorm rather than BatchNorm: segmentation often trains with one or two images per batch,
    and a GroupNorm decoder behaves the same whatever BatchNorm policy (`--batchnorm`) a method
    applies to the backbone.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = 64, upsample: int = 0) -> None:
        super().__init__()
        groups = math.gcd(8, width)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = _conv_block(width, groups)
        self.upsample = nn.ModuleList(_conv_block(width, groups) for _ in range(upsample))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, levels: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits from the backbone's levels (finest first), resized to `size` (H, W) when given."""
        x = self.lateral[-1](levels[-1])
        for level, lateral in zip(reversed(levels[:-1]), reversed(self.lateral[:-1])):
            y = lateral(level)
            x = y + F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(x)
        for block in self.upsample:
            x = block(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        x = self.classifier(x)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def _conv_block(width: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width),
                         nn.ReLU(inplace=True))


def _feature_info(backbone: nn.Module) -> list[dict[str, Any]]:
    info = getattr(backbone, "feature_info", None)
    if hasattr(info, "get_dicts"):
        info = info.get_dicts()
    if not isinstance(info, (list, tuple)) or not info or not hasattr(backbone, "forward_intermediates"):
        raise TypeError(f"{type(backbone).__name__} is not a timm model with feature_info and forward_intermediates; "
                        "segmentation needs a timm backbone (torchvision models are not supported)")
    return [dict(d) for d in info]


def evenly_spaced(depth: int, count: int) -> list[int]:
    """`count` block indices spread over `depth` blocks, ending at the last ([2, 5, 8, 11] for 12 and 4)."""
    return sorted({max(0, (i + 1) * depth // count - 1) for i in range(count)})


class SegmentationModel(nn.Module):
    """A timm backbone (`backbone`) and an FPN decoder (`decode_head`); `forward(x)` -> logits [B, C, H, W].

    The backbone is changed in place: its classifier and the layers after the last level used are
    removed (`prune_intermediate_layers`). `levels`: feature levels fed to the decoder (at most 4
    is typical). `decoder_width`: channels of the decoder. `upsample_to`: the decoder upsamples
    coarse features in x2 steps (each with a 3x3 conv) while the stride stays >= this value (a
    patch-16 ViT gets two steps, to stride 4); the logits are then resized to the input.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, levels: int = 4, decoder_width: int = 64,
                 upsample_to: int = 4) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be a whole number >= 1 (background included), not {num_classes!r}")
        if levels < 1:
            raise InputError(f"levels must be >= 1, not {levels!r}")
        info = _feature_info(backbone)
        before = set(backbone.state_dict())
        self.plain = len({d["reduction"] for d in info}) == 1 and hasattr(backbone, "blocks")
        self.has_neck = self.plain and isinstance(getattr(backbone, "neck", None), nn.Module) \
            and not isinstance(backbone.neck, nn.Identity)
        if self.plain:  # ViT / SAM: blocks spread over the depth, all at the patch stride
            self.indices = evenly_spaced(len(backbone.blocks), levels)
            taken = [info[min(i, len(info) - 1)] for i in self.indices]
            channels = [int(d["num_chs"]) for d in taken]
            if self.has_neck:
                channels[-1] = int(taken[-1].get("num_chs_norm", getattr(backbone, "num_features", channels[-1])))
            backbone.prune_intermediate_layers(self.indices, prune_norm=False, prune_head=True)
        else:  # hierarchical: the last `levels` entries of feature_info
            self.indices = list(range(max(0, len(info) - levels), len(info)))
            taken = [info[i] for i in self.indices]
            channels = [int(d["num_chs"]) for d in taken]
            backbone.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.pruned = sorted(before - set(backbone.state_dict()))  # state entries of the classifier model dropped
        self.backbone = backbone
        self.channels = channels
        self.reductions = [int(d["reduction"]) for d in taken]
        self.num_classes = num_classes
        self.decoder_width = decoder_width
        stride = min(self.reductions)
        self.upsample_steps = int(math.floor(math.log2(stride / upsample_to))) if stride > upsample_to else 0
        self.decode_head = FPNDecoder(channels, num_classes, decoder_width, self.upsample_steps)

    # -- forward ---------------------------------------------------------------------------------

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature maps [B, C_i, h_i, w_i], finest first (see the module docstring)."""
        bb = self.backbone
        if self.has_neck:  # SAM: the last level through the neck, which forward_intermediates returns as its output
            final, levels = bb.forward_intermediates(x, indices=self.indices, norm=False, output_fmt="NCHW")
            return [*levels[:-1], final]
        if self.plain:
            return bb.forward_intermediates(x, indices=self.indices, norm=True, output_fmt="NCHW",
                                            intermediates_only=True)
        return bb.forward_intermediates(x, indices=self.indices, output_fmt="NCHW", intermediates_only=True)

    task = "segmentation"  # how sparseft's GPS scoring and training recognise a dense model
    #: the classes' names when known (set by `sparseft train` and `sparseft.load`); the metrics leave a
    #: class 0 named "background" out of the mean (`sparseft.seg.SegMetrics`)
    class_names: list[str] | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last (coarsest) backbone level [B, C, h, w], e.g. for pooling features over mask regions."""
        return self.forward_levels(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits [B, num_classes, H, W] at the input's size."""
        return self.decode_head(self.forward_levels(x), size=tuple(x.shape[-2:]))

    # -- the head, as sparseft and timm look for it ----------------------------------------------

    def get_classifier(self) -> nn.Module:
        """The decoder: sparseft's head (trained in full, left out of the base fingerprint)."""
        return self.decode_head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh decoder for `num_classes` classes."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be a whole number >= 1, not {num_classes!r}")
        device = next(self.decode_head.parameters()).device
        self.decode_head = FPNDecoder(self.channels, num_classes, self.decoder_width, self.upsample_steps).to(device)
        self.num_classes = num_classes
        self.class_names = None

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The backbone's data config (timm's `resolve_data_config(model=...)` reads it), with the input
        size the backbone was built for when it has a fixed one."""
        cfg = dict(getattr(self.backbone, "pretrained_cfg", None) or {})
        size = getattr(getattr(self.backbone, "patch_embed", None), "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            cfg["input_size"] = (3, *size)
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict[str, Any]) -> None:
        self.backbone.pretrained_cfg = cfg

    default_cfg = pretrained_cfg


def create_segmentation_model(name: str, num_classes: int, img_size: int | None = None, pretrained: bool = False,
                              weights: str | Path | None = None, *, levels: int = 4, decoder_width: int = 64,
                              **kwargs: Any) -> SegmentationModel:
    """A `SegmentationModel` on the backbone `name` (an offline backbone or a timm model).

    The backbone is built by `sparseft.models.create_model(name, 0, img_size=...)`: offline names
    (`sparseft weights list`) come with their pretrained weights, `pretrained=True` uses timm's hub.
    `weights`: a local file, either a segmentation model's state (keys `backbone.*` and
    `decode_head.*`, e.g. a merged task; decoder tensors of another class count are dropped) or the
    backbone's own weights in timm names or in a format the architecture's timm
    `checkpoint_filter_fn` maps (an official SAM checkpoint's `image_encoder.*`); the backbone's
    classifier and the layers the model prunes are left out, everything else must fit. SAM: load a
    1024-px checkpoint into the default 1024-px build (no `img_size`) and feed smaller images; its
    position embeddings are resampled on the fly. Other keyword arguments go to the architecture.
    """
    if weights is None:
        backbone = create_model(name, 0, img_size=img_size, pretrained=pretrained, **kwargs)
    else:
        backbone = _untrained_backbone(name, img_size, **kwargs)
    model = SegmentationModel(backbone, num_classes, levels=levels, decoder_width=decoder_width)
    if weights is not None:
        load_segmentation_weights(model, weights)
    return note_build(model, name, img_size)


def _untrained_backbone(name: str, img_size: int | None, **kwargs: Any) -> nn.Module:
    """The architecture of `name` without weights and without a head (an offline name fetches nothing)."""
    if name not in REGISTRY:
        return create_model(name, 0, img_size=img_size, **kwargs)
    spec = REGISTRY[name]
    if spec.library != "timm":
        raise TypeError(f"{name} is a {spec.library} model; segmentation needs a timm backbone")
    data_config = dict(spec.data_config)
    if img_size is not None:
        data_config["input_size"] = (3, img_size, img_size)
    model = create_model(spec.architecture, 0, img_size=data_config["input_size"][-1],
                         **{**spec.model_kwargs, **kwargs})
    return attach_data_config(model, data_config, architecture=spec.architecture, tag="offline", num_classes=0,
                              license=spec.licence, source=spec.source)


def load_segmentation_weights(model: SegmentationModel, path: str | Path,
                              sha256: str | None = None) -> SegmentationModel:
    """Load a segmentation model's state or the backbone's weights (see `create_segmentation_model`)."""
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path, sha256).items()}
    if any(k.startswith(("backbone.", "decode_head.")) for k in state):
        return load_weights(model, path, sha256)
    backbone = model.backbone
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        state = filter_fn(state, backbone)
    own = backbone.state_dict()
    classifier = (backbone.pretrained_cfg or {}).get("classifier") or ()
    prefixes = tuple(p + "." for p in ([classifier] if isinstance(classifier, str) else classifier))
    pruned = set(model.pruned)
    state = {k: v for k, v in state.items() if k in own or not (k in pruned or k.startswith(prefixes))}
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise WeightsError(f"{path}: tensors of another shape than the backbone's: {', '.join(wrong[:4])}"
                           f"{'…' if len(wrong) > 4 else ''}; these weights are for another architecture or size")
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: does not fit the backbone; missing {missing[:8]}"
                           f"{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           f"{'…' if len(unexpected) > 8 else ''}")
    return model
