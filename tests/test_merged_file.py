"""Merged model files (`sparseft merge --out`, `sparseft.save_merged`): a plain state dict that carries the task's
header, so predict, eval, info and `sparseft.load` take it with no base; plain files stay refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SEG_CLASSES, make_seg_task, make_vtab, toy_base, toy_batches, trained_model, write_png, write_task
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sparseft
from sparseft.api import evaluate_task, load_for_inference
from sparseft.cli import main
from sparseft.deltafile import DeltaFileError
from sparseft.methods import MethodContext, get_method


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_vtab(tmp_path_factory.mktemp("data") / "toy", n_train=4, n_val=2, n_test=6, classes=3)
    (root / "classes.txt").write_text("a\nb\nc\n")  # the class names the task files record
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Task files of a sparse method, one that folds added modules (LoRA) and full fine-tuning, each merged."""
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for method in ("gps", "lora", "full"):
        task = write_task(method, root / f"{method}.safetensors")
        merged = root / f"{method}-merged.safetensors"
        assert main(["merge", str(task), "--out", str(merged)]) == 0
        out[method] = (task, merged)
    return out


def _rows(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open()))


@pytest.mark.parametrize("method", ["gps", "lora", "full"])
def test_predict_eval_info_and_load_take_the_merged_file(method, files, data, tmp_path, capsys):
    task, merged = files[method]
    x = toy_batches(1, batch=4, classes=3)[0][0]
    with torch.no_grad():
        expected = load_for_inference(task)(x)
        model = sparseft.load(merged)
        assert not sparseft.delta.is_applied(model)  # a plain model: nothing to unmerge, no base kept
        torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=0)
    assert sparseft.delta.task_record(model)["class_names"] == ["a", "b", "c"]  # the task's record came along
    capsys.readouterr()
    for command in (["eval", "--data", str(data), "--json"], ["predict", str(data / "images"), "--no-progress"]):
        outputs = []
        for source in (task, merged):
            assert main([command[0], str(source), *command[1:]]) == 0
            outputs.append(capsys.readouterr().out)
        if command[0] == "eval":
            a, b = (json.loads(o) for o in outputs)
            assert b["acc"] == a["acc"] and b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        else:
            assert outputs[1] == outputs[0] and outputs[0].count("\n") == 12  # one line per image, same classes
    assert main(["predict", str(merged), str(data / "images"), "--out", str(tmp_path / "m.csv"), "--no-progress"]) == 0
    assert main(["predict", str(task), str(data / "images"), "--out", str(tmp_path / "t.csv"), "--no-progress"]) == 0
    assert _rows(tmp_path / "m.csv") == _rows(tmp_path / "t.csv")
    capsys.readouterr()
    assert main(["info", str(merged)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["merged"] is True and "no base model needed" in info["content"]
    assert info["method"] == method and info["merged_from"] == str(task)
    assert info["extra"]["model"] == "test_vit" and info["extra"]["img_size"] == 32
    assert info["base_fingerprint"] == sparseft.read_delta(task).header["fingerprint"]


@pytest.mark.parametrize("method", ["gps", "lora"])
def test_plain_load_state_dict_still_takes_the_merged_file(method, files):
    task, merged = files[method]
    tensors = load_file(str(merged))
    assert not any("sparse_delta" in k or "lora" in k for k in tensors)
    base = toy_base()
    base.load_state_dict(tensors)  # strict: every key of the architecture, nothing else
    x = toy_batches(1, batch=4, classes=3)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(base(x), load_for_inference(task)(x), atol=1e-5, rtol=0)
    with safe_open(str(merged), "pt") as f:
        meta = f.metadata()
    header = json.loads(meta["header"])
    assert meta["format"] == "sparseft.merged/1" == header["format"]
    for key in ("model", "img_size", "num_classes", "class_names", "method"):
        assert key in header["extra"], key


def test_a_merged_file_needs_no_base_weights(tmp_path):
    """A task whose base came from a local weight file: the task file needs that file, the merged one does not."""
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in toy_base().state_dict().items()}, str(base_file))
    model = trained_model("gps")
    task = get_method("gps").save(model, tmp_path / "task.safetensors", extra={
        "model": "test_vit", "num_classes": 3, "img_size": 32, "weights": str(base_file), "class_names": list("abc")})
    merged = sparseft.save_merged(sparseft.merge(sparseft.load(task)), tmp_path / "merged.safetensors", source=task)
    x = toy_batches(1, batch=2, classes=3)[0][0]
    with torch.no_grad():
        expected = load_for_inference(task)(x)
    base_file.unlink()
    with pytest.raises(sparseft.models.WeightsError, match="base.safetensors"):
        sparseft.load(task)
    with torch.no_grad():
        torch.testing.assert_close(load_for_inference(merged)(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="takes no base weights"):
        sparseft.load(merged, weights=tmp_path / "other.safetensors")


def test_a_segmentation_task_merged_gives_the_same_scores_and_masks(tmp_path, capsys):
    data = make_seg_task(tmp_path / "seg", n_train=4, n_test=3)
    torch.manual_seed(0)  # the random base is defined by its seed (`init_seed`)
    model = sparseft.seg.create_segmentation_model("test_vit", 3, img_size=32)
    model = get_method("linear").prepare(model, MethodContext(loader=lambda kind: [], progress=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    task = get_method("linear").save(model, tmp_path / "seg.safetensors", extra={
        "model": "test_vit", "task": "segmentation", "num_classes": 3, "img_size": 32, "class_names": SEG_CLASSES,
        "init_seed": 0})
    merged = tmp_path / "seg-merged.safetensors"
    assert main(["merge", str(task), "--out", str(merged)]) == 0
    a, b = evaluate_task(task, str(data)), evaluate_task(merged, str(data))
    assert b["mIoU"] == pytest.approx(a["mIoU"], abs=1e-6) and b["acc"] == pytest.approx(a["acc"], abs=1e-6)
    assert sparseft.load(merged).class_names == SEG_CLASSES
    for source, out in ((task, tmp_path / "masks-task"), (merged, tmp_path / "masks-merged")):
        assert main(["predict", str(source), str(data / "images"), "--out", str(out), "--no-progress"]) == 0
    names = sorted(p.name for p in (tmp_path / "masks-task").iterdir())
    assert names and names == sorted(p.name for p in (tmp_path / "masks-merged").iterdir())
    for name in names:
        assert (tmp_path / "masks-task" / name).read_bytes() == (tmp_path / "masks-merged" / name).read_bytes()


def test_a_plain_safetensors_file_is_refused_naming_it(tmp_path, capsys):
    plain = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in toy_base().state_dict().items()}, str(plain))
    earlier = tmp_path / "old-merged.safetensors"  # what `merge --out` wrote before it kept the header
    save_file({"x": torch.zeros(2)}, str(earlier), metadata={"merged_from": "runs/x/delta.safetensors",
                                                               "model": "test_vit"})
    images = tmp_path / "images"
    write_png(images / "a.png")
    commands = (["info"], ["eval", "--data", str(tmp_path)], ["predict", str(images), "--out", str(tmp_path / "p.csv")],
                ["merge", "--out", str(tmp_path / "m.st")])
    for argv in commands:
        assert main([argv[0], str(plain), *argv[1:]]) == 1
        line = one_line(capsys.readouterr().err)
        assert str(plain) in line and "a plain safetensors file (" in line and "no sparseft header" in line
        assert main([argv[0], str(earlier), *argv[1:]]) == 1
        line = one_line(capsys.readouterr().err)
        assert str(earlier) in line and "merged model written by an earlier sparseft" in line
        assert "runs/x/delta.safetensors" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "old-merged.safetensors", "weights.safetensors"]
    with pytest.raises(DeltaFileError, match="plain safetensors file"):
        sparseft.load(plain)


