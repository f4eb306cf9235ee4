"""GPS's scoring pass: the head-free SupCon loss on two views per image, its gradients summed
over the task's batches, and the checks that keep a degenerate pass from selecting anything.

Memory: `chunk_size` runs the batch's forward without gradients, takes the loss gradient with
respect to the features, then re-runs the model chunk by chunk (replaying the random state, so
drop-path draws the same masks) and back-propagates the feature gradient. Peak activation memory
then follows the chunk, not the batch, at the price of one extra forward. Models with BatchNorm
in train mode normalise per chunk in that case. By default (`"auto"`) the chunk is chosen from a
one-image probe so the pass stays below a training step of the same batch (`auto_chunk`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from sparseft import distributed
from sparseft.kinds.base import kind_of
from sparseft.selected import SelectionError
from sparseft.selection.losses import supcon_loss  # noqa: F401 - re-exported (sparseft.selection)

ScoreReduction = Literal["abs_of_sum", "sum_of_abs", "sum_of_squares"]
ChunkSize = int | Literal["auto"] | None
#: below this many bytes of activations and scores a pass is not worth the extra forward of chunking
AUTO_CHUNK_MIN_BYTES = 512 * 2**20
LOSSES = ("supcon", "ce")
BATCH_ADVICE = "use --batch-size >= 2 with at least two classes per batch"


def check_count(value: Any, name: str, flag: str, what: str) -> None:
    """Refuse a count option that is not a whole number >= 1 (SelectionError naming `name` and `flag`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise SelectionError(f"{name} must be a whole number of at least 1 ({flag}, {what}), got {value!r}")


def check_temperature(temperature: Any) -> None:
    """Refuse a SupCon temperature that is not a finite number > 0 (the logits are divided by it)."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise SelectionError(
            f"temperature must be a finite number > 0 (--temperature; GPS uses 0.07), got {temperature!r}: "
            "the SupCon logits are divided by it, so 0 gives a NaN loss and a negative value inverts it")



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
        raise SelectionError("selection loader must yield (images, labels) or ([view1, view2], labels)")
    images, labels = batch
    if isinstance(images, (list, tuple)):
        if len(images) < 2:
            raise SelectionError("a multi-view batch needs at least two views per image")
        return list(images), labels
    if augment is not None:
        return list(augment(images)), labels
    return default_two_views(images, generator), labels


def class_labels(labels: Any, views: list[torch.Tensor], step: int) -> torch.Tensor:
    """`labels` as a 1-D integer tensor with one class index per image of every view, or SelectionError."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SelectionError(f"selection batch {step}: labels must be a tensor of class indices, "
                                 f"got {type(labels).__name__}") from err
    dtype = labels.dtype
    if labels.dim() != 1 or dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        raise SelectionError(
            f"selection batch {step}: labels must be a 1-D integer vector of class indices [B], got shape "
            f"{tuple(labels.shape)} ({str(dtype).removeprefix('torch.')}); one-hot or soft labels [B, C] "
            "need labels.argmax(1), float class ids need .long()")
    sizes = {len(v) for v in views}
    if sizes != {labels.shape[0]}:
        raise SelectionError(f"selection batch {step}: {labels.shape[0]} labels for views of "
                             f"{sorted(sizes)} images")
    return labels


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
                    max_batches: int | None = None, chunk_size: ChunkSize = "auto",
                    autocast: bool | torch.dtype | str = False, seed: int = 0, head: str | None = None,
                    progress: bool | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Accumulated gradient magnitudes for the named parameters over one pass of `loader`.

    `loss="supcon"` is GPS's head-free loss on two views per image; `loss="ce"` uses the model's
    own head (cross-entropy, first view only; plain image batches are used as they are).
    `reduction`: |Σg| (GPS official), Σ|g|, or Σg² (SPT's sensitivity). Returns (scores, counts
    of batches and images; for SupCon also `single_class_batches`, the batches without negatives).

    Raises SelectionError, before any forward pass, for a temperature <= 0 (SupCon), `max_batches`
    or `chunk_size` < 1, or a SupCon loader of batch size 1; per batch for labels that are not a
    1-D integer class vector; after the pass when no batch held two classes (SupCon), or the loss
    (in some batch) or the scores (of some named parameter) are NaN/inf.

    Under a process group it is collective: rank r scores batches r, r+W, ... of `loader` and the
    scores, counts and checks are those of the whole pass on every rank. The random draws of
    batch i (drop-path, the default views) depend on (`seed`, i) only.
    """
    _check_arguments(loader, loss, temperature, reduction, max_batches, chunk_size)
    names = list(names)
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    target = kind_of(model).selection_objective(model, head)  # images or class regions: the task kind's
    features = target.features(model, head)
    per_batch = reduction != "abs_of_sum"  # Σ|g| and Σg² (SPT's sensitivity) accumulate batch by batch
    acc = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names} if per_batch else None
    generator = torch.Generator()
    steps: list[int] = []              # the global index of each batch this rank scored
    losses: list[torch.Tensor] = []    # per batch, checked after the pass (no sync per batch)
    contrast: list[torch.Tensor] = []  # per batch (SupCon): whether it holds two classes, i.e. negatives
    sizes: list[int] = []

    autocast_dtype = autocast if isinstance(autocast, torch.dtype) else torch.bfloat16  # True: bfloat16

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=bool(autocast)):
            return features(x) if loss == "supcon" else model(x)

    def objective(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return target.loss(model, out, y, loss, temperature)

    world, here = distributed.world_size(), distributed.rank()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), scoring_mode(model, set(names)):
        torch.manual_seed(seed)  # a loader shuffling from the global RNG: the same order for a seed, on every rank
        batches = distributed.progress(distributed.shard(loader, "batches"), "GPS scores", progress)
        for local, batch in enumerate(batches):
            step = here + local * world  # rank r scores batches r, r+W, ... of the one batch order
            if max_batches is not None and step >= max_batches:
                break
            torch.manual_seed(_step_seed(seed, step))  # the random draws of batch i depend on (seed, i) only
            generator.manual_seed(_step_seed(seed, step))
            views, labels = _batch_views(batch, loss, augment, generator)
            x = torch.cat([v.to(device) for v in views])
            y, two_classes = target.targets(labels, views, step)
            y = y.to(device)
            if loss == "supcon":
                contrast.append(two_classes)
            if autocast == "auto":  # decided on the first batch's device and image size
                autocast = native_low_precision(device, x) or False
                autocast_dtype = autocast or torch.bfloat16
            if chunk_size == "auto":
                chunk_size = auto_chunk(model, forward, x, len(views[0]), [params[n] for n in names])
            value = _forward_backward(forward, objective, x, y, chunk_size, device)
            if acc is not None:
                _accumulate(acc, params, names, reduction)
            steps.append(step)
            losses.append(value.detach())
            sizes.append(len(views[0]))
        acc = _reduce_over_ranks(acc, params, names)
    table = _batch_table(steps, losses, contrast, sizes)
    stats = _check_pass(table, acc, loss, chunk_size)
    low = autocast not in (False, "auto")  # "auto" with no batch scored ran nothing
    stats["precision"] = {torch.float16: "fp16", torch.bfloat16: "bf16"}[autocast_dtype] if low else "fp32"
    return acc, stats


#: the smallest image side at which a CPU's bf16 pass beat its fp32 pass (DINOv2 ViT-S/14 on an Intel Xeon with
#: AMX, docs/performance.md: 28 px 2.4x slower, 56 px 1.6x faster, 224 px 2.1x faster)
LOW_PRECISION_MIN_SIDE = 56


def native_low_precision(device: torch.device, x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype `precision="auto"` scores under: bfloat16 on a GPU that has it, and on a CPU with bf16
    instructions for images of at least `LOW_PRECISION_MIN_SIDE` px; None (float32) otherwise. bfloat16, the
    precision whose accuracy was measured (float16, the official code's, can underflow without loss scaling)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    if device.type == "cpu" and native() and x.dim() == 4 and min(x.shape[-2:]) >= LOW_PRECISION_MIN_SIDE:
        return torch.bfloat16
    return None


def _check_arguments(loader: Iterable, loss: str, temperature: Any, reduction: str, max_batches: Any,
                     chunk_size: Any) -> None:
    """`gradient_scores`' option checks, before any forward pass (SelectionError naming the flag)."""
    if reduction not in ("abs_of_sum", "sum_of_abs", "sum_of_squares"):
        raise SelectionError(f"reduction must be 'abs_of_sum', 'sum_of_abs' or 'sum_of_squares', not {reduction!r}")
    if loss not in LOSSES:
        raise SelectionError(f"loss must be one of {LOSSES} (--loss), not {loss!r}")
    if loss == "supcon":
        check_temperature(temperature)
    if max_batches is not None:
        check_count(max_batches, "max_batches", "--select-batches", "batches of the selection pass")
    if chunk_size not in (None, "auto"):
        check_count(chunk_size, "chunk_size", "--select-chunk", "images per re-run chunk")
    if loss == "supcon" and getattr(loader, "batch_size", None) == 1:
        raise SelectionError("the selection loader has batch size 1: every SupCon batch then holds one image "
                             "(its two views are each other's only positive, with no negatives), so the loss is 0 "
                             f"and no gradient reaches the weights; {BATCH_ADVICE}")


