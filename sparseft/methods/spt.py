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

import math
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

import sparseft
from sparseft.delta import DeltaError, DeltaState, mark_added, state_of
from sparseft.deltafile import load_delta
from sparseft.methods import Method, MethodContext, register
from sparseft.models import head_parameter_names
from sparseft.select import Selection
from sparseft.select.gps import gradient_scores

EXCLUDED_WORDS = ("cls_token", "patch_embed", "pos_embed")
DEFAULT_BUDGET_FRACTION = 0.005  # ≈ 0.43 M of ViT-B's 86 M, inside the official 0.2-1.0 M sweep
LORA_ADAPTER_NAME = "default"
KINDS = ("lora", "adapter")


# -- sensitivity ----------------------------------------------------------------------------

def scored_parameters(model: nn.Module) -> list[str]:
    """Parameters SPT scores: all but the head and the embeddings (cls_token, patch_embed, pos_embed)."""
    heads = set(head_parameter_names(model))
    return [n for n, _ in model.named_parameters() if n not in heads and not any(w in n for w in EXCLUDED_WORDS)]


def sensitivity(model: nn.Module, loader: Iterable, names: Iterable[str] | None = None, *,
                max_batches: int | None = 16, seed: int = 0,
                autocast: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Σ over batches of g², g the gradient of the cross-entropy loss, per named parameter.

    Runs in train mode (drop-path active, seeded) and leaves the model as it was (parameters,
    gradients, buffers, mode). Returns (scores in float32, counts of batches and images).
    """
    names = scored_parameters(model) if names is None else list(names)
    return gradient_scores(model, loader, names, loss="ce", reduction="sum_of_squares", max_batches=max_batches,
                           autocast=autocast, seed=seed, progress=False)


# -- budget and plan ------------------------------------------------------------------------

def structured_size(kind: str, in_features: int, out_features: int, rank: int) -> int:
    """Parameters of the structured module on an [out, in] weight: LoRA r(in+out); adapter adds biases r+out."""
    if kind == "lora":
        return rank * (in_features + out_features)
    if kind == "adapter":
        return rank * (in_features + out_features) + rank + out_features
    raise ValueError(f"structured kind must be one of {KINDS}, not {kind!r}")


@dataclass
class _Tensor:
    name: str
    numel: int
    kind: str              # "linear": a Linear weight (may get a module); "vector": 1-D; "other"
    module_size: int = 0   # P for a Linear weight
    weight: int = -1       # for a Linear's bias: position of that Linear's weight among the scored tensors


@dataclass
class SPTPlan:
    """What trains how for one τ: structured Linear modules, full vectors, sparse entries."""

    tau: int
    budget: int
    cost: int                                   # trainable backbone values (head excluded)
    structured: list[str]                       # Linear module names that get a structured module
    full: list[str]                             # vectors trained in full (structured Linears' biases included)
    sparse: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> flat indices

    @property
    def num_sparse(self) -> int:
        return sum(int(i.numel()) for i in self.sparse.values())


def _tensors(model: nn.Module, names: list[str], kind: str, rank: int) -> list[_Tensor]:
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    position = {n: i for i, n in enumerate(names)}
    out = []
    for name in names:
        p = params[name]
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name) if owner_name else model
        t = _Tensor(name, p.numel(), "vector" if p.dim() == 1 else "other")
        if isinstance(owner, nn.Linear) and leaf == "weight":
            t.kind = "linear"
            t.module_size = structured_size(kind, owner.in_features, owner.out_features, rank)
        elif isinstance(owner, nn.Linear) and leaf == "bias":
            t.weight = position.get(f"{owner_name}.weight" if owner_name else "weight", -1)
        out.append(t)
    return out


def _decide(tensors: list[_Tensor], counts: list[int], alpha: float,
            beta: float) -> tuple[set[int], set[int], set[int], int]:
    """(structured, full, sparse) tensor positions and the trainable count, given sensitive counts."""
    structured = {i for i, t in enumerate(tensors)
                  if t.kind == "linear" and counts[i] > 0 and counts[i] >= t.module_size / alpha
                  and t.module_size < t.numel}
    full: set[int] = set()
    sparse: set[int] = set()
    cost = sum(tensors[i].module_size for i in structured)
    for i, t in enumerate(tensors):
        c = counts[i]
        if c == 0 or i in structured:
            continue
        # engine limits: a tuned Linear's bias cannot be sparse (peft renames it; the Linear fast path
        # and an injected bias do not combine), so it trains in full
        coupled = t.weight >= 0 and (t.weight in structured or counts[t.weight] > 0)
        if t.kind == "vector" and (c >= t.numel / beta or coupled):
            full.add(i)
            cost += t.numel
        else:
            sparse.add(i)
            cost += c
    return structured, full, sparse, cost


def plan(model: nn.Module, scores: dict[str, torch.Tensor], budget: int, *, kind: str = "lora", rank: int = 8,
         alpha: float = 10.0, beta: float = 5.0, rule: str = "fit") -> SPTPlan:
    """SPT's allocation of the budget from sensitivity `scores` (see the module docstring)."""
    if rule not in ("fit", "tau"):
        raise ValueError(f"budget rule must be 'fit' or 'tau', not {rule!r}")
    if budget < 1:
        raise ValueError(f"the SPT budget must be at least 1 trainable value, got {budget}")
    names = list(scores)
    tensors = _tensors(model, names, kind, rank)
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names]) if names else torch.zeros(0)
    ends = torch.tensor([t.numel for t in tensors], dtype=torch.int64).cumsum(0)
    positive = int((flat > 0).sum())  # entries with no gradient at all are never sensitive

    order = owners = torch.zeros(0, dtype=torch.int64)
    memo: dict[int, tuple] = {}

    def top(m: int) -> None:
        nonlocal order, owners
        order = flat.topk(m).indices if m else torch.zeros(0, dtype=torch.int64)  # sorted, most sensitive first
        owners = torch.bucketize(order, ends, right=True)
        memo.clear()

    def decide(tau: int) -> tuple:
        if tau not in memo:
            counts = torch.bincount(owners[:tau], minlength=len(tensors)).tolist() if tensors else []
            memo[tau] = _decide(tensors, counts, alpha, beta)
        return memo[tau]

    if rule == "tau":
        tau = min(budget, positive)
        top(tau)
    else:
        # the trainable count grows with τ (a structured module replaces at most α× its sensitive count),
        # so search the largest τ that fits; widen the candidate list until the count exceeds the budget
        m = min(positive, 2 * budget)
        top(m)
        while m < positive and decide(m)[3] <= budget:
            m = min(positive, 4 * m)
            top(m)
        if decide(m)[3] <= budget:
            tau = m
        else:
            lo, hi = 0, m
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if decide(mid)[3] <= budget:
                    lo = mid
                else:
                    hi = mid
            tau = lo
    structured, full, sparse, cost = decide(tau)
    chosen, chosen_owner = order[:tau], owners[:tau]
    starts = ends - torch.tensor([t.numel for t in tensors], dtype=torch.int64)
    sparse_idx = {tensors[i].name: (chosen[chosen_owner == i] - starts[i]).sort().values for i in sorted(sparse)}
    return SPTPlan(tau=tau, budget=budget, cost=cost,
                   structured=[tensors[i].name.rpartition(".")[0] for i in sorted(structured)],
                   full=[tensors[i].name for i in sorted(full)], sparse=sparse_idx)


