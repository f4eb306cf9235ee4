"""The verdict rule of evidence plan v2 (docs/evidence-plan.md): the task is the unit.

For "A beats B" on a set of tasks: per task, A's and B's means over seeds and their difference
d_t (points); with n tasks a paired t-test on the d_t (n − 1 degrees of freedom) gives three
one-sided p-values — A better (d̄ > 0), A worse (d̄ < 0), and level: TOST with margin ±`MARGIN`,
the larger p of (d̄ > −margin, d̄ < +margin). Each kind of p is Holm-corrected over the
comparison's family; a corrected p below `ALPHA` gives **better** (the claim is supported),
**worse** (not supported) or **level** (equivalent within the margin), otherwise **inconclusive**.
Fewer than 3 tasks, a (task, seed) missing from either row, or no spread at all: inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from scipy import stats

from sparseft.errors import InputError

ALPHA = 0.05
MARGIN = 1.0  # points
RULE_V2 = (
    "Rule v2 (evidence plan v2): the task is the unit. Per task, each row's mean over seeds and their difference "
    "d_t in points; a paired t-test over the n tasks (n − 1 degrees of freedom) gives one-sided p-values for "
    f"'better' (d̄ > 0) and 'worse' (d̄ < 0), and TOST with a ±{MARGIN:g}-point margin for 'level'. Each kind of "
    f"p is Holm-corrected over the family of comparisons listed together; corrected p < {ALPHA:g} gives better "
    "(supported), worse (not supported) or level (equivalent), otherwise inconclusive. Fewer than 3 tasks or a "
    "missing (task, seed): inconclusive.")


def rows_of(records: Iterable[dict[str, Any]]) -> dict[str, dict[tuple[str, int], float]]:
    """label -> {(task, seed): test top-1 %} of a suite's finished records (`sparseft.bench.load_records`)."""
    rows: dict[str, dict[tuple[str, int], float]] = {}
    for r in records:
        if r.get("test_acc") is not None:
            rows.setdefault(r["label"], {})[(r["task"], r["seed"])] = 100 * r["test_acc"]
    return rows


def task_differences(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float],
                     seeds: Iterable[int] | None = None) -> tuple[dict[str, float], list[str]]:
    """Per task, mean over seeds of A minus that of B (points); and what is missing for a complete pairing.

    `seeds`: the seeds every task must have (default: every seed either row has for that task).
    """
    tasks = sorted({t for t, _ in a} | {t for t, _ in b})
    diffs, missing = {}, []
    for task in tasks:
        want = sorted(set(seeds) if seeds is not None else {s for t, s in [*a, *b] if t == task})
        gaps = [f"{task}/seed{s}" for s in want if (task, s) not in a or (task, s) not in b]
        if gaps:
            missing += gaps
            continue
        diffs[task] = sum(a[(task, s)] for s in want) / len(want) - sum(b[(task, s)] for s in want) / len(want)
    return diffs, missing


def t_test(diffs: dict[str, float], margin: float = MARGIN) -> dict[str, Any]:
    """Mean, se, t and the three one-sided p-values of the per-task differences (None below 3 tasks)."""
    values = list(diffs.values())
    n = len(values)
    out: dict[str, Any] = {"n": n, "mean": sum(values) / n if n else None, "se": None, "t": None,
                           "p_better": None, "p_worse": None, "p_level": None}
    if n < 3:
        return out
    mean = out["mean"]
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0:
        return out
    se = sd / math.sqrt(n)
    df = n - 1
    out.update(se=se, t=mean / se, p_better=float(stats.t.sf(mean / se, df)), p_worse=float(stats.t.cdf(mean / se, df)),
               p_level=float(max(stats.t.sf((mean + margin) / se, df), stats.t.cdf((mean - margin) / se, df))))
    return out


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count towards the family)."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def judge_family(comparisons: list[dict[str, Any]], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Holm-correct each kind of p over the family and give every comparison its verdict (in place)."""
    for kind in ("p_better", "p_worse", "p_level"):
        for c, adj in zip(comparisons, holm([c.get(kind) for c in comparisons])):
            c[f"{kind}_holm"] = adj
    for c in comparisons:
        if c.get("missing"):
            c["verdict"] = "inconclusive"
        elif c.get("p_better_holm") is not None and c["p_better_holm"] < alpha:
            c["verdict"] = "better"
        elif c.get("p_worse_holm") is not None and c["p_worse_holm"] < alpha:
            c["verdict"] = "worse"
        elif c.get("p_level_holm") is not None and c["p_level_holm"] < alpha:
            c["verdict"] = "level"
        else:
            c["verdict"] = "inconclusive"
    return comparisons


def compare_family(rows: dict[str, dict[tuple[str, int], float]], pairs: list[tuple[str, str]],
                   seeds: Iterable[int] | None = None, margin: float = MARGIN) -> list[dict[str, Any]]:
    """Every (A, B) of `pairs` whose rows exist, judged as one family."""
    seeds = list(seeds) if seeds is not None else None
    found = []
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        diffs, missing = task_differences(rows[a], rows[b], seeds)
        found.append({"a": a, "b": b, "per_task": diffs, "missing": missing, "tasks_won": sum(d > 0 for d in
                                                                                               diffs.values()),
                      **t_test(diffs, margin)})
    return judge_family(found)


#: the plan's sparse variants (docs/evidence-plan.md, v2)
VARIANTS = ("gps-col", "gps-row", "gps-taylor", "gps-colnorm", "gps-nobias", "rosa", "spiel")


