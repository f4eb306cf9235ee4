"""What GPS costs: a training step against full fine-tuning and the floor, the selection pass, memory.

Modes of a training step (one model, one batch of random images, K selected inputs per neuron)
  full      every parameter trains: dense gradients, AdamW state for all
  official  GPS as the official code trains it: dense gradients and full-size Adam state for
            every parameter, gradients of unselected entries zeroed before each step
  sparse    sparseft: selected entries as sparse deltas, GPS's fully trained parameters (biases,
            head) as usual, BatchNorm in train mode
  floor     no weight gradient at all, everything else as `sparse` trains it, so the backward
            still runs through the whole network: GPS's fully trained parameters plus every
            BatchNorm bias (CNNs have no other bias), BatchNorm in train mode. A sparse step can
            approach this, not go below it.
Step time is measured interleaved (round-robin over modes, several rounds) in one process and
reported as medians and ratios to `full` and to `floor`. Gradient + optimizer-state bytes are
counted from the tensors after a step.

Options add, in the same run:
  --bf16       the four modes again under bf16 autocast
  --compile    `sparse` wrapped in torch.compile (inductor), against `sparse` eager
  --selection  the GPS selection pass with default arguments (two views of --select-images
               random images, batches of --batch) against one full fine-tuning epoch on those
               images; and the pass's peak RSS in its own process
  --rss        peak RSS of each mode in its own process, counted from the built model (the peak
               of loading a checkpoint is left out), `sparse` including a default-argument
               `sparseft.select` on two views of the batch (what a user who passes no options gets)
  --all        all of the above
  --device     where the models and batches live (cpu, cuda, cuda:1, ...); on a GPU each timed step
               ends with a device synchronisation, bf16 autocast runs on that device and `--rss`
               reports each mode's peak allocated device memory instead of its RSS
  --variants   the frontier variants' steps against full, sparse (GPS) and floor: `column` (GPS
               --level column), `rosa` (LoRA r=1 on qkv + sparse entries at GPS K's budget) and
               `spiel-probe` (a GPS step with SpIEL's gradient probes on: what its 2 steps before
               each update cost; its other steps are `sparse` steps)

    python benchmarks/step_cost.py --all                                   # ViT-S/16 @224, batch 32
    python benchmarks/step_cost.py --model resnet50 --img 128               # a CNN
    python benchmarks/step_cost.py --rss --model vit_base_patch16_224 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import sparseft
from sparseft import delta
from sparseft.methods import MethodContext, get_method
from sparseft.regrow import Regrower, RegrowSchedule
from sparseft.selection import parameter_roles

MODES = ("full", "official", "sparse", "floor")
DEVICE = torch.device("cpu")  # --device


def synchronize() -> None:
    """Wait for the device (a GPU runs asynchronously: a step is timed when its work is done)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def build(name: str, img: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return sparseft.create_model(name, num_classes=classes, img_size=img).to(DEVICE)


def batch_of(n: int, img: int, classes: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, img, img, generator=g).to(DEVICE), (torch.arange(n) % classes).to(DEVICE)


def select(model: torch.nn.Module, img: int, k: int, classes: int, images: int, batch: int,
           precision: str = "fp32") -> sparseft.Selection:
    """GPS with default arguments on two views of random images (a realistic per-neuron pattern)."""
    x, y = batch_of(images, img, classes, seed=1)
    loader = [([x[i:i + batch], x[i:i + batch].flip(-1)], y[i:i + batch]) for i in range(0, images, batch)]
    return sparseft.select(model, loader, k=k, progress=False, precision=precision)


def floor_parameters(model: torch.nn.Module) -> set[str]:
    """GPS's fully trained parameters and every BatchNorm bias: the floor trains these, no weight."""
    roles = parameter_roles(model)
    norms = {f"{n}.bias" for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return {n for n, r in roles.items() if r == "full"} | norms


class Runner:
    """One mode's model, optimizer and step function."""

    def __init__(self, mode: str, base: torch.nn.Module, selection: sparseft.Selection, bf16: bool = False,
                 compiled: bool = False) -> None:
        self.mode, self.bf16 = mode, bf16
        self.model = copy.deepcopy(base).train()
        roles = parameter_roles(self.model)
        self.masks: dict[str, torch.Tensor] = {}
        if mode == "sparse":
            sparseft.apply(self.model, selection)
        elif mode == "floor":
            trained = floor_parameters(self.model)
            for name, p in self.model.named_parameters():
                p.requires_grad_(name in trained)
        elif mode == "official":
            for name, p in self.model.named_parameters():
                if name in selection.indices:
                    mask = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    mask[selection.indices[name]] = 1
                    self.masks[name] = mask.view_as(p)
                elif roles[name] == "frozen":
                    self.masks[name] = torch.zeros_like(p)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0 if mode == "official" else 1e-4)
        self.named = dict(self.model.named_parameters())
        self.forward = torch.compile(self.model) if compiled else self.model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
        F.cross_entropy(logits.float(), y).backward()
        for name, mask in self.masks.items():
            self.named[name].grad.mul_(mask)
        self.opt.step()
        synchronize()

    def state_bytes(self) -> int:
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        state = sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
        return grads + state


def interleaved(runners: dict[str, Runner], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict:
    """Median step time per runner, round-robin over runners; ratios to full and to floor."""
    for r in runners.values():  # warm-up (allocations, kernel build, oneDNN primitives, compilation)
        for _ in range(args.warmup):
            r.step(x, y)
    times: dict[str, list[float]] = {m: [] for m in runners}
    for _ in range(args.rounds):
        for m, r in runners.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                r.step(x, y)
                times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {"steps_per_mode": args.rounds * args.steps, "step_s": {m: round(v, 4) for m, v in med.items()}}
    for ref in ("full", "floor", "sparse"):
        if ref in med:
            out[f"ratio_to_{ref}"] = {m: round(v / med[ref], 3) for m, v in med.items()}
    return out


def time_modes(args: argparse.Namespace, base: torch.nn.Module, selection: sparseft.Selection, bf16: bool) -> dict:
    runners = {m: Runner(m, base, selection, bf16=bf16) for m in MODES}
    x, y = batch_of(args.batch, args.img, args.classes)
    result = interleaved(runners, x, y, args)
    state = {m: r.state_bytes() for m, r in runners.items()}
    result.update({"bf16": bf16, "grad_opt_bytes": state,
                   "grad_opt_ratio": {m: round(state[m] / state["full"], 4) for m in MODES},
                   "trainable": {m: sparseft.trainable_parameters(r.model) for m, r in runners.items()}})
    return result


def time_compiled(args: argparse.Namespace, base: torch.nn.Module, selection: sparseft.Selection) -> dict:
    runners = {"sparse": Runner("sparse", base, selection), "sparse+compile": Runner("sparse", base, selection,
                                                                                    compiled=True)}
    x, y = batch_of(args.batch, args.img, args.classes)
    t0 = time.perf_counter()
    runners["sparse+compile"].step(x, y)
    first = time.perf_counter() - t0
    result = interleaved(runners, x, y, args)
    result["first_compiled_step_s"] = round(first, 1)  # includes compilation
    return result


def prepared_runner(base: torch.nn.Module, method: str, loader: list, **options) -> Runner:
    """A runner whose model a method prepared (on `loader`'s views), with AdamW on what it trains."""
    runner = Runner("floor", base, sparseft.Selection(indices={}, shapes={}))
    runner.model = get_method(method, **options).prepare(
        copy.deepcopy(base).train(), MethodContext(loader={"select": loader}.__getitem__, progress=False))
    runner.opt = torch.optim.AdamW([p for p in runner.model.parameters() if p.requires_grad], lr=1e-4,
                                   weight_decay=1e-4)
    runner.named = dict(runner.model.named_parameters())
    runner.forward = runner.model
    return runner


def time_variants(args: argparse.Namespace, base: torch.nn.Module, selection: sparseft.Selection) -> dict:
    x, y = batch_of(args.batch, args.img, args.classes, seed=1)
    loader = [([x, x.flip(-1)], y)]
    runners = {m: Runner(m, base, selection) for m in ("full", "sparse", "floor")}
    runners["column"] = prepared_runner(base, "gps", loader, k=args.k, level="column", score="sum_of_squares")
    runners["rosa"] = prepared_runner(base, "rosa", loader, k=args.k)
    probe = Runner("sparse", base, selection)
    grower = Regrower(probe.model, RegrowSchedule())
    for name, d in delta.deltas(probe.model).items():
        d.probe = grower._accumulator(name, d)  # on for every step: the cost of a step before an update
    runners["spiel-probe"] = probe
    result = interleaved(runners, *batch_of(args.batch, args.img, args.classes), args)
    result["trainable"] = {m: sparseft.trainable_parameters(r.model) for m, r in runners.items()}
    return result


def time_selection(args: argparse.Namespace, base: torch.nn.Module) -> dict:
    """The default selection pass against one full fine-tuning epoch (fp32) on the same images, interleaved
    (min of 2 each); with --bf16 also the pass with `precision="bf16"` and how many entries it changes."""
    x, y = batch_of(args.select_images, args.img, args.classes)
    full = Runner("full", base, sparseft.Selection(indices={}, shapes={}))
    full.step(x[:args.batch], y[:args.batch])  # warm-up
    precisions = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    epochs: list[float] = []
    passes: dict[str, list[float]] = {p: [] for p in precisions}
    chosen: dict[str, sparseft.Selection] = {}
    for _ in range(2):
        t0 = time.perf_counter()
        for i in range(0, args.select_images, args.batch):
            full.step(x[i:i + args.batch], y[i:i + args.batch])
        epochs.append(time.perf_counter() - t0)
        for precision in precisions:
            t0 = time.perf_counter()
            chosen[precision] = select(base, args.img, args.k, args.classes, args.select_images, args.batch,
                                       precision)
            synchronize()
            passes[precision].append(time.perf_counter() - t0)
    epoch = min(epochs)
    out = {"images": args.select_images, "batch": args.batch, "chunk_size": chosen["fp32"].meta.get("chunk_size"),
           "selection_s": round(min(passes["fp32"]), 2), "full_epoch_s": round(epoch, 2),
           "selection_per_epoch": round(min(passes["fp32"]) / epoch, 2)}
    if "bf16" in chosen:
        a, b = chosen["fp32"].indices, chosen["bf16"].indices
        changed = sum(v.numel() - len(set(v.tolist()) & set(b[n].tolist())) for n, v in a.items())
        out.update({"selection_bf16_s": round(min(passes["bf16"]), 2),
                    "selection_bf16_per_fp32_epoch": round(min(passes["bf16"]) / epoch, 2),
                    "bf16_entries_changed": changed, "entries": sum(v.numel() for v in a.values())})
    return out


def rss_child(args: argparse.Namespace) -> None:
    """Run one mode in this process (`sparse`: the default selection first) and print its peak RSS."""
    base = build(args.model, args.img, args.classes)
    x, y = batch_of(args.batch, args.img, args.classes)
    _reset_peak()  # what loading the weights needed (a converted checkpoint) is not what training needs
    if args.rss_child == "selection":  # the selection pass alone, as --selection times it
        select(base, args.img, args.k, args.classes, args.select_images, args.batch)
        synchronize()
        print(json.dumps({"mode": "selection", "peak_rss_mib": round(_peak_mib(), 1)}))
        return
    if args.rss_child in ("sparse", "official"):
        selection = select(base, args.img, args.k, args.classes, args.batch, args.batch)
    else:
        selection = sparseft.Selection(indices={}, shapes={})
    after_select = _peak_mib()
    runner = Runner(args.rss_child, base, selection)
    del base
    for _ in range(3):
        runner.step(x, y)
    print(json.dumps({"mode": args.rss_child, "peak_rss_mib": round(_peak_mib(), 1),
                      "peak_rss_selection_mib": round(after_select, 1)}))


def _reset_peak() -> None:
    """Start the peak-RSS count afresh from what is resident now (Linux: /proc/self/clear_refs)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib() -> float:
    """This process's peak RSS (VmHWM: getrusage would report the launching process's size, inherited at exec);
    on a GPU, the peak memory allocated on the device since `_reset_peak`."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated(DEVICE) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_all(args: argparse.Namespace, modes: tuple[str, ...]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rss_repeats):
        for mode in modes:
            cmd = [sys.executable, __file__, "--rss-child", mode, "--model", args.model, "--img", str(args.img),
                   "--batch", str(args.batch), "--k", str(args.k), "--classes", str(args.classes),
                   "--select-images", str(args.select_images), "--device", str(DEVICE)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            result[mode].append(json.loads(out.strip().splitlines()[-1])["peak_rss_mib"])
    best = {m: min(v) for m, v in result.items()}
    return {"repeats": args.rss_repeats, "peak_rss_mib": best,
            "peak_rss_ratio": {m: round(best[m] / best["full"], 3) for m in modes if "full" in best}}


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (every figure names its CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def show(title: str, result: dict) -> None:
    print(title)
    for m, s in result["step_s"].items():
        ratios = "  ".join(f"/{ref} {result[f'ratio_to_{ref}'][m]:.3f}" for ref in ("full", "floor", "sparse")
                           if f"ratio_to_{ref}" in result)
        extra = (f"   grad+opt {result['grad_opt_bytes'][m] / 2**20:8.1f} MiB ({result['grad_opt_ratio'][m]:.4f})"
                 if "grad_opt_bytes" in result else "")
        print(f"  {m:15s} {s:7.3f} s  {ratios}{extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=100, help="head size (VTAB's largest task has 100 classes)")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="steps per mode per round")
    p.add_argument("--select-images", type=int, default=0, help="images of the selection pass (default 2 batches)")
    for flag in ("bf16", "compile", "selection", "rss", "variants", "all"):
        p.add_argument(f"--{flag}", action="store_true")
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32 step timing")
    p.add_argument("--rss-repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (models, batches, autocast)")
    p.add_argument("--rss-child", choices=(*MODES, "selection"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.select_images = args.select_images or 2 * args.batch
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(int(os.environ.get("SPARSEFT_BENCH_THREADS", "2")))
    if args.rss_child:
        rss_child(args)
        return
    if args.all:
        args.bf16 = args.compile = args.selection = args.rss = args.variants = True
    head = {"model": args.model, "img": args.img, "batch": args.batch, "k": args.k, "classes": args.classes,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(DEVICE),
            "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else cpu_name()}
    print(json.dumps(head))
    base = build(args.model, args.img, args.classes)
    selection = select(base, args.img, args.k, args.classes, args.batch, args.batch)
    print(json.dumps({"selected_entries": selection.num_sparse, "chunk_size": selection.meta.get("chunk_size")}))
    runs = [("fp32", False)] * (not args.no_fp32) + [("bf16 autocast", True)] * args.bf16
    for label, bf16 in runs:
        result = time_modes(args, base, selection, bf16)
        show(f"step, {label} ({result['steps_per_mode']} timed steps per mode, median):", result)
        print(json.dumps({"step": label, **result}))
    if args.variants:
        result = time_variants(args, base, selection)
        show("frontier variants' steps (fp32):", result)
        print(json.dumps({"variants": result}))
    if args.compile:
        result = time_compiled(args, base, selection)
        show("sparse step, eager vs torch.compile (inductor):", result)
        print(json.dumps({"compile": result}))
    if args.selection:
        result = time_selection(args, base)
        print(f"selection pass (default arguments, chunk {result['chunk_size']}): {result['selection_s']} s; one "
              f"full fine-tuning epoch on the same {result['images']} images: {result['full_epoch_s']} s; "
              f"ratio {result['selection_per_epoch']}")
        if "selection_bf16_s" in result:
            print(f"  precision='bf16': {result['selection_bf16_s']} s, ratio to the fp32 epoch "
                  f"{result['selection_bf16_per_fp32_epoch']}, {result['bf16_entries_changed']} of "
                  f"{result['entries']} entries differ from fp32's")
        print(json.dumps({"selection": result}))
    if args.rss:
        result = rss_all(args, (*MODES, "selection") if args.selection else MODES)
        print(f"peak RSS (MiB, own process each, min of {args.rss_repeats}; sparse includes a default select):")
        for m, v in result["peak_rss_mib"].items():
            print(f"  {m:10s} {v:8.1f}  ratio to full {result['peak_rss_ratio'].get(m, float('nan')):.3f}")
        print(json.dumps({"rss": result}))


if __name__ == "__main__":
    main()
