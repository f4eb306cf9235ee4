"""Cost of switching tasks on one base with `sparseft.TaskBank`, against loading a task file each time.

Two GPS tasks (K per neuron, selected on one batch of random images, random trained values) are
written as task files for the same base; the bank reads both and the benchmark times switches
between them (median of `--switches`), a switch back to the base, and, for comparison, the
route without a bank (unmerge the active task, `sparseft.load` the other file onto the base,
merge it). It checks that the base is bit-identical after all switches and reports the bank's
memory (`TaskBank.memory()`: storage bytes of what it holds besides the model) beside the task
files' sizes. `--device cuda` runs the bank on a GPU (tasks are written on the CPU, the bank's
model is moved before the tasks are added; each timed switch ends with a device synchronisation).

    python benchmarks/switch_cost.py                               # ViT-B/16 @224, K=1
    python benchmarks/switch_cost.py --model vit_small_patch16_224 --switches 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import sparseft


def build(name: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=classes).eval()


def write_task(name: str, classes: int, k: int, seed: int, path: Path) -> Path:
    """A GPS task: selection on one random batch (two views), values drawn at random (a trained stand-in)."""
    model = build(name, classes)
    size = model.default_cfg["input_size"][-1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, size, size, generator=g)
    y = torch.arange(8) % classes
    selection = sparseft.select(model, [([x, x.flip(-1)], y)], k=k, progress=False, chunk_size=4)
    sparseft.apply(model, selection)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    return sparseft.save_delta(model, path)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--switches", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where the bank's model lives (cpu, cuda, cuda:1, ...)")
    args = p.parse_args()
    device = torch.device(args.device)

    def synced(fn):
        def run() -> None:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        files = [write_task(args.model, args.classes, args.k, seed, Path(tmp) / f"task{seed}.safetensors")
                 for seed in (1, 2)]
        model = build(args.model, args.classes).to(device)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        bank = sparseft.TaskBank(model)
        t0 = time.perf_counter()
        bank.add("a", files[0])
        add_s = time.perf_counter() - t0
        bank.add("b", files[1])
        tasks = iter(["a", "b"] * args.switches)
        switch = median_ms(synced(lambda: bank.use(next(tasks))), args.switches)
        to_base = median_ms(synced(lambda: (bank.use("a"), bank.use(None))), 10) - switch / 2
        bank.use(None)
        exact = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())

        plain = build(args.model, args.classes).to(device)
        loaded = iter(files * 5)
        state = {"model": sparseft.merge(sparseft.load(files[1], model=plain))}

        def reload() -> None:
            sparseft.unmerge(state["model"])
            state["model"] = sparseft.merge(sparseft.load(next(loaded), model=state["model"]))

        without_bank = median_ms(synced(reload), 10)
        result = {
            "model": args.model, "device": str(device), "k": args.k,
            "classes": args.classes, "threads": torch.get_num_threads(),
            "switch_ms_median": round(switch, 3), "to_base_ms": round(to_base, 3),
            "reload_merge_ms_median": round(without_bank, 1), "add_s": round(add_s, 2),
            "task_file_bytes": [f.stat().st_size for f in files], "bank_bytes": bank.nbytes(),
            "bank_to_files": round(bank.memory()["ratio"], 3),
            "base_bit_exact_after_switches": exact,
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