def plan_pairs(labels: Iterable[str], claims: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """A report's family: the given claim pairs, then each variant vs gps and vs LoRA at GPS's budget, then gps vs
    every other row (evidence plan v2's development family)."""
    labels = list(labels)
    pairs = list(claims)
    for v in (v for v in VARIANTS if v in labels):
        pairs += [(v, "gps"), (v, "lora-qkv-r5")]
    if "gps" in labels:
        pairs += [("gps", other) for other in labels if other != "gps" and other not in VARIANTS]
    return list(dict.fromkeys((a, b) for a, b in pairs if a in labels and b in labels))


def choose_variants(rows: dict[str, dict[tuple[str, int], float]], tasks: list[str], seeds: list[int],
                    variants: Iterable[str] = VARIANTS, count: int = 2) -> list[tuple[str, float]]:
    """Evidence plan v2, step 3: the `count` variants with the highest mean over `tasks` of their mean over
    `seeds` (highest first, ties by label). A variant missing any (task, seed) cannot be chosen; raises
    InputError when fewer than `count` are complete, naming what is missing."""
    scored, missing = [], {}
    for v in variants:
        cells = rows.get(v, {})
        gaps = [f"{t}/seed{s}" for t in tasks for s in seeds if (t, s) not in cells]
        if gaps:
            missing[v] = gaps
            continue
        per_task = [sum(cells[(t, s)] for s in seeds) / len(seeds) for t in tasks]
        scored.append((v, sum(per_task) / len(per_task)))
    if len(scored) < count:
        raise InputError(f"only {len(scored)} of the variants are complete on every (task, seed); missing: "
                         + "; ".join(f"{v}: {', '.join(g[:3])}{'…' if len(g) > 3 else ''}" for v, g in missing.items()))
    return sorted(scored, key=lambda vs: (-vs[1], vs[0]))[:count]


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.3f}"


def markdown(family: list[dict[str, Any]], title: str) -> list[str]:
    """A table of one family's verdicts: d̄ ± se over tasks, Holm-corrected p-values, per-task differences."""
    lines = [f"**{title}** (one Holm family, {len(family)} comparisons)", "",
             "| A vs B | tasks | d̄ ± se (points) | tasks won | p better | p worse | p level | verdict | per task |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in family:
        spread = "–" if c["mean"] is None else (f"{c['mean']:+.2f}" + ("" if c["se"] is None else f" ± {c['se']:.2f}"))
        per_task = ", ".join(f"{t} {d:+.1f}" for t, d in c["per_task"].items())
        if c["missing"]:
            per_task += f"; missing {', '.join(c['missing'][:3])}{'…' if len(c['missing']) > 3 else ''}"
        lines.append(f"| {c['a']} vs {c['b']} | {c['n']} | {spread} | {c['tasks_won']}/{c['n']} | "
                     f"{_p(c['p_better_holm'])} | {_p(c['p_worse_holm'])} | {_p(c['p_level_holm'])} | "
                     f"**{c['verdict']}** | {per_task} |")
    return lines + [""]


def confirmation_families(regimes: dict[str, dict[str, dict[tuple[str, int], float]]], variants: list[str],
                          seeds: Iterable[int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Evidence plan v2's confirmation families: `regimes` maps a regime (S56, L56) to its rows.

    primary: each chosen variant V vs `lora-qkv-r5` in every regime (one Holm family); secondary: V vs
    `gps`, V vs `full`, `gps` vs `lora-qkv-r5`, `gps` vs `full` in every regime (another). A comparison's
    rows are labelled `<row>@<regime>`.
    """
    rows = {f"{label}@{regime}": cells for regime, by_label in regimes.items() for label, cells in by_label.items()}
    primary = [(f"{v}@{r}", f"lora-qkv-r5@{r}") for v in variants for r in regimes]
    secondary = [(f"{a}@{r}", f"{b}@{r}") for r in regimes
                 for a, b in [*((v, "gps") for v in variants), *((v, "full") for v in variants),
                              ("gps", "lora-qkv-r5"), ("gps", "full")]]
    return {"primary": compare_family(rows, primary, seeds), "secondary": compare_family(rows, secondary, seeds)}


def product_outcome(primary: list[dict[str, Any]], variants: list[str]) -> tuple[str | None, str]:
    """The plan's product outcome from the primary family: (the recommended variant or None, why).

    A variant qualifies when it is **better** than `lora-qkv-r5` in one regime and not **worse** in any;
    of two that qualify, the one with the larger mean d̄ over its primary comparisons (a tie-break the plan
    leaves open, fixed here before any confirmation result was read).
    """
    incomplete = [f"{c['a']} vs {c['b']}" for c in primary if c["missing"] or not c["n"]]
    if not primary or len(primary) < len(variants) * 2 or incomplete:
        return None, ("not decided yet: the primary family is incomplete"
                      + (f" ({', '.join(incomplete[:4])} miss cells)" if incomplete else ""))
    qualifying = []
    for v in variants:
        mine = [c for c in primary if c["a"].split("@")[0] == v]
        verdicts = [c["verdict"] for c in mine]
        if "better" in verdicts and "worse" not in verdicts:
            qualifying.append((sum(c["mean"] for c in mine) / len(mine), v))
    if not qualifying:
        return None, ("no chosen variant is better than lora-qkv-r5 in one regime without being worse in the other "
                      "(primary family, Holm): no sparse method here beat LoRA at equal budget")
    mean, best = max(qualifying)
    return best, (f"{best} is better than lora-qkv-r5 in at least one regime and worse in none (mean d̄ {mean:+.2f} "
                  "points over its primary comparisons)")
