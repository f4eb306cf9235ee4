"""The rows and tables of official settings, and how a table is compared with parsed values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sparseft.errors import InputError

#: the settings every row states (None where the official code has none, e.g. no EMA); a row adds its method's own
KEYS = ("lr", "batch_size", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "optimizer", "weight_decay",
        "drop_path", "augmentation", "ema_decay", "mixup", "cutmix", "smoothing", "amp", "drop_last")

#: the backbone SPT's and SCT's code load: Google's original ImageNet-21k ViT-B/16 checkpoint (`Table` fields)
GOOGLE_VIT_B16_IN21K = {"backbone": "vit_base_patch16_224.orig_in21k",
                        "backbone_file": "ViT-B_16.npz (Google's ImageNet-21k ViT-B/16)"}


@dataclass(frozen=True)
class Row:
    """One task's official settings (`values`: KEYS plus the method's own, e.g. GPS's `k`)."""

    task: str  # sparseft's task folder name (VTAB-1k: cifar, dtd, ...; FGVC: CUB_200_2011, ...)
    source: str  # the file of the official repository the values were read from
    values: Mapping[str, Any]
    method: str = ""  # the sparseft method the row runs (a table of several methods names it)


@dataclass(frozen=True)
class Table:
    """What one official repository runs on one benchmark."""

    name: str  # e.g. gps-vtab
    paper: str
    benchmark: str  # vtab-1k | fgvc
    repository: str
    commit: str
    backbone: str  # the timm name (with pretrained tag) of the paper's exact weights
    backbone_file: str  # the weights file the official code loads
    protocol: str  # how the official code scores a run
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = field(default=())

    def row(self, task: str, method: str = "") -> Row:
        for r in self.rows:
            if r.task == task and (not method or r.method == method):
                return r
        raise InputError(f"{self.name}: no official row for task {task!r}{f' ({method})' if method else ''}; "
                         f"tasks: {', '.join(dict.fromkeys(r.task for r in self.rows))}")

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in self.rows))


def compare(table: Table, fixture: Mapping[str, Any]) -> list[str]:
    """Where `table` differs from the values parsed from the official scripts (`fixture`): one line each.

    Every fixture row must have a table row with the same task (and method), source and values.
    """
    problems = []
    for key in ("repository", "commit"):
        if fixture.get(key) != getattr(table, key):
            problems.append(f"{table.name}: {key} {getattr(table, key)!r} != parsed {fixture.get(key)!r}")
    seen = set()
    for parsed in fixture.get("rows", []):
        task, method = parsed["task"], parsed.get("method", "")
        try:
            row = table.row(task, method)
        except InputError as err:
            problems.append(str(err))
            continue
        seen.add((row.task, row.method))
        if row.source != parsed["source"]:
            problems.append(f"{table.name} {task}: source {row.source!r} != {parsed['source']!r}")
        for key, value in parsed["values"].items():
            mine = row.values.get(key, "<missing>")
            if mine != value and not (isinstance(mine, (int, float)) and isinstance(value, (int, float))
                                      and not isinstance(mine, bool) and float(mine) == float(value)):
                problems.append(f"{table.name} {task}{f' {method}' if method else ''}: {key} = {mine!r}, "
                                f"official {value!r} ({parsed['source']})")
    extra = [(r.task, r.method) for r in table.rows if (r.task, r.method) not in seen]
    problems += [f"{table.name}: row {t} {m} has no parsed official values".rstrip() for t, m in extra]
    return problems
