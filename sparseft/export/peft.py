"""A sparseft task as an HF peft adapter folder: `PeftModel.from_pretrained(base, DIR)` loads it, no sparseft needed.

    sparseft.export_peft("runs/pets/delta.safetensors", "pets-peft")     # or: sparseft export ... --format peft

What maps to what (docs/ecosystem.md has the reasons and the measured costs):

- sparse entries of `nn.Linear` weights (GPS, SpIEL, ...) -> a SHiRA adapter (`peft_type: SHIRA`): per layer
  `shira_indices` (int32 [2, n]: row, column) and `shira_weight` (the delta values). peft gives every layer
  exactly r·(in + out) entries for one r, so r is the smallest that holds every layer's entries and each layer
  is padded with zero-valued entries at unselected positions (the real entries first). A Linear whose weight
  is smaller than r·(in + out) (peft refuses those) is carried whole instead: fewer values than the padding.
- LoRA layers (lora, spt-lora, rosa) -> a LoRA adapter with the same r and lora_alpha (peft's scaling alpha/r).
- the head -> `modules_to_save` (peft's own way to carry a new classifier).
- parameters trained in full outside the head (biases, layer-scale gammas, norms) and changed BatchNorm
  statistics -> extra checkpoint entries under their model names (`<layer>.base_layer.bias` for an adapted
  layer), the layout of peft's LoRA `bias="all"/"lora_only"`; peft loads them into the model as they are.
- sparse entries peft cannot index (convolutions, bias tables, position embeddings; any entry of a LoRA
  task): a vector is carried whole; weights of 2 or more dimensions are carried whole by default when they
  hold at most 5 % of the base model's values (a ViT's patch embedding, which GPS selects from), always with
  `dense=True`, never with `dense=False`; otherwise the task is refused, the cost named in the refusal.

Refused before anything is written: methods whose modules no peft tuner has (adapter, spt-adapter, VPT, SCT,
SSF) and tasks that train only whole parameters (full, linear, bitfit: a plain model, see `--format onnx`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparseft import delta
from sparseft.api import load, method_named_in, unmerge
from sparseft.deltafile import PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE, PEFT_PREFIX, TaskSource, read_task
from sparseft.export.common import ExportError, atomic_folder, check_output_folder, task_summary
from sparseft.hub.registry import REGISTRY
from sparseft.methods.modules import Added, lora_layers
from sparseft.version import __version__

PREFIX = PEFT_PREFIX  # where peft's checkpoints keep the base model's names
ADAPTER_FILE = PEFT_ADAPTER_FILE  # (defined with the task file's reader, which tells an adapter from a task file)
CONFIG_FILE = PEFT_CONFIG_FILE
MASK_TYPE = "sparseft"  # any value but "random": peft then takes the stored indices as the mask

#: why a method's task has no peft form
NO_PEFT_TUNER = {
    "adapter": "a bottleneck adapter (down -> GELU -> up) is non-linear: no peft tuner holds it and it cannot be "
               "folded into a weight",
    "spt-adapter": "its parallel adapters are non-linear (down -> GELU -> up): no peft tuner holds them",
    "vpt-shallow": "prompt tokens are inserted into the token sequence inside the backbone; peft's prompt tuners "
                   "work on transformers' language models, not on timm backbones",
    "vpt-deep": "prompt tokens are inserted into the token sequence inside the backbone; peft's prompt tuners "
                "work on transformers' language models, not on timm backbones",
    "sct": "its salient-channel update acts on the residual stream, which has no weight a peft tuner could adapt",
    "ssf": "peft has no scale-and-shift (SSF) tuner; merged, SSF is a plain model: export --format onnx",
    "full": "full fine-tuning changes every weight: as an adapter it would be the whole model; export the merged "
            "model (--format onnx, or sparseft merge)",
    "linear": "linear probing trains only the head, and peft needs target layers; export the merged model "
              "(--format onnx, or sparseft merge)",
    "bitfit": "BitFit trains only biases and the head, and peft needs target layers; export the merged model "
              "(--format onnx, or sparseft merge)",
}


@dataclass
class PeftExport:
    """What `export_peft` wrote and what the peft form costs beside the task file."""

    folder: Path
    peft_type: str
    r: int
    layers: int  # SHiRA or LoRA target layers
    entries: int  # SHiRA: the task's sparse entries in SHiRA layers; LoRA: LoRA values
    padding: int  # SHiRA: zero-valued entries added to reach r·(in + out) per layer
    whole_values: int  # values of weights carried whole (parameters trained in full, dense-carried weights)
    head_values: int
    adapter_bytes: int
    task_file_bytes: int
    whole: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def _refuse_by_header(header: dict[str, Any], where: str) -> None:
    method = method_named_in(header)
    if method in NO_PEFT_TUNER:
        raise ExportError(f"{where}: a {method} task has no peft form: {NO_PEFT_TUNER[method]}")


def _in_mha(model: nn.Module, module_name: str) -> bool:
    """nn.MultiheadAttention reads its out_proj's weight without calling it: an adapter there would be skipped."""
    parent, _, child = module_name.rpartition(".")
    return child == "out_proj" and isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention)