def test_a_state_dict_with_format_pt_is_a_plain_file_and_a_peft_adapter_is_named_as_one(tmp_path, capsys):
    """timm, Hugging Face, peft and `sparseft weights convert` write metadata {"format": "pt"}: still a plain
    state dict (not "not a sparseft delta (format 'pt', ...)"); a peft adapter (file or folder) and a task folder
    are named as what they are, with the way to load them."""
    plain = tmp_path / "timm.safetensors"
    save_file({"x": torch.zeros(2), "y": torch.zeros(1)}, str(plain), metadata={"format": "pt"})
    for argv in (["info"], ["predict", str(tmp_path), "--out", str(tmp_path / "p.csv")]):
        assert main([argv[0], str(plain), *argv[1:]]) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"error: {plain}: a plain safetensors file (2 tensors, no sparseft header)")
        assert "model.load_state_dict(" in line and "format 'pt'" not in line
    with pytest.raises(DeltaFileError, match="plain safetensors file"):
        sparseft.load(plain)
    task = write_task("gps", tmp_path / "g.safetensors")
    ours = sparseft.export.export_peft(task, tmp_path / "ours-peft", dense=True)
    theirs = tmp_path / "their-lora"  # peft's own names and metadata, no sparseft record, another file name
    theirs.mkdir()
    save_file({"base_model.model.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 8)}, str(theirs / "lora.safetensors"),
              metadata={"format": "pt"})
    for path, folder, base in [(ours.folder / "adapter_model.safetensors", ours.folder, False),
                               (ours.folder, ours.folder, False), (theirs / "lora.safetensors", theirs, True)]:
        assert main(["info", str(path)]) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"error: {path}: a peft adapter"), line
        assert f"`sparseft import-peft {folder} --out TASK.safetensors" in line
        assert ("--model NAME --num-classes N" in line) == base
        with pytest.raises(DeltaFileError, match="a peft adapter"):
            sparseft.load(path)
    hub = sparseft.save_pretrained(tmp_path / "g.safetensors", tmp_path / "hub")
    with pytest.raises(DeltaFileError, match=r"a task folder \(sparseft.save_pretrained\), not a task file; give its "
                                             ".*task.safetensors, or load it with sparseft.from_pretrained"):
        sparseft.load(hub)


