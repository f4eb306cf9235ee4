"""The sparse-delta engine: train selected weight entries without dense gradients.

After `apply(model, selection)`:
- every selected weight stays a frozen parameter that holds the *merged* value base + delta in
  place; its trainable part is a small `values` vector (one entry per selected index) in a
  `SparseDelta` module attached to the layer as `<layer>.sparse_delta[<param name>]`;
- forward uses that dense weight as it is (no copy); when the optimizer has changed `values`
  (detected through the tensor's version counter) the next forward rewrites only the selected
  entries, so any training loop works;
- backward of an `nn.Linear` or `nn.Conv2d` computes the input gradient as usual and, for the
  weight, only the selected entries (`sparseft.sparse_layers`); other layers get the gradient of
  their weight as a transient tensor from which the selected entries are gathered: no `.grad`,
  no optimizer state is ever held for frozen weights;
- the parameters the selection trains in full (biases, layer-scale, the head) train as usual;
  all other parameters are frozen.

`merge` turns the model into a plain one (no extra modules, parameters or forward overrides);
`unmerge` writes every base value back bit-exactly, from an applied or from a merged model.

This module owns what it remembers on a model (`_State`); methods, task files and the CLI use
its verbs: `apply`, `mark_added`, `remember_base`, `clear_added`, `export_task`, `import_task`,
`merge`, `unmerge`, and the read-only `is_applied`, `selection_of`, `structure_of`, ...
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from sparseft.anatomy import fingerprint, head_parameter_names
from sparseft.errors import InputError, SparseftError
from sparseft.fileutil import tensor_bytes
from sparseft.selected import Selection
from sparseft.sparse_layers import SparseDelta, freeze_batchnorm, install, uninstall, write_flat

BatchNormMode = Literal["update", "frozen"]

__all__ = [
    "BatchNormMode", "DeltaError", "SparseDelta", "abandon", "added_parameters", "apply", "base_name", "base_weights",
    "buffers_by_name", "clear_added", "params_by_name", "replace_entries",
    "deltas", "export_task", "forget_base", "import_task", "is_applied", "is_merged", "mark_added", "merge",
    "merged_changes", "merged_task",
    "method_of", "parameter_summary", "remember_base", "selection_of", "sparse_entries",
    "set_task_record", "structure_of", "sync", "task_record", "trainable_parameters", "unmerge",
]


class DeltaError(SparseftError, RuntimeError):
    """A model in the wrong state for the requested delta operation."""


@dataclass
class _State:
    """What the engine remembers on a model (as `model._sparseft`) between apply and unmerge."""

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
    # what must not change until save / unmerge: (name, parameter, digest) of the frozen parameters
    # after apply, of every parameter after merge
    guarded: list[tuple[str, torch.Tensor, bytes]] = field(default_factory=list)
    # the task file's record (`extra` of its header: class names, preprocessing, ...) once loaded
    record: dict[str, Any] = field(default_factory=dict)


def base_name(name: str) -> str:
    """A parameter's or module's name in the base model: peft's wrappers (LoRA on a layer that also has
    sparse entries, as in RoSA) put the layer under `.base_layer`."""
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def params_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name, under the base model's names as well (see `base_name`)."""
    table = dict(model.named_parameters())
    table.update({base_name(n): p for n, p in list(table.items())})
    return table


