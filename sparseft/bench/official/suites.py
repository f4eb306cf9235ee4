"""The paper suites, generated from the official tables (`sparseft.bench.official`): one source of truth.

    python -m sparseft.bench.official.suites          # rewrite sparseft/bench/suites/*-paper.yaml

`suite_data(name)` builds a paper suite as a mapping and `render(name)` its YAML text; the committed
files must equal `render` (a test holds them). Every official value of a table row lands in the
suite (per task where it varies), mapped onto sparseft's settings:

    lr, batch size, drop-path, EMA decay  ->  the row's per_task_train (or its train where uniform)
    K (--times_para), SCT's topN         ->  the method's options (per_task where it varies)
    direct resize, no augmentation       ->  preprocessing: vtab;  simple-aug -> preprocessing: fgvc
    mixup/cutmix alphas, smoothing       ->  train.mixup / cutmix / label_smoothing (timm's Mixup)
    amp (fp16 autocast)                  ->  bf16 autocast
    drop-last, selection crop scale      ->  train.drop_last, GPS's view_scale

What has no sparseft setting (SCT's module scale, RandAugment, the 10 cool-down epochs) is listed
in docs/reproduce.md. The baselines (full, linear, lora) of the GPS suites have no official table
here: they keep fixed settings, named in the file's header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sparseft.bench.official import TABLES
from sparseft.bench.official.table import Row, Table

SUITES = {"vtab-1k-paper": "gps-vtab", "fgvc-paper": "gps-fgvc", "spt-vtab-paper": "spt-vtab",
          "sct-vtab-paper": "sct-vtab"}
#: `sparseft reproduce` targets: (suite, the rows that are the paper's method)
TARGETS = {"gps-vtab": "vtab-1k-paper", "gps-fgvc": "fgvc-paper", "spt-vtab": "spt-vtab-paper",
           "sct-vtab": "sct-vtab-paper"}

VTAB_GROUPS = {
    "natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"],
}
FGVC_TASKS = ["CUB_200_2011", "nabirds", "OxfordFlower", "Stanford-dogs", "Stanford-cars"]
PREPROCESSING = {"direct-resize": "vtab", "simple-aug": "fgvc", "resize-randaugment": "vtab"}
BASELINES = [  # not from an official table: the GPS suites' comparison rows, at fixed settings
    {"label": "full", "method": "full", "grid": {"lr": [1.0e-4]}},
    {"label": "linear", "method": "linear", "grid": {"lr": [1.0e-3]}},
    {"label": "lora", "method": "lora", "grid": {"lr": [1.0e-3]}},
]
BASELINE_TRAIN = {"epochs": 100, "weight_decay": 1.0e-4, "warmup_epochs": 10, "warmup_lr": 1.0e-7, "min_lr": 1.0e-8,
                  "bf16": True}


def _tasks(table: Table) -> dict[str, list[str]]:
    if table.benchmark == "fgvc":
        return {"natural": [f"fgvc:${{FGVC_ROOT}}/{t}" for t in FGVC_TASKS]}
    return {g: [f"${{VTAB_ROOT}}/{t}" for t in ts] for g, ts in VTAB_GROUPS.items()}


def _train(values: dict[str, Any]) -> dict[str, Any]:
    """sparseft's train settings for one row's official values."""
    return {"epochs": values["epochs"], "lr": values["lr"], "batch_size": values["batch_size"],
            "optimizer": values["optimizer"], "weight_decay": values.get("weight_decay", 0.0),
            "warmup_epochs": values["warmup_epochs"], "warmup_lr": values["warmup_lr"], "min_lr": values["min_lr"],
            "label_smoothing": values["smoothing"], "drop_path": values["drop_path"], "mixup": values["mixup"],
            "cutmix": values["cutmix"], "drop_last": values["drop_last"], "bf16": values["amp"],
            "preprocessing": PREPROCESSING[values["augmentation"]],
            **({"ema_decay": values["ema_decay"]} if values["ema_decay"] is not None else {})}


def _split(rows: list[Row], settings) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the row's settings, each task's own) of `settings(row)`: a value most tasks share goes to the row
    (ties: the first task's), the others to their tasks; a setting no two tasks share stays per task."""
    each = {r.task: settings(r) for r in rows}
    shared: dict[str, Any] = {}
    for key in dict.fromkeys(k for d in each.values() for k in d):
        values = [d[key] for d in each.values() if key in d]
        common = max(values, key=lambda v: sum(v == w for w in values))  # the first of the most frequent
        if len(values) == len(each) and (len(each) == 1 or sum(v == common for v in values) > 1):
            shared[key] = common
    own = {t: {k: v for k, v in d.items() if k not in shared or shared[k] != v} for t, d in each.items()}
    return shared, {t: d for t, d in own.items() if d}


