"""Which parameters are selected from, trained in full, or frozen.

Defaults follow the official GPS code: normalisation layers, position embeddings (SAM's relative
position tables too) and class / register tokens are frozen; every parameter with "bias" in its name (biases, and Swin's
`relative_position_bias_table`, as the official code's name test does), every layer-scale `gamma`
and the new head are trained in full; every other weight with two or more dimensions (Linear rows,
Conv output channels viewed as [out, in*kh*kw], fused qkv, the patch embedding) is selected from.
`select_bias_tables=True` selects from bias tables per row instead (sparseft 0.1's rule).
Norms are found by module type (BatchNorm, LayerNorm, GroupNorm, RMSNorm and timm's variants)
as well as by the word "norm" in the name, so CNN layers called `bn1` count as norms too.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

from sparseft.anatomy import head_parameter_names

Role = Literal["select", "full", "frozen"]

EMBEDDING_WORDS = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")
#: SAM's (and MViTv2's) relative position tables, frozen with the embeddings as the official GPS SAM
#: code does ("pos" in the name); matched as whole parameter names: the MLP weights of timm's
#: `rel_pos` modules (MaxViT, relpos ViTs) are ordinary weights
POSITION_TABLES = ("rel_pos_h", "rel_pos_w")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class Eligibility:
    """Switches for `parameter_roles`; the defaults reproduce the official GPS code."""

    freeze_norm: bool = True
    freeze_embeddings: bool = True
    train_bias: bool = True
    train_layer_scale: bool = True
    train_head: bool = True
    select_patch_embed: bool = True
    select_bias_tables: bool = False  # True: 2-D bias tables (relative position) are selected from per row
    frozen: tuple[str, ...] = ()   # fnmatch patterns forced frozen (checked first)
    full: tuple[str, ...] = ()     # fnmatch patterns forced to train in full

    def to_dict(self) -> dict:
        """JSON-ready form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Eligibility:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _is_norm_module(mod: nn.Module) -> bool:
    if isinstance(mod, _NORM_TYPES):
        return True
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(mod, rms):
        return True
    return "norm" in type(mod).__name__.lower()


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Parameters owned directly by normalisation modules."""
    names = set()
    for mod_name, mod in model.named_modules():
        if _is_norm_module(mod):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def parameter_roles(model: nn.Module, rules: Eligibility | None = None,
                    head: str | None = None) -> dict[str, Role]:
    """Map every parameter name to 'select', 'full' or 'frozen'."""
    rules = rules or Eligibility()
    heads = set(head_parameter_names(model, head))
    norms = norm_parameter_names(model)
    roles: dict[str, Role] = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatchcase(name, pat) for pat in rules.frozen):
            role: Role = "frozen"
        elif any(fnmatch.fnmatchcase(name, pat) for pat in rules.full):
            role = "full"
        elif name in heads:
            role = "full" if rules.train_head else "frozen"
        elif name in norms or "norm" in name:
            role = "frozen" if rules.freeze_norm else "full"
        elif any(word in name for word in EMBEDDING_WORDS) or leaf in POSITION_TABLES:
            role = "frozen" if rules.freeze_embeddings else ("select" if p.dim() >= 2 else "full")
        elif leaf == "bias":
            role = "full" if rules.train_bias else "frozen"
        elif "bias" in leaf and not (rules.select_bias_tables and p.dim() >= 2):  # e.g. relative_position_bias_table
            role = "full" if rules.train_bias else "frozen"
        elif leaf == "gamma" or "layerscale" in name.replace("_", "").lower():
            role = "full" if rules.train_layer_scale else "frozen"
        elif p.dim() >= 2:
            role = "select" if (rules.select_patch_embed or "patch_embed" not in name) else "frozen"
        else:
            role = "frozen"
        roles[name] = role
    return roles