def buffers_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's buffers by name, under the base model's names as well (see `base_name`)."""
    table = dict(model.named_buffers())
    table.update({base_name(n): b for n, b in list(table.items())})
    return table


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(tensor_bytes(t), digest_size=16).digest()


def _guard(state: _State, params: list[tuple[str, torch.Tensor]]) -> None:
    state.guarded = [(name, p, _digest(p)) for name, p in params]


def _check_guarded(model: nn.Module, state: _State, action: str) -> None:
    """Refuse, naming the tensors, when weights the engine does not train changed since apply (or merge).

    A weight with selected entries is compared with its base values written back at those entries.
    """
    live = {} if state.merged else deltas(model)

    def current(name: str, p: torch.Tensor) -> bytes:
        d = live.get(name)
        if d is None:
            return _digest(p)
        restored = p.detach().clone()
        write_flat(restored, d.index, d.base)
        return _digest(restored)

    changed = [name for name, p, digest in state.guarded if current(name, p) != digest]
    if not changed:
        return
    names = f"{', '.join(changed[:4])}{'…' if len(changed) > 4 else ''}"
    if not state.merged:  # only the frozen weights are guarded: none of them is the task's
        raise DeltaError(f"cannot {action}: {len(changed)} weight(s) changed since apply where the task does not "
                         f"train them ({names}: frozen weights, or entries of a sparse weight outside its selection); "
                         "something other than the engine wrote into them (an optimizer given parameters outside "
                         "the task's, load_state_dict, a .data edit)")
    trained = set(state.selection.full) | set(state.selection.indices) | set(state.base_full) | set(state.head)
    own = [n for n in changed if n in trained]
    theirs = (f"; the task trains {'all' if len(own) == len(changed) else len(own)} of them "
              f"({', '.join(own[:3])}{'…' if len(own) > 3 else ''}), but merged they are plain weights" if own else "")
    way_out = {
        "unmerge": "its base cannot be written back under the changes: build the base again "
                   "(sparseft.base_model(task_file)) or load the base weights again",
        "save the task": "to save the task, load its task file again (or unmerge before training further); to keep "
                         "the trained model, save its weights (model.state_dict()) or train it as a new task "
                         "(sparseft.apply on it, then save_delta)",
        "save the merged model": "save_merged writes the task as it was merged: load its task file again, or save "
                                 "the trained model's own weights (model.state_dict())",
    }.get(action, "load the task file again")
    raise DeltaError(f"cannot {action}: the model's task is merged and {len(changed)} weight(s) changed since the "
                     f"merge ({names}){theirs}: a merged model trained further is another model, not the task; "
                     + way_out)


def _state(model: nn.Module) -> _State | None:
    return model.__dict__.get("_sparseft")


def _require_state(model: nn.Module) -> _State:
    state = _state(model)
    if state is None:
        raise DeltaError("model has no sparseft deltas (apply() or load_delta() first)")
    return state


# -- read-only views -------------------------------------------------------------------------

def is_applied(model: nn.Module) -> bool:
    """Whether the model carries a task (applied, or merged with its base values kept)."""
    return _state(model) is not None


def is_merged(model: nn.Module) -> bool:
    """Whether the model's task was merged into its weights (and can still be unmerged)."""
    state = _state(model)
    return state is not None and state.merged


def selection_of(model: nn.Module) -> Selection:
    """The selection the model was applied with (its entries as they are now, after any regrowth)."""
    return _require_state(model).selection


def replace_entries(model: nn.Module, name: str, positions: torch.Tensor, new_index: torch.Tensor) -> torch.Tensor:
    """Swap entries of parameter `name`'s delta for other entries of that weight during training.

    The dropped entries get their base values back, the new ones start at delta 0, the count stays
    (`sparseft.regrow` drives it). Returns the order to move per-entry optimizer state with.
    """
    state = _require_state(model)
    if state.merged:
        raise DeltaError("replace_entries needs an applied (not merged) model")
    d = deltas(model)[name]
    module, leaf = _owner(model, name)
    order = d.replace_entries(module._parameters[leaf], positions, new_index)
    state.selection.indices[name] = d.index.detach().cpu().clone()
    return order


def structure_of(model: nn.Module) -> dict[str, Any]:
    """The JSON structure of the modules a method added (empty when none were)."""
    return dict(_require_state(model).structure)