def _batch_views(batch: Any, loss: str, augment: Callable | None,
                 generator: torch.Generator) -> tuple[list[torch.Tensor], Any]:
    """One batch's views (two or more for SupCon, the first only for cross-entropy) and its labels."""
    if loss == "ce" and isinstance(batch, (list, tuple)) and isinstance(batch[0], torch.Tensor):
        return [batch[0]], batch[1]  # cross-entropy needs no second view
    views, labels = _split_batch(batch, augment, generator)
    return (views[:1] if loss == "ce" else views), labels


def _forward_backward(forward: Callable[[torch.Tensor], torch.Tensor],
                      objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor, chunk_size: int | None, device: torch.device) -> torch.Tensor:
    """The batch's loss, its gradients added to the scored weights' `.grad`: at once, or (`chunk_size`
    smaller than the batch) forward without gradients, then chunk by chunk with the random state replayed."""
    if chunk_size is None or chunk_size >= len(x):
        value = objective(forward(x), y)
        value.backward()
        return value
    spans = [slice(i, i + chunk_size) for i in range(0, len(x), chunk_size)]
    states, outs = [], []
    with torch.no_grad():
        for span in spans:
            states.append(_rng_state(device))
            outs.append(forward(x[span]).float())
    after = _rng_state(device)
    out = torch.cat(outs).requires_grad_(True)
    value = objective(out, y)
    value.backward()
    for span, state in zip(spans, states):
        _set_rng_state(device, state)
        forward(x[span]).float().backward(out.grad[span])
    _set_rng_state(device, after)
    return value


