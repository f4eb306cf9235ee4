"""A peft adapter folder (SHiRA or LoRA) as a sparseft task file, so `sparseft.load` and `TaskBank` serve it.

    sparseft.import_peft("pets-peft", "pets.safetensors")                       # a folder sparseft exported
    sparseft.import_peft("their-lora", "t.safetensors", model=create_model(...))  # any peft LoRA / SHiRA

SHiRA: each layer's (row, column) indices become flat indices of a sparse task (the engine's life cycle, as
GPS's); the zero-valued padding of a sparseft export is dropped again (its header counts the real entries).
LoRA: a `lora` task with the same layers, r and alpha (`use_rslora`'s alpha/sqrt(r) becomes alpha·sqrt(r)/r).
`modules_to_save` and the extra entries (biases, norms, ...) become parameters trained in full; buffers
(BatchNorm statistics) are kept. Refused: other peft types, DoRA, per-layer ranks, pickled `adapter_model.bin`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from sparseft import delta
from sparseft.anatomy import fingerprint, head_parameter_names
from sparseft.api import base_from_record
from sparseft.deltafile import save_delta
from sparseft.export.common import ExportError
from sparseft.export.peft import ADAPTER_FILE, CONFIG_FILE, PREFIX
from sparseft.fileutil import check_output_file, read_json
from sparseft.methods import get_method
from sparseft.selection import Selection


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter config, tensors under the base model's names, sparseft's record or {}) of a peft folder."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ExportError(f"{folder}: no {CONFIG_FILE}: not a peft adapter folder")
    if not (folder / ADAPTER_FILE).is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ExportError(f"{folder}: no {ADAPTER_FILE}" + ("; adapter_model.bin is a pickle, which sparseft does "
                                                             "not load (save the adapter with safetensors)"
                                                             if pickled else ""))
    config = read_json(folder / CONFIG_FILE, ExportError, "adapter config")
    try:
        with safe_open(str(folder / ADAPTER_FILE), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}
        record = json.loads(meta.get("sparseft", "{}"))
    except Exception as err:  # noqa: BLE001 - safetensors' own error type, OS errors, a damaged record
        raise ExportError(f"{folder / ADAPTER_FILE}: not a readable safetensors file, truncated or corrupt "
                          f"({err})") from err
    return config, tensors, record


def _base_from_record(record: dict[str, Any], weights: str | Path | None, where: Path) -> nn.Module:
    extra = record.get("task_record") or {}
    if "model" not in extra:
        raise ExportError(f"{where}: the adapter does not say which sparseft base it is for; pass the base model "
                          "(model=, or --model NAME --num-classes N)")
    return base_from_record(extra, where, weights or extra.get("weights"))


def _split(tensors: dict[str, torch.Tensor], modules_to_save: list[str], suffixes: tuple[str, ...]
           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(per adapted layer: its adapter tensors by suffix, everything else under the base model's names)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        hit = next((s for s in suffixes if key.endswith("." + s)), None)
        if hit is not None:
            layers.setdefault(key[: -len(hit) - 1], {})[hit] = t
        else:
            rest[delta.base_name(key)] = t
    return layers, rest


def import_peft(folder: str | Path, out: str | Path, *, model: nn.Module | None = None,
                weights: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the peft adapter in `folder` as a sparseft task file `out`; returns the path.

    `model`: the plain base the adapter was trained on (default: the base a sparseft export records).
    A sparseft export made for another base than `model` is refused (the fingerprint differs).
    """
    folder, out = Path(folder), check_output_file(out, overwrite=overwrite, label="--out", what="task file")
    config, tensors, record = read_adapter(folder)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("SHIRA", "LORA"):
        raise ExportError(f"{folder}: a {peft_type or 'unknown'} adapter; sparseft imports SHiRA and LoRA adapters")
    if model is None:
        model = _base_from_record(record, weights, folder)
    if delta.is_applied(model):
        raise delta.DeltaError("import_peft needs a plain base model (this one has a task applied)")
    if record.get("fingerprint"):
        head = record.get("head") or head_parameter_names(model)
        if fingerprint(model, exclude=set(head)) != record["fingerprint"]:
            raise ExportError(f"{folder}: this adapter was exported from a task on another base (fingerprint "
                              f"{record['fingerprint'][:12]}…); load the base weights it was trained from")
    modules_to_save = list(config.get("modules_to_save") or [])
    if peft_type == "SHIRA":
        return _import_shira(folder, out, model, tensors, record, modules_to_save)
    return _import_lora(folder, out, model, config, tensors, record, modules_to_save)


