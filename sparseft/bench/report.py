"""Turn a results folder into a fair-comparison report.

`write_report(results_dir)` reads every cell's `record.json` and writes
    report.md    protocol, seeds, tuning, the verdict rule; per backbone: per-task top-1 (mean ± std
                 over seeds, edge-of-grid marks), group and overall means (over seeds of per-seed
                 means; incomplete rows flagged, never averaged), the papers' claims judged on paired
                 (task, seed) differences, budget-matched comparisons and the Pareto frontier
    results.csv  one row per cell (all seeds)
    figures      see `sparseft.bench.figures`
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sparseft.bench.figures import selection_distribution, write_figures
from sparseft.bench.screen import write_screen_report
from sparseft.bench.suite import task_name
from sparseft.bench.taskrule import RULE_V2, compare_family, plan_pairs
from sparseft.bench.taskrule import markdown as taskrule_markdown
from sparseft.bench.verdicts import (
    CLAIMS,
    VERDICT_RULE,
    budget_matched,
    claims,
    families,
    interpolate,
    mean_of,
    over_seeds,
    pareto_frontier,
    std_of,
    verdict,
)
from sparseft.fileutil import atomic_path, write_text_atomic

__all__ = ["budget_matched", "build_tables", "claims", "edge_marks", "families", "grid_of", "interpolate",
           "load_records", "pareto_frontier", "selection_distribution", "train_settings", "verdict", "write_report"]

GROUP_ORDER = ("natural", "specialized", "structured")


# ---------------------------------------------------------------- records


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("**/final/record.json"))]
    if not records:
        raise FileNotFoundError(f"{results_dir}: no finished runs (record.json) found")
    return records


def train_settings(record: dict[str, Any], results_dir: Path) -> dict[str, Any]:
    """The record's training settings; older records lack them: then the final run's config.json."""
    if "train" in record:
        return record["train"] or {}
    config = results_dir / record.get("final_dir", "") / "config.json"
    if record.get("final_dir") and config.exists():
        return json.loads(config.read_text()).get("train", {})
    return {}


def grid_of(record: dict[str, Any]) -> dict[str, list[Any]]:
    """The values the cell's grid tried per key; older records: derived from their tuning points."""
    if "grid" in record:
        return record["grid"] or {}
    grid: dict[str, list[Any]] = {}
    for t in record.get("tuning") or []:
        for k, v in t["point"].items():
            grid.setdefault(k, [])
            if v not in grid[k]:
                grid[k].append(v)
    return grid


def edge_marks(record: dict[str, Any]) -> dict[str, str]:
    """key -> "lo" / "hi" for each grid key (≥2 numeric values) whose chosen value is the min / max tried.

    Only cells whose setting was chosen on a grid (their own tuning or the first seed's) are marked."""
    marks: dict[str, str] = {}
    if not record.get("tuning") and record.get("tuned_on_seed") is None:
        return marks
    for key, values in grid_of(record).items():
        nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        chosen = (record.get("chosen") or {}).get(key)
        if len(set(nums)) < 2 or chosen not in nums:
            continue
        if chosen == min(nums):
            marks[key] = "lo"
        elif chosen == max(nums):
            marks[key] = "hi"
    return marks


def _valid(record: dict[str, Any]) -> bool:
    return record.get("test_acc") is not None and not record.get("diverged")


# ---------------------------------------------------------------- tables