# -- structured modules ---------------------------------------------------------------------

class ParallelAdapter(nn.Module):
    """Bottleneck beside a Linear: y = W x + b + up(GELU(down(dropout(x)))); `up` starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(in_features, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, out_features)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.dropout(x))))


def _adapter_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted Linear: add the adapter's output to the layer's."""
    return output + module.spt_adapter(args[0]).to(output.dtype)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _bias_name(kind: str, module: str) -> str:
    """Where a structured Linear's bias lives: peft moves the layer to `<module>.base_layer`."""
    return f"{module}.base_layer.bias" if kind == "lora" else f"{module}.bias"


def inject(model: nn.Module, structure: dict[str, Any], seed: int | None = None) -> list[str]:
    """Add SPT's structured modules described by `structure` to an applied model.

    Also makes the structured Linears' biases listed in `structure["bias"]` trainable (their base
    values are kept for unmerge). Returns the names of every parameter it made trainable.
    """
    kind, rank, dropout = structure["kind"], int(structure["rank"]), float(structure["dropout"])
    modules, biases = list(structure["modules"]), list(structure["bias"])
    if kind not in KINDS:
        raise DeltaError(f"SPT: unknown structured module kind {kind!r}")
    state = _require_state(model)
    found = dict(model.named_modules())
    bad = [m for m in modules if not isinstance(found.get(m), nn.Linear)]
    if bad:
        raise DeltaError(f"SPT: these modules are not Linear layers of this model: {bad[:5]}")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        if kind == "lora" and modules:
            from peft import LoraConfig, inject_adapter_in_model

            # no scaling (lora_alpha = r), as the official code; exactly these modules (anchored regex)
            config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, bias="none",
                                target_modules="^(?:" + "|".join(re.escape(m) for m in modules) + ")$")
            had_config = "peft_config" in model.__dict__
            inject_adapter_in_model(config, model, adapter_name=LORA_ADAPTER_NAME)
            if not had_config:
                model.__dict__.pop("peft_config", None)  # nothing here uses peft's model-level API
        elif kind == "adapter":
            for m in modules:
                layer = found[m]
                layer.spt_adapter = ParallelAdapter(layer.in_features, layer.out_features, rank, dropout).to(
                    device=layer.weight.device, dtype=layer.weight.dtype)
                layer.register_forward_hook(_adapter_hook)
    for p in model.parameters():  # peft freezes everything but LoRA: restore the engine's choice
        p.requires_grad_(flags.get(id(p), True))
    params = dict(model.named_parameters())
    part = "lora_" if kind == "lora" else "spt_adapter."
    names = [n for n in params if any(n.startswith(f"{m}.{part}") for m in modules)]
    for m in biases:
        name = _bias_name(kind, m)
        params[name].requires_grad_(True)
        state.base_full[name] = params[name].detach().clone()
        names.append(name)
    return names


