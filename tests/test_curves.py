"""Training curves: TensorBoard event files of a run (the optional extra) and `sparseft plot` from metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from helpers import make_vtab
from PIL import Image

from sparseft import curves
from sparseft.cli import main
from sparseft.errors import InputError

FAST = ["--model", "test_vit", "--img-size", "32", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
        "--warmup-epochs", "0", "--no-progress"]


def test_a_run_writes_tensorboard_events_per_step_and_per_epoch(tmp_path):
    pytest.importorskip("tensorboard")  # the `tensorboard` extra (in `dev`, so CI has it)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_vtab(tmp_path / "toy", n_train=8, n_val=2, n_test=4, classes=3)
    assert main(["train", "--method", "gps", "--data", str(data), "--out", str(tmp_path / "run"), *FAST]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    steps = [e.step for e in events.Scalars("step/loss")]
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, history[-1]["step"] + 1))  # one point per optimizer step
    assert {"step/lr", "epoch/lr", "train/loss", "train/acc", "test/acc"} <= set(scalars)
    assert [round(e.value, 6) for e in events.Scalars("test/acc")] == [round(h["test_acc"], 6) for h in history]


def test_an_explicit_log_dir_without_tensorboard_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(curves, "tensorboard_available", lambda: False)
    assert curves.CurveLog(tmp_path / "tb").writer is None  # the default folder: silently none
    with pytest.raises(InputError, match=r"pip install 'sparseft\[tensorboard\]'"):
        curves.CurveLog(tmp_path / "tb", explicit=True)


def _metrics(folder, lrs, accs, key="test_acc"):
    folder.mkdir(parents=True)
    lines = [{"epoch": i + 1, "step": 4 * (i + 1), "lr": lr, "train_loss": 1.0 / (i + 1), "train_acc": a,
              key: a * 0.9} for i, (lr, a) in enumerate(zip(lrs, accs))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_plot_draws_loss_accuracy_and_lr_of_several_runs(tmp_path, capsys):
    a = _metrics(tmp_path / "pets-gps", [1e-3, 5e-4, 1e-4], [0.5, 0.7, 0.8])
    b = _metrics(tmp_path / "pets-seg", [1e-3, 1e-4], [0.2, 0.4], key="test_mIoU")
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b / "metrics.jsonl"), "--out", str(out)]) == 0
    assert "curves of 2 run(s)" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 2 * img.size[1]  # three panels side by side
    assert main(["plot", str(a), "--out", str(out)]) == 1  # exists
    with pytest.raises(InputError, match="no metrics.jsonl"):
        curves.plot([tmp_path], tmp_path / "x.png")
    with pytest.raises(InputError, match=r"\.png"):
        curves.plot([a], tmp_path / "x.pdf")


def test_a_resumed_run_purges_the_events_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = curves.CurveLog(tmp_path / "tb")
    for step in range(1, 7):  # the run was interrupted at step 6; its checkpoint is at step 4
        first.step(step, loss=1.0, lr=0.1)
    first.close()
    resumed = curves.CurveLog(tmp_path / "tb", start_step=4)
    for step in range(5, 9):
        resumed.step(step, loss=0.5, lr=0.1)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("step/loss")]
    assert points == [(s, 1.0) for s in range(1, 5)] + [(s, 0.5) for s in range(5, 9)]


def test_plot_out_a_folder_is_refused_as_a_folder_with_or_without_overwrite(tmp_path, capsys):
    a = _metrics(tmp_path / "run", [1e-3], [0.5])
    folder = tmp_path / "figures"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert main(["plot", str(a), "--out", str(folder), *extra]) == 1
        err = capsys.readouterr().err
        assert str(folder) in err and "is a folder" in err and "pass --overwrite" not in err
    assert list(folder.iterdir()) == []
