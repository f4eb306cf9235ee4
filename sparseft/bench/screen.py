"""Which tasks a study keeps: the screen rule on validation scores only.

A `protocol: screen` suite runs each row's learning-rate grid with the first seed on train800 and
scores it on val200 (no test split is read). A task is kept when it separates methods:

- its best row's validation accuracy is at most `CEILING` (no method at the ceiling), and
- the linear probe (row `linear`) is at least `PROBE_GAP` points below that best row.

The rule is evidence plan v2's (docs/evidence-plan.md); `screen_tasks` applies it and
`write_screen_report` writes screen.md beside the records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparseft.fileutil import write_text_atomic

CEILING = 97.0     # best validation top-1 (%) a kept task may reach
PROBE_GAP = 3.0    # points the linear probe must stay below the best row
PROBE = "linear"


def screen_tasks(records: list[dict[str, Any]], ceiling: float = CEILING, gap: float = PROBE_GAP,
                 probe: str = PROBE) -> list[dict[str, Any]]:
    """Per (backbone, task): every row's best validation accuracy (%) and whether the task is kept."""
    by_task: dict[tuple[str, str], dict[str, float | None]] = {}
    for r in records:
        val = r.get("val_acc")
        by_task.setdefault((r["backbone"], r["task"]), {})[r["label"]] = None if val is None else 100 * val
    out = []
    for (backbone, task), rows in sorted(by_task.items()):
        scored = {k: v for k, v in rows.items() if v is not None}
        best_label = max(scored, key=scored.get) if scored else None
        best = scored.get(best_label) if best_label else None
        linear = scored.get(probe)
        if best is None or linear is None:
            keep, why = False, f"incomplete: no validation score for {'every row' if best is None else probe}"
        elif best > ceiling:
            keep, why = False, f"at the ceiling ({best_label} {best:.1f} > {ceiling:g})"
        elif best_label == probe or best - linear < gap:
            keep, why = False, (f"{probe} is the best row" if best - linear <= 0 else
                                f"{probe} within {best - linear:.1f} points of the best row ({best_label})")
        else:
            keep, why = True, f"best {best_label} {best:.1f}, {probe} {best - linear:.1f} points below"
        out.append({"backbone": backbone, "task": task, "rows": rows, "best": best, "best_label": best_label,
                    "probe": linear, "keep": keep, "why": why})
    return out


def write_screen_report(results_dir: Path, records: list[dict[str, Any]], suite: dict[str, Any]) -> Path:
    """screen.md: the rule, every row's best validation accuracy per task, and the tasks kept."""
    table = screen_tasks(records)
    labels = sorted({label for t in table for label in t["rows"]})
    lines = [f"# Screen: {suite.get('name', results_dir.name)}", "",
             f"Validation top-1 (%), first seed, best point of each row's grid (train800 → val200); no test score "
             f"was computed. A task is kept when its best row is at most {CEILING:g} % and `{PROBE}` is at least "
             f"{PROBE_GAP:g} points below it.", "",
             "| backbone | task | " + " | ".join(labels) + " | kept | why |",
             "|---|---|" + "---|" * len(labels) + "---|---|"]
    for t in table:
        cells = " | ".join("–" if t["rows"].get(lab) is None else f"{t['rows'][lab]:.1f}" for lab in labels)
        lines.append(f"| {t['backbone']} | {t['task']} | {cells} | {'yes' if t['keep'] else 'no'} | {t['why']} |")
    kept = [t["task"] for t in table if t["keep"]]
    lines += ["", f"Kept ({len(kept)}): {', '.join(kept) or 'none'}.", ""]
    path = results_dir / "screen.md"
    write_text_atomic(path, "\n".join(lines))
    return path
