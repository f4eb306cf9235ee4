"""Evidence plan v2, step 3: which two variants the confirmation runs take, from frontier-dev's records.

    python benchmarks/frontier_choice.py results/frontier-dev

The rule (docs/evidence-plan.md, fixed before the runs): the two variants of gps-col, gps-row,
gps-taylor, gps-colnorm, gps-nobias, rosa, spiel with the highest mean D28 test top-1 over the
development tasks (mean over seeds per task, then over tasks). A variant missing a (task, seed) cannot
be chosen. Prints every variant's mean and the choice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sparseft.bench import load_records
from sparseft.bench.taskrule import VARIANTS, choose_variants
from sparseft.errors import InputError


def main(results: str) -> None:
    records = load_records(results)
    suite = json.loads((Path(results) / "suite.json").read_text())
    tasks = sorted({r["task"] for r in records})
    rows: dict[str, dict[tuple[str, int], float]] = {}
    for r in records:
        if r.get("test_acc") is not None:
            rows.setdefault(r["label"], {})[(r["task"], r["seed"])] = 100 * r["test_acc"]
    for variant in VARIANTS:
        try:
            (_, mean), = choose_variants(rows, tasks, suite["seeds"], variants=[variant], count=1)
            print(f"{variant:12s} {mean:6.2f}")
        except InputError as err:
            print(f"{variant:12s} incomplete ({err})")
    try:
        print("chosen:", ", ".join(label for label, _ in choose_variants(rows, tasks, suite["seeds"])))
    except InputError as err:
        print(f"no choice yet: {err}")


if __name__ == "__main__":
    main(sys.argv[1])
