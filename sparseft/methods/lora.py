"""LoRA (Hu et al., 2022) through HF peft: W x + (alpha / r) B A x on chosen layers.

The LoRA layers are peft's own (`peft.inject_adapter_in_model`); this module only decides which
layers they go on, records that in the task file so a fresh base can be rebuilt, and merges with
peft's per-layer merge followed by swapping each peft wrapper for its base layer, which leaves a
plain model with the base's module tree and state-dict keys.

Layers adapted: modules whose name is, or ends with `.<target>`, for each target, outside the
head, that are an `nn.Linear` or a pointwise `nn.Conv2d` (1x1, not grouped; the same map as a
Linear, e.g. ConvNeXt's conv-MLP). kxk convolutions are adapted only with `lora_conv` (peft's
LoRA Conv2d: A is a kxk conv to r channels, B a 1x1 conv back); grouped convolutions never.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseft.anatomy import LayerGroup, head_prefix, in_head, layer_groups, layer_kind, model_name
from sparseft.delta import DeltaError
from sparseft.errors import InputError
from sparseft.methods.base import CommonOptions, Method, MethodContext, NotApplicable, head_selection, register
from sparseft.methods.modules import lora_layers, set_submodule
from sparseft.selection import Selection

DEFAULT_TARGETS = "qkv,proj,fc1,fc2"
_kind = layer_kind  # how LoRA sees a layer (sparseft.anatomy): linear, conv, grouped or None


def suggested_groups(model: nn.Module, conv: bool = True) -> tuple[list[LayerGroup], bool]:
    """The layer groups (`sparseft.anatomy.layer_groups`) to suggest as `--lora-targets`, and whether
    they need `--lora-conv`.

    The groups with the most layers among the Linear and 1x1 conv layers (a CNN's pointwise
    convs); the kxk conv groups instead when `conv` and they hold more layers (a ResNet of basic
    blocks). At most four; none when the model has no layer LoRA can adapt.
    """
    groups = [g for g in layer_groups(model) if not g.in_head]

    def best(kind: str) -> list[LayerGroup]:
        found = sorted((g for g in groups if g.kind == kind), key=lambda g: -len(g.names))
        most = len(found[0].names) if found else 0
        return [g for g in found if len(g.names) >= max(min(2, most), most / 2)][:4]

    linear, convs = best("linear"), best("conv") if conv else []
    if sum(len(g.names) for g in convs) > sum(len(g.names) for g in linear):
        return convs, True
    return linear, False


def suggest_targets(model: nn.Module, conv: bool = True) -> str:
    """A sentence for a refusal: `model`'s most frequent adaptable layers as a `--lora-targets` value."""
    picked, needs_conv = suggested_groups(model, conv)
    name = model_name(model)
    listing = f"`sparseft layers {name if name != type(model).__name__ else 'MODEL'}` lists every layer"
    if not picked:
        return f"It has no layer LoRA can adapt (Linear or Conv2d outside the head); {listing}."
    shown = ", ".join(f"{g.target} ({len(g.names)} {g.type})" for g in picked)
    return (f"Its most frequent adaptable layers: {shown}: e.g. --lora-targets {','.join(g.target for g in picked)}"
            f"{' --lora-conv' if needs_conv else ''}; {listing}.")


def find_targets(model: nn.Module, targets: list[str], conv: bool) -> tuple[list[str], dict[str, list[str]]]:
    """Names of the layers to adapt, and the name-matched layers left out (by reason)."""
    head = head_prefix(model)
    chosen: list[str] = []
    skipped: dict[str, list[str]] = {"conv": [], "grouped": [], "other": []}
    for name, module in model.named_modules():
        if not name or in_head(name, head) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        kind = _kind(module)
        if kind == "linear" or (kind == "conv" and conv):
            chosen.append(name)
        else:
            skipped["other" if kind is None else kind].append(name)
    return chosen, skipped


def parse_targets(text: str, owner: str) -> list[str]:
    """The comma-separated --lora-targets as a list; InputError naming the flag when it is empty."""
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise InputError(f"{owner}: --lora-targets is empty")
    return targets


