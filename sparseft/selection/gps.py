"""GPS: Gradient-based Parameter Selection (Zhang et al., CVPR 2024).

1. Score: one pass over the task's training data; each batch gives two augmented views per
   image; a Supervised Contrastive loss on the L2-normalised pooled pre-logit features (no
   classification head involved) is back-propagated; gradients of the eligible weights are
   summed over batches. Score = |Σg| (official) or Σ|g|.
2. Select: for every neuron (row of a weight viewed as [out, rest]) keep the top-K entries.

Failures are loud: options that cannot work (K < 1, temperature <= 0, ...) are refused before any
forward pass, labels must be a 1-D vector of class indices, and a pass whose batches never held
two classes (no SupCon negatives), whose loss went NaN/inf, or whose scores are NaN/inf or all
zero raises `SelectionError` instead of selecting input column 0 of every row.

The scoring pass and its checks are in `sparseft.selection.scores`; this module holds the
selection rules (per neuron, and the layer / net ablations) and `select`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from sparseft import distributed
from sparseft.anatomy import head_parameter_names
from sparseft.selected import Selection, SelectionError, row_length
from sparseft.selection.rules import Eligibility, parameter_roles
from sparseft.selection.scores import (
    ChunkSize,
    ScoreReduction,
    check_count,
    first_nonfinite,
    gradient_scores,
    nonfinite_where,
)


def top_k_per_neuron(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices of the K highest-scoring entries of every row of each [out, rest] view."""
    if k < 1:
        raise SelectionError(f"K must be at least 1, got {k}")
    chosen = {}
    for name, score in scores.items():
        rows = score.reshape(score.shape[0], -1)
        kk = min(k, rows.shape[1])
        cols = rows.topk(kk, dim=1).indices
        flat = cols + torch.arange(rows.shape[0], device=cols.device)[:, None] * rows.shape[1]
        chosen[name] = flat.reshape(-1).sort().values.cpu()
    return chosen


COLUMN_FLOOR = 0.1  # of the weight's mean score: a nearly silent column cannot win a row on a tiny score