def remove(model: nn.Module) -> None:
    """Take SPT's structured modules out again (without folding), e.g. after a failed load."""
    peft = sys.modules.get("peft")  # not imported: no peft layer can exist (and importing it takes seconds)
    tuner_layer = peft.tuners.tuners_utils.BaseTunerLayer if peft is not None else ()
    for name, module in list(model.named_modules()):
        if tuner_layer and isinstance(module, tuner_layer):
            _set_submodule(model, name, module.get_base_layer())
        elif "spt_adapter" in module._modules:
            del module._modules["spt_adapter"]
            for key, hook in list(module._forward_hooks.items()):
                if hook is _adapter_hook:
                    del module._forward_hooks[key]


def rebuild(model: nn.Module, structure: dict[str, Any]) -> list[str]:
    """`load_delta` callback: re-create the structured modules a task file names."""
    if structure.get("method") not in SPT_METHODS:
        raise DeltaError(f"not an SPT task file (method {structure.get('method')!r})")
    return inject(model, structure)


def _require_state(model: nn.Module) -> DeltaState:
    state = state_of(model)
    if state is None:
        raise DeltaError("model has no sparseft deltas (prepare or load the SPT task first)")
    return state


# -- the methods ----------------------------------------------------------------------------

class _SPT(Method):
    kind: ClassVar[str]

    @dataclass
    class Options:
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
        batchnorm: str = field(default="update", metadata={
            "help": "BatchNorm statistics: update (saved with the delta) or frozen", "choices": ["update", "frozen"]})

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
                raise ValueError(f"budget_fraction must be in (0, 1], got {fraction}")
            candidates.append(max(1, round(fraction * backbone)))
        return min(candidates)

    def select(self, model: nn.Module, ctx: MethodContext) -> Selection:
        """Score, allocate the budget, and return the sparse/full part with the structured plan in `meta`."""
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
        return Selection(
            indices=sparse, shapes={n: tuple(params[n].shape) for n in sparse},
            full=engine_full + head_parameter_names(model),
            meta={"method": self.name, "kind": self.kind, "budget": budget, "tau": p.tau, "cost": p.cost,
                  "rule": o.budget_rule, "rank": o.rank, "alpha": o.spt_alpha, "beta": o.spt_beta,
                  "structured": p.structured, "structured_bias": structured_biases,
                  "full_vectors": len(p.full), **stats})

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        cached = ctx.run_dir / "spt-selection.safetensors" if ctx.run_dir else None
        if cached is not None and cached.exists():
            selection = Selection.load(cached)  # a resumed run keeps its plan
        else:
            selection = self.select(model, ctx)
            if cached is not None:
                selection.save(cached)
        meta = selection.meta
        sparseft.apply(model, selection, batchnorm=self.options.batchnorm)
        structure = {"method": self.name, "kind": self.kind, "rank": meta["rank"],
                     "dropout": self.options.structured_dropout, "modules": meta["structured"],
                     "bias": meta["structured_bias"]}
        mark_added(model, inject(model, structure, seed=ctx.seed), structure)
        ctx.info.update({"spt_budget": meta["budget"], "spt_tau": meta["tau"],
                         "spt_structured_matrices": len(meta["structured"]),
                         "spt_sparse_entries": selection.num_sparse, "spt_full_vectors": meta["full_vectors"],
                         "spt_trainable_backbone": sparseft.parameter_summary(model)["trainable_backbone"],
                         "spt_budget_used": round(meta["cost"] / max(meta["budget"], 1), 4)})
        return model

    def save(self, model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        state = state_of(model)
        if state is not None and state.structure.get("folded"):
            raise DeltaError("this SPT model was merged: its LoRA is folded into the weights and cannot be saved "
                             "as a task file; save before merging")
        return super().save(model, path, extra)

    def load(self, model: nn.Module, path: str | Path) -> nn.Module:
        try:
            return load_delta(model, path, rebuild=rebuild)
        except Exception:
            remove(model)  # load_delta undid the sparse part; the modules are ours to undo
            raise


@register
class SPTLoRA(_SPT):
    name = "spt-lora"
    summary = "SPT: sensitive entries as sparse deltas, LoRA (peft) on sensitive-dense Linear weights"
    kind = "lora"

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold LoRA into the weights (peft), put the plain Linears back, then merge the sparse part.

        The base values of the folded weights are kept with the engine's state, so
        `sparseft.unmerge` restores the base model bit-exactly.
        """
        state = _require_state(model)
        if state.merged:
            return model
        structure = state.structure
        if structure.get("modules") and structure.get("kind") != "lora":
            raise DeltaError(f"this model holds SPT {structure.get('kind')!r} modules; they cannot be merged")
        with torch.no_grad():
            for m in structure.get("modules", []):
                wrapper = model.get_submodule(m)
                base = wrapper.get_base_layer()
                state.base_full[f"{m}.weight"] = base.weight.detach().clone()
                if m in structure.get("bias", []):
                    state.base_full[f"{m}.bias"] = state.base_full.pop(_bias_name("lora", m))
                wrapper.merge(adapter_names=[LORA_ADAPTER_NAME])
                _set_submodule(model, m, base)
        state.added = []
        state.structure = {**structure, "folded": True}
        return sparseft.merge(model)


@register
class SPTAdapter(_SPT):
    name = "spt-adapter"
    summary = "SPT: sensitive entries as sparse deltas, parallel adapters on sensitive-dense Linear weights"
    kind = "adapter"
    mergeable = False

    def merge(self, model: nn.Module) -> nn.Module:
        raise DeltaError("spt-adapter cannot be merged: an adapter is down-projection -> GELU -> up-projection, "
                         "and the non-linearity cannot be folded into any weight; use the model unmerged "
                         "(or train spt-lora, which merges)")


SPT_METHODS = (SPTLoRA.name, SPTAdapter.name)
