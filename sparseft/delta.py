"""The sparse-delta engine: train selected weight entries without dense gradients.

After `apply(model, selection)`:
- every selected weight stays a frozen parameter that holds the *merged* value base + delta in
  place; its trainable part is a small `values` vector (one entry per selected index) in a
  `SparseDelta` module attached to the layer as `<layer>.sparse_delta[<param name>]`;
- forward uses that dense weight as it is (no copy); when the optimizer has changed `values`
  (detected through the tensor's version counter) the next forward rewrites only the selected
  entries, so any training loop works;
- backward of an `nn.Linear` or `nn.Conv2d` computes the input gradient as usual and, for the
  weight, only the selected entries (sampled dot products, `sparseft.kernels`); other layers
  (timm's Conv2dSame, relative-position tables, any other module) get the gradient of their
  weight as a transient tensor from which the selected entries are gathered: no `.grad`, no
  optimizer state is ever held for frozen weights;
- biases, layer-scale and the head train in full; all other parameters are frozen.

`merge` turns the model into a plain one (no extra modules, parameters or forward overrides);
`unmerge` writes every base value back bit-exactly, from an applied or from a merged model.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparseft.kernels import sampled_conv_weight_grad, sampled_dot, sampled_dot_channels_first
from sparseft.models import fingerprint, head_parameter_names
from sparseft.select.selection import Selection

BatchNormMode = Literal["update", "frozen"]


class DeltaError(RuntimeError):
    """A model in the wrong state for the requested delta operation."""


# -- flat index helpers ------------------------------------------------------------------

def _read_flat(param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return param.detach().reshape(-1).index_select(0, index)


def _write_flat(param: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        values = values.to(param.dtype)
        if param.is_contiguous():
            param.view(-1).index_copy_(0, index, values)
        else:
            param.index_put_(torch.unravel_index(index, param.shape), values)


def _merged_values(base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """base + delta in the delta's precision: the single formula every writer uses."""
    return base.to(values.dtype) + values.detach()


# -- autograd functions ------------------------------------------------------------------

