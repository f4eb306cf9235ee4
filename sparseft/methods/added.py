"""Shared machinery for methods that add modules to the backbone (LoRA, adapters, SSF, VPT).

Every such method follows the same life cycle on top of the sparse-delta engine:

1. `prepare`: check the model fits (`check`, before anything changes), `sparseft.apply` with an
   empty sparse part and the head trained in full (the base fingerprint is taken on the clean
   model), then `inject` the method's modules and `mark_added` their parameters together with a
   JSON `structure` that says how to re-create them;
2. `save`: the engine's delta file (head, changed buffers, `added/<name>` tensors, structure);
3. `load`: `load_delta(..., rebuild=...)` re-creates the modules from the file's structure (not
   from this instance's options, so `METHODS[name]().load(...)` works) and loads their values;
4. `merge` (mergeable methods only): `fold` the modules into the base weights, remove them, then
   the engine's `merge`. The original values of every folded weight are kept on the model's
   state so `sparseft.unmerge` restores the base bit-exactly;
5. `unmerge`: back to the plain base from an applied or a merged model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparseft
from sparseft.delta import DeltaError, mark_added, state_of
from sparseft.deltafile import load_delta
from sparseft.methods import Method, MethodContext, NotApplicable  # noqa: F401 - re-exported
from sparseft.models import head_module_name, head_parameter_names
from sparseft.select import Selection


class ModuleMethod(Method):
    """Base class of methods that inject modules; subclasses implement check/inject/rebuild/remove."""

    mergeable = False
    #: BatchNorm statistics stay those of the base: the backbone is frozen in these methods
    batchnorm: str = "frozen"

    # -- what subclasses implement -------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise `NotApplicable` if the method cannot be used on `model`."""

    def inject(self, model: nn.Module, ctx: MethodContext) -> tuple[list[str], dict[str, Any]]:
        """Add the modules; return (names of their parameters, structure needed to rebuild them)."""
        raise NotImplementedError

    def rebuild(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        """Re-create the modules described by `structure` (values are loaded afterwards)."""
        raise NotImplementedError

    def remove(self, model: nn.Module) -> None:
        """Take every added module and hook out without folding (the model becomes the base again)."""
        raise NotImplementedError

    def fold(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Fold the modules into the base weights and remove them; return the folded weights' old values."""
        raise DeltaError(self.merge_refusal())

    def merge_refusal(self) -> str:
        """Why this method cannot be merged (for non-mergeable methods)."""
        return f"{self.name} cannot be merged"

    # -- the common life cycle ---------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Engine on the clean model (head trains), then the modules; the model is unchanged on error."""
        self.check(model)
        start(model, self.name, batchnorm=self.batchnorm)
        try:
            names, structure = self.inject(model, ctx)
            mark_added(model, names, {"method": self.name, **structure})
            train_head(model)
        except Exception:
            self.unmerge(model)
            raise
        added = set(names)
        ctx.info["added_parameters"] = sum(p.numel() for n, p in model.named_parameters() if n in added)
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        """Back to the plain base model, bit-exactly: added modules removed, folded weights restored."""
        state = state_of(model)
        if state is None:
            raise DeltaError(f"{self.name}: the model has no task to undo")
        if state.added and state.structure.get("method") != self.name:
            raise DeltaError(f"{self.name}: the model holds modules of method {state.structure.get('method')!r}")
        if not state.merged:
            self.remove(model)
            state.added = []
        return sparseft.unmerge(model)

    def save(self, model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """The engine's task file; refused after merge (the modules no longer exist then)."""
        state = state_of(model)
        if state is not None and state.merged:
            raise DeltaError(f"{self.name}: the model was merged, its added modules are folded into the base "
                             "weights; save the task file before merging")
        return super().save(model, path, extra)

    def load(self, model: nn.Module, path: str | Path) -> nn.Module:
        """Apply a task file to a plain base, re-creating the modules from the file's structure."""

        def rebuild(m: nn.Module, structure: dict[str, Any]) -> list[str]:
            if structure.get("method") != self.name:
                raise DeltaError(f"{path}: holds modules of method {structure.get('method')!r}, "
                                 f"not {self.name!r}; load it with that method")
            names = self.rebuild(m, structure)
            train_head(m)
            return names

        try:
            return load_delta(model, path, rebuild=rebuild)
        except Exception:
            if state_of(model) is None:  # load_delta rolled the engine back: take our modules out too
                self.remove(model)
            raise

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the added modules into the base weights, leaving a plain model (mergeable methods)."""
        if not self.mergeable:
            raise DeltaError(self.merge_refusal())
        state = state_of(model)
        if state is None:
            raise DeltaError(f"{self.name}: the model has no task to merge (prepare() or load() first)")
        if state.merged:
            return model
        if state.added and state.structure.get("method") != self.name:
            raise DeltaError(f"{self.name}: the model holds modules of method {state.structure.get('method')!r}")
        originals = self.fold(model)
        if state.keep_base:
            # unmerge copies base_full back: keeping the folded weights there makes it restore them exactly
            state.base_full.update({n: v for n, v in originals.items() if n not in state.base_full})
        state.added = []
        return sparseft.merge(model)


def start(model: nn.Module, method: str, batchnorm: str = "frozen") -> nn.Module:
    """Apply the engine to the clean model: nothing sparse, the head trained in full."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    selection = Selection(indices={}, shapes=shapes, full=head_parameter_names(model), meta={"method": method})
    return sparseft.apply(model, selection, batchnorm=batchnorm)


def train_head(model: nn.Module) -> None:
    """Make the parameters the engine trains in full (the head) trainable again.

    Needed after injectors that freeze every non-adapter parameter (peft does).
    """
    state = state_of(model)
    params = dict(model.named_parameters())
    for name in state.selection.full:
        params[name].requires_grad_(True)


def head_prefix(model: nn.Module) -> str | None:
    """'<head module>.' so modules under the classifier can be excluded (None: no head)."""
    state = state_of(model)
    if state is not None and state.head:
        return state.head[0].rsplit(".", 1)[0] + "."
    name = head_module_name(model)
    return None if name is None else name + "."


def in_head(name: str, prefix: str | None) -> bool:
    """Whether module `name` is the head or inside it."""
    return prefix is not None and (name + ".").startswith(prefix)


def attach(parent: nn.Module, attr: str, child: nn.Module) -> None:
    """Register `child` as `parent.<attr>`, refusing to overwrite an existing attribute."""
    if hasattr(parent, attr):
        raise DeltaError(f"cannot add module '{attr}' to {type(parent).__name__}: the name is taken")
    parent.add_module(attr, child)


def remove_hooks(module: nn.Module, fn: Any) -> None:
    """Remove the forward (pre-)hooks of `module` that call `fn`."""
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def param_names(model: nn.Module, module: nn.Module) -> list[str]:
    """Full names of `module`'s parameters inside `model`."""
    prefix = next(n for n, m in model.named_modules() if m is module)
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]



def generator(seed: int) -> torch.Generator:
    """A CPU generator for reproducible initialisation, independent of the global RNG."""
    return torch.Generator().manual_seed(seed)
