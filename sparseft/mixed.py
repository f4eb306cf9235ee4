"""One forward pass for a batch whose items use different tasks of one base.

The base model runs once on the whole batch. A forward hook on every module a task changes then
corrects the rows of that task's items: a Linear layer whose weight a task changed at entries adds the
task's sparse products, `Σ_entries Δw · x[..., col]`, and its bias change to the base output in place,
for the items of all tasks in one pass over their rows (`sparseft.kernels.correct.correct_rows`; no task's weight
is formed); a zero-padded convolution changed at entries does the same with shifted input planes
(`correct_conv`); a LayerNorm applies each item's task's weight and bias to one normalisation of the
batch, and timm's LayerScale each item's gamma; any other changed module (BatchNorm statistics, a layer
merged whole, the head) runs again on each task's items with the task's tensors and replaces their rows.
A head with another number of classes than the base's gives those items their own output rows.

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

from sparseft.kernels.correct import TaskChange, correct_conv, correct_rows
from sparseft.sparse_layers import write_flat


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
    known: dict[tuple[int, ...], torch.Tensor] = {}  # task ids per item, formed once per group of tasks
    handles = [modules[owner].register_forward_hook(_corrector(plan, batch, widened, known))
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
               widened: dict[str, torch.Tensor], known: dict[tuple[int, ...], torch.Tensor]) -> Any:
    rerunning = []  # the task's own run of the module below calls this hook too: leave that output alone

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
        if rerunning:
            return output
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)
                and x.shape[0] == batch and output.shape[0] == batch):
            raise NotServed(f"{type(module).__name__} does not see the batch as dim 0")
        linear = [(items, leaves) for _, items, leaves in plan if _sparse_linear(module, leaves)]
        conv = [(items, leaves) for _, items, leaves in plan if _sparse_conv(module, leaves)]
        norm = [(items, leaves) for _, items, leaves in plan if _affine_layer_norm(module, leaves)]
        scale = [(items, leaves) for _, items, leaves in plan if _layer_scale(module, leaves)]
        for group, correct in ((linear, _correct_linear), (conv, _correct_conv), (norm, _layer_norms),
                               (scale, _layer_scales)):
            if group:
                output = correct(module, x, output, group, _task_ids(group, batch, output.device, known))
        done = {id(items) for items, _ in linear + conv + norm + scale}
        for task, items, leaves in plan:
            if id(items) in done:
                continue
            rerunning.append(module)
            try:
                own = _run_again(module, _task_tensors(module, leaves), x[items])
            finally:
                rerunning.pop()
            if own.shape[1:] == output.shape[1:]:
                output[items] = own
            else:
                widened[task] = own
        return output

    return hook


def _task_ids(group: Group, batch: int, device: torch.device,
              known: dict[tuple[int, ...], torch.Tensor]) -> torch.Tensor:
    """For each item of the batch, the position of its task in `group`; -1 for items of no task in it. `known`:
    those already formed in this forward (most layers' groups hold the same tasks)."""
    key = tuple(id(items) for items, _ in group)
    if key not in known:
        ids = torch.full((batch,), -1, dtype=torch.int32, device=device)
        for k, (items, _) in enumerate(group):
            ids[items] = k
        known[key] = ids
    return known[key]


def _sparse_linear(module: nn.Module, leaves: dict[str, TaskTensors]) -> bool:
    """A plain Linear whose weight the task changed at entries (or not at all) and whose bias it may change."""
    return _entries_and_bias(leaves) and _plain_linear(module)


def _entries_and_bias(leaves: dict[str, TaskTensors]) -> bool:
    """The task changed a layer's weight at entries (or not at all) and may have changed its bias, nothing else."""
    return bool(leaves) and not set(leaves) - {"weight", "bias"} and (
        "weight" not in leaves or leaves["weight"].index is not None)


def _plain_linear(module: nn.Module) -> bool:
    """torch's or timm's Linear with its own forward (y = x Wᵀ + b, nothing wrapped around it)."""
    if "forward" in vars(module) or not isinstance(module, nn.Linear):
        return False
    from timm.layers import Linear as TimmLinear

    return type(module).forward in (nn.Linear.forward, TimmLinear.forward)


def _correct_linear(module: nn.Linear, x: torch.Tensor, output: torch.Tensor, group: Group,
                    task: torch.Tensor) -> torch.Tensor:
    """The base layer's `output` with what each task adds on its items (`sparseft.kernels.correct.correct_rows`, in
    place): `Σ_entries Δw · x[..., col]` into the entry's row (no task weight is formed), and its bias change."""
    y = output.contiguous()
    out_features, in_features = module.weight.shape
    correct_rows(y.view(y.shape[0], -1, out_features), x.reshape(y.shape[0], -1, in_features),
                 task, module.weight.detach(), _bias(module),
                 _changes(module, group))
    return y


def _changes(module: nn.Module, group: Group) -> list[TaskChange]:
    """Each task's (entry indices, values, whole bias) of one layer, from its record."""
    out = []
    for _, leaves in group:
        weight, bias = leaves.get("weight"), leaves.get("bias")
        out.append((None if weight is None else weight.index, None if weight is None else weight.value,
                    None if bias is None else _full(module.bias, bias)))
    return out


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def _sparse_conv(module: nn.Module, leaves: dict[str, TaskTensors]) -> bool:
    """A plain zero-padded Conv2d whose weight the task changed at entries (or not at all) and whose bias it
    may change."""
    return (_entries_and_bias(leaves) and type(module) is nn.Conv2d and "forward" not in vars(module)
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


def _correct_conv(module: nn.Conv2d, x: torch.Tensor, output: torch.Tensor, group: Group,
                  task: torch.Tensor) -> torch.Tensor:
    """The base convolution's `output` with what each task adds on its items (`sparseft.kernels.correct.correct_conv`,
    in place): each changed weight entry's product with its input channel's shifted plane, and the bias change."""
    y = output.contiguous()
    correct_conv(y, x, task, module.weight.detach(), _bias(module),
                 _changes(module, group), module.stride, module.padding, module.dilation, module.groups)
    return y


def _affine_layer_norm(module: nn.Module, leaves: dict[str, TaskTensors]) -> bool:
    """A plain LayerNorm over the last dim with weight and bias, of which the task changes one or both."""
    if not leaves or set(leaves) - {"weight", "bias"} or "forward" in vars(module):
        return False
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        return False
    from timm.layers import LayerNorm as TimmLayerNorm

    return (type(module).forward in (nn.LayerNorm.forward, TimmLayerNorm.forward)
            and module.weight is not None and module.bias is not None)


def _layer_norms(module: nn.LayerNorm, x: torch.Tensor, output: torch.Tensor, group: Group,
                 task: torch.Tensor) -> torch.Tensor:
    """The base layer's `output` with each task's items normalised with the task's weight and bias: one
    normalisation of the whole batch, an affine per item."""
    weight = torch.stack([_full(module.weight, leaves["weight"]) if "weight" in leaves else module.weight.detach()
                          for _, leaves in group])
    bias = torch.stack([_full(module.bias, leaves["bias"]) if "bias" in leaves else module.bias.detach()
                        for _, leaves in group])
    normed = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _per_item(output, task, lambda task, view: torch.addcmul(bias[task].view(view), normed,
                                                                      weight[task].view(view)))


def _layer_scale(module: nn.Module, leaves: dict[str, TaskTensors]) -> bool:
    """timm's LayerScale (not in place) whose gamma the task changed."""
    from timm.layers import LayerScale

    return (set(leaves) == {"gamma"} and type(module) is LayerScale and "forward" not in vars(module)
            and not module.inplace)


def _layer_scales(module: nn.Module, x: torch.Tensor, output: torch.Tensor, group: Group,
                  task: torch.Tensor) -> torch.Tensor:
    """The base layer scale's `output` with each task's items scaled by the task's gamma."""
    gamma = torch.stack([_full(module.gamma, leaves["gamma"]) for _, leaves in group])
    return _per_item(output, task, lambda task, view: x * gamma[task].view(view))


def _per_item(output: torch.Tensor, task: torch.Tensor, ours: Any) -> torch.Tensor:
    """`output` with the rows of the items of a task (`task` >= 0) replaced by `ours(task per item, view)`,
    computed for the whole batch at once (the other items keep the base's rows)."""
    task = task.long()
    view = (task.numel(), *[1] * (output.dim() - 2), -1)
    return torch.where((task >= 0).view(view[:-1] + (1,)), ours(task.clamp(min=0), view), output)


def _run_again(module: nn.Module, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`module` on `x` with `tensors` in place of its own: a plain Linear directly, any other through
    `functional_call` (a head of every task, a LoRA task's merged layers: dozens of calls a forward)."""
    if _plain_linear(module) and set(tensors) <= {"weight", "bias"}:
        return F.linear(x, tensors.get("weight", module.weight), tensors.get("bias", module.bias))
    return functional_call(module, tensors, (x,))


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
