"""GPS: Gradient-based Parameter Selection (Zhang et al., CVPR 2024).

1. Score: one pass over the task's training data; each batch gives two augmented views per
   image; a Supervised Contrastive loss on the L2-normalised pooled pre-logit features (no
   classification head involved) is back-propagated; gradients of the eligible weights are
   summed over batches. Score = |Σg| (official) or Σ|g|.
2. Select: for every neuron (row of a weight viewed as [out, rest]) keep the top-K entries.

Memory: `chunk_size` runs the batch's forward without gradients, takes the loss gradient with
respect to the features, then re-runs the model chunk by chunk (replaying the random state, so
drop-path draws the same masks) and back-propagates the feature gradient. Peak activation memory
then follows the chunk, not the batch, at the price of one extra forward. Models with BatchNorm
in train mode normalise per chunk in that case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparseft.models import feature_fn
from sparseft.selection.rules import Eligibility, parameter_roles
from sparseft.selection.selection import Selection

ScoreReduction = Literal["abs_of_sum", "sum_of_abs", "sum_of_squares"]


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), all anchors against all samples.

    `features` [N, D] holds every view of every image (views stacked along N), `labels` [N].
    Each anchor's positives are the other samples with its label (its own other view included).
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"supcon_loss needs features [N, D] and labels [N], got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.t() / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(1)
    has_pos = count > 0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos] / count[has_pos]
    return -mean_log_prob.mean()


def default_two_views(images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Two geometric views per image (random resized crop 0.2-1 + flip), per image.

    Used when a loader yields plain image batches. Colour jitter and greyscale need unnormalised
    images, so they belong in the data pipeline (`sparseft.data` builds SimCLR-style views).
    """
    from torchvision.transforms.v2 import functional as TF

    size = images.shape[-2:]
    views = []
    for _ in range(2):
        out = torch.empty_like(images)
        for i, img in enumerate(images):
            area = torch.empty(1).uniform_(0.2, 1.0, generator=generator).item()
            ratio = torch.exp(torch.empty(1).uniform_(-0.2877, 0.2877, generator=generator)).item()
            h = max(1, min(size[0], round((area * size[0] * size[1] / ratio) ** 0.5)))
            w = max(1, min(size[1], round((area * size[0] * size[1] * ratio) ** 0.5)))
            top = int(torch.randint(0, size[0] - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, size[1] - w + 1, (1,), generator=generator))
            crop = TF.resized_crop(img, top, left, h, w, list(size), antialias=True)
            if torch.rand(1, generator=generator).item() < 0.5:
                crop = TF.horizontal_flip(crop)
            out[i] = crop
        views.append(out)
    return views


