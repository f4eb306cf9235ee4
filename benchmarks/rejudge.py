"""Re-judge a finished suite's comparisons by rule v2 (task as unit, t-test, Holm, TOST) from its results.csv.

    python benchmarks/rejudge.py docs/results-figures/mini-vtab-long/results.csv [...]

Per backbone of each file, one Holm family: the claims of `sparseft.bench.verdicts.CLAIMS` whose rows
the suite ran, plus each GPS row of a K sweep against every LoRA family's curve interpolated at its
number of trained weights (linear in log weights, never extrapolated). Prints markdown.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

from sparseft.bench.taskrule import RULE_V2, compare_family, markdown
from sparseft.bench.verdicts import CLAIMS, families, interpolate


def rows_of(path: Path) -> dict[str, dict[str, dict[tuple[str, int], float]]]:
    """backbone -> label -> {(task, seed): top-1 %}; plus '<label>#params' -> {(task, seed): weights}."""
    out: dict[str, dict[str, dict[tuple[str, int], float]]] = defaultdict(lambda: defaultdict(dict))
    for r in csv.DictReader(path.open()):
        if r["test_acc"]:
            key = (r["task"], int(r["seed"]))
            out[r["backbone"]][r["label"]][key] = 100 * float(r["test_acc"])
            out[r["backbone"]][r["label"] + "#params"][key] = float(r["trainable_backbone"] or 0)
    return out


def matched_rows(rows: dict[str, dict[tuple[str, int], float]]) -> tuple[dict, list[tuple[str, str]]]:
    """For every GPS K row and every LoRA family: the family's accuracy interpolated at the GPS row's weights."""
    labels = [k for k in rows if not k.endswith("#params")]
    fams = families(labels)
    extra, pairs = {}, []
    for gps in fams.get("gps", []):
        for fam, members in fams.items():
            if fam == "gps" or len(members) < 2:
                continue
            cells = {}
            for key, _ in rows[gps].items():
                if all(key in rows[m] for m in members):
                    y = interpolate([rows[m + "#params"][key] for m in members], [rows[m][key] for m in members],
                                    rows[gps + "#params"][key])
                    if y is not None:
                        cells[key] = y
            if cells:
                name = f"{fam}@{gps}"
                extra[name] = cells
                pairs.append((gps, name))
    return extra, pairs


def main(paths: list[str]) -> None:
    print(RULE_V2 + "\n")
    for path in map(Path, paths):
        for backbone, rows in rows_of(path).items():
            ref = "gps-ref" if "gps-ref" in rows else "gps"
            pairs = [(ref if a == "REF" else a, ref if b == "REF" else b) for _, ps in CLAIMS for a, b in ps]
            extra, matched = matched_rows(rows)
            plain = {k: v for k, v in rows.items() if not k.endswith("#params")}
            family = compare_family({**plain, **extra}, list(dict.fromkeys(pairs + matched)))
            print("\n".join(markdown(family, f"{path.parent.name}, {backbone}")))


if __name__ == "__main__":
    main(sys.argv[1:])