def _accumulate(acc: dict[str, torch.Tensor], params: dict[str, nn.Parameter], names: list[str],
                reduction: str) -> None:
    """Σ|g| or Σg²: add this batch's gradients to the scores and clear them."""
    for n in names:
        if params[n].grad is not None:
            g = params[n].grad.float()
            acc[n] += g.square() if reduction == "sum_of_squares" else g.abs()
            params[n].grad = None


def _reduce_over_ranks(acc: dict[str, torch.Tensor] | None, params: dict[str, nn.Parameter],
                       names: list[str]) -> dict[str, torch.Tensor]:
    """The scores of the whole pass on every rank: per-batch sums added up, or (`acc` None) |Σg|."""
    if acc is not None:
        for score in acc.values():
            distributed.all_reduce_sum(score)
        return acc
    acc = {}  # |Σg|: take each accumulated gradient over, in place (no second copy of the model)
    for n in names:
        grad, params[n].grad = params[n].grad, None
        grad = grad if grad is not None else torch.zeros_like(params[n], dtype=torch.float32)
        acc[n] = distributed.all_reduce_sum(grad).abs_().float()  # |Σg| over every rank's batches
    return acc


def _check_pass(table: torch.Tensor, acc: dict[str, torch.Tensor], loss: str,
                chunk_size: int | None) -> dict[str, Any]:
    """The pass's counts, or SelectionError: no batches, no batch with two classes (SupCon), NaN/inf."""
    stats = {"batches": len(table), "images": int(table[:, 2].sum()), "chunk_size": chunk_size}
    if stats["batches"] == 0:
        raise SelectionError("selection loader yielded no batches (is the training split empty?)")
    if loss == "supcon":
        mixed = int(table[:, 1].sum())
        stats["single_class_batches"] = stats["batches"] - mixed
        if mixed == 0:
            lo, hi = int(table[:, 2].min()), int(table[:, 2].max())
            size = f"{lo}" if lo == hi else f"{lo}-{hi}"
            raise SelectionError(
                f"none of the {stats['batches']} selection batches held two classes (batch size {size}), so the "
                "SupCon loss had no negatives and its gradients carry no class information; "
                f"{BATCH_ADVICE} (shuffle the data if it is sorted by class)")
    finite = table[:, 0].isfinite()
    bad_name = first_nonfinite(acc)
    if bad_name is not None or not bool(finite.all()):
        problems = []
        if bad_name is not None:
            problems.append(f"gradient scores of {nonfinite_where(acc, bad_name)} are not finite")
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            problems.append(f"the {loss} loss is {float(table[first, 0])} in selection batch {first} "
                            f"({int((~finite).sum())} of {len(table)} batches)")
        raise SelectionError("; ".join(problems) + ": the images hold NaN/inf values, or the loss or the gradients "
                             "overflowed; check the data and the model weights (a tiny --temperature or --bf16 "
                             "can overflow too)")
    return stats