def _row(label: str, recs: list[dict[str, Any]], tab: dict[str, Any], results_dir: Path) -> dict[str, Any]:
    tasks, seeds, groups = tab["tasks"], tab["seeds"], tab["groups"]
    cells = {(r["task"], r["seed"]): 100 * r["test_acc"] for r in recs if _valid(r)}
    n_valid = sum((t, s) in cells for t in tasks for s in seeds)
    complete = n_valid == len(tasks) * len(seeds)
    failed = any(r.get("tuning_failed") for r in recs)
    per_task = {t: [a for (tt, _), a in cells.items() if tt == t] for t in tasks}
    edges = {t: {(k, v) for r in recs if r["task"] == t for k, v in edge_marks(r).items()} for t in tasks}
    task_cells = [t for t in tasks if any(r["task"] == t for r in recs)]
    settings = [train_settings(r, results_dir) for r in recs]
    params = [r["trainable_backbone"] for r in recs if r.get("trainable_backbone") is not None]
    row = {
        "label": label, "method": recs[0]["method"], "cells": cells, "complete": complete,
        "display": (label if complete else f"{label} (incomplete {n_valid}/{len(tasks) * len(seeds)})")
        + (" (every tuning run diverged)" if failed else ""),
        "per_task": {t: mean_of(v) for t, v in per_task.items()},
        "task_std": {t: std_of(v) for t, v in per_task.items()},
        "n_seeds": {t: len(v) for t, v in per_task.items()}, "edges": edges,
        "edge": f"{sum(bool(edges[t]) for t in task_cells)}/{len(task_cells)}",
        "setting": " / ".join(dict.fromkeys(
            f"{s.get('optimizer', '?')} wd{_num(s['weight_decay']) if 'weight_decay' in s else '?'}"
            for s in settings)),
        "cell_params": {(r["task"], r["seed"]): r["trainable_backbone"] for r in recs
                        if r.get("trainable_backbone") is not None},
        "params": mean_of(params), "percent": mean_of([r["backbone_percent"] for r in recs
                                                   if r.get("backbone_percent") is not None]),
        "file_kib": mean_of([(r.get("task_file_bytes") or 0) / 1024 for r in recs]),
        "time_min": sum(r.get("run_time_s") or 0 for r in recs) / 60,
        "mean": None, "std": None, "group_means": {g: (None, None) for g in groups}, "mean_groups": (None, None),
        "scores": {},  # other test scores: name -> (mean, std) over seeds of the mean over tasks
    }
    others: dict[str, dict[tuple[str, int], float]] = {}
    for r in recs:
        if _valid(r):
            for name, value in (r.get("test_scores") or {}).items():
                if isinstance(value, (int, float)) and name != r.get("metric", "acc"):
                    others.setdefault(name, {})[(r["task"], r["seed"])] = 100 * value
    if complete:
        row["mean"], row["std"] = over_seeds(cells, tasks, seeds)
        row["group_means"] = {g: over_seeds(cells, [t for t in tasks if tab["group_of"][t] == g], seeds)
                              for g in groups}
        per_seed = [mean_of([mean_of([cells[(t, s)] for t in tasks if tab["group_of"][t] == g]) for g in groups])
                    for s in seeds]
        row["mean_groups"] = (mean_of(per_seed), std_of(per_seed))
        row["scores"] = {name: over_seeds(c, tasks, seeds) for name, c in others.items() if len(c) == len(cells)}
    return row


def build_tables(records: list[dict[str, Any]], seeds: list[int] | None = None,
                 results_dir: str | Path = ".", tasks: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """backbone -> {tasks, groups, group_of, seeds, rows, families, pareto}.

    Expected cells of a row: the suite's `tasks` (group -> data specs; default: every task seen for
    the backbone) × `seeds` (default: every seed seen). Records of other seeds are left out."""
    seeds = sorted(seeds if seeds is not None else {r["seed"] for r in records})
    planned = {task_name(spec): group for group, specs in (tasks or {}).items() for spec in specs}
    out: dict[str, Any] = {}
    for backbone in sorted({r["backbone"] for r in records}):
        recs = [r for r in records if r["backbone"] == backbone and r["seed"] in seeds]
        group_of = {**planned, **{r["task"]: r["group"] for r in recs}}
        groups = sorted(set(group_of.values()), key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else 99, g))
        tasks = [t for g in groups for t in sorted(t for t, gg in group_of.items() if gg == g)]
        metrics = {r.get("metric", "acc") for r in recs}
        if metrics == {"acc"}:
            metric = "Top-1 accuracy"
        elif metrics == {"mIoU"}:
            metric = "mIoU (dataset-level, without a background class)"
        else:
            metric = " / ".join(sorted(metrics))
        tab = {"tasks": tasks, "groups": groups, "group_of": group_of, "seeds": seeds, "metric": metric}
        labels = list(dict.fromkeys(r["label"] for r in recs))
        tab["rows"] = [_row(lab, [r for r in recs if r["label"] == lab], tab, Path(results_dir)) for lab in labels]
        tab["families"] = families(labels)
        tab["pareto"] = pareto_frontier({r["label"]: (r["params"], r["mean"]) for r in tab["rows"]
                                         if r["complete"] and r["params"] is not None})
        out[backbone] = tab
    return out


# ---------------------------------------------------------------- markdown


def _num(x: float) -> str:
    """0, 0.01, 1e-4, 2.5e-5: short and unambiguous."""
    if x == 0 or abs(x) >= 1e-2:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def _pm(mean: float | None, std: float | None, digits: int = 1) -> str:
    return _fmt(mean, digits) + (f" ±{std:.{digits}f}" if mean is not None and std is not None else "")


def _marks(edges: set[tuple[str, str]]) -> str:
    return "".join(("" if k == "lr" else k) + ("↓" if v == "lo" else "↑") for k, v in sorted(edges))


