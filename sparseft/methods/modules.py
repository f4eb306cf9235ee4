"""The one way methods add modules to a model and take them out again.

A method's module is an `Added` module registered as a child of some layer (`<layer>.<attr>`)
together with the forward hooks that make the layer use it. The `RemovableHandle`s torch
returns for those hooks are kept on the added module, so `remove_added` needs nothing but the
model: it removes each added module's hooks through their handles and deletes the module.
Hooks are bound methods of the added module, so a deep copy of the model runs its own copies.
LoRA layers come from HF peft (`peft.tuners.lora.LoraLayer` wrappers that hold `base_layer`);
`remove_added` puts each wrapper's base layer back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from sparseft.delta import DeltaError


class Added(nn.Module):
    """Base class of modules a method adds; holds the handles of the hooks that call it."""

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[RemovableHandle] = []

    def hook(self, layer: nn.Module, fn: Callable[..., Any], *, pre: bool = False, with_kwargs: bool = False) -> None:
        """Register `fn` as a forward (pre-)hook of `layer`, removed with this module."""
        register = layer.register_forward_pre_hook if pre else layer.register_forward_hook
        self._handles.append(register(fn, with_kwargs=with_kwargs))

    def after(self, layer: nn.Module) -> None:
        """Replace `layer`'s output by this module applied to it."""
        self.hook(layer, self._on_output)

    def _on_output(self, layer: nn.Module, args: tuple, output: Any) -> Any:
        return self(output)

    def release(self) -> None:
        """Remove every hook this module registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach(model: nn.Module, layer_name: str, attr: str, module: Added) -> nn.Module:
    """Register `module` as `<layer_name>.<attr>` (refusing to overwrite); returns the layer."""
    layer = model.get_submodule(layer_name) if layer_name else model
    if hasattr(layer, attr):
        raise DeltaError(f"cannot add module '{attr}' to {layer_name or type(layer).__name__}: the name is taken")
    layer.add_module(attr, module)
    return layer


def parameter_names(model: nn.Module, module: nn.Module) -> list[str]:
    """Full names of `module`'s parameters inside `model`."""
    prefix = next(n for n, m in model.named_modules() if m is module)
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module called `name` in `model` by `module`."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, wrapper) of every peft tuner layer in the model (none when peft was never imported)."""
    peft = sys.modules.get("peft")  # importing peft takes seconds; without it no peft layer can exist
    if peft is None:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def remove_added(model: nn.Module) -> None:
    """Take every added module and LoRA wrapper out without folding: the base's module tree remains."""
    for name, wrapper in lora_layers(model):
        set_submodule(model, name, wrapper.get_base_layer())
    model.__dict__.pop("peft_config", None)
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, Added):
                child.release()
                delattr(parent, attr)
