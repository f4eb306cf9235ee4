"""SPT: Sensitivity-aware Parameter-efficient fine-Tuning (He et al., ICCV 2023) on the sparse-delta engine.

1. Sensitivity: the squared gradient of the cross-entropy loss (through the model's new random
   head) summed over `select_batches` training batches, in train mode, without augmentation.
   Not scored, and frozen: the head (it trains in full anyway), cls_token, patch_embed, pos_embed.
2. The top-τ scored entries are "sensitive". A Linear weight with at least P/α sensitive
   entries (P: the parameter count of the structured module it would get) gets that module:
   LoRA (`spt-lora`, injected with HF peft) or a parallel bottleneck adapter (`spt-adapter`).
   A vector (norm weight/bias, bias, layer scale) with at least 1/β of its entries sensitive
   trains in full. Every other sensitive entry trains as a sparse delta through the core engine.
3. τ: `budget_rule="fit"` (default) takes the largest τ whose trainable count fits the budget
   (the official code sweeps τ and keeps the count closest to the budget); `"tau"` takes
   τ = budget as the paper states it, so structured modules may overshoot the budget.

Deviations forced by the engine (see docs/methods-spt-sct.md): a Linear's bias never trains as
sparse entries when its weight is tuned (structured or sparse) - it trains in full if any of its
entries is sensitive - and structured modules are only given where P is smaller than the weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sparseft import delta
from sparseft.anatomy import head_parameter_names
from sparseft.errors import InputError
from sparseft.methods.adapter import ParallelAdapter
from sparseft.methods.base import CommonOptions, Method, MethodContext, register
from sparseft.methods.lora import fold_lora, inject_lora
from sparseft.methods.modules import attach, parameter_names
from sparseft.methods.spt_plan import DEFAULT_BUDGET_FRACTION, KINDS, plan, sensitivity
from sparseft.selection import Selection


def _bias_name(kind: str, module: str) -> str:
    """Where a structured Linear's bias lives: peft moves the layer to `<module>.base_layer`."""
    return f"{module}.base_layer.bias" if kind == "lora" else f"{module}.bias"


