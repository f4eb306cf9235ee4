"""SCT: Salient Channel Tuning (Zhao et al., "SCT: A Simple Baseline for Parameter-Efficient
Fine-Tuning via Salient Channels", IJCV 2024).

1. Saliency: one forward pass over the training data in eval mode. At every block the residual
   stream after attention (the input of `norm2`) is read; per class, each channel's L2 norm
   over that class's tokens (class / register tokens excluded); the mean over classes is the
   channel's saliency. Only per-class sums of squares are kept (streaming), never activations.
2. Per block the top-K channels (default K = width / 8: 96 of 768 as the official code) get a
   K×K linear map with bias, added back to them: `x[..., idx] += W x[..., idx] + b`, applied to
   the residual stream itself, so both the MLP branch and the skip connection see it.
   Initialisation as the official code: trunc-normal std 0.02, zero bias.

How the residual is reached: in timm's ViT and Swin blocks it is a local variable of
`forward`, so a forward pre-hook on `norm2` modifies `norm2`'s input in place; that tensor is
the one the skip connection adds to afterwards. Autograd handles the in-place update (the
residual add saves nothing for backward); the tests compare against a block forward rewritten
by hand. ConvNeXt has no attention: the module acts on each block's output channels (dim 1)
through a forward hook, i.e. on the residual stream between blocks. Other architectures are
refused with an error.

Not mergeable: the update acts on the residual stream, whose skip path has no weight that could
absorb it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseft.delta import DeltaError
from sparseft.errors import InputError
from sparseft.methods.base import CommonOptions, Method, MethodContext, NotApplicable, head_selection, register
from sparseft.methods.modules import Added, attach, parameter_names
from sparseft.selection import Selection


class SCTError(NotApplicable):
    """A model SCT does not know how to apply to."""


@dataclass
class Site:
    """One block SCT acts on: where its residual stream is read and changed."""

    block: str    # module name of the block
    hook: str     # "norm2": input of block.norm2, channels last; "output": block output, channels at dim 1
    width: int    # channels
    prefix: int   # leading tokens left out of the statistics (class / register tokens)


def _block_kinds() -> dict[Any, str]:
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    return {Block.forward: "vit", SwinTransformerBlock.forward: "swin", ConvNeXtBlock.forward: "convnext"}


def _norm_width(norm: nn.Module) -> int:
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return int(norm.weight.numel())


def sct_sites(model: nn.Module) -> tuple[str, list[Site]]:
    """The architecture ("vit", "swin", "convnext") and the blocks SCT acts on.

    Blocks are recognised by their forward function (timm's pre-norm ViT `Block`, Swin's
    `SwinTransformerBlock`, `ConvNeXtBlock`), so a subclass with another forward is not
    mistaken for one.
    """
    kinds = _block_kinds()
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = 1 if getattr(model, "cls_token", None) is not None else 0
    found: list[Site] = []
    archs = set()
    for name, module in model.named_modules():
        arch = kinds.get(getattr(type(module), "forward", None))
        if arch is None:
            continue
        archs.add(arch)
        if arch == "convnext":
            found.append(Site(name, "output", _norm_width(module.norm), 0))
        else:
            found.append(Site(name, "norm2", _norm_width(module.norm2), int(prefix) if arch == "vit" else 0))
    if not found:
        raise SCTError(
            f"SCT needs transformer blocks with a residual stream after attention (timm ViT/DeiT `Block`, "
            f"Swin `SwinTransformerBlock`) or ConvNeXt blocks; {type(model).__name__} has none. Other CNNs "
            f"(ResNet, MobileNet, EfficientNet) are not supported: use spt-lora/spt-adapter, gps or bitfit")
    if len(archs) > 1:
        raise SCTError(f"SCT: the model mixes block kinds {sorted(archs)}; expected one architecture")
    return archs.pop(), found


# -- saliency -------------------------------------------------------------------------------

def channel_saliency(model: nn.Module, loader: Iterable, sites: list[Site] | None = None, *,
                     max_batches: int | None = None,
                     autocast: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per block: each channel's L2 norm over a class's tokens, averaged over the classes seen.

    Streams: per block only a [classes, channels] table of sums of squares is kept (float64).
    Runs in eval mode without gradients and restores the model's mode.
    """
    if sites is None:
        sites = sct_sites(model)[1]
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {s.block: torch.zeros(0, s.width, dtype=torch.float64, device=device)
                                     for s in sites}
    labels: list[torch.Tensor] = []

    def record(site: Site, x: torch.Tensor) -> None:
        x = x.detach().float()
        if site.hook == "norm2":
            per_image = x.reshape(x.shape[0], -1, x.shape[-1])[:, site.prefix:].square().sum(1)
        else:
            per_image = x.flatten(2).square().sum(2)
        y = labels[-1]
        table = sums[site.block]
        rows = int(y.max()) + 1
        if rows > table.shape[0]:
            table = torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])
        sums[site.block] = table.index_add_(0, y, per_image.double())

    handles = []
    for site in sites:
        block = modules[site.block]
        if site.hook == "norm2":
            handles.append(block.norm2.register_forward_pre_hook(lambda mod, args, s=site: record(s, args[0])))
        else:
            handles.append(block.register_forward_hook(lambda mod, args, out, s=site: record(s, out)))
    class_images = torch.zeros(0, dtype=torch.int64, device=device)
    stats = {"batches": 0, "images": 0}
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for step, batch in enumerate(loader):
                if max_batches is not None and step >= max_batches:
                    break
                images, y = batch[0], batch[1]
                if isinstance(images, (list, tuple)):
                    images = images[0]
                y = y.to(device).long()
                labels.append(y)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    model(images.to(device))
                counts = torch.bincount(y)
                if counts.numel() > class_images.numel():
                    class_images = torch.cat([class_images, class_images.new_zeros(counts.numel() -
                                                                                     class_images.numel())])
                class_images[: counts.numel()] += counts
                stats["batches"] += 1
                stats["images"] += len(y)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if stats["batches"] == 0:
        raise InputError("SCT: the training loader yielded no batches")
    present = class_images > 0
    stats["classes"] = int(present.sum())
    return {b: t.sqrt()[present[: t.shape[0]]].mean(0).float().cpu() for b, t in sums.items()}, stats


