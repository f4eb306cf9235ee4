"""The recommended learning-rate table from the suites' choices (sparseft.methods.rates), as Python and markdown.

    python benchmarks/recommended_lr.py [docs/results-figures]
    python benchmarks/recommended_lr.py --choices results/frontier-dev docs/results-figures/frontier-dev

The second form is for a suite still running: it writes the first seed's choices of every finished
cell (the columns of results.csv that `evidence` reads) to choices.csv in the second folder.

Prints `RECOMMENDED_LR` as the rule derives it (paste it into sparseft/methods/rates.py when the
evidence changes; tests/test_autolr.py fails until the two agree) and the table for docs/learning-rates.md.
"""

from __future__ import annotations

import csv
import json
import pprint
import sys
from pathlib import Path

from sparseft.bench import load_records
from sparseft.fileutil import atomic_path
from sparseft.methods.rates import EVIDENCE, FAMILIES, derive_rates, evidence


def write_choices(results: Path, out: Path) -> Path:
    """choices.csv in `out`: backbone, task, label, method, seed, chosen of every first-seed record in `results`."""
    rows = [r for r in load_records(results) if r.get("seed") == 0]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "choices.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["backbone", "task", "label", "method", "seed", "chosen"])
        for r in sorted(rows, key=lambda r: (r["backbone"], r["task"], r["label"])):
            chosen = json.dumps(r.get("chosen") or {})
            w.writerow([r["backbone"], r["task"], r["label"], r["method"], r["seed"], chosen])
    return out / "choices.csv"


def markdown(results: Path) -> str:
    table, chosen = derive_rates(results), evidence(results)
    lines = ["| method | " + " | ".join(FAMILIES) + " |", "|---|" + "---|" * len(FAMILIES)]
    for method in sorted(table):
        cells = []
        for family in FAMILIES:
            values = chosen.get((method, family))
            if values:
                shown = ", ".join(f"{v:g}" for v in sorted(values))
                plural = "" if len(values) == 1 else "s"
                cells.append(f"**{table[method][family]:g}** ({len(values)} choice{plural}: {shown})")
            else:
                cells.append(f"{table[method]['transformer']:g} (no evidence: the transformer value)"
                             if "transformer" in table[method] else "no evidence")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nSuites: {', '.join(EVIDENCE)}."


if __name__ == "__main__":
    if sys.argv[1:2] == ["--choices"]:
        print(write_choices(Path(sys.argv[2]), Path(sys.argv[3])))
        sys.exit()
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results-figures")
    print("RECOMMENDED_LR = ", end="")
    pprint.pprint(derive_rates(root), sort_dicts=False)
    print()
    print(markdown(root))