def _full_parts(model: nn.Module, rest: dict[str, torch.Tensor], where: Path
                ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(parameters trained in full, task tensors `full/...` and `buffer/...`) from the non-adapter entries."""
    params, buffers = delta.params_by_name(model), delta.buffers_by_name(model)
    full, out = [], {}
    for name, t in rest.items():
        target = params.get(name, buffers.get(name))
        if target is None or tuple(target.shape) != tuple(t.shape):
            raise ExportError(f"{where}: the adapter's entry {name!r} {tuple(t.shape)} does not fit this model")
        if name in params:
            full.append(name)
            out[f"full/{name}"] = t
        else:
            out[f"buffer/{name}"] = t
    return full, out


def _head(model: nn.Module, full: list[str]) -> str | None:
    heads = head_parameter_names(model)
    return heads[0].rpartition(".")[0] if heads and all(h in full for h in heads) else None


def _import_shira(folder: Path, out: Path, model: nn.Module, tensors: dict[str, torch.Tensor],
                  record: dict[str, Any], modules_to_save: list[str]) -> Path:
    layers, rest = _split(tensors, modules_to_save, ("shira_indices", "shira_weight"))
    real = record.get("real_entries") or {}
    modules = dict(model.named_modules())
    indices, shapes, values = {}, {}, {}
    for layer, parts in sorted(layers.items()):
        module = modules.get(layer)
        if not isinstance(module, nn.Linear) or set(parts) != {"shira_indices", "shira_weight"}:
            raise ExportError(f"{folder}: SHiRA layer {layer!r} is not an nn.Linear of this model, or lacks indices "
                              "or weights")
        idx, w = parts["shira_indices"].long(), parts["shira_weight"]
        n = int(real.get(layer, w.numel()))
        flat = idx[0, :n] * module.in_features + idx[1, :n]
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= module.weight.numel()):
            raise ExportError(f"{folder}: SHiRA layer {layer!r} has indices outside its weight")
        unique, inverse = torch.unique(flat, return_inverse=True)  # sorted; repeated entries add up, as in peft
        summed = torch.zeros(unique.numel(), dtype=w.dtype).index_add_(0, inverse, w[:n])
        name = f"{layer}.weight"
        indices[name], shapes[name], values[f"sparse/{name}/values"] = unique, tuple(module.weight.shape), summed
    full, parts = _full_parts(model, rest, folder)
    meta = {"imported_from": {"format": "peft", "peft_type": "SHIRA", "folder": str(folder)}}
    if record.get("method"):
        meta["method"] = record["method"]
    selection = Selection(indices=indices, shapes=shapes, full=full, meta=meta)
    delta.apply(model, selection, batchnorm=record.get("batchnorm") or "frozen", head=_head(model, full))
    try:
        delta.import_task(model, {**values, **parts})
        extra = {**(record.get("task_record") or {}), "imported_from": meta["imported_from"]}
        return save_delta(model, out, extra=extra)
    finally:
        delta.unmerge(model)


def _import_lora(folder: Path, out: Path, model: nn.Module, config: dict[str, Any],
                 tensors: dict[str, torch.Tensor], record: dict[str, Any], modules_to_save: list[str]) -> Path:
    if config.get("use_dora") or any(k.endswith("lora_magnitude_vector") for k in tensors):
        raise ExportError(f"{folder}: a DoRA adapter; sparseft's LoRA has no magnitude vector")
    layers, rest = _split(tensors, modules_to_save, ("lora_A.weight", "lora_B.weight"))
    if not layers:
        raise ExportError(f"{folder}: the LoRA adapter holds no lora_A/lora_B weights")
    ranks = {parts["lora_A.weight"].shape[0] for parts in layers.values()}
    alphas = set((config.get("alpha_pattern") or {}).values()) | {config.get("lora_alpha", 8)}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ExportError(f"{folder}: per-layer ranks or alphas ({sorted(ranks)}, {sorted(alphas)}); sparseft's "
                          "LoRA task has one r and one alpha")
    r, alpha = ranks.pop(), float(alphas.pop())
    if config.get("use_rslora"):
        alpha *= math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); sparseft (peft's default) by alpha/r
    full, parts = _full_parts(model, rest, folder)
    names = sorted(layers)
    options = {"lora_targets": ",".join(names), "lora_r": r, "lora_alpha": alpha,
               "lora_dropout": float(config.get("lora_dropout") or 0.0),
               "lora_conv": any(isinstance(model.get_submodule(n), nn.Conv2d) for n in names)}
    method = get_method("lora", **options)
    imported = {"format": "peft", "peft_type": "LORA", "folder": str(folder)}
    selection = Selection(indices={}, shapes={}, full=full, meta={"method": "lora", "imported_from": imported})
    delta.apply(model, selection, batchnorm=record.get("batchnorm") or "frozen", head=_head(model, full))
    try:
        structure = {"method": "lora", "layers": names, "r": r, "alpha": alpha, "dropout": options["lora_dropout"]}
        delta.mark_added(model, method._add(model, structure), structure)
        for layer, lora in layers.items():
            for suffix, t in lora.items():
                parts[f"added/{layer}.{suffix.replace('.', '.default.')}"] = t
        missing = [k for k in (f"added/{n}" for n in delta.added_parameters(model)) if k not in parts]
        if missing:
            raise ExportError(f"{folder}: the adapter lacks {missing[:3]}")
        delta.import_task(model, parts)
        extra = {**(record.get("task_record") or {}), "imported_from": imported}
        extra.pop("method", None)
        extra.pop("options", None)
        return method.save(model, out, extra=extra)
    finally:
        method.unmerge(model)
