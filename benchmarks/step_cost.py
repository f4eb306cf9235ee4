"""Cost of one training step: full fine-tuning vs official-style GPS vs sparseft vs BitFit.

Modes
  full      every parameter trains: dense gradients, AdamW state for all
  official  GPS as the official code trains it: dense gradients and full-size Adam state for
            every parameter, gradients of unselected entries zeroed before each step
  sparse    sparseft: selected entries as sparse deltas (K per neuron), biases and head in full
  bitfit    biases and head only (no weight gradients at all): the floor for (sparse)

Step time is measured interleaved (round-robin over modes, several rounds) in one process and
reported as medians and ratios to `full`. Gradient + optimizer-state bytes are counted from the
tensors after a step. Peak RSS is measured with each mode in its own process (`--rss`).

    python benchmarks/step_cost.py                        # ViT-S/16 @224, batch 32, + a CNN
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

import timm
import torch
import torch.nn.functional as F

import sparseft
from sparseft.selection import parameter_roles

MODES = ("full", "official", "sparse", "bitfit")


def build(model_name: str, img: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(model_name, num_classes=classes, img_size=img) if "vit" in model_name \
        else timm.create_model(model_name, num_classes=classes)


def gps_selection(model: torch.nn.Module, img: int, k: int, classes: int, batch: int = 16,
                  chunk: int = 8) -> sparseft.Selection:
    """GPS on one batch of random images (two views each): a realistic per-neuron pattern."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, img, img, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return sparseft.select(model, [([x, x.flip(-1)], y)], k=k, progress=False, chunk_size=chunk)


class Runner:
    """One mode's model, optimizer and step function."""

    def __init__(self, mode: str, base: torch.nn.Module, selection: sparseft.Selection) -> None:
        self.mode = mode
        self.model = copy.deepcopy(base).train()
        roles = parameter_roles(self.model)
        self.masks: dict[str, torch.Tensor] = {}
        if mode == "sparse":
            sparseft.apply(self.model, selection)
        elif mode == "bitfit":
            for name, p in self.model.named_parameters():
                p.requires_grad_(roles[name] == "full")
        elif mode == "official":
            for name, p in self.model.named_parameters():
                if name in selection.indices:
                    mask = torch.zeros(p.numel(), dtype=p.dtype)
                    mask[selection.indices[name]] = 1
                    self.masks[name] = mask.view_as(p)
                elif roles[name] == "frozen":
                    self.masks[name] = torch.zeros_like(p)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0 if mode == "official" else 1e-4)
        self.named = dict(self.model.named_parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        for name, mask in self.masks.items():
            self.named[name].grad.mul_(mask)
        self.opt.step()

    def state_bytes(self) -> int:
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        state = sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
        return grads + state


def time_steps(args: argparse.Namespace, model_name: str, img: int, batch: int) -> dict:
    base = build(model_name, img, args.classes)
    selection = gps_selection(base, img, args.k, args.classes)
    runners = {m: Runner(m, base, selection) for m in MODES}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, img, img, generator=g)
    y = torch.randint(0, args.classes, (batch,), generator=g)
    for r in runners.values():  # warm-up (allocations, kernel build, oneDNN primitives)
        for _ in range(args.warmup):
            r.step(x, y)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for m, r in runners.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                r.step(x, y)
                times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    state = {m: r.state_bytes() for m, r in runners.items()}
    return {
        "model": model_name, "img": img, "batch": batch, "threads": torch.get_num_threads(), "k": args.k,
        "classes": args.classes, "steps_per_mode": len(times["full"]),
        "step_s": {m: round(v, 4) for m, v in med.items()},
        "step_ratio": {m: round(med[m] / med["full"], 3) for m in MODES},
        "grad_opt_bytes": state,
        "grad_opt_ratio": {m: round(state[m] / state["full"], 4) for m in MODES},
        "trainable": {m: sparseft.trainable_parameters(r.model) for m, r in runners.items()},
        "selected_entries": selection.num_sparse,
    }


def rss_child(args: argparse.Namespace) -> None:
    """Run one mode (selection included for sparse/official) and print its peak RSS."""
    base = build(args.model, args.img, args.classes)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, 3, args.img, args.img, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    if args.rss_child in ("sparse", "official"):
        # the selection pass at the training batch size, re-run in chunks (lean selection)
        selection = gps_selection(base, args.img, args.k, args.classes, batch=args.batch, chunk=args.select_chunk)
    else:
        selection = sparseft.Selection(indices={}, shapes={})
    after_select = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner = Runner(args.rss_child, base, selection)
    del base
    for _ in range(args.steps):
        runner.step(x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": args.rss_child, "peak_rss_mib": round(peak / 1024, 1),
                      "peak_rss_selection_mib": round(after_select / 1024, 1)}))


def rss_all(args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result: dict[str, list[float]] = {m: [] for m in MODES}
    selection_peak: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rss_repeats):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--rss-child", mode, "--model", args.model, "--img", str(args.img),
                   "--batch", str(args.batch), "--k", str(args.k), "--classes", str(args.classes), "--steps", "2",
                   "--select-chunk", str(args.select_chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            line = json.loads(out.strip().splitlines()[-1])
            result[mode].append(line["peak_rss_mib"])
            selection_peak[mode].append(line["peak_rss_selection_mib"])
    best = {m: min(v) for m, v in result.items()}
    return {"model": args.model, "img": args.img, "batch": args.batch, "k": args.k, "repeats": args.rss_repeats,
            "peak_rss_mib": best, "peak_rss_ratio": {m: round(best[m] / best["full"], 3) for m in MODES},
            "selection_peak_rss_mib": {m: min(v) for m, v in selection_peak.items()}}


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
    p.add_argument("--cnn", default="resnet50", help="CNN also timed ('' to skip)")
    p.add_argument("--cnn-img", type=int, default=128)
    p.add_argument("--rss", action="store_true", help="measure peak RSS, each mode in its own process")
    p.add_argument("--rss-repeats", type=int, default=2)
    p.add_argument("--select-chunk", type=int, default=2, help="selection re-run chunk (images) in --rss mode")
    p.add_argument("--rss-child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("SPARSEFT_BENCH_THREADS", "2")))
    if args.rss_child:
        rss_child(args)
        return
    if args.rss:
        result = rss_all(args)
        print(f"peak RSS (MiB, min of {args.rss_repeats}, selection included):")
        for m in MODES:
            print(f"  {m:9s} {result['peak_rss_mib'][m]:8.1f}  ratio {result['peak_rss_ratio'][m]:.3f}")
        print(json.dumps(result))
        return
    for model_name, img, batch in [(args.model, args.img, args.batch)] + (
            [(args.cnn, args.cnn_img, args.batch)] if args.cnn else []):
        result = time_steps(args, model_name, img, batch)
        print(f"{model_name} @{img}px batch {batch}, {result['threads']} threads, K={args.k}, "
              f"{result['steps_per_mode']} timed steps per mode (median):")
        for m in MODES:
            print(f"  {m:9s} {result['step_s'][m]:7.3f} s  ratio {result['step_ratio'][m]:.3f}   "
                  f"grad+opt {result['grad_opt_bytes'][m] / 2**20:8.1f} MiB  ratio {result['grad_opt_ratio'][m]:.4f}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
