"""How concentrated GPS's choices are: per weight, how many distinct input columns its rows pick,
and the share of rows that pick the most common one.

    python benchmarks/selection_collapse.py results/mini-vtab-cpu-honest --labels gps gps-colnorm

reads every `<label>/seed*/final/selection.safetensors` under the results folder and prints, per
label, the mean over weights and runs of: distinct columns / columns, top column's share of rows.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from sparseft.selection import Selection


def concentration(selection: Selection) -> list[tuple[float, float]]:
    """Per sparse weight: (distinct input columns used / columns, share of entries on the top column)."""
    out = []
    for name, flat in selection.indices.items():
        shape = selection.shapes[name]
        cols = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        if cols < 2 or flat.numel() == 0:
            continue
        counts = torch.bincount(flat % cols, minlength=cols)
        out.append(((counts > 0).sum().item() / cols, counts.max().item() / flat.numel()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--labels", nargs="+", default=["gps"])
    args = parser.parse_args()
    for label in args.labels:
        stats: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for path in sorted(args.results.glob(f"*/*/{label}/seed*/final/selection.safetensors")):
            stats[path.parts[-6]] += concentration(Selection.load(path))
        for backbone, values in stats.items():
            distinct = statistics.mean(v[0] for v in values)
            top = statistics.mean(v[1] for v in values)
            print(f"{label:>16} {backbone}: {len(values)} weights; distinct columns {100 * distinct:.1f} %, "
                  f"top column's share of rows {100 * top:.1f} %")


if __name__ == "__main__":
    main()