def test_a_merged_file_is_refused_where_a_task_delta_is_needed(files, tmp_path, capsys):
    task, merged = files["gps"]
    out = tmp_path / "again.safetensors"
    assert main(["merge", str(merged), "--out", str(out)]) == 1
    assert "is a merged model already" in one_line(capsys.readouterr().err) and not out.exists()
    base = toy_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    bank = sparseft.TaskBank(base)
    bank.add("gps", task)
    with pytest.raises(ValueError, match=f"{merged}: a merged model .*merged from \\({task}\\)"):
        bank.add("merged", merged)
    assert bank.tasks == ["gps"]
    bank.use(None)
    with pytest.raises(DeltaFileError, match="a merged model .*not a task delta"):
        sparseft.load_delta(base, merged)
    assert not sparseft.delta.is_applied(base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(DeltaFileError, match="needs no base"):
        sparseft.base_model(merged)


def test_a_merged_file_onto_a_model_that_does_not_fit_names_what_differs(files):
    _, merged = files["gps"]
    other = toy_base(classes=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(DeltaFileError, match="this merged model is for test_vit at 32 px with 3 classes; this model "
                                             "is test_vit at 32 px with 5 classes"):
        sparseft.load(merged, model=other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing was loaded


def test_a_changed_merged_file_is_refused(files, tmp_path):
    _, merged = files["gps"]
    with safe_open(str(merged), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(merged))
    bad = tmp_path / "bad.safetensors"
    changed = dict(tensors, **{"head.bias": tensors["head.bias"] + 1})
    save_file(changed, str(bad), metadata=meta)
    with pytest.raises(DeltaFileError, match="checksum mismatch: the file's contents are corrupt"):
        sparseft.load(bad)
    header = json.loads(meta["header"])
    header["extra"]["class_names"] = ["x", "y", "z"]
    save_file(tensors, str(bad), metadata={**meta, "header": json.dumps(header)})
    with pytest.raises(DeltaFileError, match="header checksum mismatch"):
        sparseft.load(bad)


def test_save_merged_refuses_a_model_that_is_not_its_merged_task(files, tmp_path):
    task, _ = files["gps"]
    out = tmp_path / "m.safetensors"
    applied = sparseft.load(task)
    with pytest.raises(sparseft.DeltaError, match="not merged"):
        sparseft.save_merged(applied, out)
    with pytest.raises(sparseft.DeltaError, match="no sparseft deltas"):
        sparseft.save_merged(toy_base(), out)
    merged = sparseft.merge(applied)
    with torch.no_grad():
        merged.get_parameter("blocks.0.mlp.fc1.weight").add_(1.0)  # trained further: no longer the task
    with pytest.raises(sparseft.DeltaError, match="cannot save the merged model: .*blocks.0.mlp.fc1.weight"):
        sparseft.save_merged(merged, out)
    assert not out.exists()


def test_a_merged_file_is_never_unpickled(files, monkeypatch):
    """The file is safetensors only: loading it never calls torch.load (pickle)."""
    _, merged = files["gps"]
    assert merged.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    shutil.copyfile(merged, merged.with_name("copy.safetensors"))
    sparseft.load(merged.with_name("copy.safetensors"))
    assert calls == []
