"""Progress bars only where someone watches them (a terminal, or --progress); results on their own lines."""

import io
import re
import sys
from pathlib import Path

import pytest
from helpers import write_png, write_task

from sparseft import progress
from sparseft.cli import main
from sparseft.progress import draw_progress, progress_bar

ROOT = Path(__file__).resolve().parent.parent


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("tty", "enabled", "drawn"), [(True, None, True), (False, None, False), (False, True, True),
                                                       (True, False, False)])
def test_bars_follow_the_terminal_unless_asked(monkeypatch, tty, enabled, drawn):
    stream = Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    assert draw_progress(enabled) is drawn
    assert list(progress_bar(range(3), enabled=enabled, desc="work", file=stream)) == [0, 1, 2]
    assert ("work" in stream.getvalue()) is drawn


def test_every_bar_goes_through_the_one_helper():
    users = [p.relative_to(ROOT) for p in (ROOT / "sparseft").rglob("*.py")
             if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert users == [Path("sparseft/progress.py")]
    assert progress.__all__ == ["draw_progress", "labelled", "progress_bar", "write_line"]


def test_a_label_starts_every_result_line_of_its_block(capsys):
    """Which of several runs of one command a line is about (`--lr auto`'s tuning runs)."""
    with progress.labelled("[--lr auto: lr 0.003]"):
        progress.write_line("epoch=1 val_acc=0.5")
        with progress.labelled("[inner]"):
            progress.write_line("epoch=1")
        progress.write_line("epoch=2")
    progress.write_line("epoch=3")
    assert capsys.readouterr().out.splitlines() == [
        "[--lr auto: lr 0.003] epoch=1 val_acc=0.5", "[inner] epoch=1", "[--lr auto: lr 0.003] epoch=2", "epoch=3"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    write_task("gps", root / "task.safetensors")
    for i in range(3):
        write_png(root / "images" / f"{i}.png", value=i, size=24)
    return root


def test_predict_into_a_file_draws_no_bar_and_each_result_starts_a_line(task, monkeypatch):
    """`sparseft predict ... > out.txt 2>&1`: stdout and stderr in one file that is not a terminal."""
    log = Stream(tty=False)
    monkeypatch.setattr(sys, "stdout", log)
    monkeypatch.setattr(sys, "stderr", log)
    assert main(["predict", str(task / "task.safetensors"), str(task / "images"), "--top-k", "1"]) == 0
    out = log.getvalue()
    assert "\r" not in out and "predict:" not in out and "it/s" not in out
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(task / "images" / f"{i}.png") for i in range(3)]


def test_progress_flag_draws_the_bar_anyway(task, capsys):
    capsys.readouterr()
    assert main(["predict", str(task / "task.safetensors"), str(task / "images"), "--progress"]) == 0
    captured = capsys.readouterr()
    assert "predict" in captured.err and captured.out.startswith(str(task / "images" / "0.png"))
    assert main(["predict", str(task / "task.safetensors"), str(task / "images")]) == 0
    assert capsys.readouterr().err == ""  # capsys is no terminal: no bar by default