def normalize_columns(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each column's scores divided by that column's mean over the rows (the `score_norm="column"` variant).

    A column is an input of a Linear, or one (input channel, kh, kw) position of a conv viewed as
    [out, in·kh·kw]. A connection's gradient score carries its input's activation scale, so top-K
    rows tend to pick the same few high-activation inputs; after this each row ranks inputs against
    their typical score. The divisor is at least COLUMN_FLOOR × the weight's mean score.
    """
    out = {}
    for name, score in scores.items():
        rows = score.reshape(score.shape[0], -1).float()
        floor = (COLUMN_FLOOR * rows.mean()).clamp_min(torch.finfo(torch.float32).tiny)
        out[name] = (rows / rows.mean(dim=0, keepdim=True).clamp_min(floor)).reshape(score.shape)
    return out


def top_k_per_layer(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Per weight, the same number of entries as neuron level (rows × K), anywhere in the weight."""
    chosen = {}
    for name, score in scores.items():
        rows = score.reshape(score.shape[0], -1)
        n = rows.shape[0] * min(k, rows.shape[1])
        chosen[name] = score.reshape(-1).topk(n).indices.sort().values.cpu()
    return chosen


def top_n_global(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Over the whole network, the same total as neuron level, wherever the highest scores are."""
    names = list(scores)
    total = sum(s.shape[0] * min(k, s[0].numel()) for s in scores.values())
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    top = flat.topk(total).indices.sort().values
    offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
    chosen = {}
    for i, name in enumerate(names):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        part = top[(top >= lo) & (top < hi)] - lo
        chosen[name] = part
    return chosen


def top_columns(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Per weight, every entry of its K input columns with the largest summed score (structured selection).

    A column is an input of a Linear, or one (input channel, kh, kw) position of a conv viewed as
    [out, in·kh·kw]; K columns hold rows × K entries, as many as neuron level's top-K.
    """
    chosen = {}
    for name, score in scores.items():
        rows = score.reshape(score.shape[0], -1).float()
        cols = rows.sum(dim=0).topk(min(k, rows.shape[1])).indices
        flat = cols[None, :] + torch.arange(rows.shape[0], device=cols.device)[:, None] * rows.shape[1]
        chosen[name] = flat.reshape(-1).sort().values.cpu()
    return chosen


def top_rows(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Whole rows (neurons) over the network, as many entries in all as neuron level's top-K.

    Rows are ranked by their mean score per entry (so that long rows do not win by length) and
    taken in that order while they fit the total; a row that would overshoot is skipped and
    shorter rows further down may still fill the rest.
    """
    names = list(scores)
    budget = sum(s.shape[0] * min(k, s[0].numel()) for s in scores.values())
    means = [scores[n].reshape(scores[n].shape[0], -1).float().mean(dim=1).cpu() for n in names]
    owner = torch.cat([torch.full((len(m),), i) for i, m in enumerate(means)])
    row = torch.cat([torch.arange(len(m)) for m in means])
    length = torch.cat([torch.full((len(m),), scores[n][0].numel()) for n, m in zip(names, means)])
    picked: dict[int, list[int]] = {i: [] for i in range(len(names))}
    left = budget
    for j in torch.cat(means).argsort(descending=True, stable=True).tolist():
        if int(length[j]) <= left:
            picked[int(owner[j])].append(int(row[j]))
            left -= int(length[j])
        if left < int(length.min()):
            break
    chosen = {}
    for i, name in enumerate(names):
        width = scores[name][0].numel()
        rows = torch.tensor(sorted(picked[i]), dtype=torch.int64)
        chosen[name] = (rows[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
    return chosen


LEVELS = {"neuron": top_k_per_neuron, "layer": top_k_per_layer, "net": top_n_global, "column": top_columns,
          "row": top_rows}
CRITERIA = ("gradient", "magnitude", "random", "taylor")


def per_neuron_count(shapes: dict[str, tuple[int, ...]], entries: int) -> int:
    """The largest K whose top-K per neuron over `shapes` holds at most `entries` entries (0 if none fits)."""
    def total(k: int) -> int:
        return sum(s[0] * min(k, row_length(s)) for s in shapes.values())

    widest = max((row_length(s) for s in shapes.values()), default=0)
    k = 0
    while k < widest and total(k + 1) <= entries:
        k += 1
    return k


def fill_to(scores: dict[str, torch.Tensor], chosen: dict[str, torch.Tensor], entries: int
            ) -> dict[str, torch.Tensor]:
    """Add the highest-scoring entries not yet chosen, over the whole network, up to `entries` in all."""
    extra = entries - sum(int(c.numel()) for c in chosen.values())
    if extra <= 0:
        return chosen
    names = list(scores)
    flat = []
    for n in names:
        s = scores[n].reshape(-1).float().cpu().clone()
        s[chosen[n]] = -float("inf")
        flat.append(s)
    flat_all = torch.cat(flat)
    top = flat_all.topk(min(extra, int(torch.isfinite(flat_all).sum()))).indices
    offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
    out = {}
    for i, n in enumerate(names):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        part = top[(top >= lo) & (top < hi)] - lo
        out[n] = torch.cat([chosen[n], part]).sort().values
    return out


def criterion_scores(model: nn.Module, names: list[str], criterion: str, seed: int) -> dict[str, torch.Tensor]:
    """Data-free scores for the ablations: |W| (magnitude) or seeded uniform noise (random)."""
    params = dict(model.named_parameters())
    if criterion == "magnitude":
        return {n: params[n].detach().abs().float() for n in names}
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return {n: torch.rand(params[n].shape, generator=g) for n in names}
    raise SelectionError(f"criterion must be one of {CRITERIA}, not {criterion!r}")


def check_scores(scores: dict[str, torch.Tensor], criterion: str = "gradient", loss: str = "supcon") -> None:
    """Refuse scores that cannot rank anything: NaN/inf in any weight, or zero for every weight.

    Either way top-K would pick input column 0 of every row. `criterion`/`loss` shape the advice.
    """
    if not scores:
        return
    name = first_nonfinite(scores)
    if name is not None:
        where = nonfinite_where(scores, name)
        if criterion == "magnitude":
            raise SelectionError(f"magnitude scores: the weights of {where} are not finite; the model's weights "
                                 "are broken (check the checkpoint)")
        raise SelectionError(f"GPS scores of {where} are not finite: the gradients overflowed, or the images or "
                             "model weights hold NaN/inf; check the data and the weights")
    if not any(bool(s.any()) for s in scores.values()):
        if criterion == "magnitude":
            raise SelectionError(f"every eligible weight is zero ({len(scores)} weights), so --criterion magnitude "
                                 "has nothing to rank; load the pretrained weights or use --criterion gradient")
        advice = ("with --loss ce the gradient passes through the head, and a zero-initialised head passes none; "
                  "use --loss supcon" if loss == "ce" else
                  "check that the model's pooled features depend on them (--head names the classifier)")
        raise SelectionError(f"GPS scores are zero for every eligible weight ({len(scores)} weights): no gradient "
                             f"reached them; {advice}")


def _autocast_dtype(model: nn.Module, precision: str) -> torch.dtype | bool | str:
    """What `gradient_scores` runs under for `precision`: False (fp32), the autocast dtype, or "auto"."""
    if precision == "fp32":
        return False
    if precision == "auto":
        return "auto"  # gradient_scores decides on the first batch (scores.native_low_precision)
    device = next(model.parameters()).device
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def select(model: nn.Module, loader: Iterable | None, k: int = 1, *, rules: Eligibility | None = None,
           score: ScoreReduction = "abs_of_sum", temperature: float = 0.07, augment: Callable | None = None,
           max_batches: int | None = None, chunk_size: ChunkSize = "auto", autocast: bool = False,
           seed: int = 0, head: str | None = None, progress: bool | None = None, level: str = "neuron",
           criterion: str = "gradient", loss: Literal["supcon", "ce"] = "supcon",
           score_norm: Literal["none", "column"] = "none", budget: int | None = None,
           reserved: int = 0, precision: Literal["auto", "fp32", "bf16"] = "auto") -> Selection:
    """Run GPS on `model` with the task data in `loader` and return the `Selection`.

    The loader yields `(images, labels)` (two geometric views are made per image) or
    `([view1, view2], labels)` as the official code feeds it. The model is left as it was:
    parameters, gradients, buffers (BatchNorm statistics) and train/eval mode are restored.

    `chunk_size`: images per re-run chunk of the scoring pass (less memory, one extra forward);
    "auto" picks it so the pass stays below a training step of the same batch (see
    `sparseft.selection.scores.auto_chunk`), None scores each batch at once.

    `precision`: "bf16" runs the scoring pass's forwards and backwards under autocast (bfloat16 on
    the CPU; float16 on CUDA, as the official code runs it), scores still accumulated in float32;
    "fp32" does not; "auto" (the default) is bfloat16 autocast where the device runs it natively and
    faster: a GPU with bf16, a CPU with bf16 instructions for images of at least 56 px
    (`scores.native_low_precision`). Measured: bf16 selection level with fp32 in accuracy (rule v2,
    4 tasks x 3 seeds, docs/performance.md), 2-3 % of K=1 entries differ. `autocast=True` is "bf16"
    with bfloat16 on every device.

    Ablations of the paper: `level` neuron (top-K per row) | layer (rows×K per weight) | net
    (the same total over the network); `criterion` gradient | magnitude | random; `loss`
    supcon (head-free) | ce (through the model's randomly initialised head). `score_norm="column"`
    divides each input column's scores by their mean over the rows before ranking (an experiment on
    the top-1 choices' collapse onto a few input channels; "none" is the paper's rule).

    Variants beyond the paper: `level` column (each weight's K input columns with the largest
    summed score) | row (whole neurons over the network, the same number of entries);
    `criterion="taylor"` scores an entry by the first-order importance |Σg·w| (gradient score ×
    |w|). `budget` fixes the total of trainable backbone values instead of K: the parameters trained
    in full (outside the head) and `reserved` values (e.g. a low-rank part added by the caller)
    count against it, K becomes the largest per-neuron count that fits, and what is left goes to
    the highest-scoring remaining entries of the whole network (neuron level only).

    Raises SelectionError (a ValueError) instead of selecting from scores that rank nothing: see
    `gradient_scores` for the options and data it refuses, and `check_scores` for NaN/inf or
    all-zero scores.
    """
    if level not in LEVELS:
        raise SelectionError(f"level must be one of {sorted(LEVELS)} (--level), not {level!r}")
    if criterion not in CRITERIA:
        raise SelectionError(f"criterion must be one of {CRITERIA} (--criterion), not {criterion!r}")
    check_count(k, "k", "--k", "input connections kept per neuron")
    if precision not in ("auto", "fp32", "bf16"):
        raise SelectionError(f"precision must be 'auto', 'fp32' or 'bf16' (select's `precision`), not {precision!r}")
    if score_norm not in ("none", "column"):
        raise SelectionError(f"score_norm must be 'none' or 'column' (--score-norm), not {score_norm!r}")
    roles = parameter_roles(model, rules, head)
    selectable = [n for n, r in roles.items() if r == "select"]
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in selectable}
    full = [n for n, r in roles.items() if r == "full"]
    if budget is not None:
        entries = budget_entries(model, full, head, budget, reserved, level)
        k = per_neuron_count(shapes, entries)
    stats: dict[str, Any] = {}
    if criterion in ("gradient", "taylor"):
        if loader is None:
            raise SelectionError(f"{criterion} selection needs a data loader")
        scores, stats = gradient_scores(model, loader, selectable, loss=loss, temperature=temperature,
                                        reduction=score, augment=augment, max_batches=max_batches,
                                        chunk_size=chunk_size,
                                        autocast=_autocast_dtype(model, precision) if not autocast else True,
                                        seed=seed, head=head,
                                        progress=progress)
        if criterion == "taylor":
            scores = {n: s.mul_(params[n].detach().abs().float()) for n, s in scores.items()}
    else:
        scores = criterion_scores(model, selectable, criterion, seed)
    if criterion != "random":  # random scores need no data and are never NaN or all zero
        check_scores(scores, criterion, loss)
    if score_norm == "column":
        scores = normalize_columns(scores)
    indices = LEVELS[level](scores, k) if k > 0 else {n: torch.zeros(0, dtype=torch.int64) for n in selectable}
    budget_meta: dict[str, Any] = {}
    if budget is not None:
        indices = fill_to(scores, indices, entries)
        budget_meta = {"budget": budget, "reserved": reserved}
    return Selection(
        indices=indices,
        shapes=shapes,
        full=full,
        meta={"method": "gps", "k": k, "level": level, "criterion": criterion, "loss": loss, "score": score,
              "score_norm": score_norm, "temperature": temperature, "seed": seed, "chunk_size": None,
              **stats, "precision": stats.get("precision", "fp32" if precision == "auto" else precision),
              **budget_meta, "world_size": distributed.world_size(),
              "rules": (rules or Eligibility()).to_dict()},
    )


def full_values(model: nn.Module, full: list[str], head: str | None = None) -> int:
    """Values of the parameters `full` trains in full, the head left out (they count against a budget)."""
    heads = set(head_parameter_names(model, head))
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in full if n not in heads)


def budget_entries(model: nn.Module, full: list[str], head: str | None, budget: int, reserved: int,
                   level: str) -> int:
    """Entries a `budget` of trainable backbone values leaves for selection, or SelectionError naming it."""
    if level != "neuron":
        raise SelectionError(f"a budget (--budget) fills top-K per neuron; level {level!r} (--level) takes --k")
    check_count(budget, "budget", "--budget", "trainable backbone values")
    in_full = full_values(model, full, head)
    entries = budget - in_full - reserved
    if entries < 0:
        what = f"{in_full:,} values trained in full (biases, layer scale)" + (
            f" and {reserved:,} values of added modules" if reserved else "")
        raise SelectionError(f"budget {budget:,} (--budget) is below the {what}; raise it, or freeze biases and "
                             "layer scale with --no-train-bias")
    return entries