def channels_for(width: int, channels: int | None, fraction: float) -> int:
    """K for a block of `width` channels: `channels` if given, else round(width × fraction); 1..width."""
    k = channels if channels is not None else round(width * fraction)
    return max(1, min(int(k), width))


# -- the module -----------------------------------------------------------------------------

class SalientChannelLinear(Added):
    """A K×K linear map on fixed channels, added back to them (a residual update of those channels)."""

    def __init__(self, channels: torch.Tensor, width: int) -> None:
        super().__init__()
        channels = torch.as_tensor(channels, dtype=torch.int64)
        if channels.numel() == 0 or int(channels.min()) < 0 or int(channels.max()) >= width:
            raise SCTError(f"SCT channel indices must lie in 0..{width - 1}")
        self.width = width
        self.register_buffer("index", channels, persistent=False)
        self.linear = nn.Linear(channels.numel(), channels.numel())
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def delta(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """W x[idx] + b along channel dimension `dim` (same layout and dtype as x's selection)."""
        picked = x.index_select(dim, self.index)
        return self.linear(picked.movedim(dim, -1)).movedim(-1, dim).to(x.dtype)

    def on_residual(self, norm2: nn.Module) -> None:
        """Update the residual stream in place: it is `norm2`'s input, which the skip connection adds to."""
        self.hook(norm2, self._update_residual, pre=True)

    def on_output(self, block: nn.Module) -> None:
        """Update `block`'s output channels (dim 1), out of place."""
        self.hook(block, self._update_output)

    def _update_residual(self, norm2: nn.Module, args: tuple) -> None:
        x = args[0]
        x.index_add_(-1, self.index, self.delta(x, -1))

    def _update_output(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.index_add(1, self.index, self.delta(output, 1))

    def extra_repr(self) -> str:
        return f"channels={self.index.numel()} of {self.width}"


# -- the method -----------------------------------------------------------------------------

@register
class SCT(Method):
    name = "sct"
    summary = "Salient Channel Tuning: a KxK map on each block's top-K residual channels (by class-wise L2 norm)"
    mergeable = False

    def merge_refusal(self) -> str:
        return ("sct cannot be merged: its KxK map updates the residual stream itself, and the skip connection "
                "that carries it has no weight to fold the update into; use the model unmerged")

    @dataclass
    class Options(CommonOptions):
        channels: int | None = field(default=None, metadata={
            "help": "salient channels per block (default: width x channel_fraction)"})
        channel_fraction: float = field(default=0.125, metadata={
            "help": "channels per block as a fraction of its width when --channels is not given (official 96/768)"})
        select_batches: int | None = field(default=None, metadata={"help": "limit the saliency pass to N batches"})

    def validate(self) -> None:
        super().validate()
        o = self.options
        self.require(0 < o.channel_fraction <= 1, "channel_fraction", "in (0, 1]")
        self.require(o.channels is None or o.channels >= 1, "channels", ">= 1")
        self.require(o.select_batches is None or o.select_batches >= 1, "select_batches", ">= 1")

    def check(self, model: nn.Module) -> None:
        _, sites = sct_sites(model)
        narrow = min(s.width for s in sites)
        self.require(self.options.channels is None or self.options.channels <= narrow, "channels",
                     f"at most the narrowest block's width ({narrow})")

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        """Saliency pass and top-K per block: the modules to add; the head trains in full."""
        o = self.options
        arch, sites = sct_sites(model)
        t0 = time.perf_counter()
        saliency, stats = channel_saliency(model, ctx.loader("train"), sites, max_batches=o.select_batches,
                                           autocast=ctx.bf16)
        ctx.info["saliency_time_s"] = round(time.perf_counter() - t0, 2)
        chosen = []
        for s in sites:
            k = channels_for(s.width, o.channels, o.channel_fraction)
            idx = saliency[s.block].topk(k).indices.sort().values
            chosen.append({"block": s.block, "hook": s.hook, "width": s.width, "channels": idx.tolist()})
        ctx.info.update({"sct_blocks": len(chosen), "sct_channels": [len(c["channels"]) for c in chosen]})
        structure = {"arch": arch, "sites": chosen, "saliency_images": stats["images"],
                     "saliency_classes": stats["classes"]}
        return head_selection(model, self.name, structure)

    def inject(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        """Add the SCT modules `structure` describes (`<block>.sct`); returns their parameter names."""
        arch, sites = sct_sites(model)
        by_name = {s.block: s for s in sites}
        names = []
        for w in structure["sites"]:
            s = by_name.get(w["block"])
            if s is None or s.hook != w["hook"] or s.width != w["width"] or arch != structure.get("arch"):
                raise DeltaError(f"SCT: block {w['block']!r} ({structure.get('arch')}, {w['hook']}, width "
                                 f"{w['width']}) does not exist in this {arch} model in that form")
            block = model.get_submodule(w["block"]) if w["block"] else model
            weight = next(block.parameters())
            sct = SalientChannelLinear(torch.tensor(w["channels"]), w["width"]).to(device=weight.device,
                                                                                  dtype=weight.dtype)
            attach(model, w["block"], "sct", sct)
            if w["hook"] == "norm2":
                sct.on_residual(block.norm2)
            else:
                sct.on_output(block)
            names += parameter_names(model, sct)
        return names
