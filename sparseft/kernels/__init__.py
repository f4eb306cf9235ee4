"""Sampled dense-dense products for sparse weight gradients, with a compiled fast path.

`sampled_dot(g, x, rows, cols)` returns ``out[i] = Σ_t g[t, rows[i]] · x[t, cols[i]]`` for 2-D
``g`` ([T, R]) and ``x`` ([T, C]). It is the only new work a sparse-delta backward does: the
gradient of a selected weight entry (row r, column c) of a Linear layer is the dot product, over
all tokens, of the output gradient of neuron r with input feature c. `sampled_dot_and_colsum` adds the
layer's bias gradient (g summed over tokens) from the same read of g.

On CPU a small C loop (``sddmm.c``) is compiled with the system C compiler at first use and
cached under ``$SPARSEFT_CACHE`` (default ``~/.cache/sparseft``); elsewhere, or when no compiler
is found, or with ``SPARSEFT_KERNEL=torch``, a pure-torch path computes the same numbers.

`sparseft.kernels.correct` (``correct.c``, built into the same library) serves inference instead: a
batch whose items use different tasks of one base adds each item's task's entries to a layer's base output.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from sparseft.fileutil import cache_dir

_SOURCES = [Path(__file__).with_name(name) for name in ("sddmm.c", "correct.c")]
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_failed = False


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    source = b"".join(path.read_bytes() for path in _SOURCES)
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"sddmm-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            cmd = [compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"compiling {' and '.join(p.name for p in _SOURCES)} failed:\n{done.stderr.strip()}")
            os.replace(tmp, target)  # atomic: concurrent builders never see half a library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    for name in ("sddmm_f32", "sddmm_f64", "sddmm_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    cf_args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    for name in ("sddmm_cf_f32", "sddmm_cf_f64", "sddmm_cf_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = cf_args
        fn.restype = ctypes.c_int
    conv_args = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 13, ctypes.c_void_p, ctypes.c_void_p,
                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    for name in ("sddmm_conv_f32", "sddmm_conv_f64", "sddmm_conv_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = conv_args
        fn.restype = ctypes.c_int
    per_task = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]  # task ids, tasks, index, value, count, W, bias, b
    for name in ("correct_rows_f32", "correct_rows_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 4, *per_task]
        fn.restype = ctypes.c_int
    for name in ("correct_conv_f32", "correct_conv_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 16, *per_task]
        fn.restype = ctypes.c_int
    return lib


def compiled_library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it once; None when it cannot be built."""
    global _lib, _lib_failed
    if _lib is not None or _lib_failed:
        return _lib
    with _lock:
        if _lib is None and not _lib_failed:
            try:
                _lib = _build()
            except Exception as err:  # noqa: BLE001 - any build failure means: use the fallback
                _lib_failed = True
                warnings.warn(f"sparseft: compiled kernel unavailable ({err}); using the torch path",
                              RuntimeWarning, stacklevel=3)
    return _lib


def backend_for(t: torch.Tensor) -> str:
    """'c' when the compiled kernel will serve tensors like ``t``, else 'torch'."""
    choice = os.environ.get("SPARSEFT_KERNEL", "auto")
    if choice == "torch" or t.device.type != "cpu":
        return "torch"
    if t.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return "torch"
    return "c" if compiled_library() is not None else "torch"


def _reference(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, channel_dim: int,
               chunk: int) -> torch.Tensor:
    """Gather the selected channels of g and x in chunks, multiply, sum over every other dim."""
    out_dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    out = torch.empty(rows.numel(), dtype=out_dtype, device=g.device)
    rows, cols = rows.long().to(g.device), cols.long().to(g.device)
    reduce = tuple(d for d in range(g.dim()) if d != channel_dim)
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        prod = g.index_select(channel_dim, r).to(out_dtype) * x.index_select(channel_dim, c).to(out_dtype)
        out[start:start + chunk] = prod.sum(dim=reduce)
    return out


def sampled_dot_torch(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      chunk: int = 2048) -> torch.Tensor:
    """Reference path of `sampled_dot` and `sampled_dot_channels_first` (channels at dim 1); any device, dtype."""
    return _reference(g, x, rows, cols, 1, chunk)


