"""RoSA-style sparse + low-rank adaptation (after Nikdan et al., ICML 2024), on GPS's scores.

One budget of trainable backbone values is shared by a LoRA of small rank on chosen layers (peft's
LoRA layers, as the `lora` method) and sparse entries of the base weights chosen by GPS's
head-free SupCon gradient scores (the sparse-delta engine, as `gps`). Biases and layer-scale gammas
train in full as in GPS unless `--no-train-bias`; they count against the budget too. The sparse
part takes what is left: the largest top-K per neuron that fits, then the best remaining entries
of the whole network. With no `--budget` the budget is what GPS with the same `--k` trains on
this model, so `rosa` and `gps` compare at equal numbers of trained values by default.

Both parts may sit on the same weight: the LoRA wrapper's base layer is the engine's layer, so
merge folds B·A into the weight that already holds base + sparse delta, and unmerge restores the
base bit-exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseft import delta
from sparseft.anatomy import model_name
from sparseft.errors import InputError
from sparseft.methods.base import MethodContext, NotApplicable, register
from sparseft.methods.gps import GPS
from sparseft.methods.lora import find_targets, fold_lora, inject_lora, parse_targets, suggest_targets
from sparseft.selected import row_length
from sparseft.selection import Selection, parameter_roles
from sparseft.selection.gps import full_values


def lora_values(model: nn.Module, layers: list[str], r: int) -> int:
    """Trainable values of rank-r LoRA factors on `layers` (Linear: r·(in + out))."""
    modules = dict(model.named_modules())
    total = 0
    for name in layers:
        w = modules[name].weight
        total += r * (int(w.shape[0]) + row_length(tuple(w.shape)))
    return total


@register
class RoSA(GPS):
    name = "rosa"
    summary = "RoSA: LoRA of small rank + GPS-selected sparse entries sharing one budget (merges into the weights)"

    @dataclass
    class Options(GPS.Options):
        lora_targets: str = field(default="qkv", metadata={
            "help": "comma-separated module names (or name suffixes) to adapt, e.g. qkv,proj,fc1,fc2 or conv1,conv2"})
        lora_r: int = field(default=1, metadata={"help": "LoRA rank r"})
        lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha; the update is scaled by alpha/r"})
        lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})

    def validate(self) -> None:
        super().validate()
        self.require(self.options.lora_r >= 1, "lora_r", ">= 1")
        if self.options.level != "neuron":
            raise InputError(f"rosa: the sparse part fills top-K per neuron; --level {self.options.level} is not used")
        self._targets()

    def _targets(self) -> list[str]:
        return parse_targets(self.options.lora_targets, self.name)

    def check(self, model: nn.Module) -> None:
        chosen, _ = find_targets(model, self._targets(), conv=False)
        if not chosen:
            raise NotApplicable(f"rosa: no nn.Linear (or 1x1 Conv2d) of {model_name(model)} outside the head "
                                f"matches --lora-targets {self.options.lora_targets}. "
                                f"{suggest_targets(model, conv=False)}")

    def default_budget(self, model: nn.Module) -> int:
        """What GPS with this --k trains on `model`: top-K per neuron plus the values trained in full."""
        roles = parameter_roles(model, self.rules())
        params = dict(model.named_parameters())
        sparse = sum(p.shape[0] * min(self.options.k, row_length(tuple(p.shape)))
                     for n, p in params.items() if roles[n] == "select")
        return sparse + full_values(model, [n for n, r in roles.items() if r == "full"])

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        o = self.options
        t0 = time.perf_counter()
        layers, _ = find_targets(model, self._targets(), conv=False)
        reserved = lora_values(model, layers, o.lora_r)
        budget = o.budget if o.budget is not None else self.default_budget(model)
        selection = self.select(model, ctx, budget=budget, reserved=reserved)
        selection.meta["method"] = self.name
        selection.meta["structure"] = {"layers": layers, "r": o.lora_r, "alpha": float(o.lora_alpha),
                                       "dropout": float(o.lora_dropout)}
        ctx.info["selection_time_s"] = round(time.perf_counter() - t0, 2)
        ctx.info["selected_entries"] = selection.num_sparse
        ctx.info["lora_values"] = reserved
        return selection

    def inject(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        return inject_lora(model, list(structure["layers"]), int(structure["r"]), float(structure["alpha"]),
                           float(structure["dropout"]))

    def fold(self, model: nn.Module) -> dict[str, torch.Tensor]:
        delta.sync(model)  # sparse entries written now: the engine's merge must not rewrite them after B·A is added
        return fold_lora(model)