def added_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of added modules (empty for a plain or merged model)."""
    state = _state(model)
    return list(state.added) if state is not None else []


def task_record(model: nn.Module) -> dict[str, Any]:
    """The record of the task file the model's task was loaded from (class names, image size,
    preprocessing, ...); for a plain model, that of the merged model file it was loaded from;
    else empty."""
    state = _state(model)
    return dict(state.record) if state is not None else dict(model.__dict__.get("_sparseft_record", {}))


def set_task_record(model: nn.Module, record: dict[str, Any]) -> None:
    """Keep a task file's record with the model's task (`sparseft.load_delta` does), or with a plain
    model loaded from a merged model file (`sparseft.load` does)."""
    state = _state(model)
    if state is not None:
        state.record = dict(record)
    else:
        model.__dict__["_sparseft_record"] = dict(record)


def merged_task(model: nn.Module) -> dict[str, Any]:
    """What a merged model's file records of its task: the base `fingerprint`, the `head`, the `method`
    and the task file's `record`; refused unless the task is merged and no weight changed since."""
    state = _require_state(model)
    if not state.merged:
        raise DeltaError("the model's task is not merged (sparseft.merge(model) first)")
    _check_guarded(model, state, "save the merged model")
    return {"fingerprint": state.fingerprint, "head": list(state.head), "method": method_of(model),
            "record": dict(state.record)}


def method_of(model: nn.Module) -> str | None:
    """The name of the method that applied the model's task (None for a plain model or unknown)."""
    state = _state(model)
    if state is None:
        return None
    return state.structure.get("method") or state.selection.meta.get("method")


# -- apply and the state ---------------------------------------------------------------------

def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    """(module holding the parameter, its leaf name), through wrappers that hold the layer as `base_layer`."""
    mod_name, _, leaf = param_name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    while leaf not in module._parameters and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module, leaf


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


def apply(model: nn.Module, selection: Selection, *, batchnorm: BatchNormMode = "frozen",
          head: str | None = None, keep_base: bool = True, base_fingerprint: str | None = None) -> nn.Module:
    """Make `model` train only what `selection` names, in place; returns the model.

    `batchnorm="frozen"` (GPS's default, docs/results.md) keeps BatchNorm layers in eval mode;
    `"update"` lets their running statistics adapt during training (they are saved with the
    delta). `keep_base=False` keeps no copy of the parameters trained in full (saves memory when that is most of the
    model, as in full fine-tuning); such a model cannot be unmerged. `base_fingerprint`: the
    base's fingerprint when the caller knows it already (a task file's), else it is computed.
    """
    if _state(model) is not None:
        raise DeltaError("model already has sparseft deltas; merge or unmerge it first")
    if batchnorm not in ("update", "frozen"):
        raise InputError(f"batchnorm must be 'update' or 'frozen', not {batchnorm!r}")
    selection.check_model(model)
    heads = head_parameter_names(model, head)
    full = set(selection.full)
    state = _State(
        selection=selection,
        fingerprint=base_fingerprint or fingerprint(model, exclude=set(heads)),
        head=heads,
        base_full={n: p.detach().clone() for n, p in model.named_parameters() if keep_base and n in full},
        base_buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        batchnorm=batchnorm,
        keep_base=keep_base,
        base_backbone_params=sum(p.numel() for n, p in model.named_parameters() if n not in set(heads)),
    )
    for name, p in model.named_parameters():
        p.requires_grad_(name in full)
        p.grad = None
    _guard(state, [(n, p) for n, p in model.named_parameters() if n not in full])  # before any delta is written
    by_module: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, index in selection.indices.items():
        if index.numel():
            mod_name, target = _user_of(model, name)
            by_module.setdefault(mod_name, []).append((target, index))
    for mod_name, entries in by_module.items():
        install(model.get_submodule(mod_name) if mod_name else model, entries)
    if batchnorm == "frozen":
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                freeze_batchnorm(bn)
    model._sparseft = state
    return model


def mark_added(model: nn.Module, names: list[str], structure: dict[str, Any]) -> None:
    """Record parameters of modules a method injected after `apply`, and how to rebuild them.

    They are saved as `added/<name>` in the task file; `structure` (JSON) goes into its header
    so the method can re-create the modules on a fresh base before the values are loaded.
    """
    state = _require_state(model)
    params = params_by_name(model)
    missing = [n for n in names if n not in params]
    if missing:
        raise DeltaError(f"mark_added: the model has no parameters {missing[:5]}")
    state.added = sorted(set(state.added) | set(names))
    state.structure = {**state.structure, **structure}
    trained = {id(params[n]) for n in names}  # e.g. base biases a method trains along with its modules
    state.guarded = [g for g in state.guarded if id(g[1]) not in trained]


