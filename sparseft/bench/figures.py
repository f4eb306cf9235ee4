"""The report's figures (matplotlib, Agg backend), drawn from the tables `report.py` computes.

    acc_vs_params.png       mean accuracy against trainable backbone parameters (log x): families as
                            lines, other rows as points, error bars = std over seeds, Pareto frontier
    gps_distribution.png    where GPS's selected weights sit, per block and matrix type
    gps_levels.png          neuron- vs layer- vs net-level selection at the same setting (if run)
    lr_sensitivity.png      validation score against learning rate, per task and method: the tuning
                            runs (honest protocol), so how sharp each method's optimum is and where
                            the grid caught it
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from sparseft.seg.figure import prediction_figure
from sparseft.selection import Selection


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


def _plot_acc_vs_params(ax: Any, backbone: str, tab: dict[str, Any]) -> None:
    """Complete rows only (an incomplete row has no mean); x is clamped to 1 for the log axis."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator

    rows = {r["label"]: r for r in tab["rows"] if r["complete"]}
    in_family = set()
    for family, labels in tab["families"].items():
        members = sorted((rows[lab] for lab in labels if lab in rows), key=lambda r: r["params"])
        if len(members) < 2:
            continue
        in_family.update(r["label"] for r in members)
        ax.errorbar([max(r["params"], 1.0) for r in members], [r["mean"] for r in members],
                    yerr=[r["std"] or 0.0 for r in members], marker="o", ms=4, capsize=3, label=family)
    for r in rows.values():
        if r["label"] in in_family:
            continue
        x = max(r["params"], 1.0)
        ax.errorbar([x], [r["mean"]], yerr=[r["std"] or 0.0], fmt="s", ms=4, capsize=3, color="black")
        ax.annotate(r["label"], (x, r["mean"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    front = [rows[lab] for lab in tab["pareto"]]
    if len(front) > 1:
        ax.step([max(r["params"], 1.0) for r in front], [r["mean"] for r in front], where="post", ls="--",
                color="grey", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    # 2x and 5x labels when the axis spans at most 2 decades (3x/4x labels overlapped), none on wider axes
    ax.xaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("trainable backbone parameters (head excluded)")
    ax.set_ylabel(f"mean {tab.get('metric', 'top-1').lower()} over tasks (%)")
    ax.set_title(backbone, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def lr_curves(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[tuple[float, float]]]]:
    """(backbone, task) -> label -> [(lr, validation score in %)] from the tuning runs of learning-rate
    grids (the lowest seed that tuned; diverged points left out); rows with fewer than 2 points skipped."""
    curves: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = defaultdict(dict)
    for r in sorted(records, key=lambda r: r["seed"]):
        points = [(float(t["point"]["lr"]), 100 * t["val_acc"]) for t in r.get("tuning") or []
                  if set(t["point"]) == {"lr"} and t.get("val_acc") is not None]
        if len(points) >= 2 and r["label"] not in curves[(r["backbone"], r["task"])]:
            curves[(r["backbone"], r["task"])][r["label"]] = sorted(points)
    return {k: v for k, v in curves.items() if v}


def _plot_lr_curves(ax: Any, title: str, curves: dict[str, list[tuple[float, float]]]) -> None:
    for i, (label, points) in enumerate(sorted(curves.items())):  # 10 colours, then the next line style
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^D"[i // 10 % 4], ms=3, lw=1,
                ls=["-", "--", ":", "-."][i // 10 % 4], color=f"C{i % 10}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation score (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(curves) > 8 else 1)


def write_figures(records: list[dict[str, Any]], tables: dict[str, Any], results_dir: Path) -> list[str]:
    """Draw the figures into `results_dir`; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(results_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)

    written: list[str] = []
    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 5), squeeze=False)
    for ax, (backbone, tab) in zip(axes[0], tables.items()):
        _plot_acc_vs_params(ax, backbone, tab)
    save(fig, "acc_vs_params.png")

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
            _plot_distribution(ax, summed(files), f"GPS selected entries per block, {b} (sum of {len(files)} runs)")
        save(fig, "gps_distribution.png")
    # equal budgets: the ablations' fixed-setting reference `gps-ref`, not the tuned `gps`, when it was run
    levels = []
    for b in tables:
        base = "gps-ref" if selections("gps-ref", b) else "gps"
        levels += [(b, lab) for lab in (base, "gps-layer", "gps-net") if selections(lab, b)]
    if any(lab not in ("gps", "gps-ref") for _, lab in levels):
        fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4), squeeze=False)
        for ax, (b, lab) in zip(axes[0], levels):
            _plot_distribution(ax, summed(selections(lab, b)), f"{lab} ({b})")
        save(fig, "gps_levels.png")
    curves = lr_curves(records)
    if curves:
        backbones = list(dict.fromkeys(b for b, _ in curves))
        tasks = list(dict.fromkeys(t for _, t in curves))
        fig, axes = plt.subplots(len(backbones), len(tasks), figsize=(4.5 * len(tasks), 3.6 * len(backbones)),
                                 squeeze=False)
        for i, b in enumerate(backbones):
            for j, t in enumerate(tasks):
                if (b, t) in curves:
                    _plot_lr_curves(axes[i][j], f"{t} ({b})", curves[(b, t)])
                else:
                    axes[i][j].set_axis_off()
        save(fig, "lr_sensitivity.png")
    written += _prediction_figures(records, results_dir)
    return written


def _prediction_figures(records: list[dict[str, Any]], results_dir: Path) -> list[str]:
    """Segmentation suites: image | ground truth | each row's prediction, per backbone and task (first seed)."""

    written = []
    seg = [r for r in records if r.get("metric") == "mIoU"]
    for backbone, task in sorted({(r["backbone"], r["task"]) for r in seg}):
        mine = [r for r in seg if r["backbone"] == backbone and r["task"] == task]
        first = min(r["seed"] for r in mine)
        files = {r["label"]: results_dir / r["final_dir"] / "delta.safetensors" for r in mine
                 if r["seed"] == first and (results_dir / r["final_dir"] / "delta.safetensors").exists()}
        if files:
            name = f"predictions_{backbone.replace('/', '_').replace('@', '_')}_{task}.png"
            prediction_figure(files, mine[0]["data"], results_dir / name)
            written.append(name)
    return written
