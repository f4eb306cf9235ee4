"""One set of data checks for every task kind (issue 25): images compared by their decoded pixels,
and segmentation masks checked as classification labels are (the classes they hold, splits that
share images).

Each refusal is checked through `sparseft train`: one line naming the culprit, exit 1, and no run
folder file written.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import make_folder, make_seg_task, make_vtab
from PIL import Image

from sparseft.cli import main
from sparseft.data import DataError, DataWarning, images
from sparseft.kinds import get_kind

MODEL = ["--model", "test_vit", "--img-size", "32"]
FAST = ["--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "0", "--no-progress"]
FINAL = ("train800val200", ("test",))


def refused(capsys, data: Path | str, out: Path, method: str = "linear") -> str:
    """`sparseft train` on `data` fails with one line (returned) and leaves no run folder file."""
    assert main(["train", "--data", str(data), "--out", str(out), *MODEL, *FAST, "--method", method]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())
    return lines[0]


def check(kind: str, data: Path | str, train: str = FINAL[0], evals: tuple[str, ...] = FINAL[1]) -> list[str]:
    """The `DataWarning`s of a kind's checks of a run's splits (`check_data`), as strings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_kind(kind).check_data(str(data), train, evals)
    return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def append(path: Path, *lines: str) -> int:
    """Add lines to a split file; returns the line number of the first one added."""
    before = path.read_text().splitlines()
    path.write_text("\n".join([*before, *lines]) + "\n")
    return len(before) + 1


def label_of(task: Path, split: str, line: int) -> tuple[str, int]:
    rel, label = (task / f"{split}.txt").read_text().splitlines()[line - 1].rsplit(None, 1)
    return rel, int(label)


# -- classification: copies under other names ------------------------------------------------

def test_a_copy_of_a_test_image_in_training_under_another_name_warns_with_the_pair(tmp_path):
    task = make_vtab(tmp_path / "task")
    assert check("classification", task) == []  # clean data: not a word
    rel, label = label_of(task, "test", 1)
    shutil.copyfile(task / rel, task / "images" / "copy.png")  # byte-identical
    other, other_label = label_of(task, "test", 2)
    with Image.open(task / other) as img:
        img.save(task / "images" / "again.bmp")  # pixel-identical, in another format
    for split in ("train800", "train800val200"):
        append(task / f"{split}.txt", f"images/copy.png {label}", f"images/again.bmp {other_label}")
    (found,) = check("classification", task)
    assert found.startswith("2 images of split test have the same pixels as images of split train800val200 "
                            "(train/test overlap under other names: test scores are optimistic)")
    assert f"{task / 'test.txt'}:1 = {task / 'train800val200.txt'}:9" in found  # the example pair, by split line
    assert check("classification", task, "train800", ("val200",)) == []  # tuning scores val200, not test
    third, third_label = label_of(task, "test", 3)
    shutil.copyfile(task / third, task / "images" / "relabelled.png")
    append(task / "train800val200.txt", f"images/relabelled.png {(third_label + 1) % 3}")
    (found,) = check("classification", task)
    assert found.startswith("3 images of split test have the same pixels as images of split train800val200 (train/test "
                            "overlap under other names: test scores are optimistic; 1 of them with another label): ")


def test_a_copy_of_a_class_0_image_labelled_class_1_is_refused_naming_both(tmp_path, capsys):
    task = make_vtab(tmp_path / "task")
    rel, label = label_of(task, "train800", 1)
    assert label == 0
    shutil.copyfile(task / rel, task / "images" / "relabelled.png")
    for split in ("train800", "train800val200"):
        append(task / f"{split}.txt", "images/relabelled.png 1")
    before = {p.name: p.read_bytes() for p in task.iterdir() if p.is_file()}
    line = refused(capsys, task, tmp_path / "run")
    assert (f"{task / 'train800val200.txt'}:9: image {task / 'images' / 'relabelled.png'} has the same pixels as "
            f"{task / rel} ({task / 'train800val200.txt'}:1) but label 1 here and label 0 there; one image must have "
            "one label") in line
    assert {p.name: p.read_bytes() for p in task.iterdir() if p.is_file()} == before  # the data is left as it is