def remember_base(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Keep base values of weights a method is about to change (folding, biases it trains) for unmerge."""
    state = _require_state(model)
    if state.keep_base:
        for name, value in originals.items():
            state.base_full.setdefault(name, value.detach().clone())


def clear_added(model: nn.Module) -> None:
    """Forget the added parameters once the method has taken its modules out (or folded them)."""
    _require_state(model).added = []


def abandon(model: nn.Module) -> None:
    """Undo a half-built task (its added modules already taken out): the plain base again, if applied."""
    if is_applied(model):
        clear_added(model)
        unmerge(model)


def _refuse_added(state: _State, action: str) -> None:
    if state.added:
        raise DeltaError(f"cannot {action}: the model has modules added by method "
                         f"{state.structure.get('method', '?')!r}; use that method's {action} "
                         f"(or sparseft.{action})")


def _uninstall_all(model: nn.Module) -> None:
    for module in model.modules():
        uninstall(module)


def deltas(model: nn.Module) -> dict[str, SparseDelta]:
    """The live `SparseDelta` modules of an applied model, by parameter name."""
    found = {}
    for mod_name, module in model.named_modules():
        if "sparse_delta" in module._modules:
            for d in module.sparse_delta.values():
                found[base_name(f"{mod_name}.{d.target}" if mod_name else d.target)] = d
    return found


def sync(model: nn.Module, force: bool = True) -> None:
    """Write base + delta into every selected entry now (forward does it lazily).

    Forward does this itself whenever `values` changed (any optimizer, `.data` edits included);
    call it to see the new weights without a forward. `force=False` writes only entries whose
    values changed since they were last written.
    """
    for name, d in deltas(model).items():
        module, leaf = _owner(model, name)
        d.sync(module._parameters[leaf], force=force)


def sparse_entries(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(index, delta values) per selected parameter, for an applied or merged model."""
    state = _require_state(model)
    if state.merged:
        return {n: (idx, vals) for n, (idx, _, vals) in state.merged_entries.items()}
    return {n: (d.index, d.values.detach()) for n, d in deltas(model).items()}


# -- task contents: what a task file holds ------------------------------------------------------

def export_task(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header fields, tensors) of the model's task, for `sparseft.deltafile` to write.

    Tensors: `sparse/<name>/index|values`, `full/<name>`, `added/<name>` and `buffer/<name>`
    for buffers that training changed (BatchNorm statistics); CPU, contiguous.
    """
    state = _require_state(model)
    _check_guarded(model, state, "save the task")
    entries = sparse_entries(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, (index, values) in entries.items():
        small = index.numel() == 0 or int(index.max()) < 2**31 - 1
        tensors[f"sparse/{name}/index"] = index.to(torch.int32 if small else torch.int64).cpu().contiguous()
        tensors[f"sparse/{name}/values"] = values.detach().cpu().contiguous()
    params = params_by_name(model)
    for name in state.selection.full:
        tensors[f"full/{name}"] = params[name].detach().cpu().contiguous()
    for name in state.added:
        tensors[f"added/{name}"] = params[name].detach().cpu().contiguous()
    for name, buf in model.named_buffers():
        base = state.base_buffers.get(name)
        if base is not None and not torch.equal(buf, base):
            tensors[f"buffer/{name}"] = buf.detach().cpu().contiguous()
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DeltaError(f"cannot save the task: NaN or infinite values in {', '.join(bad[:4])}; the training "
                         "diverged (lower the learning rate)")
    header = {"fingerprint": state.fingerprint, "head": state.head, "batchnorm": state.batchnorm,
              "shapes": {n: list(state.selection.shapes[n]) for n in entries}, "full": state.selection.full,
              "added": state.added, "structure": state.structure, "selection": state.selection.meta}
    return header, tensors


def import_task(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write a task's trained values (as `export_task` names them) into an applied model.

    The caller has checked names and shapes; added modules must exist already (`mark_added`).
    """
    state = _require_state(model)
    params = params_by_name(model)
    buffers = buffers_by_name(model)
    with torch.no_grad():
        for name, d in deltas(model).items():
            d.values.copy_(tensors[f"sparse/{name}/values"].to(d.values))
            d.sync(params[name], force=True)
        for name in state.selection.full:
            params[name].copy_(tensors[f"full/{name}"])
        for name in state.added:
            params[name].copy_(tensors[f"added/{name}"])
        for key, t in tensors.items():
            if key.startswith("buffer/"):
                buffers[key.removeprefix("buffer/")].copy_(t)


# -- merge, unmerge ----------------------------------------------------------------------------

def merge(model: nn.Module) -> nn.Module:
    """Bake the deltas in and drop every sparseft module and override: a plain model remains.

    The base values are kept on the side (not as parameters or buffers) so `unmerge` can
    restore them; `forget_base(model)` drops them. Parameters get back the `requires_grad`
    they had before `apply`.
    """
    state = _require_state(model)
    if state.merged:
        return model
    _refuse_added(state, "merge")
    sync(model, force=False)  # a method's fold (RoSA: B·A) may have written into entries already synced
    state.merged_entries = {n: (d.index.clone(), d.base.clone(), d.values.detach().clone())
                            for n, d in deltas(model).items()}
    _uninstall_all(model)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
    state.merged = True
    _guard(state, list(model.named_parameters()))
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base model bit-exactly (weights, biases, head, buffers) and drop the deltas."""
    state = _require_state(model)
    _refuse_added(state, "unmerge")
    _check_guarded(model, state, "unmerge")
    if not state.keep_base:
        raise DeltaError("this model was applied with keep_base=False (full fine-tuning keeps no copy of the "
                         "base): its base values are gone; load the base weights again instead")
    params = params_by_name(model)
    with torch.no_grad():  # whole tensors first: a weight folded into (RoSA) also has sparse entries
        for name, value in state.base_full.items():
            params[name].copy_(value)
    if state.merged:
        for name, (index, base, _) in state.merged_entries.items():
            write_flat(params[name], index, base)
    else:
        for name, d in deltas(model).items():
            write_flat(params[name], d.index, d.base)
        _uninstall_all(model)
    with torch.no_grad():
        buffers = buffers_by_name(model)
        for name, value in state.base_buffers.items():
            if name in buffers:
                buffers[name].copy_(value)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
        p.grad = None
    del model.__dict__["_sparseft"]
    return model


def merged_changes(model: nn.Module) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """What a merged task changed in its base: per parameter or buffer, (flat indices, base values there).

    Indices are None where the whole tensor changed (parameters trained in full or folded,
    buffers). The model's current values at those places are the task's.
    """
    state = _require_state(model)
    if not state.merged:
        raise DeltaError("merged_changes needs a merged model (merge it first)")
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {
        n: (index, base) for n, (index, base, _) in state.merged_entries.items()}
    out.update({n: (None, base) for n, base in state.base_full.items()})  # whole-tensor changes win
    buffers = buffers_by_name(model)
    out.update({n: (None, base) for n, base in state.base_buffers.items()
                if n in buffers and not torch.equal(buffers[n], base)})
    return out


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
    params = params_by_name(model)
    saved_full = {n: params[n].detach().clone() for n in state.base_full}
    buffers = buffers_by_name(model)
    saved_buffers = {n: b.detach().clone() for n, b in buffers.items() if n in state.base_buffers}
    try:
        with torch.no_grad():
            for name, d in deltas(model).items():
                write_flat(params[name], d.index, d.base)
                d.mark_synced()  # forward keeps the base values
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


# -- counting ----------------------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable values (parameters with requires_grad), head included."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_summary(model: nn.Module) -> dict[str, Any]:
    """Trainable values split into backbone and head, with the backbone share in percent.

    Sparse deltas count one value per selected entry, added modules (LoRA, adapters, prompts)
    their parameters; the frozen base weights do not count. The share is relative to the base
    backbone's parameter count (head excluded).
    """
    state = _state(model)
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
