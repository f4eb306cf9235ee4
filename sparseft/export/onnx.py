"""A task as one ONNX file: the merged plain model, a dynamic batch, the task's preprocessing in the metadata.

    sparseft.export.export_onnx("runs/pets/delta.safetensors", "pets.onnx")   # or: sparseft export --format onnx

Every mergeable method exports (merged, the model is the base architecture with other weights: no sparseft
operator remains); methods that cannot merge (adapter, spt-adapter, VPT, SCT) are refused before anything is
written. Input `pixel_values` [batch, 3, S, S] at the task's image size S, output `logits` [batch, classes]
(segmentation: [batch, classes, S, S]). The file's metadata (`metadata_props`) holds `sparseft` (JSON: method,
base model, task kind, classes, base fingerprint), `preprocessing` (JSON: input size, interpolation, mean,
std, crop_pct, recipe) and `class_names` (JSON). Before the file takes its place, onnxruntime (when installed)
runs it on another batch size and its logits must equal PyTorch's within `tolerance`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.api import load, load_for_inference, merge, method_named_in
from sparseft.deltafile import TaskSource, read_task
from sparseft.export.common import ExportError, preprocessing_record, task_summary
from sparseft.fileutil import atomic_path
from sparseft.methods import METHODS
from sparseft.version import __version__

INPUT, OUTPUT = "pixel_values", "logits"


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
    except ImportError:
        raise ExportError("--format onnx needs the onnx package: pip install 'sparseft[convert]' (onnx, "
                          "onnxruntime)") from None
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    return onnx, onnxruntime


def export_onnx(task_file: TaskSource, out: str | Path, *, model: nn.Module | None = None,
                weights: str | Path | None = None, opset: int = 17, overwrite: bool = False,
                tolerance: float = 1e-4) -> dict[str, Any]:
    """Write the task's merged model as an ONNX file (module docstring); returns what was written and checked.

    `model`: the plain base to load the task onto (default: built from the header). The check runs the file
    with onnxruntime on 3 images (the export traced 2) and refuses it when logits differ by more than `tolerance`.
    """
    out = Path(out)
    if out.is_dir() or not out.name:
        raise ExportError(f"--out {out} is a folder; name the .onnx file to write")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose another path")
    onnx, ort = _onnx_modules()
    task = read_task(task_file)
    method = method_named_in(task.header)
    if not task.merged and method in METHODS and not METHODS[method].mergeable:
        raise ExportError(f"{task.path}: {METHODS[method]().merge_refusal()}; ONNX holds the merged plain model")
    if model is not None and not task.merged:  # the caller's base, merged as load_for_inference does
        model = merge(load(task, model, weights=weights)).eval()
    else:
        model = load_for_inference(task, weights=weights)
    extra = dict(task.header.get("extra", {}))
    pre = preprocessing_record(model, extra)
    size = pre["input_size"][-1]
    g = torch.Generator().manual_seed(0)
    traced, checked = (torch.randn(n, 3, size, size, generator=g) for n in (2, 3))
    with torch.no_grad():
        want = model(checked)
    record = {**task_summary(extra), "method": method, "sparseft_version": __version__,
              "base_fingerprint": task.header.get("fingerprint"), "source": str(task.path)}
    with atomic_path(out) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(model, (traced,), str(tmp), dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset)
        proto = onnx.load(str(tmp))
        for key, value in (("sparseft", record), ("preprocessing", pre), ("class_names", extra.get("class_names"))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        proto.producer_name, proto.producer_version = "sparseft", __version__
        onnx.save(proto, str(tmp))
        diff = None
        if ort is not None:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run([OUTPUT], {INPUT: checked.numpy()})[0])
            diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
            if not diff <= tolerance:
                raise ExportError(f"{task.path}: onnxruntime's logits differ from PyTorch's by {diff:.3g} "
                                  f"(> {tolerance:g}); the ONNX file was not written")
    return {"file": str(out), "bytes": out.stat().st_size, "method": method, "opset": opset,
            "input": [INPUT, ["batch", 3, size, size]], "output": [OUTPUT, ["batch", *want.shape[1:]]],
            "max_abs_diff": diff, "checked_with": "onnxruntime" if diff is not None else None}