def test_the_same_image_in_two_class_folders_is_refused_and_repeats_in_one_class_warn(tmp_path, capsys):
    root = tmp_path / "pets"
    make_folder(root / "train", per_class=6)
    make_folder(root / "test", per_class=2, classes=("cat", "dog"))
    for name in ("cat", "dog"):  # make_folder draws the same pixels for train/x/00.png and test/x/00.png
        for path in (root / "test" / name).glob("*.png"):
            Image.fromarray(np.full((12, 12, 3), 7 + int(path.stem) + 40 * (name == "dog"), np.uint8)).save(
                path.with_name(f"t{path.name}"))
            path.unlink()
    assert check("classification", f"folder:{root}") == []
    shutil.copyfile(root / "train" / "cat" / "01.png", root / "train" / "cat" / "copy.png")
    (found,) = check("classification", f"folder:{root}")
    assert found.startswith("1 images of split train800val200 have the same pixels as another of its images, with "
                            "the same label (repeated images weigh more in training)")
    assert str(root / "train" / "cat" / "copy.png") in found  # a class folder's images are shown by their paths
    shutil.copyfile(root / "train" / "cat" / "02.png", root / "train" / "dog" / "from-cat.png")
    line = refused(capsys, f"folder:{root}", tmp_path / "run")
    assert str(root / "train" / "dog" / "from-cat.png") in line and str(root / "train" / "cat" / "02.png") in line
    assert "label 1 here and label 0 there" in line


def test_a_checked_file_is_not_decoded_again_but_a_changed_one_is(tmp_path, monkeypatch):
    task = make_vtab(tmp_path / "task")
    monkeypatch.setattr(images, "_REMEMBERED", {})  # nothing remembered from other tests
    decoded: list[str] = []
    real = images.open_rgb
    monkeypatch.setattr(images, "open_rgb", lambda path, *args: decoded.append(Path(path).name) or real(path, *args))
    check("classification", task)
    assert sorted(decoded) == sorted(p.name for p in (task / "images").iterdir())  # each image once, train and test
    decoded.clear()
    check("classification", task)
    check("classification", task, "train800", ("val200",))
    assert decoded == []  # a second run in this process reads the files but decodes none
    (task / "images" / "test_2.png").write_bytes(b"not a png any more")
    with pytest.raises(DataError, match=r"test_2\.png: cannot read image \(listed at .*test\.txt:3\)"):
        check("classification", task)


# -- segmentation: the masks' classes --------------------------------------------------------

def _masks(root: Path, stems: list[str], change) -> None:
    for stem in stems:
        path = root / "masks" / f"{stem}.png"
        mask = np.asarray(Image.open(path)).copy()
        Image.fromarray(change(mask).astype(np.uint8), "L").save(path)


def _stems(root: Path, split: str) -> list[str]:
    return (root / f"{split}.txt").read_text().split()


@pytest.mark.parametrize("method", ["lora", "gps"])
def test_masks_of_only_background_are_refused_before_any_training(tmp_path, capsys, method):
    seg = make_seg_task(tmp_path / "seg")
    _masks(seg, _stems(seg, "train800val200") + _stems(seg, "test"), np.zeros_like)
    line = refused(capsys, seg, tmp_path / "run", method)
    assert line == (f"error: {seg / 'train800val200.txt'}: every mask of this split (12 images, first masks/000.png) "
                    "holds only background, no pixel of 'square' or 'disc'; a split without objects can neither train "
                    "nor score a segmentation model: check the masks (index masks hold the class ids 0..2 of "
                    "classes.txt, 255 = ignore)")


def test_an_evaluation_split_of_only_background_is_refused(tmp_path, capsys):
    seg = make_seg_task(tmp_path / "seg")
    _masks(seg, _stems(seg, "test"), lambda m: np.where(m > 0, 255, 0))  # objects marked "ignore"
    line = refused(capsys, seg, tmp_path / "run")
    assert f"{seg / 'test.txt'}: every mask of this split (6 images, first masks/012.png) holds only background" in line


def test_a_class_without_a_pixel_in_the_training_masks_is_refused_naming_its_line(tmp_path, capsys):
    seg = make_seg_task(tmp_path / "seg")
    _masks(seg, _stems(seg, "train800val200"), lambda m: np.where(m == 2, 0, m))  # discs only in test
    line = refused(capsys, seg, tmp_path / "run")
    assert (f"{seg / 'classes.txt'}:3: class 'disc' (label 2) has no pixel in the masks of "
            f"{seg / 'train800val200.txt'}; a class the model never sees in training cannot be learnt") in line