def _row(label: str, method: str, rows: list[Row], options) -> dict[str, Any]:
    train, per_task_train = _split(rows, lambda r: _train(dict(r.values)))
    opts, per_task = _split(rows, options)
    entry: dict[str, Any] = {"label": label, "method": method, "options": opts, "train": train}
    if per_task:
        entry["per_task"] = per_task
    if per_task_train:
        entry["per_task_train"] = per_task_train
    return entry


def _gps_options(row: Row) -> dict[str, Any]:
    return {"k": row.values["k"], "view_scale": row.values["selection_crop_scale"][0]}


def suite_data(name: str) -> dict[str, Any]:
    """The paper suite `name` (a key of SUITES) as a mapping, built from its official table."""
    table = TABLES[SUITES[name]]
    backbone = {"name": table.backbone, "img_size": 224, "pretrained": True}
    data: dict[str, Any] = {"name": name, "protocol": "paper", "tasks": _tasks(table), "backbones": [backbone]}
    if table.paper == "gps":
        preprocessing = PREPROCESSING[table.rows[0].values["augmentation"]]
        data["train"] = {**BASELINE_TRAIN, "batch_size": 64 if table.benchmark == "vtab-1k" else 32,
                         "preprocessing": preprocessing,
                         **({"label_smoothing": 0.1} if table.benchmark == "fgvc" else {})}
        data["methods"] = [*BASELINES, _row("gps", "gps", list(table.rows), _gps_options)]
    elif table.paper == "spt":
        methods = []
        for kind in ("lora", "adapter"):
            rows = [r for r in table.rows if r.method == f"spt-{kind}"]
            for budget in rows[0].values["budgets"]:
                methods.append(_row(f"spt-{kind}-{budget / 1e6:.1f}M", f"spt-{kind}", rows,
                                    lambda r, b=budget: {"budget": b, "rank": r.values["rank"],
                                                         "spt_alpha": r.values["spt_alpha"]}))
        data["methods"] = methods
    else:
        data["methods"] = [_row("sct", "sct", list(table.rows), lambda r: {"channels": r.values["channels"]})]
    data["seeds"] = [0]
    return data


def paper_labels(name: str) -> list[str]:
    """The rows of suite `name` that run the paper's own method (those `sparseft reproduce` runs)."""
    table = TABLES[SUITES[name]]
    return [m["label"] for m in suite_data(name)["methods"] if m["method"].startswith(table.paper)]


def render(name: str) -> str:
    """The YAML text of the paper suite `name`, with a header naming its source."""
    table = TABLES[SUITES[name]]
    header = [
        f"# GENERATED by `python -m sparseft.bench.official.suites` from the table {table.name}",
        f"# (sparseft/bench/official/{table.paper}.py: {table.repository} @ {table.commit[:10]}); do not edit.",
        f"# {table.benchmark} as the official code runs it. PAPER PROTOCOL: {table.protocol}.",
        "# The settings were chosen by their authors on test accuracy, which is why they are not in the honest",
        "# suites; what sparseft cannot reproduce is listed in docs/reproduce.md.",
    ]
    if table.paper == "gps":
        header.append("# The baselines (full, linear, lora) are not from an official table: fixed lr, AdamW wd 1e-4.")
    body = yaml.safe_dump(suite_data(name), sort_keys=False, default_flow_style=None, width=110)
    return "\n".join(header) + "\n" + body


def suite_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "suites" / f"{name}.yaml"


def main() -> None:
    for name in SUITES:
        suite_path(name).write_text(render(name))
        print(f"wrote {suite_path(name)}")


if __name__ == "__main__":
    main()