def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _start(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast the inputs as autocast would for this layer and remember the dtypes for backward."""
    compute = _autocast_dtype(x) or x.dtype
    ctx.compute, ctx.x_dtype, ctx.values_dtype = compute, x.dtype, values.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    return x.to(compute), weight.to(compute), None if bias is None else bias.to(compute)


def _bias_grad(ctx, grad: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum of the output gradient over every non-channel dim, accumulated in float32 (or float64)."""
    acc = torch.float64 if ctx.compute == torch.float64 else torch.float32
    return grad.sum(dim=dims, dtype=acc).to(ctx.bias_dtype)


class _SparseLinear(torch.autograd.Function):
    """y = x Wᵀ + b with the gradient of W taken at the selected entries only."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, rows, cpos, ucols):  # noqa: ARG004 - values ties the graph
        xc, wc, bc = _start(ctx, x, weight, bias, values)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, wc, bc)
        x2 = xc.reshape(-1, xc.shape[-1])
        saved_x = x2 if ucols is None else x2.index_select(1, ucols)
        ctx.save_for_backward(saved_x, weight, rows, cpos)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, weight, rows, cpos = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(ctx.compute)
        grad_x = grad_b = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight.to(ctx.compute)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _bias_grad(ctx, g2, (0,))
        if ctx.needs_input_grad[3]:
            grad_values = sampled_dot(g2, saved_x, rows, cpos).to(ctx.values_dtype)
        return grad_x, None, grad_b, grad_values, None, None, None


class _SparsePointwiseConv(torch.autograd.Function):
    """A 1×1, stride-1, ungrouped convolution with the weight gradient at selected entries only."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, rows, cpos, ucols):  # noqa: ARG004 - values ties the graph
        xc, wc, bc = _start(ctx, x, weight, bias, values)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(xc, wc, bc)
        saved_x = xc if ucols is None else xc.index_select(1, ucols)
        ctx.save_for_backward(saved_x, weight, rows, cpos)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, weight, rows, cpos = ctx.saved_tensors
        g = grad_y.to(ctx.compute)
        grad_x = grad_b = grad_values = None
        if ctx.needs_input_grad[0]:
            w2 = weight.reshape(weight.shape[0], -1).to(ctx.compute)
            batch, out_ch, height, width = g.shape
            if height * width < 64:  # small planes: one matmul over all pixels beats many tiny ones
                grad_x = (g.permute(0, 2, 3, 1).reshape(-1, out_ch) @ w2).reshape(batch, height, width, -1)
                grad_x = grad_x.permute(0, 3, 1, 2)
            else:
                grad_x = torch.matmul(w2.t(), g.reshape(batch, out_ch, -1)).reshape(batch, -1, height, width)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _bias_grad(ctx, g, (0, 2, 3))
        if ctx.needs_input_grad[3]:
            grad_values = sampled_dot_channels_first(g, saved_x, rows, cpos).to(ctx.values_dtype)
        return grad_x, None, grad_b, grad_values, None, None, None


class _SparseConv(torch.autograd.Function):
    """A 2-D convolution (any kernel, stride, padding, dilation, groups) with the weight gradient
    at selected entries only; the input gradient comes from ATen's convolution backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, geometry, rows, cpos, ki, kj, ucols):  # noqa: ARG004
        xc, wc, bc = _start(ctx, x, weight, bias, values)
        stride, padding, dilation, groups = geometry
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(xc, wc, bc, stride, padding, dilation, groups)
        saved_x = xc if ucols is None else xc.index_select(1, ucols)
        ctx.save_for_backward(saved_x, weight, rows, cpos, ki, kj)
        ctx.geometry, ctx.x_shape = geometry, x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, weight, rows, cpos, ki, kj = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        g = grad_y.to(ctx.compute)
        grad_x = grad_b = grad_values = None
        if ctx.needs_input_grad[0]:
            shape_only = g.new_empty(1).expand(ctx.x_shape)  # the input gradient needs the input's shape only
            grad_x = torch.ops.aten.convolution_backward(
                g, shape_only, weight.to(ctx.compute), None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False])[0].to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _bias_grad(ctx, g, (0, 2, 3))
        if ctx.needs_input_grad[3]:
            grad_values = sampled_conv_weight_grad(g, saved_x, rows, cpos, ki, kj, tuple(weight.shape[2:]), stride,
                                                   padding, dilation).to(ctx.values_dtype)
        return grad_x, None, grad_b, grad_values, None, None, None, None, None, None


class _InjectDelta(torch.autograd.Function):
    """Pass a frozen weight through unchanged; route its gradient's selected entries to `values`."""

    @staticmethod
    def forward(ctx, weight, values, index):  # noqa: ARG004
        ctx.save_for_backward(index)
        ctx.values_dtype = values.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        (index,) = ctx.saved_tensors
        return None, grad_weight.reshape(-1).index_select(0, index).to(ctx.values_dtype), None


# -- the per-parameter delta module --------------------------------------------------------

class SparseDelta(nn.Module):
    """Trainable `values` at fixed flat `index` entries of one frozen parameter.

    `base` keeps the original values of those entries (for unmerge and for re-writing
    base + values after each update). For layers with a gathered backward (Linear and Conv2d)
    it also keeps, per entry, the output channel (`rows`), the position of its input channel
    among the channels that occur (`cpos`, with `ucols` those channels, or None when all occur)
    and, for convolutions, the kernel offsets (`ki`, `kj`), so the backward saves only the
    input channels the selection uses.
    """

    def __init__(self, param: torch.Tensor, index: torch.Tensor, gathered: bool = False, groups: int = 1,
                 target: str = "weight") -> None:
        super().__init__()
        self.target = target  # the parameter, relative to the module whose forward uses it
        index = index.to(device=param.device, dtype=torch.int64)
        value_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.values = nn.Parameter(torch.zeros(index.numel(), dtype=value_dtype, device=param.device))
        self.register_buffer("index", index)
        self.register_buffer("base", _read_flat(param, index).clone(), persistent=False)
        self.shape = tuple(param.shape)
        self._synced_version = -1
        self.register_buffer("written", self.values.detach().clone(), persistent=False)
        self.gathered = gathered
        if gathered:
            shape = (*param.shape, 1, 1) if param.dim() == 2 else tuple(param.shape)  # Linear as a 1x1 conv
            out_ch, in_per_group = shape[0], shape[1]
            rows, c_local, ki, kj = torch.unravel_index(index, shape)
            channels = (rows // (out_ch // groups)) * in_per_group + c_local  # input channel of each entry
            ucols, cpos = torch.unique(channels, return_inverse=True)
            self.register_buffer("rows", rows.to(torch.int32), persistent=False)
            self.register_buffer("cpos", cpos.to(torch.int32), persistent=False)
            self.register_buffer("ki", ki.to(torch.int32), persistent=False)
            self.register_buffer("kj", kj.to(torch.int32), persistent=False)
            # when every input channel occurs, the backward keeps the whole input as it is
            self.register_buffer("ucols", None if ucols.numel() == in_per_group * groups else ucols,
                                 persistent=False)

    def sync(self, param: torch.Tensor, force: bool = False) -> None:
        """Write base + values into `param` if `values` changed since the last write.

        The version counter catches ordinary in-place updates; the comparison with the values
        last written (O(selected entries)) catches the rest: fused optimizers, `.data` edits.
        """
        values = self.values.detach()
        if force or values._version != self._synced_version or not torch.equal(values, self.written):
            _write_flat(param, self.index, _merged_values(self.base, values))
            self.written.copy_(values)
            self._synced_version = self.values._version

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        incoming = state_dict.get(prefix + "index")
        if incoming is not None and not torch.equal(incoming.to(self.index.device), self.index):
            error_msgs.append(f"{prefix}index: the state dict was saved with another selection of this weight; "
                              "apply that selection first (or load its delta file)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"nnz={self.index.numel()}, shape={self.shape}, gathered={self.gathered}"


def _no_grad_needed(delta: SparseDelta) -> bool:
    return not (torch.is_grad_enabled() and delta.values.requires_grad)


def _sparse_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    delta: SparseDelta = self.sparse_delta["weight"]
    delta.sync(self.weight)
    if _no_grad_needed(delta):
        return F.linear(x, self.weight, self.bias)
    return _SparseLinear.apply(x, self.weight, self.bias, delta.values, delta.rows, delta.cpos, delta.ucols)


def _sparse_pointwise_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    delta: SparseDelta = self.sparse_delta["weight"]
    delta.sync(self.weight)
    if _no_grad_needed(delta):
        return nn.Conv2d.forward(self, x)
    return _SparsePointwiseConv.apply(x, self.weight, self.bias, delta.values, delta.rows, delta.cpos, delta.ucols)


def _sparse_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    delta: SparseDelta = self.sparse_delta["weight"]
    delta.sync(self.weight)
    if _no_grad_needed(delta):
        return nn.Conv2d.forward(self, x)
    geometry = (self.stride, self.padding, self.dilation, self.groups)
    return _SparseConv.apply(x, self.weight, self.bias, delta.values, geometry, delta.rows, delta.cpos, delta.ki,
                             delta.kj, delta.ucols)


_FAST_FORWARDS = (_sparse_linear_forward, _sparse_pointwise_forward, _sparse_conv_forward)


def _holder(module: nn.Module, target: str) -> tuple[nn.Module, str]:
    """The module that owns `target` (a parameter name relative to `module`) and its leaf name."""
    prefix, _, leaf = target.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def _injected_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    originals = []
    try:
        for delta in self.sparse_delta.values():
            holder, leaf = _holder(self, delta.target)
            param = holder._parameters[leaf]
            delta.sync(param)
            originals.append((holder, leaf, param))
            holder._parameters[leaf] = _InjectDelta.apply(param, delta.values, delta.index)
        forward = self._sparseft_prev_forward or types.MethodType(type(self).forward, self)
        return forward(*args, **kwargs)
    finally:
        for holder, leaf, param in originals:
            holder._parameters[leaf] = param


def _frozen_bn_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """`train()` replacement that keeps a BatchNorm layer in eval mode (frozen statistics)."""
    return nn.Module.train(self, False)


def _fast_forward(module: nn.Module, name: str) -> Any:
    """The gathered-gradient forward for this parameter's layer, or None (generic path).

    Linear layers (torch's or timm's) and `nn.Conv2d` layers with zero padding given as numbers
    qualify (pointwise 1×1 convolutions get their own, cheaper path); anything else, including
    subclasses with their own forward (e.g. timm's Conv2dSame), takes the generic path.
    """
    if name != "weight" or "forward" in module.__dict__:
        return None
    forward = type(module).forward
    if isinstance(module, nn.Linear):
        try:
            from timm.layers import Linear as TimmLinear
        except ImportError:  # pragma: no cover - timm is a dependency
            TimmLinear = nn.Linear
        return _sparse_linear_forward if forward in (nn.Linear.forward, TimmLinear.forward) else None
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        pointwise = (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0)
                     and module.dilation == (1, 1) and module.groups == 1)
        return _sparse_pointwise_forward if pointwise else _sparse_conv_forward
    return None


# -- model-level state ---------------------------------------------------------------------

@dataclass
class DeltaState:
    """What sparseft remembers on a model (as `model._sparseft`) between apply and unmerge."""

    selection: Selection
    fingerprint: str
    head: list[str]
    base_full: dict[str, torch.Tensor]
    base_buffers: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    batchnorm: BatchNormMode
    keep_base: bool = True
    base_backbone_params: int = 0
    # parameters of modules a method added (LoRA, adapters, prompts...), and how to rebuild them
    added: list[str] = field(default_factory=list)
    structure: dict[str, Any] = field(default_factory=dict)
    merged: bool = False
    # filled by merge(): per parameter (index, base values, delta values)
    merged_entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def state_of(model: nn.Module) -> DeltaState | None:
    """The model's `DeltaState`, or None for a plain model."""
    return model.__dict__.get("_sparseft")


def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    mod_name, _, leaf = param_name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), leaf


def _user_of(model: nn.Module, param_name: str) -> tuple[str, str]:
    """(module whose forward uses the parameter, parameter name relative to it).

    Usually the owner itself; but nn.MultiheadAttention reads its `out_proj` child's weight and
    bias directly without calling `out_proj`, so those deltas must act in the attention module.
    """
    mod_name, _, leaf = param_name.rpartition(".")
    parent_name, _, child = mod_name.rpartition(".")
    if child == "out_proj":
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            return parent_name, f"out_proj.{leaf}"
    return mod_name, leaf


def _batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def apply(model: nn.Module, selection: Selection, *, batchnorm: BatchNormMode = "update",
          head: str | None = None, keep_base: bool = True) -> nn.Module:
    """Make `model` train only what `selection` names, in place; returns the model.

    `batchnorm="update"` lets BatchNorm running statistics adapt during training (they are
    saved with the delta); `"frozen"` keeps BatchNorm layers in eval mode. `keep_base=False`
    keeps no copy of the parameters trained in full (saves memory when that is most of the
    model, as in full fine-tuning); such a model cannot be unmerged.
    """
    if state_of(model) is not None:
        raise DeltaError("model already has sparseft deltas; merge or unmerge it first")
    if batchnorm not in ("update", "frozen"):
        raise ValueError(f"batchnorm must be 'update' or 'frozen', not {batchnorm!r}")
    selection.check_model(model)
    heads = head_parameter_names(model, head)
    state = DeltaState(
        selection=selection,
        fingerprint=fingerprint(model, exclude=set(heads)),
        head=heads,
        base_full={n: p.detach().clone() for n, p in model.named_parameters()
                   if keep_base and n in set(selection.full)},
        base_buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        batchnorm=batchnorm,
        keep_base=keep_base,
        base_backbone_params=sum(p.numel() for n, p in model.named_parameters() if n not in set(heads)),
    )
    full = set(selection.full)
    for name, p in model.named_parameters():
        p.requires_grad_(name in full)
        p.grad = None
    by_module: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, index in selection.indices.items():
        if index.numel():
            mod_name, target = _user_of(model, name)
            by_module.setdefault(mod_name, []).append((target, index))
    for mod_name, entries in by_module.items():
        module = model.get_submodule(mod_name) if mod_name else model
        # the gathered fast path serves a layer whose only sparse parameter is its own weight;
        # anything else (a sparse bias too, other layers) takes the generic injected path
        fast = _fast_forward(module, entries[0][0]) if len(entries) == 1 else None
        groups = getattr(module, "groups", 1)
        module.sparse_delta = nn.ModuleDict()
        for target, index in entries:
            holder, leaf = _holder(module, target)
            module.sparse_delta[target.replace(".", "__")] = SparseDelta(
                holder._parameters[leaf], index, gathered=fast is not None, groups=groups, target=target)
        if fast is not None:
            module.forward = types.MethodType(fast, module)
        else:
            module._sparseft_prev_forward = module.__dict__.get("forward")
            module._sparseft_injected = True
            module.forward = types.MethodType(_injected_forward, module)
    if batchnorm == "frozen":
        for bn in _batchnorm_modules(model):
            bn.train = types.MethodType(_frozen_bn_train, bn)
            bn.train(False)
    model._sparseft = state
    return model


def mark_added(model: nn.Module, names: list[str], structure: dict[str, Any]) -> None:
    """Record parameters of modules a method injected after `apply`, and how to rebuild them.

    They are saved as `added/<name>` in the task file; `structure` (JSON) goes into its header
    so the method can re-create the modules on a fresh base before the values are loaded.
    """
    state = _require_state(model)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise DeltaError(f"mark_added: the model has no parameters {missing[:5]}")
    state.added = sorted(set(state.added) | set(names))
    state.structure = {**state.structure, **structure}


def _refuse_added(state: DeltaState, action: str) -> None:
    if state.added:
        raise DeltaError(f"cannot {action}: the model has modules added by method "
                         f"{state.structure.get('method', '?')!r}; use that method's {action}")


def _detach_modules(model: nn.Module) -> None:
    """Remove delta modules, forward overrides and BatchNorm overrides."""
    for module in model.modules():
        if "sparse_delta" in module._modules:
            del module._modules["sparse_delta"]
        if getattr(module, "_sparseft_injected", False):
            prev = module.__dict__.pop("_sparseft_prev_forward")
            del module.__dict__["_sparseft_injected"]
            if prev is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = prev
        elif getattr(module.__dict__.get("forward"), "__func__", None) in _FAST_FORWARDS:
            del module.__dict__["forward"]
        if getattr(module.__dict__.get("train"), "__func__", None) is _frozen_bn_train:
            del module.__dict__["train"]


def deltas(model: nn.Module) -> dict[str, SparseDelta]:
    """The live `SparseDelta` modules of an applied model, by parameter name."""
    found = {}
    for mod_name, module in model.named_modules():
        if "sparse_delta" in module._modules:
            for delta in module.sparse_delta.values():
                found[f"{mod_name}.{delta.target}" if mod_name else delta.target] = delta
    return found


def sync(model: nn.Module) -> None:
    """Write base + delta into every selected entry now (forward does it lazily).

    Forward does this itself whenever `values` changed (any optimizer, `.data` edits included);
    call it to see the new weights without a forward.
    """
    for name, delta in deltas(model).items():
        module, leaf = _owner(model, name)
        delta.sync(module._parameters[leaf], force=True)


def _require_state(model: nn.Module) -> DeltaState:
    state = state_of(model)
    if state is None:
        raise DeltaError("model has no sparseft deltas (apply() or load_delta() first)")
    return state


def sparse_entries(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(index, delta values) per selected parameter, for an applied or merged model."""
    state = _require_state(model)
    if state.merged:
        return {n: (idx, vals) for n, (idx, _, vals) in state.merged_entries.items()}
    return {n: (d.index, d.values.detach()) for n, d in deltas(model).items()}


def merge(model: nn.Module) -> nn.Module:
    """Bake the deltas in and drop every sparseft module and override: a plain model remains.

    The base values are kept on the side (not as parameters or buffers) so `unmerge` can
    restore them; `forget_base(model)` drops them.
    """
    state = _require_state(model)
    if state.merged:
        return model
    _refuse_added(state, "merge")
    sync(model)
    state.merged_entries = {n: (d.index.clone(), d.base.clone(), d.values.detach().clone())
                            for n, d in deltas(model).items()}
    _detach_modules(model)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
    state.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base model bit-exactly (weights, biases, head, buffers) and drop the deltas."""
    state = _require_state(model)
    _refuse_added(state, "unmerge")
    if not state.keep_base:
        raise DeltaError("this model was applied with keep_base=False: its base values are gone")
    params = dict(model.named_parameters())
    if state.merged:
        for name, (index, base, _) in state.merged_entries.items():
            _write_flat(params[name], index, base)
    else:
        for name, delta in deltas(model).items():
            _write_flat(params[name], delta.index, delta.base)
        _detach_modules(model)
    with torch.no_grad():
        for name, value in state.base_full.items():
            params[name].copy_(value)
        buffers = dict(model.named_buffers())
        for name, value in state.base_buffers.items():
            if name in buffers:
                buffers[name].copy_(value)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
        p.grad = None
    del model.__dict__["_sparseft"]
    return model


def forget_base(model: nn.Module) -> nn.Module:
    """Drop the remembered base values of a merged model (it can no longer be unmerged)."""
    state = _require_state(model)
    if not state.merged:
        raise DeltaError("forget_base needs a merged model")
    del model.__dict__["_sparseft"]
    return model


@contextlib.contextmanager
def base_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run the base model (deltas written out), e.g. to compare outputs."""
    state = _require_state(model)
    _refuse_added(state, "base_weights")
    if state.merged or not state.keep_base:
        raise DeltaError("base_weights needs an applied (not merged) model that kept its base values")
    params = dict(model.named_parameters())
    saved_full = {n: params[n].detach().clone() for n in state.base_full}
    buffers = dict(model.named_buffers())
    saved_buffers = {n: b.detach().clone() for n, b in buffers.items() if n in state.base_buffers}
    try:
        with torch.no_grad():
            for name, delta in deltas(model).items():
                _write_flat(params[name], delta.index, delta.base)
                delta._synced_version = delta.values._version  # forward keeps the base values
            for n, v in state.base_full.items():
                params[n].copy_(v)
            for n, v in state.base_buffers.items():
                if n in buffers:
                    buffers[n].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved_full.items():
                params[n].copy_(v)
            for n, v in saved_buffers.items():
                buffers[n].copy_(v)
        sync(model)


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable values (parameters with requires_grad), head included."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_summary(model: nn.Module) -> dict[str, Any]:
    """Trainable values split into backbone and head, with the backbone share in percent.

    Sparse deltas count one value per selected entry, added modules (LoRA, adapters, prompts)
    their parameters; the frozen base weights do not count. The share is relative to the base
    backbone's parameter count (head excluded).
    """
    state = state_of(model)
    heads = set(state.head if state else head_parameter_names(model))
    trainable_backbone = trainable_head = total_backbone = 0
    for name, p in model.named_parameters():
        if name in heads:
            trainable_head += p.numel() if p.requires_grad else 0
        else:
            trainable_backbone += p.numel() if p.requires_grad else 0
            total_backbone += p.numel()
    if state is not None:
        total_backbone = state.base_backbone_params  # the base model's, without added modules or deltas
    return {
        "backbone_params": total_backbone,
        "trainable_backbone": trainable_backbone,
        "trainable_head": trainable_head,
        "trainable_total": trainable_backbone + trainable_head,
        "backbone_percent": 100.0 * trainable_backbone / max(total_backbone, 1),
    }