class _SPT(Method):
    kind: ClassVar[str]
    batchnorm = "update"

    @dataclass
    class Options(CommonOptions):
        budget: int | None = field(default=None, metadata={
            "help": "trainable backbone values (absolute); with --budget-fraction the smaller applies"})
        budget_fraction: float | None = field(default=None, metadata={
            "help": f"budget as a fraction of the backbone's parameters ({DEFAULT_BUDGET_FRACTION} when no budget "
                    "is given: about 0.43 M on ViT-B/16)"})
        budget_rule: str = field(default="fit", metadata={
            "help": "fit: largest top-tau whose trainable count fits the budget; tau: top-tau = budget "
                    "(structured modules may overshoot)", "choices": ["fit", "tau"]})
        rank: int = field(default=8, metadata={"help": "LoRA rank / adapter bottleneck width"})
        spt_alpha: float = field(default=10.0, metadata={
            "help": "a Linear weight gets a structured module when its sensitive count >= module size / alpha"})
        spt_beta: float = field(default=5.0, metadata={
            "help": "a vector trains in full when at least 1/beta of its entries are sensitive"})
        structured_dropout: float = field(default=0.1, metadata={"help": "dropout on the structured modules' input"})
        select_batches: int | None = field(default=16, metadata={"help": "batches of the sensitivity pass"})

    def validate(self) -> None:
        super().validate()
        o = self.options
        self.require(o.rank >= 1, "rank", ">= 1")
        self.require(o.budget is None or o.budget >= 1, "budget", ">= 1 when given")
        self.require(o.budget_fraction is None or 0 < o.budget_fraction <= 1, "budget_fraction", "in (0, 1]")
        self.require(o.select_batches is None or o.select_batches >= 1, "select_batches", ">= 1 when given")
        self.require(o.spt_alpha > 0 and o.spt_beta > 0, "spt_alpha", "> 0 (and --spt-beta too)")

    def budget_for(self, model: nn.Module) -> int:
        """The budget in trainable backbone values, from `budget` and/or `budget_fraction`."""
        o = self.options
        heads = set(head_parameter_names(model))
        backbone = sum(p.numel() for n, p in model.named_parameters() if n not in heads)
        fraction = o.budget_fraction
        if o.budget is None and fraction is None:
            fraction = DEFAULT_BUDGET_FRACTION
        candidates = [int(o.budget)] if o.budget is not None else []
        if fraction is not None:
            if not 0 < fraction <= 1:
                raise InputError(f"{self.name}: budget_fraction (--budget-fraction) must be in (0, 1], got {fraction}")
            candidates.append(max(1, round(fraction * backbone)))
        return min(candidates)

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        """Score, allocate the budget: the sparse/full part, and the structured modules in `meta["structure"]`."""
        o = self.options
        t0 = time.perf_counter()
        scores, stats = sensitivity(model, ctx.loader("train"), max_batches=o.select_batches, seed=ctx.seed,
                                    autocast=ctx.bf16)
        ctx.info["sensitivity_time_s"] = round(time.perf_counter() - t0, 2)
        budget = self.budget_for(model)
        p = plan(model, scores, budget, kind=self.kind, rank=o.rank, alpha=o.spt_alpha, beta=o.spt_beta,
                 rule=o.budget_rule)
        params = dict(model.named_parameters())
        structured_biases = [m for m in p.structured if f"{m}.bias" in p.full]
        engine_full = [n for n in p.full if n.rpartition(".")[0] not in set(structured_biases)]
        position = {n: i for i, n in enumerate(params)}
        sparse = dict(sorted(p.sparse.items(), key=lambda kv: position[kv[0]]))  # model order: weight before bias
        selection = Selection(
            indices=sparse, shapes={n: tuple(params[n].shape) for n in sparse},
            full=engine_full + head_parameter_names(model),
            meta={"method": self.name, "kind": self.kind, "budget": budget, "tau": p.tau, "cost": p.cost,
                  "rule": o.budget_rule, "rank": o.rank, "alpha": o.spt_alpha, "beta": o.spt_beta,
                  "structured": p.structured, "structured_bias": structured_biases,
                  "full_vectors": len(p.full), **stats,
                  "structure": {"kind": self.kind, "rank": o.rank, "dropout": o.structured_dropout,
                                "modules": p.structured, "bias": structured_biases}})
        ctx.info.update({"spt_budget": budget, "spt_tau": p.tau, "spt_structured_matrices": len(p.structured),
                         "spt_sparse_entries": sum(int(i.numel()) for i in sparse.values()),
                         "spt_full_vectors": len(p.full), "spt_budget_used": round(p.cost / max(budget, 1), 4)})
        return selection

    def inject(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        """The structured modules on the Linears `structure["modules"]`; their biases in `"bias"` train in full."""
        kind, rank, dropout = structure["kind"], int(structure["rank"]), float(structure["dropout"])
        modules, biases = list(structure["modules"]), list(structure["bias"])
        if kind not in KINDS:
            raise delta.DeltaError(f"SPT: unknown structured module kind {kind!r}")
        found = dict(model.named_modules())
        bad = [m for m in modules if not isinstance(found.get(m), nn.Linear)]
        if bad:
            raise delta.DeltaError(f"SPT: these modules are not Linear layers of this model: {bad[:5]}")
        params = dict(model.named_parameters())
        delta.remember_base(model, {f"{m}.bias": params[f"{m}.bias"] for m in biases})  # plain names: unmerge
        names: list[str] = []
        if kind == "lora" and modules:
            # no scaling (lora_alpha = r), as the official code
            names += inject_lora(model, modules, rank, float(rank), dropout)
        elif kind == "adapter":
            for m in modules:
                layer = found[m]
                adapter = ParallelAdapter(layer.in_features, rank, layer.out_features, activation="gelu",
                                          dropout=dropout, input_dropout=True, device=layer.weight.device,
                                          dtype=layer.weight.dtype)
                attach(model, m, "spt_adapter", adapter)
                adapter.beside(layer)
                names += parameter_names(model, adapter)
        return names + [_bias_name(kind, m) for m in biases]


@register
class SPTLoRA(_SPT):
    name = "spt-lora"
    summary = "SPT: sensitive entries as sparse deltas, LoRA (peft) on sensitive-dense Linear weights"
    kind = "lora"

    def fold(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """LoRA folded into the weights (peft); the structured biases' base values were kept at inject."""
        return fold_lora(model)


@register
class SPTAdapter(_SPT):
    name = "spt-adapter"
    summary = "SPT: sensitive entries as sparse deltas, parallel adapters on sensitive-dense Linear weights"
    kind = "adapter"
    mergeable = False

    def merge_refusal(self) -> str:
        return ("spt-adapter cannot be merged: an adapter is down-projection -> GELU -> up-projection, and the "
                "non-linearity cannot be folded into any weight; use the model unmerged (or train spt-lora)")
