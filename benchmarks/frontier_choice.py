"""Evidence plan v2, step 3: which two variants the confirmation runs take, from frontier-dev's records.

    python benchmarks/frontier_choice.py results/frontier-dev

The rule (docs/evidence-plan.md, fixed before the runs): the two variants of gps-col, gps-row,
gps-taylor, gps-colnorm, gps-nobias, rosa, spiel with the highest mean D28 test top-1 over the
development tasks (mean over seeds per task, then over tasks). A variant missing a (task, seed) cannot
be chosen. Prints every variant's mean and the choice, then the plan's budget check (amendment 5): the
confirmation suites' cost estimated from frontier-dev's measured seconds per training run of the rows they
take, scaled by the plan's cost ratios (56 px / 3 epochs = 1.6 / 0.6 of 28 px / 3 epochs; 56 px / 10
epochs = 4.8 / 0.6), and the plan's total against its 20 thread-hours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sparseft.bench import load_records
from sparseft.bench.taskrule import VARIANTS, choose_variants, rows_of
from sparseft.errors import InputError

SCREENS_MIN = 94  # measured (amendment 5)
CNN_MIN = 60  # the plan's estimate for frontier-cnn
S56, L56 = 1.6 / 0.6, 4.8 / 0.6
BUDGET_H = 20.0


def runs_of(record: dict) -> int:
    return len(record.get("tuning") or []) + 1


def budget(records: list[dict], chosen: list[str], tasks: int) -> None:
    """Print the budget check: measured frontier-dev cost, estimated confirmation cost, total vs BUDGET_H."""
    dev_s = sum(r.get("run_time_s") or 0 for r in records)
    rows = ["gps", "lora-qkv-r5", "full", *chosen]
    per_run = {}
    for label in rows:
        mine = [r for r in records if r["label"] == label]
        per_run[label] = sum(r.get("run_time_s") or 0 for r in mine) / max(1, sum(runs_of(r) for r in mine))
    tune_runs = {label: sum(len(r.get("tuning") or []) for r in records if r["label"] == label and r["seed"] == 0)
                 / max(1, sum(1 for r in records if r["label"] == label and r["seed"] == 0)) for label in rows}
    for n in range(tasks, 3, -1):
        short = sum(per_run[lb] * S56 * (tune_runs[lb] + 3) for lb in rows) * n
        long = sum(per_run[lb] * L56 * 3 for lb in rows) * n
        total = dev_s / 3600 + (short + long) / 3600 + (SCREENS_MIN + CNN_MIN) / 60
        print(f"{n} confirmation tasks: frontier-dev {dev_s / 3600:.1f} h measured; "
              f"confirm-short {short / 3600:.1f} h, confirm-long {long / 3600:.1f} h estimated; "
              f"screens + cnn {(SCREENS_MIN + CNN_MIN) / 60:.1f} h; "
              f"total {total:.1f} thread-hours ({'within' if total <= BUDGET_H else 'past'} {BUDGET_H:g})")
        if total <= BUDGET_H:
            break
    print("seconds per training run at D28: " + ", ".join(f"{lb} {v:.0f}" for lb, v in per_run.items()))


def main(results: str) -> None:
    records = load_records(results)
    suite = json.loads((Path(results) / "suite.json").read_text())
    tasks = sorted({r["task"] for r in records})
    rows = rows_of(records)
    for variant in VARIANTS:
        try:
            (_, mean), = choose_variants(rows, tasks, suite["seeds"], variants=[variant], count=1)
            print(f"{variant:12s} {mean:6.2f}")
        except InputError as err:
            print(f"{variant:12s} incomplete ({err})")
    try:
        chosen = [label for label, _ in choose_variants(rows, tasks, suite["seeds"])]
    except InputError as err:
        print(f"no choice yet: {err}")
        return
    print("chosen:", ", ".join(chosen))
    budget(records, chosen, tasks=5)


if __name__ == "__main__":
    main(sys.argv[1])
