"""Visual Prompt Tuning (Jia et al., 2022): learnable tokens in a ViT's token sequence.

`vpt-shallow` inserts P prompt tokens into the input of the first block; `vpt-deep` also
replaces the prompt positions by a fresh set of P learnable tokens at the input of every later
block (the previous block's prompt outputs are discarded), as in the VPT code. The prompts sit
right after the prefix tokens (class token, register tokens of DINOv2-reg models, the
distillation token of DeiT) and before the patch tokens, and carry no position embedding.

After the last block the prompt positions are removed again, so the final norm, the pooling
(class token, or the average over patch tokens, which therefore excludes the prompts) and the
head see the base model's token layout. Everything is done with forward hooks on the blocks,
so it also works when the blocks are run one by one or with gradient checkpointing.

Init as in VPT: uniform(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + dim)) (Xavier-uniform
over the patch-embedding fan-in). Default 10 tokens: VPT tunes P per task over
{1, 5, 10, 50, 100, 200}; 10 is a mid-range value for VTAB-1k.

Not mergeable: prompts are extra inputs of every attention layer, not a change of weights.
Needs a timm `VisionTransformer` (or subclass); anything else (Swin's windows, CNN feature
maps) raises `NotApplicable`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sparseft.delta import DeltaError
from sparseft.methods.base import CommonOptions, Method, MethodContext, NotApplicable, head_selection, register
from sparseft.methods.modules import Added, attach, parameter_names
from sparseft.selection import Selection


class PromptTokens(Added):
    """P learnable tokens that a block's pre-hook inserts at `offset` (first block) or writes over."""

    def __init__(self, count: int, dim: int, offset: int, insert: bool, dropout: float, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.offset, self.insert = offset, insert
        self.tokens = nn.Parameter(torch.zeros(count, dim, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> the sequence with the prompts inserted (or written over) at `offset`."""
        p = self.dropout(self.tokens).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        rest = x[:, self.offset:] if self.insert else x[:, self.offset + p.shape[1]:]
        return torch.cat([x[:, :self.offset], p, rest], dim=1)

    def extra_repr(self) -> str:
        return f"count={self.tokens.shape[0]}, offset={self.offset}, insert={self.insert}"


    def before(self, block: nn.Module) -> None:
        """Put the prompts into `block`'s token input."""
        self.hook(block, self._add, pre=True, with_kwargs=True)

    def _add(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("attn_mask") is not None:
            raise RuntimeError("VPT: attention masks are not supported (they do not cover the prompt tokens)")
        return (self(args[0]), *args[1:]), kwargs


class PromptStrip(Added):
    """Removes the prompt positions from the last block's output: the base token layout remains."""

    def __init__(self, offset: int, count: int) -> None:
        super().__init__()
        self.offset, self.count = offset, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :self.offset], x[:, self.offset + self.count:]], dim=1)

    def extra_repr(self) -> str:
        return f"offset={self.offset}, count={self.count}"


def _check_vit(model: nn.Module, method: str) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer) or len(model.blocks) == 0:
        raise NotApplicable(f"{method} needs a ViT with a token sequence (a timm VisionTransformer); "
                            f"{type(model).__name__} has none")


class _VPT(Method):
    """Shared by the shallow and deep variants."""

    deep: ClassVar[bool]
    mergeable = False

    @dataclass
    class Options(CommonOptions):
        prompt_tokens: int = field(default=10, metadata={"help": "number of prompt tokens (per block for deep)"})
        prompt_dropout: float = field(default=0.0, metadata={"help": "dropout on the prompt tokens"})

    def merge_refusal(self) -> str:
        return (f"{self.name} cannot be merged: its prompts are extra tokens that every attention layer attends "
                "to, not a change of weights; use the model with its prompts")

    def validate(self) -> None:
        super().validate()
        self.require(self.options.prompt_tokens >= 1, "prompt_tokens", ">= 1")

    def check(self, model: nn.Module) -> None:
        _check_vit(model, self.name)

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        o = self.options
        structure = {"tokens": o.prompt_tokens, "deep": self.deep, "dropout": float(o.prompt_dropout)}
        return head_selection(model, self.name, structure)

    def inject(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        _check_vit(model, self.name)
        if bool(structure["deep"]) != self.deep:
            raise DeltaError(f"{self.name}: the file holds {'deep' if structure['deep'] else 'shallow'} prompts")
        count, offset = int(structure["tokens"]), int(model.num_prefix_tokens)
        blocks = list(model.blocks)
        ref = model.patch_embed.proj.weight if hasattr(model.patch_embed, "proj") else blocks[0].norm1.weight
        bound = math.sqrt(6.0 / (3 * math.prod(model.patch_embed.patch_size) + model.embed_dim))
        names: list[str] = []
        for i, block in enumerate(blocks if self.deep else blocks[:1]):
            prompt = PromptTokens(count, model.embed_dim, offset, insert=i == 0, dropout=float(structure["dropout"]),
                                  dtype=ref.dtype, device=ref.device)
            with torch.no_grad():
                prompt.tokens.uniform_(-bound, bound)
            attach(model, f"blocks.{i}", "prompt", prompt)
            prompt.before(block)
            names += parameter_names(model, prompt)
        strip = PromptStrip(offset, count)
        attach(model, f"blocks.{len(blocks) - 1}", "prompt_strip", strip)
        strip.after(blocks[-1])
        return names


@register
class VPTShallow(_VPT):
    name = "vpt-shallow"
    summary = "VPT-shallow: learnable prompt tokens inserted before the first ViT block"
    deep = False


@register
class VPTDeep(_VPT):
    name = "vpt-deep"
    summary = "VPT-deep: a new set of learnable prompt tokens at the input of every ViT block"
    deep = True
