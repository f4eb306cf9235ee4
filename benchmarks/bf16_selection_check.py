"""Judge the `bf16-selection` suite (issue 23 item 3): GPS with its selection scored in bf16 against fp32.

    python benchmarks/bf16_selection_check.py results/bf16-selection

Prints markdown: per task the mean test top-1 of both rows over seeds, the share of selected entries the
two precisions agree on (same task and seed, the final run's selection), the selection pass's time ratio,
and the verdict of rule v2 (sparseft.bench.taskrule: task as unit, paired t, TOST +-1 point) for
"gps-bf16sel vs gps", one comparison. The rule and what follows from each verdict are fixed in
docs/performance.md before the suite ran.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from sparseft.bench.taskrule import compare_family, markdown
from sparseft.selected import Selection

A, B = "gps-bf16sel", "gps"


def records(out: Path) -> dict[str, dict[tuple[str, int], dict]]:
    """label -> {(task, seed): record} of the suite's finished cells."""
    found: dict[str, dict[tuple[str, int], dict]] = defaultdict(dict)
    for path in out.glob("*/*/*/seed*/final/record.json"):
        record = json.loads(path.read_text())
        if record.get("test_acc") is not None:
            found[record["label"]][(record["task"], int(record["seed"]))] = {**record, "dir": path.parent}
    return found


def agreement(a: Path, b: Path) -> float:
    """The share of `a`'s selected entries that `b` selected too (both select the same number per neuron)."""
    sa, sb = Selection.load(a / "selection.safetensors"), Selection.load(b / "selection.safetensors")
    shared = total = 0
    for name, idx in sa.indices.items():
        other = set(sb.indices.get(name, idx.new_empty(0)).tolist())
        shared += sum(int(i) in other for i in idx.tolist())
        total += idx.numel()
    return shared / max(total, 1)


def main(out: Path) -> None:
    found = records(out)
    pairs = sorted(set(found.get(A, {})) & set(found.get(B, {})))
    if not pairs:
        sys.exit(f"{out}: no (task, seed) with both {A} and {B} finished")
    rows = {label: {key: 100 * r["test_acc"] for key, r in found[label].items()} for label in (A, B)}
    print(f"| task | {B} (fp32 selection) | {A} | difference | entries agreeing | selection time bf16/fp32 |")
    print("|---|---|---|---|---|---|")
    for task in sorted({t for t, _ in pairs}):
        keys = [k for k in pairs if k[0] == task]
        a = statistics.mean(rows[A][k] for k in keys)
        b = statistics.mean(rows[B][k] for k in keys)
        agree = statistics.mean(agreement(found[A][k]["dir"], found[B][k]["dir"]) for k in keys)
        times = [json.loads((found[X][k]["dir"] / "summary.json").read_text())["selection_time_s"]
                 for X in (A, B) for k in keys]
        ratio = sum(times[:len(keys)]) / sum(times[len(keys):])
        print(f"| {task} ({len(keys)} seeds) | {b:.2f} | {a:.2f} | {a - b:+.2f} | {100 * agree:.1f} % | {ratio:.2f} |")
    print()
    print("\n".join(markdown(compare_family(rows, [(A, B)]), f"{A} vs {B} (rule v2, one comparison)")))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/bf16-selection"))
