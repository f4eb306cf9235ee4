"""Per-class results and the confusion matrix (`sparseft eval`, `evaluate_task`), and `predict --min-confidence`."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import make_seg_task, make_vtab, write_task
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparseft
from sparseft.api import evaluate_task
from sparseft.cli import main
from sparseft.data import build_transform, data_config, load_split
from sparseft.evalreport import confusion_csv, per_class_table, write_confusion
from sparseft.kinds.base import KindOptionError
from sparseft.train import evaluate

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--epochs", "1", "--batch-size", "4", "--lr", "1e-2", "--warmup-epochs", "0", "--no-progress"]
NAMES = ["a", "b", "c"]  # the class names `write_task` records


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Nine test images, three per class, of the classes a `write_task` file was made for."""
    return make_vtab(tmp_path_factory.mktemp("task") / "toy", n_train=6, n_val=3, n_test=9, names=NAMES)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return write_task("gps", tmp_path_factory.mktemp("gps") / "delta.safetensors")


@pytest.fixture(scope="module")
def seg_task_file(tmp_path_factory):
    data = make_seg_task(tmp_path_factory.mktemp("seg") / "shapes", n_train=8, n_test=4)
    run = tmp_path_factory.mktemp("segrun") / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *MODEL, *FAST]) == 0
    return run / "delta.safetensors", data


def _hand_confusion(task_file, task) -> torch.Tensor:
    """The confusion matrix counted here: the reloaded task's argmax on each test image, VTAB resize to 32 px."""
    model = sparseft.load(task_file).eval()
    test = load_split(str(task), "test", build_transform(data_config(model), "vtab", train=False, img_size=32))
    m = torch.zeros(3, 3, dtype=torch.int64)
    with torch.no_grad():
        for x, y in test:
            m[y, int(model(x[None]).argmax(1))] += 1
    return m


# -- the numbers -------------------------------------------------------------------------------------

