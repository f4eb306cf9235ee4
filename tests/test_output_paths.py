"""One check of output paths for the Python API and the command line (`fileutil.check_output_file` and
`check_output_folder`): a folder where a file goes, a parent that is a file, a folder that cannot be
written, a missing parent (created); one clear error naming the path, never a temporary file's name,
and nothing written."""

import os
from pathlib import Path

import pytest
import torch
from helpers import random_selection, toy_base, write_task

import sparseft
from sparseft import fileutil
from sparseft.cli import main
from sparseft.evalreport import write_confusion
from sparseft.fileutil import OutputPathError, atomic_path
from sparseft.inference import Prediction, write_csv

RESULT = {"confusion": {"classes": ["a", "b"], "unit": "images", "matrix": [[1, 0], [0, 1]]}}


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return write_task("gps", tmp_path_factory.mktemp("task") / "gps.safetensors")


def applied() -> torch.nn.Module:
    model = toy_base()
    return sparseft.apply(model, random_selection(model))


def merged(task_file: Path) -> torch.nn.Module:
    return sparseft.merge(sparseft.load(task_file))


#: every Python writer of a file, by name: (what it writes given a path)
WRITERS = {
    "save_delta": lambda path, task: sparseft.save_delta(applied(), path),
    "save_merged": lambda path, task: sparseft.save_merged(merged(task), path),
    "Selection.save": lambda path, task: random_selection(toy_base()).save(path),
    "write_csv": lambda path, task: write_csv([Prediction(["a"], [1.0], [0], Path("x.png"))], path),
}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def unwritable(tmp_path, monkeypatch):
    """A folder this process cannot write into (as root, where permissions do not bind, `os.access` says so)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != folder and real(p, mode, **kw))
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_an_existing_folder_is_refused_naming_it_and_nothing_is_written(writer, tmp_path, task_file):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError) as err:
        WRITERS[writer](folder, task_file)
    message = str(err.value)
    assert f"{str(folder)!r} is a folder" in message and ".tmp" not in message
    assert listing(folder) == ["keep.txt"] and listing(tmp_path) == ["out", "out/keep.txt"]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_parent_that_is_a_file_is_refused_naming_it(writer, tmp_path, task_file):
    (tmp_path / "notes.txt").write_text("mine")
    target = tmp_path / "notes.txt" / "sub" / "out.file"
    with pytest.raises(OutputPathError, match=f"{target}: {tmp_path / 'notes.txt'} is a file, not a folder"):
        WRITERS[writer](target, task_file)
    assert listing(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_folder_that_cannot_be_written_is_refused_naming_it(writer, unwritable, task_file):
    with pytest.raises(OutputPathError, match=f"{unwritable / 'out.file'}: cannot write into the folder "
                                              f"{unwritable} "):
        WRITERS[writer](unwritable / "out.file", task_file)
    assert listing(unwritable) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_missing_parents_are_created(writer, tmp_path, task_file):
    target = tmp_path / "new" / "deeper" / "out.file"
    WRITERS[writer](target, task_file)
    assert listing(tmp_path / "new") == ["deeper", "deeper/out.file"]


def test_an_os_error_while_writing_names_the_file_not_the_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"

    def replace(src, dst):
        raise IsADirectoryError(21, "Is a directory", str(src), str(dst))

    monkeypatch.setattr(fileutil.os, "replace", replace)
    with pytest.raises(OSError) as err, atomic_path(target) as tmp:
        tmp.write_text("x")
    assert str(err.value) == f"[Errno 21] cannot write {target}: Is a directory" and ".tmp" not in str(err.value)
    assert listing(tmp_path) == []


def test_folder_writers_refuse_a_file_and_an_unwritable_folder(tmp_path, unwritable):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(OutputPathError, match=f"--confusion {tmp_path / 'afile'} is a file; name a folder"):
        write_confusion(RESULT, tmp_path / "afile")
    with pytest.raises(OutputPathError, match=f"--confusion {unwritable}: cannot write into this folder"):
        write_confusion(RESULT, unwritable)
    with pytest.raises(OutputPathError, match=f"--confusion {unwritable / 'sub'}: cannot write into the folder"):
        write_confusion(RESULT, unwritable / "sub")
    assert listing(unwritable) == [] and (tmp_path / "afile").read_text() == "mine"


# -- the command line: the same check, worded for the flag ---------------------------------------


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def cli_cases(task_file: Path, out: Path) -> dict[str, list[str]]:
    image = task_file.parent / "image.png"
    if not image.exists():
        from helpers import write_png
        write_png(image, value=90, size=20)
    return {"merge": ["merge", str(task_file), "--out", str(out)],
            "predict": ["predict", str(task_file), str(image), "--out", str(out), "--no-progress"],
            "convert": ["weights", "convert", str(task_file), "--model", "test_vit", "--out", str(out)]}


@pytest.mark.parametrize("command", ["merge", "predict", "convert"])
def test_the_command_line_refuses_the_same_paths_before_any_work(command, task_file, tmp_path, unwritable, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    cases = [(folder, f"--out {str(folder)!r} is a folder"),
             (tmp_path / "notes.txt" / "x.safetensors", f"{tmp_path / 'notes.txt'} is a file, not a folder"),
             (unwritable / "x.safetensors", f"cannot write into the folder {unwritable}")]
    for out, named in cases:
        assert main(cli_cases(task_file, out)[command]) == 1
        assert named in error_line(capsys)
    assert listing(folder) == [] and listing(unwritable) == [] and (tmp_path / "notes.txt").read_text() == "mine"


def test_the_command_line_creates_a_missing_parent(task_file, tmp_path, capsys):
    out = tmp_path / "new" / "merged.safetensors"
    assert main(cli_cases(task_file, out)["merge"]) == 0
    assert out.is_file()
    csv_out = tmp_path / "more" / "preds.csv"
    assert main(cli_cases(task_file, csv_out)["predict"]) == 0
    assert csv_out.read_text().startswith("path,")


def test_eval_confusion_and_train_out_use_the_folder_check(task_file, tmp_path, unwritable, capsys):
    assert main(["eval", str(task_file), "--data", str(tmp_path / "nodata"), "--confusion", str(unwritable)]) == 1
    assert f"--confusion {unwritable}: cannot write into this folder" in error_line(capsys)
    assert main(["train", "--data", str(tmp_path / "nodata"), "--out", str(unwritable / "run"), "--model", "test_vit",
                 "--img-size", "32"]) == 1
    assert f"--out {unwritable / 'run'}: cannot write into the folder {unwritable}" in error_line(capsys)
    assert listing(unwritable) == []
