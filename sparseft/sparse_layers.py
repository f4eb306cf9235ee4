"""Sparse layers: the per-layer half of the sparse-delta engine.

A layer with selected entries gets a `SparseDelta` per selected parameter (trainable `values`
at fixed flat indices, the base values of those entries kept aside) and a forward that writes
base + values into the frozen weight when the optimizer changed them. Linear and Conv2d layers
compute the weight gradient only at the selected entries (sampled dot products in
`sparseft.kernels`); any other layer routes the selected entries of a transient weight gradient
to `values`. `install` / `uninstall` are the only ways in and out; `sparseft.delta` owns the
model-level state and calls them.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseft.kernels import (
    sampled_conv_weight_grad_op,
    sampled_dot_and_colsum_op,
    sampled_dot_channels_first_op,
    sampled_dot_op,
)

# -- flat index helpers ------------------------------------------------------------------

def read_flat(param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return param.detach().reshape(-1).index_select(0, index)


def write_flat(param: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        values = values.to(param.dtype)
        if param.is_contiguous():
            param.view(-1).index_copy_(0, index, values)
        else:
            param.index_put_(torch.unravel_index(index, param.shape), values)


def _merged_values(base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """base + delta in the delta's precision: the single formula every writer uses."""
    return base.to(values.dtype) + values.detach()


