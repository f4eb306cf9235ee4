"""--resume checks the data, not only its path; run records name the run folder's files relative to it.

A run keeps a fingerprint of its data (`data.json`: the split files' bytes, every image's size and
content hash); `--resume` refuses data that changed since, naming what changed, and leaves the run
folder as it was. A moved run folder resumes and reports its own paths.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_folder, make_seg_task, make_vtab, write_png

import sparseft
import sparseft.train
from sparseft.cli import main
from sparseft.data import fingerprint
from sparseft.kinds.base import kind_for_data

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "0", "--no-progress",
        "--method", "linear"]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), *MODEL, *FAST, *extra])


def interrupted(data: Path, out: Path, monkeypatch, *extra: str) -> None:
    """A run stopped by Ctrl-C in its second epoch: the checkpoint of the first is there, no summary."""
    real, calls = sparseft.train._non_finite, []

    def stop_in_second_epoch(*args):  # called after each epoch, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sparseft.train, "_non_finite", stop_in_second_epoch)
    assert train(data, out, *extra) == 130
    monkeypatch.setattr(sparseft.train, "_non_finite", real)
    assert json.loads((out / "checkpoint.json").read_text())["epoch"] == 0 and not (out / "summary.json").exists()


@pytest.fixture
def task(tmp_path):
    return make_vtab(tmp_path / "toy", n_train=8, n_val=4, n_test=6, classes=3)


def test_a_line_added_to_a_split_file_refuses_the_resume_naming_the_file(tmp_path, task, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(task, out, monkeypatch)
    before = snapshot(out)
    write_png(task / "images" / "extra.png", value=500)
    with open(task / "train800val200.txt", "a") as f:
        f.write("images/extra.png 2\n")
    capsys.readouterr()
    assert train(task, out, "--resume") == 1
    line = one_line(capsys.readouterr().err)
    assert f"{task}: data changed since the run in {out} started" in line
    assert "train800val200.txt (1 line added)" in line and "1 image of class '2' added (images/extra.png)" in line
    assert "resume refused" in line
    assert snapshot(out) == before


def test_an_image_whose_content_changed_refuses_the_resume_naming_it_and_its_class(tmp_path, task, monkeypatch,
                                                                                  capsys):
    out = tmp_path / "run"
    interrupted(task, out, monkeypatch)
    before = snapshot(out)
    train_lines = (task / "train800.txt").read_text().split()
    image, label = train_lines[2], train_lines[3]  # the second image of train800 and its class
    write_png(task / image, value=999)  # same name, same size in pixels, other pixels
    capsys.readouterr()
    assert train(task, out, "--resume") == 1
    assert f"1 image of class '{label}' changed ({image})" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_untouched_data_resumes_bit_identical_to_an_uninterrupted_run(tmp_path, task, monkeypatch, capsys):
    assert train(task, tmp_path / "whole") == 0
    out = tmp_path / "run"
    interrupted(task, out, monkeypatch)
    assert train(task, out, "--resume") == 0
    assert "warning" not in capsys.readouterr().err
    whole, resumed = (sparseft.read_delta(d / "delta.safetensors")[1] for d in (tmp_path / "whole", out))
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
    assert (out / "data.json").read_bytes() == (tmp_path / "whole" / "data.json").read_bytes()


def test_a_moved_finished_run_reports_its_own_task_file(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert train(task, out) == 0
    assert json.loads((out / "summary.json").read_text())["task_file"] == "delta.safetensors"  # relative to the run
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    out.rename(moved)
    capsys.readouterr()
    before = snapshot(moved)
    assert train(task, moved, "--resume") == 0
    assert f"task file: {moved / 'delta.safetensors'} (" in capsys.readouterr().out
    assert snapshot(moved) == before  # a finished run is returned as it is


def test_an_old_record_with_an_absolute_path_names_the_run_folders_own_file(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert train(task, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    summary["task_file"] = str(tmp_path / "gone" / "run" / "delta.safetensors")  # as 0.3 wrote it, then moved
    (out / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    assert train(task, out, "--resume") == 0
    assert f"task file: {out / 'delta.safetensors'} (" in capsys.readouterr().out


def test_a_moved_unfinished_run_resumes_in_its_new_folder(tmp_path, task, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(task, out, monkeypatch)
    moved = tmp_path / "moved"
    out.rename(moved)
    capsys.readouterr()
    assert train(task, moved, "--resume") == 0
    assert f"task file: {moved / 'delta.safetensors'} (" in capsys.readouterr().out
    summary = json.loads((moved / "summary.json").read_text())
    assert summary["task_file"] == "delta.safetensors" and len(summary["history"]) == 3
    assert not out.exists()


def test_a_run_started_without_a_fingerprint_resumes_with_a_warning(tmp_path, task, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(task, out, monkeypatch)
    (out / "data.json").unlink()  # as a run started by sparseft 0.3 left it
    capsys.readouterr()
    assert train(task, out, "--resume") == 0
    err = capsys.readouterr().err
    assert f"warning: {out}: no data.json (the run was started by an older sparseft)" in err
    assert "without checking that the data" in err
    assert not (out / "data.json").exists()  # nothing is recorded as what the run started with


def test_a_fingerprint_of_another_format_is_not_compared_but_said(tmp_path, task, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(task, out, monkeypatch)
    record = json.loads((out / "data.json").read_text())
    (out / "data.json").write_text(json.dumps({**record, "version": 99}))
    write_png(task / "images" / "test_0.png", value=4242)  # a change this sparseft cannot judge against it
    capsys.readouterr()
    assert train(task, out, "--resume") == 0
    assert "a fingerprint of another format (version 99" in capsys.readouterr().err


def test_a_damaged_fingerprint_refuses_the_resume_naming_it(tmp_path, task, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(task, out, monkeypatch)
    (out / "data.json").write_text("[1, 2")
    before = snapshot(out)
    capsys.readouterr()
    assert train(task, out, "--resume") == 1
    assert f"{out / 'data.json'}: malformed data fingerprint" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_segmentation_masks_are_part_of_the_fingerprint(tmp_path, monkeypatch, capsys):
    data = make_seg_task(tmp_path / "seg")
    out = tmp_path / "run"
    interrupted(data, out, monkeypatch, "--method", "linear")
    before = snapshot(out)
    mask = data / "masks" / "002.png"
    raw = mask.read_bytes()
    from PIL import Image
    Image.new("L", (32, 32), 0).save(mask)  # every pixel background now
    capsys.readouterr()
    assert train(data, out, "--resume") == 1
    assert "1 mask changed (masks/002.png)" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before
    mask.write_bytes(raw)  # restored: the run resumes
    assert train(data, out, "--resume") == 0


def test_an_image_added_to_an_image_folder_class_refuses_the_resume(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / "pets", per_class=6)
    out = tmp_path / "run"
    interrupted(Path(f"folder:{data}"), out, monkeypatch)
    before = snapshot(out)
    write_png(data / "cat" / "new.png", value=77)
    capsys.readouterr()
    assert train(Path(f"folder:{data}"), out, "--resume") == 1
    assert "1 image of class 'cat' added (cat/" in one_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_a_large_data_set_hashes_a_fixed_share_and_compares_the_rest_by_size(tmp_path, task, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1500)  # a few of the 18 toy images' bytes
    kind = kind_for_data(str(task))

    def take(like=None):
        return fingerprint.take(str(task), {s: kind.dataset(str(task), s, None) for s in ("train800val200", "test")},
                                like=like)

    stored = take()
    hashed = [rel for rel, (*_, digest) in stored["files"].items() if digest is not None]
    assert 0 < len(hashed) < len(stored["files"]) and stored["hashed_share"] < 1
    assert take(like=stored) == stored  # the same files hashed again
    unhashed = next(rel for rel, (*_, digest) in stored["files"].items() if digest is None)
    with open(task / unhashed, "ab") as f:
        f.write(b"\0")  # one byte more: seen by its size
    write_png(task / hashed[0], value=12345)
    found = fingerprint.changes(stored, take(like=stored))
    assert any(unhashed in c and "changed" in c for c in found)
    assert any(hashed[0] in c and "changed" in c for c in found)


def test_a_task_kinds_own_data_without_files_has_an_empty_fingerprint():
    class Items:  # a dataset with no files (a task kind's generated data)
        def __len__(self):
            return 3

    record = fingerprint.take("toyreg:16", {"train800val200": Items()})
    assert record["files"] == {} and record["split_files"] == {} and record["root"] is None
    assert fingerprint.changes(record, fingerprint.take("toyreg:16", {"train800val200": Items()})) == []


def test_a_copied_run_folder_names_its_own_files_even_when_the_old_ones_remain(tmp_path, task, capsys):
    out = tmp_path / "run"
    assert train(task, out) == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["task_file"] = str(out / "delta.safetensors")  # an old absolute record, its file still there
    (copy / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    assert train(task, copy, "--resume") == 0
    assert f"task file: {copy / 'delta.safetensors'} (" in capsys.readouterr().out


def test_relabelled_images_are_named_with_both_classes(tmp_path, task, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(task, out, monkeypatch)
    before = snapshot(out)
    lines = (task / "test.txt").read_text().splitlines()
    path, label = lines[0].split()
    other = str((int(label) + 1) % 3)
    (task / "test.txt").write_text("\n".join([f"{path} {other}", *lines[1:]]) + "\n")
    capsys.readouterr()
    assert train(task, out, "--resume") == 1
    line = one_line(capsys.readouterr().err)
    assert "test.txt (edited)" in line and f"1 image moved from class '{label}' to '{other}' ({path})" in line
    assert snapshot(out) == before
