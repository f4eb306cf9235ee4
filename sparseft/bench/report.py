"""Turn a results folder into the papers' kind of tables and figures.

`write_report(results_dir)` reads every cell's `record.json` and writes
    report.md    protocol, per-task top-1, group means, both overall means, parameters, time,
                 and the papers' claims checked on these numbers
    results.csv  one row per cell (all seeds)
    acc_vs_params.png       mean accuracy against trainable backbone parameters (log x)
    gps_distribution.png    where GPS's selected weights sit, per block and matrix type
    gps_levels.png          neuron- vs layer- vs net-level selection side by side (if run)
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from sparseft.fileutil import atomic_path, write_text_atomic

GROUP_ORDER = ("natural", "specialized", "structured")
# "REF" is the ablations' reference: `gps-ref` (GPS at the ablations' fixed setting) if run, else `gps`
CLAIMS = [
    ("GPS ≥ full fine-tuning (low-data tasks)", [("gps", "full")]),
    ("neuron > layer > net selection", [("REF", "gps-layer"), ("gps-layer", "gps-net")]),
    ("gradient > random and magnitude", [("REF", "gps-random"), ("REF", "gps-random-net"),
                                         ("REF", "gps-magnitude")]),
    ("SupCon > head + cross-entropy", [("REF", "gps-ce")]),
]


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("**/final/record.json"))]
    if not records:
        raise FileNotFoundError(f"{results_dir}: no finished runs (record.json) found")
    return records


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _table(records: list[dict[str, Any]]) -> dict[str, Any]:
    """backbone -> {tasks, groups, rows}; accuracies averaged over seeds."""
    out: dict[str, Any] = {}
    for backbone in sorted({r["backbone"] for r in records}):
        recs = [r for r in records if r["backbone"] == backbone]
        group_of = {r["task"]: r["group"] for r in recs}
        groups = sorted(set(group_of.values()), key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else 99, g))
        tasks = [t for g in groups for t in sorted(t for t, gg in group_of.items() if gg == g)]
        labels = list(dict.fromkeys(r["label"] for r in recs))
        rows = []
        for label in labels:
            mine = [r for r in recs if r["label"] == label]
            acc = {t: [100 * r["test_acc"] for r in mine if r["task"] == t and r["test_acc"] is not None]
                   for t in tasks}
            per_task = {t: (_mean(v) if v else None) for t, v in acc.items()}
            seeds_std = {t: (statistics.stdev(v) if len(v) > 1 else None) for t, v in acc.items()}
            present = [v for v in per_task.values() if v is not None]
            group_means = {g: _mean([per_task[t] for t in tasks if group_of[t] == g and per_task[t] is not None])
                           for g in groups}
            rows.append({
                "label": label, "method": mine[0]["method"], "per_task": per_task, "std": seeds_std,
                "group_means": group_means, "mean_tasks": _mean(present),
                "mean_groups": _mean([v for v in group_means.values() if v == v]),
                "complete": len(present) == len(tasks),
                "percent": _mean([r["backbone_percent"] for r in mine if r["backbone_percent"] is not None]),
                "params_m": _mean([r["trainable_backbone"] for r in mine if r["trainable_backbone"] is not None]) / 1e6,
                "head": _mean([r["trainable_head"] for r in mine if r["trainable_head"] is not None]),
                "file_kib": _mean([(r.get("task_file_bytes") or 0) / 1024 for r in mine]),
                "time_min": sum(r.get("run_time_s") or 0 for r in mine) / 60,
                "train_min": _mean([(r.get("train_time_s") or 0) / 60 for r in mine]),
            })
        out[backbone] = {"tasks": tasks, "groups": groups, "group_of": group_of, "rows": rows}
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def _markdown_table(tab: dict[str, Any]) -> list[str]:
    tasks, groups = tab["tasks"], tab["groups"]
    head = ["method", "params %", "params M", *tasks, *[f"{g} mean" for g in groups], "mean (tasks)",
            "mean (groups)", "file KiB", "time min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in tab["rows"]:
        cells = [r["label"], _fmt(r["percent"], 3), _fmt(r["params_m"], 3),
                 *[_fmt(r["per_task"][t]) + (f" ±{r['std'][t]:.1f}" if r["std"][t] is not None else "")
                   for t in tasks],
                 *[_fmt(r["group_means"][g]) for g in groups], _fmt(r["mean_tasks"]), _fmt(r["mean_groups"]),
                 _fmt(r["file_kib"]), _fmt(r["time_min"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def claims(tab: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim's pairwise comparisons on this backbone: per-task wins and mean difference."""
    rows = {r["label"]: r for r in tab["rows"]}
    ref = "gps-ref" if "gps-ref" in rows else "gps"
    found = []
    for claim, pairs in CLAIMS:
        comparisons = []
        for a, b in pairs:
            a, b = (ref if a == "REF" else a), (ref if b == "REF" else b)
            if a not in rows or b not in rows:
                continue
            common = [t for t in tab["tasks"] if rows[a]["per_task"][t] is not None
                      and rows[b]["per_task"][t] is not None]
            if not common:
                continue
            diffs = [rows[a]["per_task"][t] - rows[b]["per_task"][t] for t in common]
            comparisons.append({"a": a, "b": b, "tasks": len(common), "a_wins": sum(d > 0 for d in diffs),
                                "ties": sum(d == 0 for d in diffs), "mean_diff": _mean(diffs),
                                "a_mean": _mean([rows[a]["per_task"][t] for t in common]),
                                "b_mean": _mean([rows[b]["per_task"][t] for t in common])})
        if comparisons:
            supported = all(c["mean_diff"] >= 0 for c in comparisons)
            found.append({"claim": claim, "comparisons": comparisons, "supported": supported})
    return found


