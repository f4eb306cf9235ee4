"""SSF (Lian et al., 2022): learnable per-channel scale and shift after every linear op and norm.

Each adapted layer's output becomes `y * gamma + beta` over its output channels (the last dim for
Linear and LayerNorm outputs, dim 1 for convolutions, BatchNorm, GroupNorm and channels-first
LayerNorm2d). The layers are every Linear, Conv1d/2d/3d and affine LayerNorm / BatchNorm /
GroupNorm outside the classifier head (the patch embedding included, as in the paper).

Merging folds gamma and beta into the layer itself: W' = gamma * W (per output channel), b' =
gamma * b + beta. So that the merged model is plain (the base's exact state-dict keys), a layer
without a bias (e.g. a ResNet conv before its BatchNorm, Swin's patch-merging reduction) gets a
scale only: its shift would need a bias the base does not have, and the BatchNorm or norm that
follows carries a shift anyway. Norm layers with a fused activation (timm's BatchNormAct2d with
a non-identity act) are left out, since the activation sits between the norm and the scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseft.anatomy import head_prefix, in_head
from sparseft.delta import DeltaError
from sparseft.methods.base import CommonOptions, Method, MethodContext, NotApplicable, head_selection, register
from sparseft.methods.modules import Added, attach, parameter_names, remove_added
from sparseft.selection import Selection

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ScaleShift(Added):
    """y * scale + shift over one channel dimension of the wrapped layer's output."""

    def __init__(self, channels: int, dim: int, shift: bool, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(torch.ones(channels, dtype=dtype, device=device))
        self.shift = nn.Parameter(torch.zeros(channels, dtype=dtype, device=device)) if shift else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] != self.scale.numel():
            raise RuntimeError(f"SSF: expected {self.scale.numel()} channels at dim {self.dim} of the layer "
                               f"output, got shape {tuple(x.shape)}")
        shape = [1] * x.dim()
        shape[self.dim] = -1
        y = x * self.scale.to(x.dtype).view(shape)
        return y if self.shift is None else y + self.shift.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, dim={self.dim}, shift={self.shift is not None}"


def channel_dim(module: nn.Module) -> int | None:
    """The output channel dim SSF scales for `module`, or None if SSF does not apply to it."""
    if getattr(module, "weight", None) is None or not isinstance(module.weight, torch.Tensor):
        return None
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, _CONVS):
        return 1
    if isinstance(module, _NORMS):
        if module.weight.dim() != 1 or not all(isinstance(c, nn.Identity) for c in module.children()):
            return None  # multi-dim affine, or a fused activation after the affine part
        if isinstance(module, nn.LayerNorm) and not type(module).__name__.endswith("2d"):
            return -1
        return 1
    return None


def find_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer name: {"dim": channel dim, "shift": has a bias}} for every layer SSF adapts."""
    head = head_prefix(model)
    layers = {}
    for name, module in model.named_modules():
        if not name or in_head(name, head):
            continue
        dim = channel_dim(module)
        if dim is not None:
            layers[name] = {"dim": dim, "shift": getattr(module, "bias", None) is not None}
    return layers


@register
class SSF(Method):
    name = "ssf"
    summary = "SSF: per-channel scale and shift after every linear/conv/norm layer; merges into the weights"
    mergeable = True

    @dataclass
    class Options(CommonOptions):
        ssf_init: str = field(default="paper", metadata={
            "help": "scale/shift init: N(1, 0.02) / N(0, 0.02) as in the SSF code, or exactly 1 / 0",
            "choices": ["paper", "identity"]})

    def check(self, model: nn.Module) -> None:
        if not find_layers(model):
            raise NotApplicable(f"ssf: {type(model).__name__} has no Linear, Conv or affine norm layer outside "
                                "its head")

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        layers = find_layers(model)
        ctx.info["ssf_layers"] = len(layers)
        return head_selection(model, self.name, {"layers": layers, "init": self.options.ssf_init})

    def inject(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        names: list[str] = []
        for name, spec in structure["layers"].items():
            layer = model.get_submodule(name)
            if channel_dim(layer) is None:
                raise DeltaError(f"ssf: '{name}' is not a layer SSF can adapt in this model")
            w = layer.weight
            module = ScaleShift(w.shape[0], int(spec["dim"]), bool(spec["shift"]),
                                dtype=w.dtype if w.is_floating_point() else torch.float32, device=w.device)
            if structure.get("init") == "paper":  # N(1, 0.02) / N(0, 0.02) as in the SSF code
                with torch.no_grad():
                    module.scale.normal_(1.0, 0.02)
                    if module.shift is not None:
                        module.shift.normal_(0.0, 0.02)
            attach(model, name, "ssf", module)
            module.after(layer)
            names += parameter_names(model, module)
        return names

    def fold(self, model: nn.Module) -> dict[str, torch.Tensor]:
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, module in model.named_modules():
                ssf = getattr(module, "ssf", None)
                if not isinstance(ssf, ScaleShift):
                    continue
                w, b = module.weight, module.bias
                originals[f"{name}.weight"] = w.detach().clone()
                scale = ssf.scale.to(w.dtype)
                w.mul_(scale.view(-1, *([1] * (w.dim() - 1))))
                if b is not None:
                    originals[f"{name}.bias"] = b.detach().clone()
                    b.mul_(scale)
                    if ssf.shift is not None:
                        b.add_(ssf.shift.to(b.dtype))
        remove_added(model)
        return originals
