"""The recommended learning-rate table from the suites' choices (sparseft.methods.rates), as Python and markdown.

    python benchmarks/recommended_lr.py [docs/results-figures]

Prints `RECOMMENDED_LR` as the rule derives it (paste it into sparseft/methods/rates.py when the
evidence changes; tests/test_autolr.py fails until the two agree) and the table for docs/learning-rates.md.
"""

from __future__ import annotations

import pprint
import sys
from pathlib import Path

from sparseft.methods.rates import EVIDENCE, FAMILIES, derive_rates, evidence


def markdown(results: Path) -> str:
    table, chosen = derive_rates(results), evidence(results)
    lines = ["| method | " + " | ".join(FAMILIES) + " |", "|---|" + "---|" * len(FAMILIES)]
    for method in sorted(table):
        cells = []
        for family in FAMILIES:
            values = chosen.get((method, family))
            if values:
                shown = ", ".join(f"{v:g}" for v in sorted(values))
                cells.append(f"**{table[method][family]:g}** ({len(values)} choices: {shown})")
            else:
                cells.append(f"{table[method]['transformer']:g} (no evidence: the transformer value)"
                             if "transformer" in table[method] else "no evidence")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nSuites: {', '.join(EVIDENCE)}."


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results-figures")
    print("RECOMMENDED_LR = ", end="")
    pprint.pprint(derive_rates(root), sort_dicts=False)
    print()
    print(markdown(root))
