"""`sparseft layers MODEL`: a model's layers, grouped as `--lora-targets` takes them, and what each method does.

    $ sparseft layers mobilenetv2_100_offline
    mobilenetv2_100 (EfficientNet): 2,236,682 parameters; head: classifier
    TARGET       LAYERS  TYPE                  PARAMS  LORA / ROSA (--lora-targets)  GPS
    conv_stem         1  Conv2d 3x3               864  lora with --lora-conv         top-K
    conv_dw          17  Conv2d 3x3 depthwise  ...     no (grouped conv)             top-K
    conv_pw          17  Conv2d 1x1            ...     yes                           top-K
    ...
    suggested: --lora-targets conv_pw,conv_pwl

A target is the shortest name suffix that selects exactly the layers of its row (`qkv`,
`attn.proj`; `sparseft.anatomy.layer_groups`); `--lora-targets` takes a comma-separated list of
them. The GPS column is what GPS's default eligibility rules do with the row's parameters (top-K
entries per neuron, trained in full, or frozen); every method trains the head in full.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparseft.anatomy import LayerGroup, head_module_name, layer_groups, model_name
from sparseft.methods.lora import suggested_groups
from sparseft.selection import parameter_roles

#: how LoRA (and RoSA) take a layer of each `sparseft.anatomy.layer_kind`
LORA_TAKES = {"linear": "yes", "conv": "lora with --lora-conv", "grouped": "no (grouped conv)", None: "no"}
_ROLE_WORDS = {"select": "top-K", "full": "full", "frozen": "frozen"}


def _gps(group: LayerGroup, roles: dict[str, str]) -> str:
    """What GPS does with a group's parameters: one word when all agree, else per parameter name."""
    by_leaf: dict[str, set[str]] = {}
    for name in group.names:
        for param, role in roles.items():
            if param.rsplit(".", 1)[0] == name:
                by_leaf.setdefault(param.rsplit(".", 1)[-1], set()).add(_ROLE_WORDS[role])
    words = {w for found in by_leaf.values() for w in found}
    if len(words) == 1:
        return words.pop()
    return ", ".join(f"{leaf} {'/'.join(sorted(found))}" for leaf, found in by_leaf.items())


def layer_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One row per layer group (`sparseft.anatomy.layer_groups`), in model order: target, layers,
    type, params, lora (how --lora-targets takes it), gps (what GPS's default rules train), head."""
    roles = parameter_roles(model)
    return [{"target": g.target, "layers": len(g.names), "type": g.type, "params": g.params,
             "lora": "head: trained in full" if g.in_head else LORA_TAKES[g.kind], "gps": _gps(g, roles),
             "head": g.in_head, "names": g.names} for g in layer_groups(model)]


def format_layers(model: nn.Module, rows: list[dict[str, Any]] | None = None) -> str:
    """The listing `sparseft layers` prints: a title line, the table, and a suggested `--lora-targets`."""
    rows = layer_rows(model) if rows is None else rows
    total = sum(p.numel() for p in model.parameters())
    title = (f"{model_name(model)} ({type(model).__name__}): {total:,} parameters in {sum(r['layers'] for r in rows)} "
             f"layers; head: {head_module_name(model) or 'none'}")
    header = ["TARGET", "LAYERS", "TYPE", "PARAMS", "LORA / ROSA (--lora-targets)", "GPS"]
    table = [[r["target"], str(r["layers"]), r["type"], f"{r['params']:,}", r["lora"], r["gps"]] for r in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    right = {1, 3}  # numbers

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    picked, needs_conv = suggested_groups(model)
    flag = " --lora-conv" if needs_conv else ""
    suggestion = (f"suggested: --lora-targets {','.join(g.target for g in picked)}{flag}" if picked
                  else "no layer LoRA can adapt")
    return "\n".join([title, line(header), *map(line, table), suggestion])