def auto_chunk(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               batch_images: int, scored: list[torch.Tensor]) -> int | None:
    """Images per re-run chunk that keep the scoring pass below a training step on `batch_images` images.

    A one-image forward with gradients (random state and BatchNorm statistics untouched) measures
    the activations autograd keeps per image, A. The pass holds the score accumulator S (one float
    per scored weight entry) plus the activations of one chunk; a sparse training step keeps at
    least half of a dense step's activations (about 0.7 measured on ViTs), B·A/2. The chunk is
    the largest with S + chunk·A <= B·A/2, at least 1; None (the batch at once) when the whole
    pass holds less than `AUTO_CHUNK_MIN_BYTES` or the model has BatchNorm in train mode (which
    would normalise per chunk: that changes the scores, so it is only done when asked for).
    """
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        return None
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}
    held: list[torch.UntypedStorage] = []  # alive until the probe ends: no two storages share an address

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        held.append(storage)
        # storages only, and the graph gets nothing: a tensor kept here (or returned) would tie its
        # graph to this hook, a cycle through autograd that holds the model's parameters for good

    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        forward(x[:1])  # never back-propagated
    per_image = max(sum(kept.values()), 1)
    scores = 4 * sum(p.numel() for p in scored)
    if scores + len(x) * per_image < AUTO_CHUNK_MIN_BYTES:
        return None
    chunk = max(1, (batch_images * per_image // 2 - scores) // per_image)
    return None if chunk >= len(x) else int(chunk)


def _step_seed(seed: int, step: int) -> int:
    return (seed + step * 1_000_003) % 2**63  # batch 0 draws from `seed` itself


def _batch_table(steps: list[int], losses: list[torch.Tensor], contrast: list[torch.Tensor],
                 sizes: list[int]) -> torch.Tensor:
    """[batches, 3]: loss, holds two classes (1/0), images of every batch of the pass, in batch
    order, gathered from every rank (each batch was scored by one rank; the others add zeros)."""
    count = torch.tensor([max(steps) + 1 if steps else 0])
    n = int(distributed.all_reduce_max(count))
    table = torch.zeros(n, 3, dtype=torch.float64)
    if steps:
        index = torch.tensor(steps)
        table[index, 0] = torch.stack([v.double().cpu() for v in losses])
        table[index, 1] = torch.stack([c.double().cpu() for c in contrast]) if contrast else 1.0
        table[index, 2] = torch.tensor(sizes, dtype=torch.float64)
    return distributed.all_reduce_sum(table)


def first_nonfinite(scores: dict[str, torch.Tensor]) -> str | None:
    for name, score in scores.items():
        if not bool(torch.isfinite(score).all()):
            return name
    return None


def nonfinite_where(scores: dict[str, torch.Tensor], name: str) -> str:
    bad = int((~torch.isfinite(scores[name])).sum())
    hit = sum(1 for s in scores.values() if not bool(torch.isfinite(s).all()))
    return f"'{name}' ({bad} of {scores[name].numel()} entries NaN/inf; {hit} of {len(scores)} weights affected)"
