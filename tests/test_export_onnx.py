"""ONNX export of merged tasks: onnxruntime's logits equal PyTorch's (GPS, LoRA, full, segmentation)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import random_selection, train_steps, write_task

import sparseft
from sparseft.cli import main
from sparseft.export import ExportError, export_onnx
from sparseft.seg import create_segmentation_model


def _session_logits(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])


def _metadata(path) -> dict:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("method", ["gps", "lora", "full"])
def test_merged_task_as_onnx_matches_pytorch(tmp_path, method, capsys):
    task = write_task(method, tmp_path / f"{method}.safetensors")
    assert main(["export", str(task), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] <= 1e-4 and report["input"] == ["pixel_values", ["batch", 3, 32, 32]]
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's and its check's
    with torch.no_grad():
        want = sparseft.merge(sparseft.load(task)).eval()(x)
    assert (_session_logits(tmp_path / "m.onnx", x) - want).abs().max() <= 1e-4
    meta = _metadata(tmp_path / "m.onnx")
    assert meta["sparseft"]["method"] == method and meta["sparseft"]["base_model"] == "test_vit"
    assert meta["preprocessing"]["input_size"] == [3, 32, 32] and len(meta["preprocessing"]["mean"]) == 3
    assert meta["class_names"] == ["a", "b", "c"]


def test_segmentation_task_exports_logits_at_its_image_size(tmp_path):
    def base():
        torch.manual_seed(0)
        return create_segmentation_model("resnet10t", 3).eval()

    model = base()
    sparseft.apply(model, random_selection(model, k=1))
    x = torch.randn(2, 3, 32, 32)
    train_steps(model, steps=1, batches=[(x, torch.randint(0, 3, (2, 32, 32)))])
    task = sparseft.save_delta(model, tmp_path / "seg.safetensors",
                               extra={"task": "segmentation", "model": "resnet10t", "num_classes": 3, "img_size": 32,
                                      "class_names": ["background", "square", "disc"]})
    report = export_onnx(task, tmp_path / "seg.onnx", model=base())
    assert report["output"] == ["logits", ["batch", 3, 32, 32]] and report["max_abs_diff"] <= 1e-4
    with torch.no_grad():
        want = sparseft.merge(sparseft.load(task, base())).eval()(x)
    got = _session_logits(tmp_path / "seg.onnx", x)
    assert got.shape == (2, 3, 32, 32) and (got - want).abs().max() <= 1e-4
    assert np.array_equal(got.argmax(1).numpy(), want.argmax(1).numpy())
    assert _metadata(tmp_path / "seg.onnx")["sparseft"]["task"] == "segmentation"


def test_methods_that_cannot_merge_are_refused_before_writing(tmp_path):
    task = write_task("adapter", tmp_path / "a.safetensors")
    with pytest.raises(ExportError, match="adapter cannot be merged"):
        export_onnx(task, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