def _library(name: str, g: torch.Tensor, x: torch.Tensor, backend: str | None) -> ctypes.CDLL | None:
    """Check that g and x share a dtype; the compiled library when it serves them, else None."""
    if g.dtype != x.dtype:
        raise ValueError(f"{name} needs one dtype, got {g.dtype} and {x.dtype}")
    return compiled_library() if (backend or backend_for(g)) == "c" else None


def _call_c(lib: ctypes.CDLL, family: str, g: torch.Tensor, args: tuple, rows: torch.Tensor,
            cols: torch.Tensor, always: bool = False) -> torch.Tensor:
    """Run `<family>_{f32,f64,bf16}` on g's dtype (with no entries only when `always`: it has other output);
    float32 output except for float64 inputs."""
    rows = rows.to(torch.int32).contiguous()
    cols = cols.to(torch.int32).contiguous()
    n = rows.numel()
    if g.dtype == torch.float64:
        out, fn = torch.empty(n, dtype=torch.float64), getattr(lib, f"{family}_f64")
    else:
        out = torch.empty(n, dtype=torch.float32)
        fn = getattr(lib, f"{family}_bf16" if g.dtype == torch.bfloat16 else f"{family}_f32")
    if (n or always) and fn(*args, rows.data_ptr(), cols.data_ptr(), n, out.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("sparseft kernel could not allocate its partial sums")
    return out


def sampled_dot(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """``out[i] = Σ_t g[t, rows[i]] · x[t, cols[i]]``; float32 output for bf16/fp16 inputs."""
    return _sampled_dot(g, x, rows, cols, backend, colsum=False)[0]


def sampled_dot_and_colsum(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampled_dot` and ``Σ_t g[t, :]`` (a Linear layer's bias gradient) from one read of g."""
    out, colsum = _sampled_dot(g, x, rows, cols, backend, colsum=True)
    assert colsum is not None
    return out, colsum


def _sampled_dot(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, backend: str | None,
                 colsum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if g.dim() != 2 or x.dim() != 2 or g.shape[0] != x.shape[0]:
        raise ValueError(f"sampled_dot needs [T, R] and [T, C] tensors, got {tuple(g.shape)} and {tuple(x.shape)}")
    if rows.shape != cols.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} differ in shape")
    lib = _library("sampled_dot", g, x, backend)
    if lib is None:
        out = sampled_dot_torch(g, x, rows, cols)
        return out, (g.sum(0, dtype=out.dtype) if colsum else None)
    g = g if g.stride(1) == 1 else g.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    sums = torch.empty(g.shape[1] if colsum else 0, dtype=_out_dtype(g))
    out = _call_c(lib, "sddmm", g, (g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), g.shape[0], sums.numel(),
                                    sums.data_ptr()), rows, cols, always=colsum)
    return out, (sums if colsum else None)


def sampled_dot_channels_first(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                               backend: str | None = None) -> torch.Tensor:
    """``out[i] = Σ_{b,s} g[b, rows[i], s] · x[b, cols[i], s]`` for [B, C, *spatial] tensors.

    The weight gradient of the selected entries of a pointwise (1×1) convolution.
    """
    if g.dim() < 3 or g.dim() != x.dim() or g.shape[0] != x.shape[0] or g.shape[2:] != x.shape[2:]:
        raise ValueError(f"sampled_dot_channels_first needs [B, C, ...] tensors of one batch and spatial size, "
                         f"got {tuple(g.shape)} and {tuple(x.shape)}")
    lib = _library("sampled_dot_channels_first", g, x, backend)
    if lib is None:
        return sampled_dot_torch(g, x, rows, cols, chunk=256)
    g, x = g.contiguous(), x.contiguous()
    return _call_c(lib, "sddmm_cf", g, (g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), g.shape[0],
                                        g[0, 0].numel()), rows, cols)


def sampled_conv_weight_grad_torch(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                                   ki: torch.Tensor, kj: torch.Tensor, kernel: tuple[int, int],
                                   stride: tuple[int, int], padding: tuple[int, int],
                                   dilation: tuple[int, int]) -> torch.Tensor:
    """Reference path of `sampled_conv_weight_grad`: the dense weight gradient of a conv from
    `x`'s channels to `g`'s, then the selected entries; any device and dtype."""
    out_dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    dense = torch.nn.grad.conv2d_weight(x.to(out_dtype), (g.shape[1], x.shape[1], *kernel), g.to(out_dtype),
                                        stride=stride, padding=padding, dilation=dilation)
    return dense[rows.long(), cols.long(), ki.long(), kj.long()]


def sampled_conv_weight_grad(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                             ki: torch.Tensor, kj: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                             padding: tuple[int, int], dilation: tuple[int, int],
                             backend: str | None = None) -> torch.Tensor:
    """Weight gradient of a 2-D convolution at entries (rows[i], cols[i], ki[i], kj[i]) only.

    `g`: output gradient [B, O, Ho, Wo]; `x`: the input channels the entries use [B, C, H, W]
    (`cols` index into them: grouping is resolved by the caller).
    """
    if g.dim() != 4 or x.dim() != 4 or g.shape[0] != x.shape[0]:
        raise ValueError(f"sampled_conv_weight_grad needs [B, O, Ho, Wo] and [B, C, H, W], got {tuple(g.shape)} "
                         f"and {tuple(x.shape)}")
    lib = _library("sampled_conv_weight_grad", g, x, backend)
    if lib is None:
        return sampled_conv_weight_grad_torch(g, x, rows, cols, ki, kj, kernel, stride, padding, dilation)
    g, x = g.contiguous(), x.contiguous()
    ki = ki.to(torch.int32).contiguous()
    kj = kj.to(torch.int32).contiguous()
    args = (g.data_ptr(), x.data_ptr(), g.shape[0], g.shape[1], x.shape[1], x.shape[2], x.shape[3], g.shape[2],
            g.shape[3], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], ki.data_ptr(),
            kj.data_ptr())
    return _call_c(lib, "sddmm_conv", g, args, rows, cols)


# -- the same three products as torch operators: torch.compile keeps them in its graph -----------

def _out_dtype(g: torch.Tensor) -> torch.dtype:
    return torch.float64 if g.dtype == torch.float64 else torch.float32


@torch.library.custom_op("sparseft::sampled_dot", mutates_args=())
def sampled_dot_op(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`sampled_dot` as an operator (what the sparse layers' backward calls)."""
    return sampled_dot(g, x, rows, cols).to(_out_dtype(g))


@torch.library.custom_op("sparseft::sampled_dot_and_colsum", mutates_args=())
def sampled_dot_and_colsum_op(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                              cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampled_dot_and_colsum` as an operator."""
    out, colsum = sampled_dot_and_colsum(g, x, rows, cols)
    return out.to(_out_dtype(g)), colsum.to(_out_dtype(g))


@sampled_dot_and_colsum_op.register_fake
def _sampled_colsum_fake(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,  # noqa: ARG001
                         cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g.new_empty(rows.shape[0], dtype=_out_dtype(g)), g.new_empty(g.shape[1], dtype=_out_dtype(g))


@torch.library.custom_op("sparseft::sampled_dot_channels_first", mutates_args=())
def sampled_dot_channels_first_op(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                                  cols: torch.Tensor) -> torch.Tensor:
    """`sampled_dot_channels_first` as an operator."""
    return sampled_dot_channels_first(g, x, rows, cols).to(_out_dtype(g))


@torch.library.custom_op("sparseft::sampled_conv_weight_grad", mutates_args=())
def sampled_conv_weight_grad_op(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                                ki: torch.Tensor, kj: torch.Tensor, kernel: list[int], stride: list[int],
                                padding: list[int], dilation: list[int]) -> torch.Tensor:
    """`sampled_conv_weight_grad` as an operator."""
    return sampled_conv_weight_grad(g, x, rows, cols, ki, kj, tuple(kernel), tuple(stride), tuple(padding),
                                    tuple(dilation)).to(_out_dtype(g))


@sampled_dot_op.register_fake
@sampled_dot_channels_first_op.register_fake
def _sampled_fake(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
    return g.new_empty(rows.shape[0], dtype=_out_dtype(g))


@sampled_conv_weight_grad_op.register_fake
def _conv_fake(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, *args: object) -> torch.Tensor:  # noqa: ARG001
    return g.new_empty(rows.shape[0], dtype=_out_dtype(g))