def inject_lora(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float) -> list[str]:
    """Put peft LoRA layers on exactly the modules `names`; returns the LoRA parameters' names.

    The one LoRA injector: the `lora` method and SPT's structured modules both use it.
    """
    from peft import LoraConfig, inject_adapter_in_model

    modules = dict(model.named_modules())
    bad = [n for n in names if n not in modules or _kind(modules[n]) not in ("linear", "conv")]
    if bad:
        raise DeltaError(f"lora: the model has no adaptable layers {bad[:4]}")
    had_config = "peft_config" in model.__dict__
    pattern = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"  # peft full-matches a string target
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, model)
    if not had_config:
        model.__dict__.pop("peft_config", None)  # nothing here uses peft's model-level API
    added = []
    for name in names:
        wrapper = model.get_submodule(name)
        added += [f"{name}.{n}" for n, _ in wrapper.named_parameters() if not n.startswith("base_layer.")]
    return added


def fold_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """Merge every LoRA layer into its base layer (peft's merge) and put the base layer back.

    Returns the weights' values before folding, by parameter name.
    """
    originals: dict[str, torch.Tensor] = {}
    for name, wrapper in lora_layers(model):
        base = wrapper.get_base_layer()
        originals[f"{name}.weight"] = base.weight.detach().clone()
        wrapper.merge(safe_merge=True)  # W += (alpha/r) B A, refusing NaN
        set_submodule(model, name, base)
    return originals


@register
class LoRA(Method):
    """peft's LoRA layers on the layers `lora_targets` names (see the module docstring)."""

    name = "lora"
    summary = "LoRA (peft): low-rank update (alpha/r)·B·A on qkv/proj/fc1/fc2; merges into the weights"

    @dataclass
    class Options(CommonOptions):
        lora_targets: str = field(default=DEFAULT_TARGETS, metadata={
            "help": "comma-separated module names (or name suffixes) to adapt, e.g. qkv,proj,fc1,fc2 or conv1,conv2"})
        lora_r: int = field(default=8, metadata={"help": "LoRA rank r"})
        lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha; the update is scaled by alpha/r"})
        lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})
        lora_conv: bool = field(default=False, metadata={
            "help": "also adapt matching kxk Conv2d layers (CNNs, the ViT patch embedding)"})

    def _targets(self) -> list[str]:
        return parse_targets(self.options.lora_targets, self.name)

    def validate(self) -> None:
        super().validate()
        self.require(self.options.lora_r >= 1, "lora_r", ">= 1")
        self._targets()

    def check(self, model: nn.Module) -> None:
        o = self.options
        targets = self._targets()
        chosen, skipped = find_targets(model, targets, o.lora_conv)
        if skipped["grouped"]:
            raise NotApplicable(f"lora: grouped/depthwise convolutions cannot take LoRA: {skipped['grouped'][:4]}; "
                                "leave them out of --lora-targets")
        if not chosen:
            if skipped["conv"]:
                hint = f"It has matching kxk Conv2d layers ({', '.join(skipped['conv'][:3])}…): pass --lora-conv."
            else:
                hint = suggest_targets(model, conv=True)
            raise NotApplicable(f"lora: no layer of {model_name(model)} matches the targets {','.join(targets)} "
                                f"(nn.Linear or 1x1 Conv2d outside the head). {hint}")

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        o = self.options
        chosen, skipped = find_targets(model, self._targets(), o.lora_conv)
        ctx.info["lora_layers"] = len(chosen)
        if skipped["conv"]:
            ctx.info["lora_skipped_convs"] = skipped["conv"]
        structure = {"layers": chosen, "r": o.lora_r, "alpha": float(o.lora_alpha), "dropout": float(o.lora_dropout)}
        return head_selection(model, self.name, structure)

    def inject(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        return inject_lora(model, list(structure["layers"]), int(structure["r"]), float(structure["alpha"]),
                           float(structure["dropout"]))

    def fold(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return fold_lora(model)
