"""TaskBank.predict on real task files: grouped by task and in one forward, against one base forward.

Takes the frontier-dev suite's seed-0 task files (DINOv2 ViT-S/14 @28: gps, lora-qkv-r5, gps-colnorm,
gps-taylor on digits, animal_mnist, fashion_mnist, mnist5k) from RESULTS (default results), and a batch of
64 random images naming 1, 4 or 16 of them round robin; 5 interleaved repeats, medians.

    python benchmarks/mixed_real_tasks.py [RESULTS]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import sparseft

TASKS = ("digits", "animal_mnist", "fashion_mnist", "mnist5k")
ROWS = ("gps", "lora-qkv-r5", "gps-colnorm", "gps-taylor")


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    root = f"{sys.argv[1] if len(sys.argv) > 1 else 'results'}/frontier-dev/dinov2_vits14_offline@28"
    files = {f"{t}-{m}": f"{root}/{t}/{m}/seed0/final/delta.safetensors" for t in TASKS for m in ROWS}
    bank = sparseft.TaskBank(sparseft.base_model(files["digits-gps"]))
    for name, path in files.items():
        bank.add(name, path)
    x = torch.randn(64, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    rows = {}
    for count in (1, 4, 16):
        tasks = [bank.tasks[i % count] for i in range(len(x))]
        times: dict[str, list[float]] = {"grouped": [], "one-forward": [], "base": []}
        for _ in range(5):  # interleaved, so drift in the machine's speed hits all alike
            for mode in ("grouped", "one-forward"):
                times[mode].append(seconds(lambda tasks=tasks, mode=mode: bank.predict(x, tasks, mode)))
            with torch.no_grad():
                times["base"].append(seconds(lambda: bank.model(x)))
        med = {k: statistics.median(v) for k, v in times.items()}
        grouped, one = bank.predict(x, tasks), bank.predict(x, tasks, "one-forward")
        rows[count] = {"base_ms": round(1e3 * med["base"], 1), "grouped_ratio": round(med["grouped"] / med["base"], 3),
                       "one_forward_ratio": round(med["one-forward"] / med["base"], 3),
                       "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(grouped, one))}
        print(count, rows[count], flush=True)
    print(json.dumps({"model": "dinov2_vits14_offline @28", "task_files": list(files), "batch": len(x),
                      "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