def test_training_masks_of_a_single_class_are_refused(tmp_path, capsys):
    seg = make_seg_task(tmp_path / "seg")
    _masks(seg, _stems(seg, "train800val200"), lambda m: np.where(m == 1, 2, m))  # no square ...
    _masks(seg, _stems(seg, "train800val200"), lambda m: np.where(m == 0, 255, m))  # ... and no background left
    line = refused(capsys, seg, tmp_path / "run")
    assert (f"{seg / 'train800val200.txt'}: 1 class (only 'disc' occurs in its masks); a single-class task cannot be "
            "trained/evaluated meaningfully") in line


def test_many_masks_of_only_background_warn_with_the_count(tmp_path):
    seg = make_seg_task(tmp_path / "seg")
    assert check("segmentation", seg) == []  # clean data: not a word
    stems = _stems(seg, "train800val200")
    _masks(seg, stems[1:5], np.zeros_like)  # 4 of 12 negatives: fine
    assert check("segmentation", seg) == []
    _masks(seg, stems[5:7], np.zeros_like)  # 6 of 12: half of them
    (found,) = check("segmentation", seg)
    assert found == (f"{seg / 'train800val200.txt'}: 6 of its 12 masks hold only background (first masks/001.png); "
                     "negative examples are fine, but if these are not meant to be, check how their masks were saved")


# -- segmentation: images shared by training and evaluation ------------------------------------

def test_a_test_stem_listed_for_training_warns_like_classification(tmp_path):
    seg = make_seg_task(tmp_path / "seg")
    line = append(seg / "train800val200.txt", "013")
    (found,) = check("segmentation", seg)
    assert found == (f"1 images of test.txt are also in train800val200.txt (train/test overlap: test scores are "
                     f"optimistic): {seg / 'test.txt'}:2 = {seg / 'train800val200.txt'}:{line}")
    assert check("segmentation", seg, "train800", ("val200",)) == []  # tuning does not use those splits
    line = append(seg / "train800.txt", "009")
    (tuning,) = check("segmentation", seg, "train800", ("val200",))
    assert tuning == (f"1 images of val200.txt are also in train800.txt (train/val200 overlap: val200 scores are "
                      f"optimistic): {seg / 'val200.txt'}:2 = {seg / 'train800.txt'}:{line}")


def test_pixel_identical_images_are_compared_across_splits_and_masks(tmp_path, capsys):
    seg = make_seg_task(tmp_path / "seg")
    shutil.copyfile(seg / "images" / "014.png", seg / "images" / "copy.png")
    shutil.copyfile(seg / "masks" / "014.png", seg / "masks" / "copy.png")
    line = append(seg / "train800val200.txt", "copy")
    (found,) = check("segmentation", seg)
    assert found == ("1 images of split test have the same pixels as images of split train800val200 (train/test "
                     f"overlap under other names: test scores are optimistic): {seg / 'test.txt'}:3 = "
                     f"{seg / 'train800val200.txt'}:{line}")
    shutil.copyfile(seg / "masks" / "001.png", seg / "masks" / "copy.png")  # now the copy has another mask ...
    shutil.copyfile(seg / "images" / "000.png", seg / "images" / "copy.png")  # ... of a training image
    line = refused(capsys, seg, tmp_path / "run")
    assert (f"{seg / 'train800val200.txt'}:13: image {seg / 'images' / 'copy.png'} has the same pixels as "
            f"{seg / 'images' / '000.png'} ({seg / 'train800val200.txt'}:1) but mask copy.png here and mask 000.png "
            "there; one image must have one mask") in line


def test_an_undecodable_training_image_is_named_by_its_path_not_by_an_internal_buffer(tmp_path, capsys):
    task = make_vtab(tmp_path / "t", n_train=6, n_val=2, n_test=3)
    bad = task / "images" / "train800_3.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "run"
    assert main(["train", "--method", "linear", "--data", str(task), "--out", str(out), "--model", "test_vit",
                 "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: cannot read image") and "\n" not in err
    assert "BytesIO" not in err and repr(str(bad)) in err  # PIL's 'cannot identify image file' names the file
    assert not out.exists()  # refused before the run folder is made
    with pytest.raises(DataError, match="cannot identify image file") as info:
        images.open_rgb(bad, data=bad.read_bytes())
    assert "BytesIO" not in str(info.value)