class Logits(nn.Module):
    """A "model" whose inputs are its logits (one parameter, so it has a device)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_per_class_accuracy_is_counted_from_the_predictions():
    logits = torch.tensor([[3., 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 1], [1, 0, 0], [0, 0, 5]])
    y = torch.tensor([0, 1, 0, 2, 2, 2])  # class 0: 1 of 2 right; class 1: 1 of 1; class 2: 2 of 3
    result = evaluate(Logits(), DataLoader(TensorDataset(logits, y), batch_size=4), details=True,
                      class_names=["a", "b", "c"])
    assert result["confusion"] == {"classes": ["a", "b", "c"], "unit": "images",
                                   "matrix": [[1, 1, 0], [0, 1, 0], [1, 0, 2]]}
    assert result["per_class"] == {"a": {"n": 2, "correct": 1, "acc": 0.5}, "b": {"n": 1, "correct": 1, "acc": 1.0},
                                   "c": {"n": 3, "correct": 2, "acc": pytest.approx(2 / 3)}}
    assert result["acc"] == pytest.approx(4 / 6)
    assert "per_class" not in evaluate(Logits(), DataLoader(TensorDataset(logits, y), batch_size=4))


def test_a_class_without_items_has_no_accuracy():
    logits, y = torch.tensor([[1., 0, 0], [0, 1, 0]]), torch.tensor([0, 0])
    result = evaluate(Logits(), DataLoader(TensorDataset(logits, y)), details=True)
    assert result["confusion"]["classes"] == ["0", "1", "2"]  # no names: the indices
    assert result["per_class"]["2"]["n"] == 0 and math.isnan(result["per_class"]["2"]["acc"])
    assert per_class_table(result).splitlines()[3].split() == ["2", "0", "0", "-"]


def test_per_class_iou_and_dice_count_pixels_and_leave_void_out():
    class Seg(Logits):
        task, num_classes, class_names = "segmentation", 2, ["background", "spot"]

    logits = torch.zeros(1, 2, 2, 3)
    logits[0, 1, 0, :2] = 1  # predicted spot: (0,0) and (0,1)
    mask = torch.tensor([[[1, 0, 255], [1, 0, 0]]])  # spot: (0,0) and (1,0); (0,2) is void
    result = evaluate(Seg(), DataLoader(TensorDataset(logits, mask)), details=True)
    # true background (0,1),(1,1),(1,2): predicted spot, bg, bg; true spot (0,0),(1,0): spot, bg
    assert result["confusion"]["matrix"] == [[2, 1], [1, 1]] and result["confusion"]["unit"] == "pixels"
    spot, background = result["per_class"]["spot"], result["per_class"]["background"]
    assert (spot["n"], spot["correct"], spot["acc"]) == (2, 1, 0.5)
    assert spot["iou"] == pytest.approx(1 / 3) and spot["dice"] == pytest.approx(2 / 4)  # I=1, U=3, |P|+|G|=4
    assert background["iou"] == pytest.approx(2 / 4) and background["dice"] == pytest.approx(4 / 6)
    assert result["mIoU"] == pytest.approx(1 / 3)  # the spot class's, as the per-class row says


def test_evaluate_task_returns_what_a_hand_count_gives(task_file, task):
    result = evaluate_task(task_file, str(task), "test")
    hand = _hand_confusion(task_file, task)
    assert result["confusion"]["matrix"] == hand.tolist() and result["confusion"]["classes"] == NAMES
    for c, name in enumerate(NAMES):
        row = result["per_class"][name]
        assert row["n"] == int(hand[c].sum()) == 3 and row["correct"] == int(hand[c, c])
        assert row["acc"] == pytest.approx(int(hand[c, c]) / 3)
    assert result["acc"] == pytest.approx(int(hand.diagonal().sum()) / 9)
    assert "per_class" not in evaluate_task(task_file, str(task), "test", per_class=False)


# -- the command -----------------------------------------------------------------------------------

def test_eval_prints_the_overall_line_then_one_line_per_class(task_file, task, capsys):
    capsys.readouterr()
    assert main(["eval", str(task_file), "--data", str(task)]) == 0
    lines = capsys.readouterr().out.splitlines()
    overall = json.loads(lines[0])
    assert set(overall) == {"task_file", "split", "acc", "loss", "n"}  # as before: one JSON line of scores
    assert lines[1].split() == ["class", "images", "correct", "accuracy"] and len(lines) == 5
    hand = _hand_confusion(task_file, task)
    for c, (name, line) in enumerate(zip(NAMES, lines[2:])):
        assert line.split() == [name, "3", str(int(hand[c, c])), f"{int(hand[c, c]) / 3:.4f}"]


def test_eval_writes_the_confusion_matrix_as_csv_and_png(task_file, task, tmp_path, capsys):
    out = tmp_path / "eval-test"
    capsys.readouterr()
    assert main(["eval", str(task_file), "--data", str(task), "--confusion", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["confusion_files"] == [str(out / "confusion.csv"), str(out / "confusion.png")]
    with (out / "confusion.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    hand = _hand_confusion(task_file, task)
    assert rows[0] == ["true \\ predicted", *NAMES]
    assert [r[0] for r in rows[1:]] == NAMES and [[int(v) for v in r[1:]] for r in rows[1:]] == hand.tolist()
    with Image.open(out / "confusion.png") as png:
        assert png.format == "PNG" and min(png.size) > 200
    assert sorted(p.name for p in out.iterdir()) == ["confusion.csv", "confusion.png"]  # no temporary left


def test_eval_of_a_segmentation_task_lists_iou_and_dice_per_class(seg_task_file, tmp_path, capsys):
    task_file, data = seg_task_file
    capsys.readouterr()
    assert main(["eval", str(task_file), "--data", str(data), "--confusion", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["class", "pixels", "correct", "accuracy", "IoU", "Dice"]
    assert [line.split()[0] for line in lines[2:5]] == ["background", "square", "disc"]
    result = evaluate_task(task_file, str(data), "test")
    pixels = sum(r["n"] for r in result["per_class"].values())
    assert pixels == sum(map(sum, result["confusion"]["matrix"])) == 4 * 32 * 32  # every pixel, none void
    assert sum(r["correct"] for r in result["per_class"].values()) / pixels == pytest.approx(result["acc"])
    assert confusion_csv(result) == (tmp_path / "confusion.csv").read_text()


@pytest.mark.parametrize("case", ["a file", "exists"])
def test_confusion_refusals_name_the_path_and_change_nothing(task_file, task, tmp_path, case, capsys):
    target = tmp_path / "conf"
    if case == "a file":
        target.write_text("mine")
    else:
        target.mkdir()
        (target / "confusion.csv").write_text("mine")
    capsys.readouterr()
    assert main(["eval", str(task_file), "--data", str(task), "--confusion", str(target)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not captured.out  # refused before evaluating
    if case == "a file":
        assert f"--confusion {target} is a file" in err[0] and target.read_text() == "mine"
    else:
        assert f"{target / 'confusion.csv'} exists" in err[0] and "--overwrite" in err[0]
        assert (target / "confusion.csv").read_text() == "mine" and not (target / "confusion.png").exists()
        assert main(["eval", str(task_file), "--data", str(task), "--confusion", str(target), "--overwrite"]) == 0
        assert (target / "confusion.csv").read_text().startswith("true \\ predicted,a,b,c")


def test_write_confusion_needs_a_result_with_classes(tmp_path):
    with pytest.raises(sparseft.errors.InputError, match="no confusion matrix"):
        write_confusion({"mse": 0.1}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- predict --min-confidence ----------------------------------------------------------------------

def _predict_csv(argv, out):
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    with out.open(newline="") as f:
        return list(csv.reader(f))


def test_min_confidence_labels_uncertain_images_unknown(task_file, task, tmp_path):
    images = str(task / "images")
    plain = _predict_csv(["predict", str(task_file), images, "--top-k", "2", "--no-progress"], tmp_path / "a.csv")
    assert plain[0] == ["path", "label_1", "prob_1", "label_2", "prob_2"]  # no label column unless asked
    tops = sorted(float(r[2]) for r in plain[1:])
    threshold = (tops[len(tops) // 2 - 1] + tops[len(tops) // 2]) / 2  # half the images below, half above
    rows = _predict_csv(["predict", str(task_file), images, "--top-k", "2", "--no-progress", "--min-confidence",
                         str(threshold)], tmp_path / "b.csv")
    assert rows[0] == ["path", "label", "label_1", "prob_1", "label_2", "prob_2"]
    assert [r[2:] for r in rows[1:]] == [r[1:] for r in plain[1:]]  # the top-k as they were
    for r in rows[1:]:
        assert r[1] == ("unknown" if float(r[3]) < threshold else r[2])
    assert 0 < sum(r[1] == "unknown" for r in rows[1:]) < len(rows) - 1


def test_min_confidence_in_python_and_on_the_terminal(task_file, task, capsys):
    model = sparseft.load(task_file)
    image = task / "images" / "test_0.png"
    certain, = sparseft.predict(model, [image], min_confidence=1e-6)
    never, = sparseft.predict(model, [image], min_confidence=1.0)
    assert not certain.unknown and certain.label == certain.labels[0]
    assert never.unknown and never.label == "unknown" and never.labels == certain.labels
    capsys.readouterr()
    assert main(["predict", str(task_file), str(image), "--min-confidence", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: unknown; {certain.labels[0]} (")


@pytest.mark.parametrize("value", ["0", "-0.2", "1.5", "nan"])
def test_a_min_confidence_outside_0_1_is_refused_before_any_work(task_file, task, tmp_path, value, capsys):
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", str(task_file), str(task / "images"), "--min-confidence", value, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--min-confidence" in err[0] and "(0, 1]" in err[0] and not out.exists()


@pytest.mark.parametrize("command, flags", [
    ("predict", ["--min-confidence", "0.5"]), ("predict", ["--top-k", "3"]),
    ("predict", ["--top-k", "3", "--min-confidence", "0.5"]), ("eval", ["--preprocessing", "fgvc"])])
def test_classification_options_are_refused_for_a_segmentation_task(seg_task_file, tmp_path, capsys, command, flags):
    """As an option of another method is: one line naming the option and the task kind, exit status 2, nothing
    written (not silently ignored)."""
    task_file, data = seg_task_file
    out = tmp_path / "out"
    where = (["--out", str(out)] if command == "predict" else ["--confusion", str(out)])
    argv = [command, str(task_file), *([str(data / "images")] if command == "predict" else ["--data", str(data)])]
    capsys.readouterr()
    assert main([*argv, *flags, *where]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    named = [f for f in flags if f.startswith("--")]
    assert len(err) == 1 and not captured.out and "Traceback" not in captured.err
    assert err[0].startswith(f"error: {task_file} is a segmentation task: {', '.join(named)} ")
    assert "task kind 'segmentation' (" in err[0] and "belong" in err[0] and "to classification)" in err[0]
    assert err[0].endswith("segmentation takes no options")
    assert not out.exists()
    assert main([*argv, *where]) == 0 and out.is_dir()  # the same command without the option runs


def test_the_python_api_refuses_a_classification_option_for_a_segmentation_task(seg_task_file):
    task_file, data = seg_task_file
    with pytest.raises(KindOptionError, match=r"is a segmentation task: preprocessing \(--preprocessing\) is not an "
                                              "option of task kind 'segmentation'"):
        evaluate_task(task_file, str(data), "test", preprocessing="vtab")


def test_a_task_with_a_class_named_unknown_refuses_min_confidence(tmp_path, capsys):
    data = make_vtab(tmp_path / "toy", n_train=6, n_val=2, n_test=2, classes=2, names=["face", "unknown"])
    run = tmp_path / "run"
    assert main(["train", "--method", "linear", "--data", str(data), "--out", str(run), *MODEL, *FAST]) == 0
    model = sparseft.load(run / "delta.safetensors")
    with pytest.raises(sparseft.errors.InputError, match="a class named 'unknown'"):
        sparseft.predict(model, [data / "images" / "test_0.png"], min_confidence=0.5)
    capsys.readouterr()
    assert main(["predict", str(run / "delta.safetensors"), str(data / "images"), "--min-confidence", "0.5",
                 "--out", str(tmp_path / "p.csv")]) == 1
    assert "a class named 'unknown'" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()


def test_predict_on_a_segmentation_task_skips_what_it_cannot_read(seg_task_file, tmp_path, capsys):
    """The masks of the readable images are written; each unreadable input is one warning line naming it."""
    import os
    import shutil

    task_file, data = seg_task_file
    images = tmp_path / "images"
    images.mkdir()
    good = shutil.copy(next(iter(sorted((data / "images").iterdir()))), images / "good.png")
    (images / "link.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(images / "pipe.png")
    (images / "cut.png").write_bytes(Path(good).read_bytes()[:40])
    out = tmp_path / "masks"
    capsys.readouterr()
    assert main(["predict", str(task_file), str(images), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]
    for name in ("cut.png", "link.png", "pipe.png"):
        assert sum(line.startswith(f"warning: {images / name}: ") and line.endswith("(skipped)") for line in err) == 1
    assert err[-1] == "warning: skipped 3 of 4 images"
