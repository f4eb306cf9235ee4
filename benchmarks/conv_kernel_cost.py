"""The sampled conv kernels alone: the per-entry kernel (before issue 23) against the blocked one.

Both C sources are compiled here (the old one from git, `--old-rev`) and called on the same tensors:
the output gradients and inputs of a CNN's convolutions at a batch, with a K=1 selection on random
scores (spread over the input channels: every output channel picks one input entry) or `--collapsed`
(every entry on a few input channels, as a pretrained model's selection tends to be). Interleaved
rounds, medians and minima per layer shape (on a shared machine the minimum is the least disturbed
run); results equal within float32 rounding (checked).

    python benchmarks/conv_kernel_cost.py                   # ResNet-50 and MobileNetV2 layers @128, b32
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# (name, batch, cin, cout, plane in, kernel, stride, groups)
LAYERS = [
    ("resnet50 layer1 1x1 64->256 @32", 32, 64, 256, 32, 1, 1, 1),
    ("resnet50 layer1 3x3 64->64 @32", 32, 64, 64, 32, 3, 1, 1),
    ("resnet50 layer2 1x1 128->512 @16", 32, 128, 512, 16, 1, 1, 1),
    ("resnet50 layer1 1x1 256->64 @32", 32, 256, 64, 32, 1, 1, 1),
    ("resnet50 downsample 1x1/2 256->512 @32", 32, 256, 512, 32, 1, 2, 1),
    ("mobilenetv2 1x1 24->144 @32", 32, 24, 144, 32, 1, 1, 1),
    ("mobilenetv2 1x1 144->24 @32", 32, 144, 24, 32, 1, 1, 1),
    ("mobilenetv2 dw3x3 144 @32", 32, 144, 144, 32, 3, 1, 144),
]


def build(source: Path, out: Path) -> ctypes.CDLL:
    subprocess.run(["gcc", *FLAGS, str(source), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    cf = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    conv = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 13, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.sddmm_cf_f32.argtypes, lib.sddmm_conv_f32.argtypes = cf, conv
    return lib


def case(layer: tuple, collapsed: bool, seed: int = 0) -> dict:
    name, batch, cin, cout, size, k, stride, groups = layer
    g = torch.Generator().manual_seed(seed)
    out_size = (size + 2 * (k // 2) - k) // stride + 1
    x = torch.randn(batch, cin, size, size, generator=g)
    grad = torch.randn(batch, cout, out_size, out_size, generator=g)
    per_group = cin // groups
    rows = torch.arange(cout, dtype=torch.int32)
    local = torch.randint(0, 2 if collapsed else per_group, (cout,), generator=g).clamp_max(per_group - 1)
    cols = ((rows // (cout // groups)) * per_group + local).to(torch.int32)
    ki = torch.randint(0, k, (cout,), generator=g, dtype=torch.int32)
    kj = torch.randint(0, k, (cout,), generator=g, dtype=torch.int32)
    return dict(name=name, x=x, g=grad, rows=rows, cols=cols, ki=ki, kj=kj, k=k, stride=stride, pad=k // 2,
                pointwise=k == 1 and stride == 1 and groups == 1)


def run(lib: ctypes.CDLL, c: dict, threads: int) -> torch.Tensor:
    out = torch.empty(c["rows"].numel())
    x, g = c["x"], c["g"]
    if c["pointwise"]:
        lib.sddmm_cf_f32(g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), g.shape[0], g[0, 0].numel(),
                         c["rows"].data_ptr(), c["cols"].data_ptr(), out.numel(), out.data_ptr(), threads)
    else:
        lib.sddmm_conv_f32(g.data_ptr(), x.data_ptr(), g.shape[0], g.shape[1], x.shape[1], x.shape[2], x.shape[3],
                           g.shape[2], g.shape[3], c["stride"], c["stride"], c["pad"], c["pad"], 1, 1,
                           c["ki"].data_ptr(), c["kj"].data_ptr(), c["rows"].data_ptr(), c["cols"].data_ptr(),
                           out.numel(), out.data_ptr(), threads)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-rev", default="1786d80", help="git revision of the per-entry kernel")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--collapsed", action="store_true", help="entries on 2 input channels per group")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_src = Path(tmp) / "old.c"
        old_src.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.old_rev}:sparseft/kernels/sddmm.c"],
                                          capture_output=True, text=True, check=True).stdout)
        libs = {"per-entry": build(old_src, Path(tmp) / "old.so"),
                "blocked": build(ROOT / "sparseft/kernels/sddmm.c", Path(tmp) / "new.so")}
        rows = []
        for layer in LAYERS:
            c = case(layer, args.collapsed)
            ref = run(libs["per-entry"], c, args.threads)
            assert torch.allclose(run(libs["blocked"], c, args.threads), ref, rtol=1e-4, atol=1e-3), c["name"]
            times: dict[str, list[float]] = {k: [] for k in libs}
            for _ in range(args.rounds):
                for k, lib in libs.items():
                    t0 = time.perf_counter()
                    run(lib, c, args.threads)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            best = {k: min(v) * 1e3 for k, v in times.items()}  # on a shared machine the least disturbed run
            rows.append({"layer": c["name"], "entries": c["rows"].numel(),
                         **{f"{k}_ms_median": round(v, 3) for k, v in med.items()},
                         **{f"{k}_ms_min": round(v, 3) for k, v in best.items()},
                         "blocked/per-entry (median)": round(med["blocked"] / med["per-entry"], 3),
                         "blocked/per-entry (min)": round(best["blocked"] / best["per-entry"], 3)})
            print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
