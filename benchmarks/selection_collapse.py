"""How concentrated and how stable GPS's choices are: per weight, how many distinct input columns
its rows pick and the share of rows that pick the most common one; per task, how much the
selections of different seeds overlap.

    python benchmarks/selection_collapse.py results/mini-vtab-cpu-honest --labels gps gps-colnorm

reads every `<label>/seed*/final/selection.safetensors` under the results folder and prints, per
label, the mean over weights and runs of: distinct columns / columns, top column's share of rows;
and the mean over tasks and seed pairs of the Jaccard overlap |A ∩ B| / |A ∪ B| of the selected
entries (1 = every seed picks the same weights; the seed changes the selection views' draws, and
the final runs select on train800val200).
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


def overlap(a: Selection, b: Selection) -> float:
    """Jaccard overlap of two selections' sparse entries (weights missing from one count as empty)."""
    inter = union = 0
    for name in set(a.indices) | set(b.indices):
        x = set(a.indices.get(name, torch.empty(0, dtype=torch.long)).tolist())
        y = set(b.indices.get(name, torch.empty(0, dtype=torch.long)).tolist())
        inter, union = inter + len(x & y), union + len(x | y)
    return inter / union if union else 1.0


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
            per_task = defaultdict(list)
            for path in sorted(args.results.glob(f"{backbone}/*/{label}/seed*/final/selection.safetensors")):
                per_task[path.parts[-5]].append(Selection.load(path))
            pairs = [overlap(a, b) for runs in per_task.values() for i, a in enumerate(runs) for b in runs[i + 1:]]
            stable = f"; seeds' overlap {100 * statistics.mean(pairs):.1f} % ({len(pairs)} pairs)" if pairs else ""
            print(f"{label:>16} {backbone}: {len(values)} weights; distinct columns {100 * distinct:.1f} %, "
                  f"top column's share of rows {100 * top:.1f} %{stable}")


if __name__ == "__main__":
    main()