def _block_of(name: str) -> str:
    for pattern in (r"(?:^|\.)layers\.(\d+)\.blocks\.(\d+)", r"(?:^|\.)stages\.(\d+)\.blocks\.(\d+)",
                    r"(?:^|\.)stages\.(\d+)", r"(?:^|\.)blocks\.(\d+)\.(\d+)", r"(?:^|\.)blocks\.(\d+)",
                    r"(?:^|\.)layer(\d+)\.(\d+)", r"(?:^|\.)features\.(\d+)"):
        m = re.search(pattern, name)
        if m:
            return ".".join(m.groups())
    return name.split(".")[0]


def selection_distribution(selection_file: str | Path) -> dict[str, dict[str, int]]:
    """block -> matrix kind -> number of selected entries, from a saved selection."""
    from sparseft.selection import Selection

    sel = Selection.load(selection_file)
    dist: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, idx in sel.indices.items():
        parts = name.split(".")
        kind = parts[-2] if len(parts) > 1 else parts[-1]
        dist[_block_of(name)][kind] += int(idx.numel())
    return {b: dict(k) for b, k in dist.items()}


def _sort_blocks(blocks: list[str]) -> list[str]:
    def key(b: str) -> tuple:
        nums = [int(x) for x in re.findall(r"\d+", b)]
        return (0 if nums else 1, nums, b)
    return sorted(blocks, key=key)


