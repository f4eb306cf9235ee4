"""Cost of switching tasks on one base with `sparseft.TaskBank`, against loading a task file each time.

Two GPS tasks (K per neuron, selected on one batch of random images, random trained values) are
written as task files for the same base; the bank reads both and the benchmark times switches
between them (median of `--switches`), a switch back to the base, and, for comparison, the
route without a bank (unmerge the active task, `sparseft.load` the other file onto the base,
merge it). It checks that the base is bit-identical after all switches and reports the bank's
memory (`TaskBank.memory()`: storage bytes of what it holds besides the model) beside the task
files' sizes. `--mixed 1,4,16,64` also times `TaskBank.predict` on one batch of `--batch` images
whose items name 1, 4, 16 or 64 different tasks, grouped by task and in one forward (interleaved
medians against one forward of the base on the same batch; each output's largest difference from
its task's own forward). `--device cuda` runs
the bank on a GPU (tasks are written on the CPU, the bank's model is moved before the tasks are
added; each timed switch ends with a device synchronisation).

    python benchmarks/switch_cost.py                               # ViT-B/16 @224, K=1
    python benchmarks/switch_cost.py --model vit_small_patch16_224 --switches 100
    python benchmarks/switch_cost.py --model vit_small_patch16_224 --mixed 1,4,16,64 --batch 64
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


def write_tasks(name: str, classes: int, k: int, count: int, folder: Path) -> list[Path]:
    """`count` GPS tasks: one selection on a random batch (two views), each task's values drawn at random with its
    own seed (a trained stand-in; the cost of a switch or a grouped forward does not depend on which entries)."""
    model = build(name, classes)
    size = model.default_cfg["input_size"][-1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, size, size, generator=g)
    y = torch.arange(8) % classes
    selection = sparseft.select(model, [([x, x.flip(-1)], y)], k=k, progress=False, chunk_size=4)
    sparseft.apply(model, selection)
    trained = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trained]
    files = []
    for seed in range(1, count + 1):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p, p0 in zip(trained, start):
                p.copy_(p0 + torch.randn(p.shape, generator=g) * 1e-3)
        files.append(sparseft.save_delta(model, folder / f"task{seed}.safetensors"))
    return files


def mixed_batches(bank: sparseft.TaskBank, names: list[str], counts: list[int], batch: int, size: int,
                  device: torch.device, repeats: int, synced) -> list[dict]:
    """Time `bank.predict` on a batch whose items name `count` tasks (round robin), grouped by task and in one
    forward, against one base forward; and how far each lands from every task's own forward."""
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7)).to(device)
    model = bank.model
    rows = []
    for count in counts:
        tasks = [names[i % count] for i in range(batch)]
        times: dict[str, list[float]] = {"grouped": [], "one-forward": [], "base": []}
        for _ in range(repeats):  # interleaved, so drift in the machine's speed hits all alike
            for mode in ("grouped", "one-forward"):
                times[mode].append(median_ms(synced(lambda tasks=tasks, mode=mode: bank.predict(images, tasks, mode)),
                                             1))
            with torch.no_grad():
                times["base"].append(median_ms(synced(lambda: model(images)), 1))
        own: list[torch.Tensor | None] = [None] * batch
        for name in dict.fromkeys(tasks):
            idx = [i for i, t in enumerate(tasks) if t == name]
            with bank.use(name), torch.no_grad():
                for i, row in zip(idx, model(images[idx])):
                    own[i] = row
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"tasks_per_batch": count, "batch": batch, "base_forward_ms": round(med["base"], 1)}
        for mode in ("grouped", "one-forward"):
            out = bank.predict(images, tasks, mode)
            row[f"{mode}_ms"] = round(med[mode], 1)
            row[f"{mode}_ratio"] = round(med[mode] / med["base"], 3)
            row[f"{mode}_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(out, own))
        row["one_forward_refused"] = dict(bank.one_forward_refused)
        rows.append(row)
    return rows


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
    p.add_argument("--mixed", default="", help="tasks per batch to time TaskBank.predict with, e.g. 1,4,16,64")
    p.add_argument("--batch", type=int, default=64, help="--mixed: images per batch")
    p.add_argument("--repeats", type=int, default=5, help="--mixed: timed repeats per row (median)")
    args = p.parse_args()
    counts = [int(c) for c in args.mixed.split(",") if c]
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
        files = write_tasks(args.model, args.classes, args.k, max([2, *counts]), Path(tmp))
        model = build(args.model, args.classes).to(device)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        bank = sparseft.TaskBank(model)
        t0 = time.perf_counter()
        bank.add("a", files[0])
        add_s = time.perf_counter() - t0
        bank.add("b", files[1])
        names = ["a", "b"]
        for i, f in enumerate(files[2:], 3):
            names.append(f"t{i}")
            bank.add(names[-1], f)
        tasks = iter(["a", "b"] * args.switches)
        switch = median_ms(synced(lambda: bank.use(next(tasks))), args.switches)
        to_base = median_ms(synced(lambda: (bank.use("a"), bank.use(None))), 10) - switch / 2
        bank.use(None)
        exact = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())

        plain = build(args.model, args.classes).to(device)
        loaded = iter(files[:2] * 5)
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
            "task_file_bytes": [f.stat().st_size for f in files[:2]], "bank_bytes": bank.nbytes(),
            "bank_to_files": round(bank.memory()["ratio"], 3),
            "base_bit_exact_after_switches": exact,
        }
        if counts:
            size = model.default_cfg["input_size"][-1]
            result["mixed"] = mixed_batches(bank, names, counts, args.batch, size, device, args.repeats, synced)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
