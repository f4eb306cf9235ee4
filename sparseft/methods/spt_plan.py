"""SPT's allocation: sensitivity scores, then which tensors get structured modules, which train in
full and which entries train sparse under a parameter budget (He et al., ICCV 2023).

See `sparseft.methods.spt` for the method and docs/methods-spt-sct.md for the deviations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseft.anatomy import head_parameter_names
from sparseft.errors import InputError
from sparseft.selection.scores import gradient_scores

EXCLUDED_WORDS = ("cls_token", "patch_embed", "pos_embed")
DEFAULT_BUDGET_FRACTION = 0.005  # ≈ 0.43 M of ViT-B's 86 M, inside the official 0.2-1.0 M sweep
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
    raise InputError(f"structured kind must be one of {KINDS}, not {kind!r}")


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
        raise InputError(f"budget rule must be 'fit' or 'tau', not {rule!r}")
    if budget < 1:
        raise InputError(f"the SPT budget must be at least 1 trainable value, got {budget}")
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