def _head_modules(model: nn.Module, head: list[str], where: str) -> list[str]:
    """The head's modules for `modules_to_save`; refused where peft's suffix match would catch another module too."""
    names = sorted({n.rpartition(".")[0] for n in head if n.rpartition(".")[0]})
    modules = [n for n, _ in model.named_modules()]
    for name in names:
        caught = [m for m in modules if m.endswith(name) and m != name and ".lora_" not in m]
        if caught:
            raise ExportError(f"{where}: peft matches modules_to_save by name suffix, and the head {name!r} would "
                              f"also catch {caught[:3]}; this model's head cannot be carried by peft")
    return names


def _model_key(params: dict[str, torch.Tensor], name: str) -> str:
    """A base parameter's name in the model as it is (peft wrappers hold a layer as `<layer>.base_layer`)."""
    if name in params:
        return name
    layer, _, leaf = name.rpartition(".")
    wrapped = f"{layer}.base_layer.{leaf}"
    return wrapped if wrapped in params else name


def _regex(layers: list[str]) -> str:
    import re

    return "^(?:" + "|".join(re.escape(n) for n in layers) + ")$"  # peft full-matches a string target


def _shira_entries(index: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                   count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shira_indices int32 [2, count], shira_weight [count]): the task's entries, then zero-valued padding at the
    first unselected positions."""
    out_f, in_f = shape
    free = torch.ones(out_f * in_f, dtype=torch.bool)
    free[index] = False
    pad = free.nonzero().flatten()[: count - index.numel()]
    flat = torch.cat([index, pad])
    weight = torch.cat([values.detach().float(), torch.zeros(pad.numel())]).to(values.dtype)
    return torch.stack([flat // in_f, flat % in_f]).to(torch.int32).contiguous(), weight.contiguous()


def _shira_plan(model: nn.Module, entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]], list[str], list[str], int]:
    """(SHiRA layers: name -> (index, values, shape), parameters SHiRA cannot index, Linear weights smaller than
    their SHiRA entries would be, r)."""
    layers, whole, smaller = {}, [], []
    for name, (index, values) in entries.items():
        if not index.numel():
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if isinstance(module, nn.Linear) and leaf == "weight" and not _in_mha(model, owner):
            layers[owner] = (index.cpu().long(), values.cpu(), tuple(module.weight.shape))
        else:
            whole.append(name)
    r = max((math.ceil(i.numel() / sum(s)) for i, _, s in layers.values()), default=1)
    for owner, (_, _, (o, i)) in list(layers.items()):
        if r * (o + i) > o * i:  # peft refuses more entries than the weight has: the whole weight is fewer values
            smaller.append(f"{owner}.weight")
            del layers[owner]
    return layers, whole, smaller, r


AUTO_DENSE_SHARE = 0.05  # dense=None carries 2+-dim weights whole up to this share of the base's values


def _check_whole(model: nn.Module, whole: list[str], dense: bool | None, where: str, why: str) -> None:
    """Refuse weights of 2+ dimensions that would be carried whole (vectors always are).

    `dense` True carries them, False refuses them, None carries them while they hold at most
    `AUTO_DENSE_SHARE` of the base model's values (a ViT's patch embedding: about 1 %).
    """
    params = delta.params_by_name(model)
    big = [n for n in whole if params[n].dim() > 1]
    if not big or dense:
        return
    values = sum(params[n].numel() for n in big)
    share = values / sum(p.numel() for p in params.values())
    if dense is None and share <= AUTO_DENSE_SHARE:
        return
    reason = ("a LoRA adapter holds no sparse entries" if why == "lora" else
              "SHiRA adapts only nn.Linear weights (peft's SHiRA has no convolution or other layer)")
    limit = ("--no-dense was given" if dense is False else
             f"carried whole they would be {share:.0%} of the base model (more than the "
             f"{AUTO_DENSE_SHARE:.0%} carried by default)")
    raise ExportError(f"{where}: sparse entries in {', '.join(big[:4])}{'…' if len(big) > 4 else ''} cannot "
                      f"be carried: {reason}, and {limit}; pass --dense (dense=True) to carry these weights whole "
                      f"({values:,} values, {values * params[big[0]].element_size() / 1e6:.2f} MB) as "
                      "checkpoint entries peft loads into the model, or export the merged model (--format onnx)")


def export_peft(task_file: TaskSource, out: str | Path, *, model: nn.Module | None = None,
                weights: str | Path | None = None, dense: bool | None = None,
                overwrite: bool = False) -> PeftExport:
    """Write the task as a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`, README.md).

    `model`: the plain base to load the task onto (default: built from the task file's header, `weights`
    overriding its base weights). `dense`: whether sparse entries peft cannot index (convolutions, ...) are
    carried as whole weights: True always, False never (refuse), None (default) while they hold at most 5 % of
    the base's values. Refusals come before anything is written (module docstring).
    """
    task = read_task(task_file)
    where = str(task.path)
    if task.merged:
        raise ExportError(f"{where}: a merged model has no adapter to export; export the task file it was merged "
                          "from, or this file with --format onnx")
    _refuse_by_header(task.header, where)
    check_output_folder(out, overwrite)
    model = load(task, model, weights=weights)
    try:
        return _write(model, task, Path(out), dense=dense, overwrite=overwrite)
    finally:
        if delta.is_applied(model):
            unmerge(model)  # the base model again (the export loaded the task onto it)


def _write(model: nn.Module, task: Any, out: Path, *, dense: bool | None, overwrite: bool) -> PeftExport:
    header, where = task.header, str(task.path)
    extra = header.get("extra", {})
    added = [n for n, m in model.named_modules() if isinstance(m, Added)]
    if added:
        raise ExportError(f"{where}: holds modules ({added[0]}, ...) that no peft tuner has")
    delta.sync(model)  # the engine holds base + delta in place: whole weights are read as they are
    params = dict(model.named_parameters())
    by_base = delta.params_by_name(model)
    state = delta.export_task(model)[1]
    entries = delta.sparse_entries(model)
    head = list(header.get("head") or [])
    head_modules = _head_modules(model, head, where)
    wrappers = dict(lora_layers(model))
    tensors: dict[str, torch.Tensor] = {}
    real: dict[str, int] = {}
    padding = 0
    if wrappers:
        peft_type, layers = "LORA", sorted(wrappers)
        ranks = {(w.r["default"], float(w.lora_alpha["default"])) for w in wrappers.values()}
        if len(ranks) > 1:
            raise ExportError(f"{where}: its LoRA layers differ in rank or alpha {sorted(ranks)}")
        (r, alpha), = ranks
        whole = [n for n, (i, _) in entries.items() if i.numel()]
        _check_whole(model, whole, dense, where, "lora")
        for n in delta.added_parameters(model):
            if ".lora_" in n:
                tensors[PREFIX + n.replace(".default.", ".").removesuffix(".default")] = state[f"added/{n}"]
        entry_count = sum(t.numel() for t in tensors.values())
        dropout = next(iter(wrappers.values())).lora_dropout["default"]
        config_kwargs = {"r": r, "lora_alpha": alpha, "lora_dropout": float(getattr(dropout, "p", 0.0)),
                         "target_modules": _regex(layers), "bias": "none"}
    else:
        if not any(i.numel() for i, _ in entries.values()):
            raise ExportError(f"{where}: the task trains no sparse entries and no LoRA layers (only whole "
                              "parameters); peft needs target layers: export --format onnx, or sparseft merge")
        peft_type = "SHIRA"
        shira, whole, smaller, r = _shira_plan(model, entries)
        layers = sorted(shira)
        if not layers:
            carried = sum(by_base[n].numel() for n in whole + smaller)
            raise ExportError(f"{where}: no sparse entry lies in an nn.Linear weight, the only layer peft's SHiRA "
                              f"adapts; as a peft adapter the task would be {carried:,} values carried whole: export "
                              "the merged model instead (--format onnx, or sparseft merge)")
        _check_whole(model, whole, dense, where, "shira")
        whole += smaller
        for layer, (index, values, shape) in shira.items():
            idx, weight = _shira_entries(index, values, shape, r * sum(shape))
            tensors[f"{PREFIX}{layer}.shira_indices"], tensors[f"{PREFIX}{layer}.shira_weight"] = idx, weight
            real[layer] = index.numel()
            padding += weight.numel() - index.numel()
        entry_count = sum(real.values())
        config_kwargs = {"r": r, "mask_type": MASK_TYPE, "target_modules": _regex(layers)}
    targets = set(layers)

    def key(name: str) -> str:
        name = _model_key(params, name)
        owner, _, leaf = name.rpartition(".")
        return PREFIX + (f"{owner}.base_layer.{leaf}" if owner in targets and peft_type == "SHIRA" else name)

    in_head = tuple(m + "." for m in head_modules)
    trained = [k.removeprefix("full/") for k in state if k.startswith("full/")]
    trained += [n for n in delta.added_parameters(model) if ".lora_" not in n]  # SPT's biases of LoRA layers
    carried = [n for n in dict.fromkeys([*trained, *whole]) if not n.startswith(in_head)]
    for name in carried:
        tensors[key(name)] = by_base[name].detach().cpu().contiguous()
    for k, t in state.items():
        if k.startswith("buffer/") and not k.removeprefix("buffer/").startswith(in_head):
            tensors[key(k.removeprefix("buffer/"))] = t
    head_values = 0
    for module in head_modules:
        for k, t in model.get_submodule(module).state_dict().items():
            tensors[f"{PREFIX}{module}.{k}"] = t.detach().cpu().contiguous()
            head_values += t.numel()
    record = {"sparseft_version": __version__, "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "source": str(task.path), "method": method_named_in(header), "fingerprint": header["fingerprint"],
              "head": head, "batchnorm": header.get("batchnorm"), "real_entries": real, "task_record": extra}
    config = _config(peft_type, config_kwargs, head_modules, extra)
    with atomic_folder(out, overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "sparseft": json.dumps(record)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        whole_values = sum(by_base[n].numel() for n in carried)
        (tmp / "README.md").write_text(_card(peft_type, extra, r, len(layers), entry_count, padding, whole_values))
    return PeftExport(out, peft_type, int(r), len(layers), entry_count, padding, whole_values, head_values,
                      (out / ADAPTER_FILE).stat().st_size, Path(task.path).stat().st_size, sorted(whole))


def _config(peft_type: str, kwargs: dict[str, Any], head_modules: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """adapter_config.json as peft writes it (peft's own config class fills every default)."""
    from peft import LoraConfig, ShiraConfig

    cls = LoraConfig if peft_type == "LORA" else ShiraConfig
    config = cls(**kwargs, modules_to_save=head_modules or None, inference_mode=True,
                 base_model_name_or_path=extra.get("model"))
    out = config.to_dict()
    out.pop("mask_fn", None)
    return json.loads(json.dumps(out, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def _card(peft_type: str, extra: dict[str, Any], r: int, layers: int, entries: int, padding: int,
          whole: int) -> str:
    facts = task_summary(extra)
    tuner = "SHiRA (sparse high-rank adapter)" if peft_type == "SHIRA" else "LoRA"
    padded = f" ({padding:,} zero-valued padding entries: peft's SHiRA holds r·(in+out) per layer)" if padding else ""
    return f"""---
library_name: peft
base_model: {facts['base_model']}
tags:
- sparseft
- {peft_type.lower()}
- {facts['method'] or 'gps'}
---

# {facts['method'] or 'gps'} task as a peft {tuner} adapter

Exported by sparseft {__version__} from a `{facts['method'] or 'gps'}` task on `{facts['base_model']}`
({facts['num_classes']} classes, {facts['img_size'] or 'default'} px): r = {r}, {layers} adapted layers,
{entries:,} adapter values{padded}, {whole:,} values of parameters trained or carried whole (biases, norms,
weights SHiRA cannot index). The head is in `modules_to_save`.

```python
from peft import PeftModel

base = ...  # {_base_recipe(extra)}
model = PeftModel.from_pretrained(base, "this folder")   # .merge_and_unload() for a plain model
```
"""


def _base_recipe(extra: dict[str, Any]) -> str:
    """How to build the task's base without sparseft, for the card."""
    name, classes, size = extra.get("model"), extra.get("num_classes"), extra.get("img_size")
    sized = f", img_size={size}" if size else ""
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is not None:
        recipe = (f"{spec.library}'s {spec.architecture} with {classes} classes{sized} and the weights of "
                  f"`sparseft weights fetch {name}` (the head's values come from this adapter)")
        if size and "vit" in spec.architecture:  # the stored position grid is another size's
            recipe += ("; first resize the weights' `pos_embed` to this size's grid with "
                       "`timm.layers.resample_abs_pos_embed(pos_embed, new_size, num_prefix_tokens=1, "
                       "interpolation='bicubic', antialias=False)`: timm's default (antialiased) resampling "
                       "changes the logits (docs/weights.md)")
        return recipe
    weights = f" and the base weights {Path(extra['weights']).name}" if extra.get("weights") else ""
    return f"timm.create_model({name!r}, num_classes={classes}{sized}){weights}"