def _markdown_table(tab: dict[str, Any]) -> list[str]:
    tasks, groups, n_seeds = tab["tasks"], tab["groups"], len(tab["seeds"])
    head = ["method", "setting", "params %", "params M", *tasks, *[f"{g} mean" for g in groups], "mean (tasks)",
            "mean (groups)", "edge", "file KiB", "time min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in tab["rows"]:
        cells = [_pm(r["per_task"][t], r["task_std"][t]) + _marks(r["edges"][t])
                 + (f" (n={r['n_seeds'][t]})" if 0 < r["n_seeds"][t] < n_seeds else "") for t in tasks]
        params_m = None if r["params"] is None else r["params"] / 1e6
        lines.append("| " + " | ".join([
            r["display"], r["setting"], _fmt(r["percent"], 3), _fmt(params_m, 3), *cells,
            *[_pm(*r["group_means"][g]) for g in groups], _pm(r["mean"], r["std"]), _pm(*r["mean_groups"]),
            r["edge"], _fmt(r["file_kib"]), _fmt(r["time_min"])]) + " |")
    return lines


def _verdict_text(c: dict[str, Any]) -> str:
    return f"**{c['verdict']}**" + (f" ({c['note']})" if c["note"] else "")


def _diff_text(c: dict[str, Any]) -> str:
    return f"d̄ = {c['mean']:+.2f} ± {c['se']:.2f} points (se)" if c["se"] is not None else (
        f"d̄ = {c['mean']:+.2f} points" if c["mean"] is not None else "no pairs")


def _header(suite: dict[str, Any], protocol: str, seeds: list[int], tuned: bool = True) -> list[str]:
    lines = []
    if protocol == "honest":
        lines += ["**Protocol: honest.** Hyper-parameters chosen on train800 → val200 (last epoch), the chosen "
                  "setting retrained on train800val200, **last-epoch** test score reported (top-1; mIoU for "
                  "segmentation).", ""]
    else:
        lines += ["**Protocol: paper.** Fixed hyper-parameters, trained on train800val200, **best test score over "
                  "epochs** reported, as the official repositories do (optimistic by construction).", ""]
    if suite:
        lines += [f"Training settings: `{json.dumps(suite.get('train', {}))}`; grid: "
                  f"`{json.dumps(suite.get('grid', {}))}` (per-method grids in the suite file).", ""]
    lines.append(f"Seeds: {seeds}" + ("" if suite else " (no suite.json: the seeds found in the records)") + ".")
    if suite and protocol == "honest" and tuned:  # suites from before `tuning` existed tuned every seed
        lines.append(f"Tuning: the grid ran with seed {seeds[0]} only; every seed retrains that choice."  # file order
                     if suite.get("tuning", "each_seed") == "first_seed" else "Tuning: every seed tuned its own grid.")
    if suite.get("batchnorm"):
        lines.append(f"BatchNorm statistics: {suite['batchnorm']} for every method unless a row says otherwise.")
    lines.append("")
    return lines + ["## How claims are judged", "", VERDICT_RULE, ""]


def _backbone_section(backbone: str, tab: dict[str, Any]) -> list[str]:
    lines = [f"## {backbone}", "", f"{tab['metric']} (%) on each task's test split: mean ±std over seeds (n = seeds "
             "when fewer than all). Means are over seeds of each seed's mean over tasks (or groups); a row missing "
             "any (task, seed) is marked incomplete and gets no mean. `params` = trainable backbone parameters "
             "(head excluded; % of the backbone). `setting` = optimizer and weight decay. `time` = all runs of "
             "the row.", ""]
    lines += _markdown_table(tab) + ["", "Edge marks: ↓ / ↑ after a cell = the chosen learning rate (or the named "
                                     "key) was the lowest / highest value of its grid on that task (for any seed), "
                                     "so the best setting may lie outside the grid; `edge` = such task cells / task "
                                     "cells.", ""]
    found = claims(tab)
    if found:
        lines += ["### Claims checked", ""]
        for c in found:
            lost = f" (not run: {'; '.join(c['missing'])})" if c.get("missing") else ""
            lines.append(f"- **{c['claim']}**: {c['verdict']}{lost}.")
            for x in c["comparisons"]:
                lines.append(f"  - {x['a']} {_pm(x['a_mean'], x['a_std'])} vs {x['b']} {_pm(x['b_mean'], x['b_std'])}"
                             f": {_diff_text(x)}, n = {x['n']} pairs, {x['a']} better on {x['a_wins']}/{x['n']} "
                             f"pairs and on {x['tasks_won']}/{x['tasks']} tasks' means → {_verdict_text(x)}"
                             f" (per task: {', '.join(f'{t} {d:+.2f}' for t, d in x['per_task'].items())})")
        lines.append("")
    rows = {r["label"]: r["cells"] for r in tab["rows"]}
    ref = "gps-ref" if "gps-ref" in rows else "gps"
    pairs = plan_pairs(rows, [(ref if a == "REF" else a, ref if b == "REF" else b) for _, ps in CLAIMS for a, b in ps])
    if pairs:
        lines += ["### Verdicts by rule v2", "", RULE_V2, ""]
        lines += taskrule_markdown(compare_family(rows, pairs), f"{backbone}: claims and plan v2's comparisons")
    matched = budget_matched(tab)
    if matched:
        lines += ["### Budget-matched comparisons", "", "Each family's accuracy interpolated (linear in log "
                  "parameters, no extrapolation) at the GPS row's trainable parameters, per (task, seed).", ""]
        for m in matched:
            params = "?" if m["params"] is None else f"{m['params']:,.0f}"
            if not m["n"]:
                span = "no common (task, seed)" if m["range"] is None else \
                    f"outside its range {m['range'][0]:,.0f}–{m['range'][1]:,.0f} params or no common (task, seed)"
                lines.append(f"- {m['gps']} ({params} params) vs {m['family']} at the same budget: {span}.")
                continue
            lines.append(f"- {m['gps']} ({params} params) vs {m['family']} at the same budget: {_fmt(m['gps_mean'])} "
                         f"vs {_fmt(m['family_mean'])}; {_diff_text(m)}, n = {m['n']} pairs, {m['gps']} better on "
                         f"{m['a_wins']}/{m['n']} → {_verdict_text(m)}")
        lines.append("")
    if tab["pareto"]:
        lines += ["Pareto frontier (complete rows; fewer parameters → higher accuracy): "
                  + " → ".join(tab["pareto"]), ""]
    return lines + _scores_section(tab)


def _scores_section(tab: dict[str, Any]) -> list[str]:
    """The other test scores the runs measured (segmentation: mDice, per-image means, pixel accuracy)."""
    names = list(dict.fromkeys(n for r in tab["rows"] for n in r["scores"]))
    if not names:
        return []
    shown = {"acc": "pixel acc" if tab["metric"] != "Top-1 accuracy" else "top-1"}
    lines = ["### Other test scores", "", "Last-epoch test scores (%) besides the table's: mean ±std over seeds of "
             "the mean over tasks (complete rows).", "",
             "| method | params % | " + " | ".join(shown.get(n, n) for n in names) + " | file KiB |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for r in tab["rows"]:
        if r["scores"]:
            values = " | ".join(_pm(*r["scores"][n]) if n in r["scores"] else "–" for n in names)
            lines.append(f"| {r['label']} | {_fmt(r['percent'], 3)} | {values} | {_fmt(r['file_kib'], 1)} |")
    return lines + [""]


def write_report(results_dir: str | Path) -> Path:
    """Write report.md, results.csv and the figures into `results_dir`; returns report.md (screen.md for a
    screen suite)."""
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    suite = json.loads((results_dir / "suite.json").read_text()) if (results_dir / "suite.json").exists() else {}
    if records[0].get("protocol") == "screen":  # validation scores only: the screen's own table
        return write_screen_report(results_dir, records, suite)
    seeds = sorted(suite.get("seeds") or {r["seed"] for r in records})  # the seeds every row should have
    tables = build_tables(records, seeds, results_dir, suite.get("tasks"))
    with atomic_path(results_dir / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        fields = ["backbone", "group", "task", "label", "method", "seed", "test_acc", "last_test_acc",
                  "best_test_acc", "chosen", "optimizer", "weight_decay", "grid", "edge", "trainable_backbone",
                  "backbone_percent", "trainable_head", "task_file_bytes", "train_time_s", "run_time_s"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            train = train_settings(r, results_dir)
            writer.writerow({**r, "chosen": json.dumps(r["chosen"]), "optimizer": train.get("optimizer"),
                             "weight_decay": train.get("weight_decay"), "grid": json.dumps(grid_of(r)),
                             "edge": ";".join(f"{k}:{v}" for k, v in edge_marks(r).items())})
    figures = write_figures(records, tables, results_dir)
    tuned = any(r.get("tuning") or r.get("tuned_on_seed") is not None for r in records)
    lines = [f"# Results: {suite.get('name', results_dir.name)}", ""] + _header(suite, records[0]["protocol"],
                                                                             suite.get("seeds") or seeds, tuned)
    total_min = sum(r.get("run_time_s") or 0 for r in records) / 60
    lines += [f"{len(records)} cells; run time {total_min:.1f} min in total (sum of runs, tuning included).", ""]
    for backbone, tab in tables.items():
        lines += _backbone_section(backbone, tab)
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    report = results_dir / "report.md"
    write_text_atomic(report, "\n".join(lines))
    return report