def _split_batch(batch: Any, augment: Callable | None,
                 generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise ValueError("selection loader must yield (images, labels) or ([view1, view2], labels)")
    images, labels = batch
    if isinstance(images, (list, tuple)):
        if len(images) < 2:
            raise ValueError("a multi-view batch needs at least two views per image")
        return list(images), labels
    if augment is not None:
        return list(augment(images)), labels
    return default_two_views(images, generator), labels


@contextlib.contextmanager
def scoring_mode(model: nn.Module, scored: set[str]) -> Iterator[None]:
    """Train mode, gradients only for scored weights; restores flags, grads and buffers after."""
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in scored)
            p.grad = None
        model.train()
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = grads[n]
        model.train(was_training)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def gradient_scores(model: nn.Module, loader: Iterable, names: Iterable[str], *,
                    loss: Literal["supcon", "ce"] = "supcon", temperature: float = 0.07,
                    reduction: ScoreReduction = "abs_of_sum", augment: Callable | None = None,
                    max_batches: int | None = None, chunk_size: int | None = None,
                    autocast: bool = False, seed: int = 0, head: str | None = None,
                    progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Accumulated gradient magnitudes for the named parameters over one pass of `loader`.

    `loss="supcon"` is GPS's head-free loss on two views per image; `loss="ce"` uses the model's
    own head (cross-entropy, first view only; plain image batches are used as they are).
    `reduction`: |Σg| (GPS official), Σ|g|, or Σg² (SPT's sensitivity). Returns (scores, counts
    of batches and images).
    """
    if reduction not in ("abs_of_sum", "sum_of_abs", "sum_of_squares"):
        raise ValueError(f"reduction must be 'abs_of_sum', 'sum_of_abs' or 'sum_of_squares', not {reduction!r}")
    names = list(names)
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    features = feature_fn(model, head)
    per_batch = reduction != "abs_of_sum"  # Σ|g| and Σg² (SPT's sensitivity) accumulate batch by batch
    acc = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names} if per_batch else None
    generator = torch.Generator().manual_seed(seed)
    stats = {"batches": 0, "images": 0}

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return features(x) if loss == "supcon" else model(x)

    def objective(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return supcon_loss(out, y, temperature) if loss == "supcon" else F.cross_entropy(out.float(), y)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), scoring_mode(model, set(names)):
        torch.manual_seed(seed)
        batches = tqdm(loader, desc="GPS scores", disable=not progress, leave=False)
        for step, batch in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            if loss == "ce" and isinstance(batch, (list, tuple)) and isinstance(batch[0], torch.Tensor):
                views, labels = [batch[0]], batch[1]  # cross-entropy needs no second view
            else:
                views, labels = _split_batch(batch, augment, generator)
                views = views[:1] if loss == "ce" else views
            x = torch.cat([v.to(device) for v in views])
            y = labels.to(device).repeat(len(views))
            if chunk_size is None or chunk_size >= len(x):
                objective(forward(x), y).backward()
            else:
                spans = [slice(i, i + chunk_size) for i in range(0, len(x), chunk_size)]
                states, outs = [], []
                with torch.no_grad():
                    for span in spans:
                        states.append(_rng_state(device))
                        outs.append(forward(x[span]).float())
                after = _rng_state(device)
                out = torch.cat(outs).requires_grad_(True)
                objective(out, y).backward()
                for span, state in zip(spans, states):
                    _set_rng_state(device, state)
                    forward(x[span]).float().backward(out.grad[span])
                _set_rng_state(device, after)
            if acc is not None:
                for n in names:
                    if params[n].grad is not None:
                        g = params[n].grad.float()
                        acc[n] += g.square() if reduction == "sum_of_squares" else g.abs()
                        params[n].grad = None
            stats["batches"] += 1
            stats["images"] += len(labels)
        if acc is None:  # |Σg|: take each accumulated gradient over, in place (no second copy of the model)
            acc = {}
            for n in names:
                grad, params[n].grad = params[n].grad, None
                acc[n] = grad.abs_().float() if grad is not None else torch.zeros_like(params[n], dtype=torch.float32)
    if stats["batches"] == 0:
        raise ValueError("selection loader yielded no batches")
    return acc, stats


def top_k_per_neuron(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices of the K highest-scoring entries of every row of each [out, rest] view."""
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")
    chosen = {}
    for name, score in scores.items():
        rows = score.reshape(score.shape[0], -1)
        kk = min(k, rows.shape[1])
        cols = rows.topk(kk, dim=1).indices
        flat = cols + torch.arange(rows.shape[0], device=cols.device)[:, None] * rows.shape[1]
        chosen[name] = flat.reshape(-1).sort().values.cpu()
    return chosen


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


LEVELS = {"neuron": top_k_per_neuron, "layer": top_k_per_layer, "net": top_n_global}
CRITERIA = ("gradient", "magnitude", "random")


def criterion_scores(model: nn.Module, names: list[str], criterion: str, seed: int) -> dict[str, torch.Tensor]:
    """Data-free scores for the ablations: |W| (magnitude) or seeded uniform noise (random)."""
    params = dict(model.named_parameters())
    if criterion == "magnitude":
        return {n: params[n].detach().abs().float() for n in names}
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return {n: torch.rand(params[n].shape, generator=g) for n in names}
    raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")


def select(model: nn.Module, loader: Iterable | None, k: int = 1, *, rules: Eligibility | None = None,
           score: ScoreReduction = "abs_of_sum", temperature: float = 0.07, augment: Callable | None = None,
           max_batches: int | None = None, chunk_size: int | None = None, autocast: bool = False,
           seed: int = 0, head: str | None = None, progress: bool = True, level: str = "neuron",
           criterion: str = "gradient", loss: Literal["supcon", "ce"] = "supcon") -> Selection:
    """Run GPS on `model` with the task data in `loader` and return the `Selection`.

    The loader yields `(images, labels)` (two geometric views are made per image) or
    `([view1, view2], labels)` as the official code feeds it. The model is left as it was:
    parameters, gradients, buffers (BatchNorm statistics) and train/eval mode are restored.

    Ablations of the paper: `level` neuron (top-K per row) | layer (rows×K per weight) | net
    (the same total over the network); `criterion` gradient | magnitude | random; `loss`
    supcon (head-free) | ce (through the model's randomly initialised head).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, not {level!r}")
    roles = parameter_roles(model, rules, head)
    selectable = [n for n, r in roles.items() if r == "select"]
    stats: dict[str, Any] = {}
    if criterion == "gradient":
        if loader is None:
            raise ValueError("gradient selection needs a data loader")
        scores, stats = gradient_scores(model, loader, selectable, loss=loss, temperature=temperature,
                                        reduction=score, augment=augment, max_batches=max_batches,
                                        chunk_size=chunk_size, autocast=autocast, seed=seed, head=head,
                                        progress=progress)
    else:
        scores = criterion_scores(model, selectable, criterion, seed)
    params = dict(model.named_parameters())
    return Selection(
        indices=LEVELS[level](scores, k),
        shapes={n: tuple(params[n].shape) for n in selectable},
        full=[n for n, r in roles.items() if r == "full"],
        meta={"method": "gps", "k": k, "level": level, "criterion": criterion, "loss": loss, "score": score,
              "temperature": temperature, "seed": seed, "chunk_size": chunk_size, **stats,
              "rules": (rules or Eligibility()).to_dict()},
    )
