"""AdaptFormer-style parallel adapter (Chen et al., 2022) on every block's MLP.

For each block with an MLP (`block.mlp` having `fc1` and `fc2`: timm ViT, DeiT, DINOv2, Swin and
ConvNeXt blocks) the MLP's output becomes

    mlp(h) + s * up(dropout(relu(down(h))))

where h is the MLP's input. As in AdaptFormer's code: ReLU, dropout (0.1) on the bottleneck,
down initialised like LoRA's A (kaiming-uniform, a=sqrt(5)), up and both biases at zero, so the
model starts exactly at the base; fixed scale s = 0.1; no adapter LayerNorm. The default
bottleneck of 8 is the setting of the VTAB-1k comparison tables (GPS, NOAH: 0.16 M on ViT-B/16).

Difference from AdaptFormer: its adapter reads the residual stream before `norm2` and is added
after the block's drop-path; here it reads the MLP's input (after `norm2`) and shares the
MLP's layer-scale / drop-path (the "parallel adapter" of He et al., 2022). That keeps the module
self-contained and identical across ViT, Swin and ConvNeXt blocks.

ConvNeXt: its blocks' MLP is channels-last `nn.Linear` (convnext_tiny and up) or channels-first
1x1 convolutions (`conv_mlp`, the atto..nano sizes); the adapter works on the channel dim the
MLP uses (last, or 1). Plain CNNs have no such blocks: `NotApplicable`.

`ParallelAdapter` is the one adapter module of sparseft: SPT's structured adapters use it too
(GELU, no scale, dropout on the input).

Not mergeable: the non-linearity between down and up makes the branch non-linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseft.anatomy import head_prefix, in_head
from sparseft.delta import DeltaError
from sparseft.methods.base import CommonOptions, Method, MethodContext, NotApplicable, head_selection, register
from sparseft.methods.modules import Added, attach, parameter_names
from sparseft.selection import Selection

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class ParallelAdapter(Added):
    """scale * up(act(down(x))) over the channel dim `dim` of x, added to a layer's output.

    `dropout` acts on the bottleneck (AdaptFormer) or, with `input_dropout`, on the input (SPT).
    It starts at zero: `up` and both biases are zero, `down` is kaiming-uniform (a=sqrt(5)).
    """

    def __init__(self, in_features: int, bottleneck: int, out_features: int | None = None, *,
                 scale: float = 1.0, dropout: float = 0.0, input_dropout: bool = False, activation: str = "relu",
                 dim: int = -1, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.dim, self.scale, self.input_dropout = dim, scale, input_dropout
        self.down = nn.Linear(in_features, bottleneck, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, out_features or in_features, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.dim == -1 else x.movedim(self.dim, -1)
        h = h.to(self.down.weight.dtype)
        if self.input_dropout:
            h = self.up(self.act(self.down(self.dropout(h))))
        else:
            h = self.up(self.dropout(self.act(self.down(h))))
        h = h * self.scale if self.scale != 1.0 else h
        return (h if self.dim == -1 else h.movedim(-1, self.dim)).to(x.dtype)

    def beside(self, layer: nn.Module) -> None:
        """Run beside `layer`: its output plus this adapter's output on the same input."""
        self.hook(layer, self._add_to_output)

    def _add_to_output(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self(args[0])

    def extra_repr(self) -> str:
        return f"scale={self.scale}, dim={self.dim}"


def _channels(layer: nn.Module, side: str) -> tuple[int, int] | None:
    """(channels, channel dim) at the input ('in') or output ('out') of an MLP layer."""
    if isinstance(layer, nn.Linear):
        return (layer.in_features if side == "in" else layer.out_features), -1
    if isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1):
        return (layer.in_channels if side == "in" else layer.out_channels), 1
    return None


def find_mlps(model: nn.Module) -> dict[str, dict[str, int]]:
    """{MLP module name: {"channels", "dim"}} for every block MLP the adapter fits."""
    head = head_prefix(model)
    found = {}
    for name, module in model.named_modules():
        mlp = getattr(module, "mlp", None)
        if not isinstance(mlp, nn.Module) or in_head(name, head) or not all(hasattr(mlp, a) for a in ("fc1", "fc2")):
            continue
        into, out = _channels(mlp.fc1, "in"), _channels(mlp.fc2, "out")
        if into is not None and into == out:
            found[f"{name}.mlp" if name else "mlp"] = {"channels": into[0], "dim": into[1]}
    return found


@register
class Adapter(Method):
    name = "adapter"
    summary = "AdaptFormer: parallel bottleneck adapter s·up(relu(down(h))) beside every block MLP"
    mergeable = False

    @dataclass
    class Options(CommonOptions):
        adapter_dim: int = field(default=8, metadata={"help": "adapter bottleneck width"})
        adapter_scale: float = field(default=0.1, metadata={"help": "fixed scale s of the adapter output"})
        adapter_dropout: float = field(default=0.1, metadata={"help": "dropout inside the adapter bottleneck"})

    def merge_refusal(self) -> str:
        return ("adapter cannot be merged: the ReLU between its down and up projections makes it a non-linear "
                "branch that no change of the base weights reproduces; use the model with its adapters")

    def validate(self) -> None:
        super().validate()
        self.require(self.options.adapter_dim >= 1, "adapter_dim", ">= 1")

    def check(self, model: nn.Module) -> None:
        if not find_mlps(model):
            raise NotApplicable(f"adapter: {type(model).__name__} has no transformer/ConvNeXt blocks with an MLP "
                                "(`.mlp` with fc1/fc2) to put the adapter beside")

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        o = self.options
        mlps = find_mlps(model)
        ctx.info["adapters"] = len(mlps)
        structure = {"mlps": mlps, "bottleneck": o.adapter_dim, "scale": float(o.adapter_scale),
                     "dropout": float(o.adapter_dropout)}
        return head_selection(model, self.name, structure)

    def inject(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        names: list[str] = []
        for name, spec in structure["mlps"].items():
            mlp = model.get_submodule(name)
            if not hasattr(mlp, "fc1") or _channels(mlp.fc1, "in") != (spec["channels"], spec["dim"]):
                raise DeltaError(f"adapter: '{name}' is not a block MLP of {spec['channels']} channels in this model")
            weight = mlp.fc1.weight
            adapter = ParallelAdapter(int(spec["channels"]), int(structure["bottleneck"]),
                                      scale=float(structure["scale"]), dropout=float(structure["dropout"]),
                                      dim=int(spec["dim"]), device=weight.device,
                                      dtype=weight.dtype if weight.is_floating_point() else torch.float32)
            attach(model, name, "adapter", adapter)
            adapter.beside(mlp)
            names += parameter_names(model, adapter)
        return names
