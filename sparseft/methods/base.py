"""The one life cycle every fine-tuning method follows.

    method = sparseft.methods.get_method("lora", lora_r=4)
    model = method.prepare(model, ctx)     # plan on the task's data, apply, add modules
    ...train...
    method.save(model, "task.safetensors")
    method.load(fresh_base, "task.safetensors")
    method.merge(model)                    # plain model (or a clear error where it cannot merge)
    method.unmerge(model)                  # the base again, bit-exactly

A method decides two things: which base entries train (a `Selection` for the sparse-delta
engine: sparse entries, parameters trained in full, the head), and which modules it adds (a
JSON `structure` from which `inject` re-creates them, on a fresh base too). `prepare` computes
both in `plan` on the clean model, so a plan never sees its own modules; everything after that
is shared: the engine is applied, the modules injected with the seed's initialisation, the task
file written and read by `sparseft.deltafile`, folded on merge and taken out again on unmerge.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sparseft import delta, distributed
from sparseft.anatomy import head_parameter_names
from sparseft.cliopts import require
from sparseft.deltafile import TaskSource, load_delta, save_delta, source_path
from sparseft.errors import InputError
from sparseft.methods.modules import remove_added
from sparseft.selection import Selection

PLAN_FILE = "selection.safetensors"


class NotApplicable(InputError):
    """The method cannot be used on this architecture (raised before the model is changed)."""


@dataclass
class MethodContext:
    """What `prepare` may use: task data (by kind) and run settings.

    `loader("select")` yields two views per training image (GPS's selection pass);
    `loader("train")` yields plain preprocessed training batches.
    """

    loader: Callable[[str], Iterable]
    seed: int = 0
    progress: bool | None = None  # None: bars only on a terminal (sparseft.progress)
    bf16: bool = False
    run_dir: Path | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # what prepare reports (timings, counts)


def whole_parameters(names: list[str], method: str, **meta: Any) -> Selection:
    """A selection that trains `names` in full and nothing sparse."""
    return Selection(indices={}, shapes={}, full=names, meta={"method": method, **meta})


@dataclass
class CommonOptions:
    """Options every method takes (each method's `Options` extends this)."""

    batchnorm: str | None = field(default=None, metadata={
        "help": "BatchNorm running statistics: update (kept in the task file) or frozen; default: the method's "
                "own (update for full and spt-*, frozen for the others)", "choices": ["update", "frozen"]})


class Method:
    """Base class of every method; subclasses set `name`, `summary`, `Options` and `plan`.

    Methods that add modules also implement `inject` (and `fold` when they merge); the added
    modules are `sparseft.methods.modules.Added` modules or peft LoRA layers, which
    `modules.remove_added` takes out.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    mergeable: ClassVar[bool] = True
    #: BatchNorm statistics unless the `batchnorm` option says otherwise ("update" or "frozen")
    batchnorm: ClassVar[str] = "frozen"
    #: keep a copy of the parameters trained in full so unmerge can restore them
    keep_base: ClassVar[bool] = True

    Options: ClassVar[type] = CommonOptions
    #: the method's own defaults for training settings (`TrainConfig` fields) its paper uses, e.g. GPS's
    #: Adam without weight decay; `sparseft train` applies them where the flag is not given
    train_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.validate()

    def validate(self) -> None:
        """Refuse options that cannot work, naming the flag (subclasses add their own rules).

        Every number must be finite, every dropout in [0, 1); counts are checked by the methods.
        """
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            self.require(not isinstance(value, float) or math.isfinite(value), f.name, "a finite number")
            if "dropout" in f.name and isinstance(value, (int, float)):
                self.require(0 <= value < 1, f.name, "in [0, 1)")
        self.require(self.options.batchnorm in (None, "update", "frozen"), "batchnorm", "'update' or 'frozen'")

    def batchnorm_mode(self) -> str:
        """'update' or 'frozen': the `batchnorm` option, else the method's default."""
        return self.options.batchnorm or self.batchnorm

    def require(self, ok: bool, option: str, rule: str) -> None:
        """Raise ValueError naming `option` and its flag unless `ok`."""
        require(ok, self.options, option, rule, owner=self.name)

    # -- what subclasses implement ------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise `NotApplicable` (or ValueError for bad options) before anything is computed."""

    def plan(self, model: nn.Module, ctx: MethodContext) -> Selection:
        """What trains: the engine's selection; modules to add go in `meta["structure"]`."""
        raise NotImplementedError

    def inject(self, model: nn.Module, structure: dict[str, Any]) -> list[str]:
        """Add the modules `structure` describes to an applied model; return their parameter names."""
        raise delta.DeltaError(f"{self.name} adds no modules")

    def fold(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Fold the added modules into the base weights and take them out; return the old weights."""
        raise delta.DeltaError(self.merge_refusal())

    def training_hook(self, model: nn.Module) -> Any:
        """What `sparseft.train.fit` calls around each step (e.g. SpIEL's drop and regrow); None for most."""
        return None

    def merge_refusal(self) -> str:
        """Why this method cannot be merged (for methods with `mergeable = False`)."""
        return f"{self.name} cannot be merged"

    # -- the life cycle -----------------------------------------------------------------
    def plan_key(self, ctx: MethodContext) -> str:
        """What a plan depends on besides the model and data: method, options, seed."""
        return json.dumps({"method": self.name, "options": dataclasses.asdict(self.options), "seed": ctx.seed},
                          sort_keys=True, default=str)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Plan on the clean model, apply, add the modules.

        With `ctx.run_dir` the plan is kept there and reused by a later prepare with the same
        method, options and seed (a resumed run); a plan made with other settings is replaced.
        """
        if delta.is_applied(model):
            raise delta.DeltaError(f"{self.name}: the model already has a task ({delta.method_of(model)}); "
                                   "prepare a plain base model")
        self.check(model)
        cached = ctx.run_dir / PLAN_FILE if ctx.run_dir is not None else None
        key = self.plan_key(ctx)
        # several processes: rank 0 reads and writes the plan file, every rank plans (GPS's pass is
        # shared) and trains rank 0's plan
        selection = distributed.run_on_main(
            lambda: Selection.load(cached) if cached is not None and cached.exists() else None)
        if selection is None or selection.meta.get("plan_key") != key:
            selection = self.plan(model, ctx)
            selection.meta["plan_key"] = key
            selection = distributed.broadcast_object(selection)
            if cached is not None and distributed.is_main():
                selection.save(cached)
        delta.apply(model, selection, batchnorm=self.batchnorm_mode(),
                    keep_base=self.keep_base)
        structure = selection.meta.pop("structure", None)  # recorded with the modules, not twice
        if structure:
            try:
                structure = {"method": self.name, **structure}
                delta.mark_added(model, self._add(model, structure, seed=ctx.seed), structure)
            except Exception:  # the model is left as it was
                remove_added(model)
                delta.abandon(model)
                raise
            added = set(delta.added_parameters(model))
            ctx.info["added_parameters"] = sum(p.numel() for n, p in model.named_parameters() if n in added)
        ctx.info["trainable_backbone"] = delta.parameter_summary(model)["trainable_backbone"]
        return model

    def _add(self, model: nn.Module, structure: dict[str, Any], seed: int = 0) -> list[str]:
        """inject with a seeded RNG, keeping the engine's choice of what trains; the new modules train.

        Injectors (peft) may freeze every other parameter; the flags are put back afterwards.
        """
        flags = {id(p): p.requires_grad for p in model.parameters()}
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            names = self.inject(model, structure)
        params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        for name in names:
            params[name].requires_grad_(True)
        return names

    def save(self, model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the task file (refused after merging a method whose modules were folded away)."""
        owner = delta.method_of(model) if delta.is_applied(model) else None
        if owner is not None and owner != self.name and (owner in METHODS or delta.structure_of(model)):
            raise delta.DeltaError(f"{self.name}: the model's task was made by method {owner!r}; save it with "
                                   f"that method (or sparseft.save_delta)")
        if delta.is_merged(model) and delta.structure_of(model):
            raise delta.DeltaError(f"{self.name}: the model was merged, its added modules are folded into the "
                                   "base weights; save the task file before merging")
        options = dataclasses.asdict(self.options)
        return save_delta(model, path, extra={"method": self.name, "options": options, **(extra or {})})

    def load(self, model: nn.Module, path: TaskSource) -> nn.Module:
        """Apply a task file (a path or a `TaskFile` read already) to a plain base, re-creating added
        modules from the file's structure."""
        where = source_path(path)

        def rebuild(m: nn.Module, structure: dict[str, Any]) -> list[str]:
            if structure.get("method") != self.name:
                raise delta.DeltaError(f"{where}: holds modules of method {structure.get('method')!r}, "
                                       f"not {self.name!r}")
            return self._add(m, structure)

        return load_delta(model, path, rebuild=rebuild, remove=remove_added)

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold everything into the base weights: a plain model with the base's state-dict keys."""
        if not self.mergeable:
            raise delta.DeltaError(self.merge_refusal())
        if delta.is_merged(model):
            return model
        self._check_owner(model)
        if delta.added_parameters(model):
            delta.remember_base(model, self.fold(model))
            delta.clear_added(model)
        return delta.merge(model)

    def unmerge(self, model: nn.Module) -> nn.Module:
        """Back to the plain base model bit-exactly, from an applied or a merged model."""
        self._check_owner(model)
        if not delta.is_merged(model) and delta.added_parameters(model):
            remove_added(model)
            delta.clear_added(model)
        return delta.unmerge(model)

    def _check_owner(self, model: nn.Module) -> None:
        owner = delta.method_of(model)
        if delta.added_parameters(model) and owner != self.name:
            raise delta.DeltaError(f"{self.name}: the model holds modules of method {owner!r}")


# -- the registry of methods by name (filled by each method module's `@register`) -----------

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


#: methods' BatchNorm defaults before 2026-12-01, for runs recorded before run folders kept their policy
BATCHNORM_DEFAULT_BEFORE = {"gps": "update"}


def get_method(name: str, **options: Any) -> Method:
    """An instance of the method `name` with the given options (unknown options are an error)."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = set(options) - fields
    if unknown:
        raise InputError(f"method {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(fields)}")
    return cls(cls.Options(**options))


def head_selection(model: nn.Module, method: str, structure: dict[str, Any], **meta: Any) -> Selection:
    """The selection of a method that only adds modules: the head trains in full, the rest is frozen."""
    return whole_parameters(head_parameter_names(model), method, structure=structure, **meta)