def columns(t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`t[:, cols]` of a 2-D tensor (torch.gather: about twice as fast as index_select on CPU here)."""
    return torch.gather(t, 1, cols.expand(t.shape[0], -1))


# -- autograd functions ------------------------------------------------------------------

def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _start(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast the inputs as autocast would for this layer and remember the dtypes for backward.

    The layers save the weight as cast here (the weight itself when no cast is needed), so under
    autocast the backward reuses the forward's cast, as autocast's own dense backward does."""
    compute = _autocast_dtype(x) or x.dtype
    ctx.compute, ctx.x_dtype, ctx.values_dtype = compute, x.dtype, values.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    return x.to(compute), weight.to(compute), None if bias is None else bias.to(compute)


def _bias_grad(ctx, grad: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum of the output gradient over every non-channel dim, accumulated in float32 (or float64)."""
    acc = torch.float64 if ctx.compute == torch.float64 else torch.float32
    return grad.sum(dim=dims, dtype=acc).to(ctx.bias_dtype)


def _producer(x: torch.Tensor) -> tuple[str, list[torch.Tensor | None], Any] | None:
    """How to recompute x from tensors autograd keeps anyway for the backward of the op that made it:
    ("gelu", [z], approximate) for x = gelu(z) (a ViT's fc2 input), ("layer_norm", [input, mean, rstd,
    weight, bias], None) for a layer norm over the last dim (qkv's and fc1's input); None otherwise."""
    if torch.compiler.is_compiling():  # a compiled graph has no grad_fn to look at
        return None
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return None  # saved-tensor hooks (checkpointing, offloading): what a node holds is not a plain tensor
    node = x.grad_fn  # held while its saved tensors are looked at
    kind = type(node).__name__ if node is not None else ""
    if kind == "GeluBackward0" and not _hooked(node, "self"):
        z = node._saved_self
        if z.shape == x.shape and z.dtype == x.dtype:
            return "gelu", [z], node._saved_approximate
    elif (kind == "NativeLayerNormBackward0" and tuple(node._saved_normalized_shape) == (x.shape[-1],)
          and not _hooked(node, "input", "result1", "result2")):
        source, mean, rstd = node._saved_input, node._saved_result1, node._saved_result2
        exact = (torch.float32, torch.float64)  # a bf16/fp16 norm's statistics are rounded: no exact recompute
        if source.shape == x.shape and source.dtype == x.dtype and {source.dtype, mean.dtype, rstd.dtype} <= set(exact):
            return "layer_norm", [source, mean, rstd, node._saved_weight, node._saved_bias], None
    return None


def _hooked(node: Any, *names: str) -> bool:
    """Whether the op kept these tensors through saved-tensor hooks (checkpointing, offloading) when it ran:
    then they are not plain tensors to hold (reading them would unpack: recompute or copy)."""
    return any(getattr(node, f"_raw_saved_{n}").unpack_hook is not None for n in names)


#: pick the used columns before recomputing them when they are fewer than this share of all columns; past it
#: recomputing every column is cheaper than gathering (measured on ViT-S/16 tokens: a layer norm's recompute is
#: about as fast as its gather, GELU's erf several times slower)
_PICK_BELOW = {"layer_norm": 0.5, "gelu": 0.9}


def _recompute_columns(kind: str, held: list[torch.Tensor | None], extra: Any, ucols: torch.Tensor | None,
                       cpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input as [tokens, columns] recomputed as `_producer` said, and each entry's column in it: the used
    columns `ucols` alone (entries at `cpos`) when they are few, else every column (entries at their channel)."""
    width = held[0].shape[-1]
    picking = ucols is not None and ucols.numel() < _PICK_BELOW[kind] * width
    cols = cpos if picking or ucols is None else ucols.index_select(0, cpos).to(cpos.dtype)

    def pick(t: torch.Tensor) -> torch.Tensor:  # the used columns of the last dim
        return (columns(t, ucols) if t.dim() == 2 else t.index_select(-1, ucols)) if picking else t

    with torch.no_grad():  # the columns feed the weight gradient only, never a graph
        if kind == "gelu":
            return F.gelu(pick(held[0].reshape(-1, width)), approximate=extra), cols
        return _layer_norm_columns(held, pick), cols


def _layer_norm_columns(held: list[torch.Tensor | None], pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    source, mean, rstd, weight, bias = held
    rows = source.reshape(-1, source.shape[-1])
    picked = pick(rows)
    # in place after the first op: one [tokens, columns] buffer (the same arithmetic as the layer norm kernel)
    normed = rows.sub(mean.reshape(-1, 1)) if picked is rows else picked.sub_(mean.reshape(-1, 1))
    normed.mul_(rstd.reshape(-1, 1))
    if weight is not None and bias is not None:
        return torch.addcmul(pick(bias), normed, pick(weight), out=normed)
    if weight is not None:
        return normed.mul_(pick(weight))
    return normed if bias is None else normed.add_(pick(bias))


class _SparseLinear(torch.autograd.Function):
    """y = x Wᵀ + b with the gradient of W taken at the selected entries only.

    Backward needs the input columns the selected entries read. A copy of them is kept, unless x is a
    GELU's or a layer norm's output, whose inputs autograd keeps anyway for their own backward: then the
    columns are recomputed from those (`_producer`; equal to float rounding, bit for bit on the CPUs tested)."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, rows, cpos, ucols):  # noqa: ARG004 - values ties the graph
        xc, wc, bc = _start(ctx, x, weight, bias, values)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, wc, bc)
        # under autocast x is cast: the recomputed columns are cast the same way in backward (an exact rounding)
        recipe = _producer(x)
        if recipe is None:
            x2 = xc.reshape(-1, xc.shape[-1])
            held = [x2 if ucols is None else columns(x2, ucols)]
            ctx.recipe = None
        else:
            held = recipe[1]
            ctx.recipe = (recipe[0], recipe[2])
        ctx.save_for_backward(wc, rows, cpos, ucols, *held)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, rows, cpos, ucols, *held = ctx.saved_tensors
        if ctx.recipe is None:
            saved_x, cols = held[0], cpos
        else:
            saved_x, cols = _recompute_columns(ctx.recipe[0], held, ctx.recipe[1], ucols, cpos)
            saved_x = saved_x.to(ctx.compute)
        g2 = grad_y.contiguous().reshape(-1, grad_y.shape[-1]).to(ctx.compute)
        grad_x = grad_b = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight.to(ctx.compute)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3] and ctx.needs_input_grad[2]:  # one read of the output gradient for both
            grad_values, grad_b = sampled_dot_and_colsum_op(g2, saved_x, rows, cols)
            grad_values, grad_b = grad_values.to(ctx.values_dtype), grad_b.to(ctx.bias_dtype)
        elif ctx.needs_input_grad[3]:
            grad_values = sampled_dot_op(g2, saved_x, rows, cols).to(ctx.values_dtype)
        elif ctx.needs_input_grad[2]:
            grad_b = _bias_grad(ctx, g2, (0,))
        return grad_x, None, grad_b, grad_values, None, None, None


class _SparsePointwiseConv(torch.autograd.Function):
    """A 1×1, stride-1, ungrouped convolution with the weight gradient at selected entries only."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, rows, cpos, ucols):  # noqa: ARG004 - values ties the graph
        xc, wc, bc = _start(ctx, x, weight, bias, values)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(xc, wc, bc)
        saved_x = xc if ucols is None else xc.index_select(1, ucols)
        ctx.save_for_backward(saved_x, wc, rows, cpos)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, weight, rows, cpos = ctx.saved_tensors
        g = grad_y.contiguous().to(ctx.compute)  # strides as traced: torch.compile may assume others
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
            grad_values = sampled_dot_channels_first_op(g, saved_x, rows, cpos).to(ctx.values_dtype)
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
        ctx.save_for_backward(saved_x, wc, rows, cpos, ki, kj)
        ctx.geometry, ctx.x_shape = geometry, x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, weight, rows, cpos, ki, kj = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        g = grad_y.contiguous().to(ctx.compute)
        grad_x = grad_b = grad_values = None
        if ctx.needs_input_grad[0]:
            shape_only = g.new_empty(1).expand(ctx.x_shape)  # the input gradient needs the input's shape only
            grad_x = torch.ops.aten.convolution_backward(
                g, shape_only, weight.to(ctx.compute), None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False])[0].to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _bias_grad(ctx, g, (0, 2, 3))
        if ctx.needs_input_grad[3]:
            grad_values = sampled_conv_weight_grad_op(g, saved_x, rows, cpos, ki, kj, list(weight.shape[2:]),
                                                      list(stride), list(padding), list(dilation)).to(ctx.values_dtype)
        return grad_x, None, grad_b, grad_values, None, None, None, None, None, None


class _ProbeDelta(torch.autograd.Function):
    """Like `_InjectDelta`, and hands the weight's dense gradient to the delta's `probe` first."""

    @staticmethod
    def forward(ctx, weight, values, delta):  # noqa: ARG004
        ctx.delta, ctx.values_dtype = delta, values.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        grad_weight = grad_weight.contiguous()
        ctx.delta.probe(grad_weight)
        return None, grad_weight.reshape(-1).index_select(0, ctx.delta.index).to(ctx.values_dtype), None


def _injected(param: torch.Tensor, delta: SparseDelta) -> torch.Tensor:
    """The weight as a layer uses it with `delta`'s gradient routed to `values` (and to its probe)."""
    if delta.probe is not None:
        return _ProbeDelta.apply(param, delta.values, delta)
    return _InjectDelta.apply(param, delta.values, delta.index)


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
        return None, grad_weight.contiguous().reshape(-1).index_select(0, index).to(ctx.values_dtype), None


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
        self.register_buffer("base", read_flat(param, index).clone(), persistent=False)
        self.shape = tuple(param.shape)
        self._synced_version = -1
        self.register_buffer("written", self.values.detach().clone(), persistent=False)
        self.gathered, self.groups = gathered, groups
        #: called with the dense gradient of the weight when set (drop-and-regrow's growth scores); the
        #: layer then takes the generic path for that step
        self.probe: Callable[[torch.Tensor], None] | None = None
        if gathered:
            self._gather_buffers()

    def _gather_buffers(self) -> None:
        """Per entry its output channel, input channel position and kernel offsets (the gathered kernels)."""
        shape = (*self.shape, 1, 1) if len(self.shape) == 2 else self.shape  # Linear as a 1x1 conv
        out_ch, in_per_group = shape[0], shape[1]
        rows, c_local, ki, kj = torch.unravel_index(self.index, shape)
        channels = (rows // (out_ch // self.groups)) * in_per_group + c_local  # input channel of each entry
        ucols, cpos = torch.unique(channels, return_inverse=True)
        self.register_buffer("rows", rows.to(torch.int32), persistent=False)
        self.register_buffer("cpos", cpos.to(torch.int32), persistent=False)
        self.register_buffer("ki", ki.to(torch.int32), persistent=False)
        self.register_buffer("kj", kj.to(torch.int32), persistent=False)
        # when every input channel occurs, the backward keeps the whole input as it is
        self.register_buffer("ucols", None if ucols.numel() == in_per_group * self.groups else ucols,
                             persistent=False)

    def replace_entries(self, param: torch.Tensor, positions: torch.Tensor, new_index: torch.Tensor) -> torch.Tensor:
        """Swap the entries at `positions` for the flat indices `new_index` (not selected now), in place.

        The dropped entries get their base values back, the new ones start at delta 0; the number of
        entries stays. The index stays sorted: returns `order`, the old position of each entry's new
        position, so a caller moves per-entry state (optimizer moments) with `state[order]`.
        """
        with torch.no_grad():
            self.sync(param)
            write_flat(param, self.index[positions], self.base[positions])
            index, base, values = self.index.clone(), self.base.clone(), self.values.detach().clone()
            index[positions] = new_index.to(index)
            base[positions] = read_flat(param, index[positions]).to(base.dtype)
            values[positions] = 0
            order = index.argsort()
            self.index.copy_(index[order])
            self.base.copy_(base[order])
            self.values.copy_(values[order])
            self.written.copy_(self.values)
            self._synced_version = self.values._version
            if self.gathered:
                self._gather_buffers()
        return order

    def sync(self, param: torch.Tensor, force: bool = False) -> None:
        """Write base + values into `param` if `values` changed since the last write.

        The version counter catches ordinary in-place updates; on the CPU the comparison with the
        values last written (O(selected entries)) catches the rest: fused optimizers, `.data` edits.
        On an accelerator that comparison would make the host wait for the device, so there (and in a
        compiled graph, which takes no data-dependent branch) the entries are written instead,
        O(selected entries) on the device: nothing in a training step synchronises with the host.
        """
        values = self.values.detach()
        if torch.compiler.is_compiling():  # no data-dependent test in a graph: write (O(selected entries))
            write_flat(param, self.index, _merged_values(self.base, values))
            return
        if not (force or values._version != self._synced_version):
            if not _compare_on_host(values):
                write_flat(param, self.index, _merged_values(self.base, values))
                return
            if torch.equal(values, self.written):
                return
        write_flat(param, self.index, _merged_values(self.base, values))
        self.written.copy_(values)
        self._synced_version = self.values._version

    def mark_synced(self) -> None:
        """Take the parameter's current entries as written: the next forward leaves them alone."""
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


def _compare_on_host(values: torch.Tensor) -> bool:
    """Whether `SparseDelta.sync` may compare values with a result the host reads (CPU tensors only: on
    an accelerator that read is a synchronisation)."""
    return values.device.type == "cpu"


def _no_grad_needed(delta: SparseDelta) -> bool:
    return not (torch.is_grad_enabled() and delta.values.requires_grad)


def _weight_delta(module: nn.Module) -> SparseDelta | None:
    """The layer's weight delta, written into the weight if it changed; None when this forward needs no
    gradient for it (the layer's plain forward serves)."""
    delta: SparseDelta = module.sparse_delta["weight"]
    delta.sync(module.weight)
    return None if _no_grad_needed(delta) else delta


def _sparse_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (delta := _weight_delta(self)) is None or delta.probe is not None:  # a probe needs the dense gradient
        return F.linear(x, self.weight if delta is None else _injected(self.weight, delta), self.bias)
    return _SparseLinear.apply(x, self.weight, self.bias, delta.values, delta.rows, delta.cpos, delta.ucols)


def _sparse_pointwise_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if (delta := _weight_delta(self)) is None or delta.probe is not None:
        return self._conv_forward(x, self.weight if delta is None else _injected(self.weight, delta), self.bias)
    return _SparsePointwiseConv.apply(x, self.weight, self.bias, delta.values, delta.rows, delta.cpos, delta.ucols)


def _sparse_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if (delta := _weight_delta(self)) is None or delta.probe is not None:
        return self._conv_forward(x, self.weight if delta is None else _injected(self.weight, delta), self.bias)
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
            holder._parameters[leaf] = _injected(param, delta)
        if self._sparseft_prev_forward is not None:
            return self._sparseft_prev_forward(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)
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
        from timm.layers import Linear as TimmLinear

        return _sparse_linear_forward if forward in (nn.Linear.forward, TimmLinear.forward) else None
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        pointwise = (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0)
                     and module.dilation == (1, 1) and module.groups == 1)
        return _sparse_pointwise_forward if pointwise else _sparse_conv_forward
    return None


def install(module: nn.Module, entries: list[tuple[str, torch.Tensor]]) -> None:
    """Give `module` a `SparseDelta` per (parameter name relative to it, flat indices) and its forward.

    The gathered fast path serves a layer whose only sparse parameter is its own weight; anything
    else (a sparse bias too, other layers) takes the generic injected path.
    """
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


def uninstall(module: nn.Module) -> None:
    """Remove what `install` and `freeze_batchnorm` added to `module` (deltas and forward overrides)."""
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


def freeze_batchnorm(bn: nn.Module) -> None:
    """Keep a BatchNorm layer in eval mode (frozen statistics) whatever `train()` says."""
    bn.train = types.MethodType(_frozen_bn_train, bn)
    bn.train(False)
