"""Each item's task's changes added to a layer's base output, in place: mixed-task inference (`sparseft.mixed`).

`correct_rows` (a Linear layer) and `correct_conv` (a zero-padded 2-D convolution) take each task's own
tensors, the flat indices and values of the weight entries it changed and its whole bias, and add to the
rows of that task's items what the task changes: for an entry (o, c), ``(value - w[o, c]) · x[..., c]``
into output o. On CPU the compiled loops of ``correct.c`` do it without forming a task's weight or a
gathered block (built with the sampled-product kernels, `sparseft.kernels.compiled_library`); elsewhere, or
for other dtypes, a pure-torch path computes the same numbers.
"""

from __future__ import annotations

import ctypes

import torch

from sparseft.kernels import backend_for, compiled_library

TaskChange = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
"""One task's change of a layer: the flat indices of the weight entries it changed and their values (None,
None: no entry), and its whole bias (None: unchanged)."""


def correct_rows(y: torch.Tensor, x: torch.Tensor, task: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, changes: list[TaskChange], backend: str | None = None) -> None:
    """Add each item's task's change to a Linear layer's base output, in place (mixed-task inference).

    `y` [B, T, O] is the base output of `x` [B, T, I] through `weight` [O, I] and `bias`. Item i uses task
    k = `task[i]` (-1: the base, untouched): its rows get ``(value - weight[o, c]) * x[i, :, c]`` added at
    column o for each entry (o, c) task k changed (`changes[k]`), and its bias change.
    """
    if y.dim() != 3 or x.dim() != 3 or y.shape[:2] != x.shape[:2] or task.shape != (y.shape[0],):
        raise ValueError(f"correct_rows needs [B, T, O] and [B, T, I] tensors and B task ids, got {tuple(y.shape)}, "
                         f"{tuple(x.shape)} and {tuple(task.shape)}")
    if not _correct_in_c(y, weight, changes, backend):
        correct_rows_torch(y, x, task, weight, bias, changes)
        return
    _call_correct("correct_rows", y, x, (*y.shape[:2], x.shape[2], y.shape[2]), task, weight, bias, changes)


def correct_conv(y: torch.Tensor, x: torch.Tensor, task: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, changes: list[TaskChange], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                 backend: str | None = None) -> None:
    """`correct_rows` for a zero-padded 2-D convolution: `y` [B, O, Ho, Wo] the base output of `x` [B, C, H, W]
    through `weight` [O, C / groups, kh, kw] and `bias`. In place."""
    if y.dim() != 4 or x.dim() != 4 or y.shape[0] != x.shape[0] or task.shape != (y.shape[0],):
        raise ValueError(f"correct_conv needs [B, O, Ho, Wo] and [B, C, H, W] tensors and B task ids, got "
                         f"{tuple(y.shape)}, {tuple(x.shape)} and {tuple(task.shape)}")
    if not _correct_in_c(y, weight, changes, backend):
        correct_conv_torch(y, x, task, weight, bias, changes, stride, padding, dilation, groups)
        return
    _call_correct("correct_conv", y, x, (*x.shape, *y.shape[1:], *weight.shape[2:], groups, *stride, *padding,
                                         *dilation), task, weight, bias, changes)


def _correct_in_c(y: torch.Tensor, weight: torch.Tensor, changes: list[TaskChange], backend: str | None) -> bool:
    same = all(t is None or t.dtype == y.dtype for index, value, b in changes for t in (value, b))
    return (y.dtype in (torch.float32, torch.float64) and weight.dtype == y.dtype and same and y.is_contiguous()
            and weight.is_contiguous() and (backend or backend_for(y)) == "c")


def _call_correct(family: str, y: torch.Tensor, x: torch.Tensor, shape: tuple, task: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor | None, changes: list[TaskChange]) -> None:
    """Run `<family>_{f32,f64}` on y in place, passing x (cast to y's dtype), `shape` and each task's own tensors
    by pointer (the kernel decodes the entries and forms the changes)."""
    x = x.to(y.dtype).contiguous()
    fn = getattr(compiled_library(), f"{family}_{'f64' if y.dtype == torch.float64 else 'f32'}")
    held = [task.to(torch.int32).contiguous()]  # alive until the call returns
    pointers: dict[str, list[int | None]] = {"index": [], "value": [], "bias": []}
    count = torch.tensor([0 if index is None else index.numel() for index, _, _ in changes], dtype=torch.int64)
    for index, value, b in changes:
        index = None if index is None else index.to(torch.int32).contiguous()
        value = None if value is None else value.contiguous()
        b = None if b is None else b.contiguous()
        held += [t for t in (index, value, b) if t is not None]
        for key, t in (("index", index), ("value", value), ("bias", b)):
            pointers[key].append(None if t is None else t.data_ptr())
    arrays = {key: (ctypes.c_void_p * len(changes))(*ptrs) for key, ptrs in pointers.items()}
    base_bias = None if bias is None else bias.detach().contiguous()
    if fn(y.data_ptr(), x.data_ptr(), *shape, held[0].data_ptr(), len(changes), arrays["index"], arrays["value"],
          count.data_ptr(), weight.data_ptr(), arrays["bias"], None if base_bias is None else base_bias.data_ptr(),
          torch.get_num_threads()) != 0:
        raise MemoryError("sparseft correction kernel could not allocate its entries")


#: elements of one gathered block (items × tokens × entries) in `correct_rows_torch`
_CORRECT_BLOCK = 1 << 24


def _entry_change(weight: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return value.to(weight.dtype) - weight.reshape(-1)[index.long()]


def correct_rows_torch(y: torch.Tensor, x: torch.Tensor, task: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, changes: list[TaskChange]) -> None:
    """Reference path of `correct_rows` (any device and dtype): per task, its items' columns gathered in blocks."""
    tokens, in_features = y.shape[1], weight.shape[1]
    for k, (index, value, b) in enumerate(changes):
        items = (task == k).nonzero().flatten()
        if not items.numel():
            continue
        if b is not None:
            y[items] += (b - bias).to(y.dtype)
        if index is None or not index.numel():
            continue
        r, c = index.long() // in_features, index.long() % in_features
        d = _entry_change(weight, index, value).to(y.dtype)
        step = max(1, _CORRECT_BLOCK // max(1, tokens * index.numel()))
        for lo in range(0, items.numel(), step):
            block = items[lo:lo + step]
            part = torch.zeros(block.numel(), tokens, y.shape[2], dtype=y.dtype, device=y.device)
            part.index_add_(2, r, x[block][..., c].to(y.dtype) * d)
            y[block] += part


def correct_conv_torch(y: torch.Tensor, x: torch.Tensor, task: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, changes: list[TaskChange], stride: tuple[int, int],
                       padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> None:
    """Reference path of `correct_conv` (any device and dtype): each task's change as a weight-shaped tensor."""
    for k, (index, value, b) in enumerate(changes):
        items = (task == k).nonzero().flatten()
        if not items.numel():
            continue
        d = torch.zeros_like(weight, dtype=y.dtype)
        if index is not None and index.numel():
            d.view(-1).index_put_((index.long(),), _entry_change(weight, index, value).to(y.dtype), accumulate=True)
        y[items] += torch.nn.functional.conv2d(x[items].to(y.dtype), d, None if b is None else (b - bias).to(y.dtype),
                                               stride, padding, dilation, groups)