def _plot_distribution(ax: Any, dist: dict[str, dict[str, int]], title: str) -> None:
    blocks = _sort_blocks(list(dist))
    kinds = sorted({k for d in dist.values() for k in d})
    bottom = [0] * len(blocks)
    for kind in kinds:
        values = [dist[b].get(kind, 0) for b in blocks]
        ax.bar(range(len(blocks)), values, bottom=bottom, label=kind)
        bottom = [x + y for x, y in zip(bottom, values)]
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(blocks, rotation=90, fontsize=7)
    ax.set_ylabel("selected entries")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def _plots(records: list[dict[str, Any]], tables: dict[str, Any], results_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (backbone, tab) in zip(axes[0], tables.items()):
        for r in tab["rows"]:
            x = max(r["params_m"] * 1e6, 1.0)
            ax.scatter(x, r["mean_tasks"], s=25)
            ax.annotate(r["label"], (x, r["mean_tasks"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable backbone parameters (log; head excluded)")
        ax.set_ylabel("mean top-1 over tasks (%)")
        ax.set_title(backbone, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(results_dir / "acc_vs_params.png", dpi=120)
    plt.close(fig)
    written.append("acc_vs_params.png")

    def selections(label: str, backbone: str) -> list[Path]:
        return [results_dir / r["final_dir"] / "selection.safetensors" for r in records
                if r["label"] == label and r["backbone"] == backbone
                and (results_dir / r["final_dir"] / "selection.safetensors").exists()]

    def summed(files: list[Path]) -> dict[str, dict[str, int]]:
        total: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for f in files:
            for b, kinds in selection_distribution(f).items():
                for k, n in kinds.items():
                    total[b][k] += n
        return {b: dict(k) for b, k in total.items()}

    gps_backbones = [b for b in tables if selections("gps", b)]
    if gps_backbones:
        fig, axes = plt.subplots(1, len(gps_backbones), figsize=(7 * len(gps_backbones), 4), squeeze=False)
        for ax, b in zip(axes[0], gps_backbones):
            files = selections("gps", b)
            _plot_distribution(ax, summed(files), f"GPS selected entries per block, {b} (sum of {len(files)} tasks)")
        fig.tight_layout()
        fig.savefig(results_dir / "gps_distribution.png", dpi=120)
        plt.close(fig)
        written.append("gps_distribution.png")
    levels = [(b, lab) for b in gps_backbones for lab in ("gps", "gps-layer", "gps-net") if selections(lab, b)]
    if any(lab != "gps" for _, lab in levels):
        fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4), squeeze=False)
        for ax, (b, lab) in zip(axes[0], levels):
            _plot_distribution(ax, summed(selections(lab, b)), f"{lab} ({b})")
        fig.tight_layout()
        fig.savefig(results_dir / "gps_levels.png", dpi=120)
        plt.close(fig)
        written.append("gps_levels.png")
    return written


def write_report(results_dir: str | Path) -> Path:
    """Write report.md, results.csv and the figures into `results_dir`; returns report.md."""
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    tables = _table(records)
    suite = json.loads((results_dir / "suite.json").read_text()) if (results_dir / "suite.json").exists() else {}
    protocol = records[0]["protocol"]
    with atomic_path(results_dir / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        fields = ["backbone", "group", "task", "label", "method", "seed", "test_acc", "last_test_acc",
                  "best_test_acc", "chosen", "trainable_backbone", "backbone_percent", "trainable_head",
                  "task_file_bytes", "train_time_s", "run_time_s"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "chosen": json.dumps(r["chosen"])})
    figures = _plots(records, tables, results_dir)
    lines = [f"# Results: {suite.get('name', results_dir.name)}", ""]
    if protocol == "honest":
        lines += ["**Protocol: honest.** Hyper-parameters chosen on train800 → val200 (last epoch), the chosen "
                  "setting retrained on train800val200, **last-epoch** test top-1 reported.", ""]
    else:
        lines += ["**Protocol: paper.** Fixed hyper-parameters, trained on train800val200, **best test top-1 over "
                  "epochs** reported, as the official repositories do (optimistic by construction).", ""]
    if suite:
        lines += [f"Training settings: `{json.dumps(suite.get('train', {}))}`; grid: "
                  f"`{json.dumps(suite.get('grid', {}))}` (per-method grids in the suite file); "
                  f"seeds {suite.get('seeds')}.", ""]
    total_min = sum(r.get("run_time_s") or 0 for r in records) / 60
    lines += [f"{len(records)} cells; run time {total_min:.1f} min in total (sum of runs, tuning included).", ""]
    for backbone, tab in tables.items():
        lines += [f"## {backbone}", "", "Top-1 accuracy (%) on each task's test split. `params` = trainable "
                  "backbone parameters (head excluded; % of the backbone). `time` = all runs of the cell.", ""]
        lines += _markdown_table(tab) + [""]
        found = claims(tab)
        if found:
            lines += ["### Claims checked", ""]
            for c in found:
                verdict = "supported" if c["supported"] else "not supported"
                lines.append(f"- **{c['claim']}**: {verdict} here.")
                for cmp in c["comparisons"]:
                    lines.append(f"  - {cmp['a']} {cmp['a_mean']:.1f} vs {cmp['b']} {cmp['b_mean']:.1f} "
                                 f"(mean difference {cmp['mean_diff']:+.2f} points; {cmp['a']} better on "
                                 f"{cmp['a_wins']}/{cmp['tasks']} tasks, {cmp['ties']} ties)")
            lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    report = results_dir / "report.md"
    write_text_atomic(report, "\n".join(lines))
    return report
