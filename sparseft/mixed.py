"""One forward pass for a batch whose items use different tasks of one base.

The base model runs once on the whole batch. A forward hook on every module a task changes then
corrects the rows of that task's items: a Linear layer whose weight a task changed at entries adds the
task's sparse products, `Σ_entries Δw · x[..., col]`, and its bias change to the base output, for the
items of all tasks in one gather and one scatter (no task's weight is formed); a LayerNorm applies each
item's task's weight and bias to one normalisation of all of them; any other changed module (a
convolution, a layer scale, BatchNorm statistics, a layer merged whole, the head) runs again on each
task's items with the task's tensors and replaces their rows. A head with another number of classes than
the base's gives those items their own output rows.

It serves models whose changed modules are leaves that see the batch as dim 0 (timm's ViTs, CNNs,
ConvNeXt); `TaskBank.predict` checks each task once, on one image, against its own forward, and runs
task by task what it cannot serve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparseft.sparse_layers import read_flat, write_flat


class NotServed(Exception):
    """The model or the tasks are outside what one forward serves (the caller runs task by task)."""


@dataclass
class TaskTensors:
    """One tensor a task changes (what a TaskBank keeps): `value` at the flat `index` (None: whole)."""

    index: torch.Tensor | None
    value: torch.Tensor


def mixed_forward(model: nn.Module, images: torch.Tensor, tasks: Sequence[str | None],
                  changes: Mapping[str, Mapping[str, TaskTensors]]) -> list[torch.Tensor]:
    """Outputs for `images` (one row per image, in order) where item i uses task `tasks[i]` (None: the base).

    `model` holds the base; `changes[task][tensor name]` the task's values (the TaskBank's record).
    Raises `NotServed` when a changed tensor's module is not a leaf, or a module does not see the batch
    as dim 0. Run it under `torch.no_grad()`, in eval mode.
    """
    batch = images.shape[0]
    modules = dict(model.named_modules())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    plans: dict[str, list[tuple[str, torch.Tensor, dict[str, TaskTensors]]]] = {}
    for task in dict.fromkeys(t for t in tasks if t is not None):
        items = torch.tensor([i for i, t in enumerate(tasks) if t == task], device=images.device)
        by_module: dict[str, dict[str, TaskTensors]] = {}
        for name, change in changes[task].items():
            owner, _, leaf = name.rpartition(".")
            module = modules.get(owner)
            if module is None or name not in tensors or next(module.children(), None) is not None:
                raise NotServed(f"{name} is not a tensor of a leaf module (one forward corrects leaf modules' outputs)")
            by_module.setdefault(owner, {})[leaf] = change
        for owner, leaves in by_module.items():
            plans.setdefault(owner, []).append((task, items, leaves))

    widened: dict[str, torch.Tensor] = {}  # heads of another width than the base's: their own rows
    handles = [modules[owner].register_forward_hook(_corrector(plan, batch, widened))
               for owner, plan in plans.items()]
    try:
        out = model(images)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.shape[0] != batch:
        raise NotServed("the model's output is not one row per image")
    rows = list(out.unbind(0))
    for task, head_out in widened.items():
        for i, row in zip([i for i, t in enumerate(tasks) if t == task], head_out.unbind(0)):
            rows[i] = row
    return rows


Group = list[tuple[torch.Tensor, dict[str, TaskTensors]]]  # (items, changed tensors) of each task


def _corrector(plan: list[tuple[str, torch.Tensor, dict[str, TaskTensors]]], batch: int,
               widened: dict[str, torch.Tensor]) -> Any:
    rerunning = []  # the task's own run of the module below calls this hook too: leave that output alone

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
        if rerunning:
            return output
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)
                and x.shape[0] == batch and output.shape[0] == batch):
            raise NotServed(f"{type(module).__name__} does not see the batch as dim 0")
        linear = [(items, leaves) for _, items, leaves in plan if _sparse_linear(module, leaves)]
        norm = [(items, leaves) for _, items, leaves in plan if _affine_layer_norm(module, leaves)]
        if linear:
            output[_items(linear)] += _linear_corrections(module, x, linear)
        if norm:
            output[_items(norm)] = _layer_norms(module, x, norm)
        done = {id(items) for items, _ in linear + norm}
        for task, items, leaves in plan:
            if id(items) in done:
                continue
            rerunning.append(module)
            try:
                own = functional_call(module, _task_tensors(module, leaves), (x[items],))
            finally:
                rerunning.pop()
            if own.shape[1:] == output.shape[1:]:
                output[items] = own
            else:
                widened[task] = own
        return output

    return hook


def _items(group: Group) -> torch.Tensor:
    return torch.cat([items for items, _ in group])


def _task_of_item(group: Group) -> torch.Tensor:
    """For the items of `_items(group)` in order, the position of their task in `group`."""
    counts = torch.tensor([len(items) for items, _ in group], device=group[0][0].device)
    return torch.repeat_interleave(torch.arange(len(group), device=counts.device), counts)


def _sparse_linear(module: nn.Module, leaves: dict[str, TaskTensors]) -> bool:
    """A plain Linear whose weight the task changed at entries (or not at all) and whose bias it may change."""
    if not leaves or set(leaves) - {"weight", "bias"} or "forward" in vars(module) or not isinstance(module, nn.Linear):
        return False
    from timm.layers import Linear as TimmLinear

    return type(module).forward in (nn.Linear.forward, TimmLinear.forward) and (
        "weight" not in leaves or leaves["weight"].index is not None)


#: elements of one gathered block of input columns (items × tokens × entries) in `_linear_corrections`
_BLOCK = 1 << 24


def _linear_corrections(module: nn.Linear, x: torch.Tensor, group: Group) -> torch.Tensor:
    """What each task adds to the base layer's output on its items: `Σ_entries Δw · x[..., col]` into the entry's
    row (no task weight is formed), plus its bias change. All tasks' items at once: their entries padded to one
    count (padding: Δw = 0)."""
    weight = module.weight.detach()
    out_features, in_features = weight.shape
    nnz = max((leaves["weight"].index.numel() for _, leaves in group if "weight" in leaves), default=0)
    rows = torch.zeros(len(group), nnz, dtype=torch.long, device=weight.device)
    cols, delta = torch.zeros_like(rows), torch.zeros(len(group), nnz, dtype=weight.dtype, device=weight.device)
    bias = torch.zeros(len(group), out_features, dtype=weight.dtype, device=weight.device)
    for k, (_, leaves) in enumerate(group):
        if "weight" in leaves:
            index = leaves["weight"].index.long()
            n = index.numel()
            rows[k, :n], cols[k, :n] = index // in_features, index % in_features
            delta[k, :n] = leaves["weight"].value - read_flat(weight, index)
        if "bias" in leaves:
            bias[k] = _full(module.bias, leaves["bias"]) - module.bias.detach()
    task = _task_of_item(group)
    xs = x[_items(group)]
    xs = xs.reshape(xs.shape[0], -1, in_features)
    items, tokens = xs.shape[:2]
    out = bias[task][:, None, :].expand(items, tokens, out_features).clone()
    step = max(1, _BLOCK // max(1, tokens * nnz))
    for lo in range(0, items if nnz else 0, step):  # blocks of items bound the gathered columns' memory
        t = task[lo:lo + step]
        shape = (t.numel(), tokens, nnz)
        picked = torch.gather(xs[lo:lo + step], 2, cols[t][:, None, :].expand(shape)) * delta[t][:, None, :]
        out[lo:lo + step].scatter_add_(2, rows[t][:, None, :].expand(shape), picked)
    return out.reshape(items, *x.shape[1:-1], out_features)


def _affine_layer_norm(module: nn.Module, leaves: dict[str, TaskTensors]) -> bool:
    """A plain LayerNorm over the last dim with weight and bias, of which the task changes one or both."""
    if not leaves or set(leaves) - {"weight", "bias"} or "forward" in vars(module):
        return False
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        return False
    from timm.layers import LayerNorm as TimmLayerNorm

    return (type(module).forward in (nn.LayerNorm.forward, TimmLayerNorm.forward)
            and module.weight is not None and module.bias is not None)


def _layer_norms(module: nn.LayerNorm, x: torch.Tensor, group: Group) -> torch.Tensor:
    """The layer norm of each task's items with the task's weight and bias, all tasks' items at once."""
    weight = torch.stack([_full(module.weight, leaves["weight"]) if "weight" in leaves else module.weight.detach()
                          for _, leaves in group])
    bias = torch.stack([_full(module.bias, leaves["bias"]) if "bias" in leaves else module.bias.detach()
                        for _, leaves in group])
    task = _task_of_item(group)
    normed = F.layer_norm(x[_items(group)], module.normalized_shape, None, None, module.eps)
    view = (task.numel(), *[1] * (normed.dim() - 2), -1)
    return torch.addcmul(bias[task].view(view), normed, weight[task].view(view))


def _task_tensors(module: nn.Module, leaves: dict[str, TaskTensors]) -> dict[str, torch.Tensor]:
    current = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    return {leaf: _full(current[leaf], change) for leaf, change in leaves.items()}


def _full(base: torch.Tensor, change: TaskTensors) -> torch.Tensor:
    """The task's whole tensor: its value, or the base with the task's entries written."""
    if change.index is None:
        return change.value
    out = base.detach().clone()
    write_flat(out, change.index.long(), change.value)
    return out
