"""How a report judges claims: the verdict rule on paired (task, seed) differences, the papers'
claims as pairs of suite rows, budget-matched comparisons against a method's curve (linear in log
parameters, never extrapolated) and the Pareto frontier. Rows are `report.build_tables` rows: they
need "label", "cells" {(task, seed): accuracy %}, "params" and "cell_params".
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

# "REF" is the ablations' reference: `gps-ref` (GPS at the ablations' fixed setting) if run, else `gps`
CLAIMS = [
    ("GPS ≥ full fine-tuning (low-data tasks)", [("gps", "full")]),
    ("GPS ≥ LoRA at GPS's budget", [("gps", "lora-qkv-r5")]),
    ("GPS ≥ LoRA at LoRA's default budget", [("gps", "lora")]),
    ("LoRA's default budget beats LoRA at GPS's budget", [("lora", "lora-qkv-r5")]),
    ("GPS beats adapters and SSF (the GPS paper's tables)", [("gps", "adapter"), ("gps", "ssf")]),
    ("neuron > layer > net selection", [("REF", "gps-layer"), ("gps-layer", "gps-net")]),
    ("gradient > random and magnitude", [("REF", "gps-random"), ("REF", "gps-random-net"),
                                         ("REF", "gps-magnitude")]),
    ("neuron-level random > net-level random", [("gps-random", "gps-random-net")]),
    ("SupCon > head + cross-entropy", [("REF", "gps-ce")]),
    # what moves GPS (each variant tuned on its own grid)
    ("GPS: Adam without weight decay beats AdamW", [("gps", "gps-adamw"), ("gps", "gps-adamw-wd0.1")]),
    ("GPS: |Σg| beats Σ|g|", [("gps", "gps-sum-of-abs")]),
    ("GPS: column-normalised scores beat the paper's rule", [("gps-colnorm", "gps")]),
    ("GPS: updating BatchNorm statistics beats freezing them", [("gps", "gps-bn-frozen")]),
]
VERDICT_RULE = (
    "For a claim 'A beats B' we pair A and B on every (task, seed) both finished; d = acc_A − acc_B in points; "
    "with n pairs, mean d̄ and standard error se = sd(d)/√n: **supported** if d̄ > 2·se, **not supported** if "
    "d̄ < −2·se, otherwise **inconclusive**; fewer than 3 pairs or a single seed: inconclusive (too little data). "
    "A claim made of several comparisons is supported if all are, not supported if any is not, otherwise "
    "inconclusive. A comparison with an incomplete row (a run missing or diverged) is inconclusive. The seeds of "
    "one task are not independent draws of tasks: each comparison also says on how many tasks A's mean over seeds "
    "is higher, and a verdict carried by one task is worth less than its n suggests.")
FAMILY = re.compile(r"^(?P<prefix>.+)-[a-z]+\d+$")  # gps-k4 -> gps, lora-qkv-r8 -> lora-qkv
GPS_FAMILY = "gps"


# ---------------------------------------------------------------- statistics


def mean_of(values: list[float]) -> float | None:
    """The mean, None for no values."""
    return sum(values) / len(values) if values else None


def std_of(values: list[float]) -> float | None:
    """The sample standard deviation, None for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def verdict(diffs: list[float], n_seeds: int | None = None) -> dict[str, Any]:
    """The verdict rule (VERDICT_RULE) on paired differences d = acc_A − acc_B (points)."""
    n = len(diffs)
    mean = mean_of(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    if n < 3 or (n_seeds is not None and n_seeds < 2):
        return {"n": n, "mean": mean, "se": se, "verdict": "inconclusive", "note": "too little data"}
    if mean > 2 * se:
        v = "supported"
    elif mean < -2 * se:
        v = "not supported"
    else:
        v = "inconclusive"
    return {"n": n, "mean": mean, "se": se, "verdict": v, "note": ""}


def _combine(verdicts: list[str]) -> str:
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    return "not supported" if "not supported" in verdicts else "inconclusive"


def over_seeds(cells: dict[tuple[str, int], float], tasks: list[str], seeds: list[int]
                ) -> tuple[float | None, float | None]:
    """Mean ± std over seeds of each seed's mean over `tasks` (seeds lacking a task are left out)."""
    per_seed = [mean_of([cells[(t, s)] for t in tasks]) for s in seeds if all((t, s) in cells for t in tasks)]
    return mean_of(per_seed), std_of(per_seed)


# ---------------------------------------------------------------- comparisons


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A against B on every (task, seed) both finished."""
    keys = sorted(k for k in a["cells"] if k in b["cells"])
    diffs = [a["cells"][k] - b["cells"][k] for k in keys]
    seeds = sorted({s for _, s in keys})
    tasks = sorted({t for t, _ in keys})

    def stats(row: dict[str, Any]) -> tuple[float | None, float | None]:
        """Mean over the pairs; std over the seeds holding every paired task, of their means over tasks."""
        return mean_of([row["cells"][k] for k in keys]), over_seeds({k: row["cells"][k] for k in keys}, tasks, seeds)[1]

    (a_mean, a_std), (b_mean, b_std) = stats(a), stats(b)
    per_task = [mean_of([a["cells"][k] - b["cells"][k] for k in keys if k[0] == t]) for t in tasks]
    return {"a": a["label"], "b": b["label"], "a_mean": a_mean, "a_std": a_std, "b_mean": b_mean, "b_std": b_std,
            "a_wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "seeds": len(seeds),
            "tasks": len(tasks), "tasks_won": sum(d > 0 for d in per_task), "per_task": dict(zip(tasks, per_task)),
            "mean_diff": mean_of(diffs), **_judged(diffs, len(seeds), a, b)}


def _judged(diffs: list[float], n_seeds: int, *rows: dict[str, Any]) -> dict[str, Any]:
    """`verdict`, made inconclusive when a row is incomplete (its missing runs would be left out)."""
    result = verdict(diffs, n_seeds=n_seeds)
    incomplete = [r["label"] for r in rows if not r.get("complete", True)]
    if incomplete:
        note = f"{', '.join(incomplete)} incomplete"
        result.update(verdict="inconclusive", note=f"{result['note']}; {note}" if result["note"] else note)
    return result


def claims(tab: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim's comparisons on this backbone (rows need "label" and "cells": {(task, seed): acc %})."""
    rows = {r["label"]: r for r in tab["rows"]}
    ref = "gps-ref" if "gps-ref" in rows else "gps"
    found = []
    for claim, pairs in CLAIMS:
        comparisons, missing = [], []
        for a, b in pairs:
            a, b = (ref if a == "REF" else a), (ref if b == "REF" else b)
            if a in rows and b in rows:
                comparisons.append(_compare(rows[a], rows[b]))
            else:
                missing.append(f"{a} vs {b}")
        if comparisons:
            combined = _combine([c["verdict"] for c in comparisons])
            if missing and combined == "supported":  # supported needs every comparison of the claim
                combined = "inconclusive"
            found.append({"claim": claim, "comparisons": comparisons, "verdict": combined, "missing": missing})
    return found


def families(labels: list[str]) -> dict[str, list[str]]:
    """prefix -> labels of the rows `<prefix>-<letters><digits>` (gps-k1, gps-k2 -> gps)."""
    out: dict[str, list[str]] = {}
    for label in labels:
        m = FAMILY.match(label)
        if m:
            out.setdefault(m["prefix"], []).append(label)
    return out


def interpolate(xs: list[float], ys: list[float], x: float | None) -> float | None:
    """y at x, linear in log10(x) between the nearest points; None outside the points' range."""
    by_x: dict[float, list[float]] = {}
    for a, b in zip(xs, ys):
        if a is not None and a > 0 and b is not None:
            by_x.setdefault(a, []).append(b)
    pts = sorted((a, sum(b) / len(b)) for a, b in by_x.items())  # equal budgets: their mean
    if x is None or x <= 0 or not pts or not pts[0][0] <= x <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:  # the first segment reaching x: x0 <= x <= x1
            t = 0.0 if x1 == x0 else (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
            return y0 + t * (y1 - y0)
    return pts[0][1]  # a single point, and x is it


def budget_matched(tab: dict[str, Any]) -> list[dict[str, Any]]:
    """Every GPS row against every other family's curve, interpolated at the GPS row's parameters."""
    rows = {r["label"]: r for r in tab["rows"]}
    gps_rows = [lab for lab in rows if lab == "gps" or lab in tab["families"].get(GPS_FAMILY, [])]
    found = []
    for family, members in tab["families"].items():
        if family == GPS_FAMILY or len(members) < 2:
            continue
        curve = [rows[m] for m in members]
        for g in gps_rows:
            gps = rows[g]
            pairs = []
            for key in sorted(k for k in gps["cells"] if all(k in r["cells"] for r in curve)):
                y = interpolate([r["cell_params"].get(key, r["params"]) for r in curve],
                                [r["cells"][key] for r in curve], gps["cell_params"].get(key, gps["params"]))
                if y is not None:
                    pairs.append((key, gps["cells"][key], y))
            diffs = [a - y for _, a, y in pairs]
            xs = [r["params"] for r in curve if r["params"] is not None]
            found.append({"gps": g, "family": family, "params": gps["params"], "range": (min(xs), max(xs)) if xs
                          else None, "gps_mean": mean_of([a for _, a, _ in pairs]), "a_wins": sum(d > 0 for d in diffs),
                          "family_mean": mean_of([y for _, _, y in pairs]),
                          **_judged(diffs, len({k[1] for k, _, _ in pairs}), gps, *curve)})
    return found


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Labels not dominated (another point with ≤ params and ≥ accuracy, strictly better in one), by params."""
    def dominated(x: float, y: float) -> bool:
        return any(ox <= x and oy >= y and (ox < x or oy > y) for ox, oy in points.values())
    return sorted((lab for lab, (x, y) in points.items() if not dominated(x, y)), key=lambda lab: points[lab])
