"""Loaders for the VTAB-1k, FGVC and ImageFolder layouts, the spec strings, and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers import make_fgvc, make_folder, make_vtab, write_png
from PIL import Image

from sparseft.data import (
    DataError,
    DataWarning,
    ImageDataset,
    class_names,
    load_split,
    num_classes,
    open_rgb,
    resolve_spec,
    verify_samples,
)
from sparseft.data.folder import folder_split
from sparseft.data.layouts import canonical_split, fgvc_class_ids, fgvc_image_root, read_split_file

# -- VTAB ------------------------------------------------------------------------------------

def test_vtab_splits_sizes_labels_and_images(tmp_path):
    task = make_vtab(tmp_path / "task")
    assert resolve_spec(str(task)).kind == "vtab"
    assert num_classes(str(task)) == 3
    sizes = {s: len(load_split(str(task), s)) for s in ("train800", "val200", "train800val200", "test")}
    assert sizes == {"train800": 6, "val200": 2, "train800val200": 8, "test": 4}
    ds = load_split(str(task), "train")  # alias of train800
    img, label = ds[4]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (12, 12)
    assert label == 4 % 3
    assert ds.targets == [i % 3 for i in range(6)]
    expected = np.asarray(Image.open(task / "images" / "train800_4.png"))
    assert np.array_equal(np.asarray(img), expected)
    assert ds.samples[4].origin.endswith("train800.txt:5")


def test_vtab_transform_is_applied_and_collates(tmp_path):
    task = make_vtab(tmp_path / "task")
    ds = load_split(str(task), "test", lambda im: torch.tensor(np.asarray(im), dtype=torch.float32))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 12, 12, 3) and y.tolist() == [(8 + i) % 3 for i in range(4)]


def test_vtab_paths_with_spaces_and_blank_lines(tmp_path):
    write_png(tmp_path / "my images" / "a b.png", 1)
    (tmp_path / "train800.txt").write_text("my images/a b.png 2\n\n   \n")
    samples = read_split_file(tmp_path / "train800.txt")
    assert len(samples) == 1 and samples[0].label == 2 and samples[0].path.name == "a b.png"


def test_vtab_classes_file_sets_names_and_count(tmp_path):
    task = make_vtab(tmp_path / "task")
    (task / "classes.txt").write_text("a\nb\nc\n")
    assert class_names(str(task)) == ["a", "b", "c"]
    assert load_split(str(task), "test").num_classes == 3
    assert load_split(str(task), "test", num_classes=5).classes == ["a", "b", "c", "3", "4"]  # the caller's head


@pytest.mark.parametrize("line,message", [
    ("images/nothere.png 1", "image file not found"),
    ("images/train800_0.png", "malformed line"),
    ("images/train800_0.png one", "not an integer"),
    ("images/train800_0.png -1", "negative"),
    ("images/train800_0.png 7", "out of range for 3 classes"),
])
def test_vtab_bad_line_names_file_and_line(tmp_path, line, message):
    task = make_vtab(tmp_path / "task")
    lines = (task / "train800.txt").read_text().splitlines()
    lines.insert(2, line)
    (task / "train800.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as info:
        load_split(str(task), "train800", num_classes=3)
    assert "train800.txt:3" in str(info.value)


def test_vtab_skip_mode_warns_with_count_and_keeps_the_rest(tmp_path):
    task = make_vtab(tmp_path / "task")
    lines = (task / "train800.txt").read_text().splitlines()
    lines += ["images/missing.png 0", "garbage", "images/train800_0.png 9"]
    (task / "train800.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(DataWarning, match=r"skipped 3 bad lines in train800.txt") as rec:
        ds = load_split(str(task), "train800", num_classes=3, on_error="skip")
    assert len(rec) == 1
    assert "train800.txt:7" in str(rec[0].message)
    assert len(ds) == 6


def test_empty_or_all_bad_split_is_an_error(tmp_path):
    task = make_vtab(tmp_path / "task")
    (task / "val200.txt").write_text("bad\n")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="no usable samples"):
        load_split(str(task), "val200", on_error="skip")


def test_unreadable_image_lazily_and_with_verify(tmp_path):
    task = make_vtab(tmp_path / "task")
    (task / "images" / "test_1.png").write_bytes(b"this is not a png")
    ds = load_split(str(task), "test")  # listing is fine: the file exists
    ds[0]
    with pytest.raises(DataError, match=r"test_1\.png: cannot read image \(listed at .*test\.txt:2\)"):
        ds[1]
    with pytest.raises(DataError, match="test_1.png"):
        load_split(str(task), "test", verify=True)
    with pytest.warns(DataWarning, match="skipped 1 bad images"):
        ds = load_split(str(task), "test", verify=True, on_error="skip")
    assert len(ds) == 3


def test_truncated_image_is_unreadable(tmp_path):
    path = write_png(tmp_path / "a.png", 3, size=64)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot read image"):
        open_rgb(path)


def test_image_modes_become_rgb(tmp_path):
    grey = write_png(tmp_path / "g.png", 1, mode="L")
    img = open_rgb(grey)
    arr = np.asarray(img)
    assert img.mode == "RGB" and np.array_equal(arr[..., 0], arr[..., 2])
    assert np.array_equal(arr[..., 0], np.asarray(Image.open(grey)))

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, one half transparent, the rest fully transparent
    rgba[0, 1, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = np.asarray(open_rgb(tmp_path / "t.png")).astype(int)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[3, 3].tolist() == [255, 255, 255]  # composited on white, not black
    assert abs(out[0, 1, 0] - (200 * 128 + 255 * 127) / 255) <= 1 and abs(out[0, 1, 1] - 127) <= 1

    Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert np.asarray(open_rgb(tmp_path / "i16.png")).max() == 255

    rgb_key = Image.new("RGB", (3, 3), (1, 2, 3))
    rgb_key.putpixel((0, 0), (9, 9, 9))
    rgb_key.save(tmp_path / "k.png", transparency=(1, 2, 3))  # a transparent colour key in an RGB PNG
    keyed = np.asarray(open_rgb(tmp_path / "k.png"))
    assert keyed[1, 1].tolist() == [255, 255, 255] and keyed[0, 0].tolist() == [9, 9, 9]

    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.save(tmp_path / "p.png")
    assert np.asarray(open_rgb(tmp_path / "p.png"))[0, 0].tolist() == [10, 20, 30]


def test_verify_samples_returns_all_in_raise_mode(tmp_path):
    task = make_vtab(tmp_path / "task")
    ds = load_split(str(task), "train800")
    assert verify_samples(ds.samples) == ds.samples


# -- FGVC ------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_dir", ["images", "Images", ""])
def test_fgvc_layouts_and_label_mapping(tmp_path, image_dir):
    root = make_fgvc(tmp_path / "cub", image_dir=image_dir, first_label=1)
    assert resolve_spec(f"fgvc:{root}").kind == "fgvc"
    assert resolve_spec(str(root)).kind == "fgvc"  # auto-detected
    assert fgvc_image_root(root) == (root / image_dir if image_dir else root)
    assert fgvc_class_ids(root) == [1, 2, 3]
    assert num_classes(f"fgvc:{root}") == 3
    train = load_split(f"fgvc:{root}", "train800")
    assert len(train) == 6 and train.targets == [0, 1, 2, 0, 1, 2]  # 1-based json labels -> 0..C-1
    assert len(load_split(f"fgvc:{root}", "val200")) == 3
    assert len(load_split(f"fgvc:{root}", "train800val200")) == 9
    test = load_split(f"fgvc:{root}", "test")
    img, _ = test[0]
    assert img.mode == "RGB" and img.size == (14, 10)


def test_fgvc_bad_entries(tmp_path):
    root = make_fgvc(tmp_path / "cars", image_dir="")
    entries = json.loads((root / "test.json").read_text())
    entries["nope/missing.jpg"] = 1
    (root / "test.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"test.json entry 4 \('nope/missing.jpg'\): image file not found"):
        load_split(f"fgvc:{root}", "test")

    entries.pop("nope/missing.jpg")
    first = next(iter(entries))
    for bad, message in (("x", "not an integer"), (-2, "negative"), (True, "not an integer")):
        (root / "test.json").write_text(json.dumps({**entries, first: bad}))
        with pytest.raises(DataError, match=message):
            load_split(f"fgvc:{root}", "test")
    (root / "test.json").write_text(json.dumps({**entries, first: -2}))
    with pytest.warns(DataWarning, match="skipped 1 bad entries in test.json"):
        assert len(load_split(f"fgvc:{root}", "test", on_error="skip")) == 2

    (root / "test.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match="out of range for 2 classes"):
        load_split(f"fgvc:{root}", "test", num_classes=2)

    (root / "val.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="val.json: expected a json object"):
        load_split(f"fgvc:{root}", "val200")


# -- ImageFolder -----------------------------------------------------------------------------

def test_folder_seeded_split_is_disjoint_complete_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=10)
    spec = f"folder:{root}"
    assert class_names(spec) == ["cat", "dog"] and num_classes(spec) == 2
    parts = {s: load_split(spec, s) for s in ("train800", "val200", "test", "train800val200")}
    paths = {s: {x.path for x in ds.samples} for s, ds in parts.items()}
    assert [len(paths[s]) for s in ("train800", "val200", "test")] == [12, 4, 4]
    assert not paths["train800"] & paths["test"] and not paths["val200"] & paths["test"]
    assert paths["train800val200"] == paths["train800"] | paths["val200"]
    assert len(paths["train800"] | paths["val200"] | paths["test"]) == 20  # .txt files ignored, nothing lost
    assert sorted(parts["test"].targets) == [0, 0, 1, 1]  # stratified per class
    again = [s.path for s in folder_split(root, "test")]
    assert again == [s.path for s in parts["test"].samples]
    other_seed = {s.path for s in folder_split(root, "test", seed=1)}
    assert other_seed != paths["test"]


def test_folder_with_train_test_subfolders(tmp_path):
    make_folder(tmp_path / "ds" / "train", per_class=5)
    make_folder(tmp_path / "ds" / "test", per_class=2)
    spec = f"folder:{tmp_path / 'ds'}"
    assert len(load_split(spec, "test")) == 4
    assert len(load_split(spec, "train800")) == 8 and len(load_split(spec, "val200")) == 2
    make_folder(tmp_path / "ds" / "test", per_class=1, classes=("bird",))
    with pytest.raises(DataError, match="bird"):
        load_split(spec, "test")


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=5)
    (root / "bird").mkdir()
    (root / "bird" / "readme.txt").write_text("no images here")  # non-image files do not count
    with pytest.raises(DataError, match=r"bird.*holds no image files"):
        load_split(f"folder:{root}", "train800")
    make_folder(tmp_path / "ds" / "train", per_class=5)
    make_folder(tmp_path / "ds" / "test", per_class=2)
    (tmp_path / "ds" / "test" / "dog" / "00.png").unlink()
    (tmp_path / "ds" / "test" / "dog" / "01.png").unlink()
    assert len(load_split(f"folder:{tmp_path / 'ds'}", "train800")) == 8
    with pytest.raises(DataError, match=r"test/dog: class folder 'dog' holds no image files"):
        load_split(f"folder:{tmp_path / 'ds'}", "test")


# -- specs -----------------------------------------------------------------------------------

def test_spec_errors(tmp_path):
    with pytest.raises(DataError, match="not provisioned"):
        resolve_spec("mini-vtab/fashion_mnist", cache=tmp_path)
    with pytest.raises(DataError, match="no task 'nope'"):
        resolve_spec("mini-vtab/nope", cache=tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        resolve_spec(str(tmp_path / "missing"))
    make_folder(tmp_path / "plain", per_class=1)
    with pytest.raises(DataError, match="folder:<dir>"):
        resolve_spec(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="no train800.txt"):
        resolve_spec(f"vtab:{tmp_path / 'plain'}")
    with pytest.raises(ValueError, match="unknown split"):
        canonical_split("train1000")


def test_dataset_repr_and_classes():
    ds = ImageDataset([], classes=["a", "b"])
    assert len(ds) == 0 and ds.num_classes == 2 and "2 classes" in repr(ds)


def test_no_warning_when_input_is_clean(tmp_path):
    task = make_vtab(tmp_path / "task")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_split(str(task), "train800val200", on_error="skip", verify=True)


# -- data that would silently change the task ------------------------------------------------

def _append(file, *lines):
    file.write_text(file.read_text() + "".join(line + "\n" for line in lines))


def test_vtab_without_classes_file_a_label_gap_is_an_error_naming_the_line(tmp_path):
    task = make_vtab(tmp_path / "task", classes=3)
    assert num_classes(str(task)) == 3  # the labels present: 0..2
    write_png(task / "images" / "typo.png", 5)
    _append(task / "train800.txt", "images/typo.png 99")  # line 7: a typo for 0..2
    for call in (lambda: num_classes(str(task)), lambda: load_split(str(task), "test")):
        with pytest.raises(DataError, match=r"train800\.txt:7: label 99 leaves a gap.*3\.\.98 are not") as info:
            call()
        assert "classes.txt" in str(info.value)  # says what to fix
    # a label present only in test is a class never trained on: named by its line
    make_vtab(task, classes=3)  # rewrites the split files
    write_png(task / "images" / "extra.png", 7)
    _append(task / "test.txt", "images/extra.png 3")
    with pytest.raises(DataError, match=r"test\.txt:5: class '3' \(label 3\) has no sample in train800\.txt"):
        load_split(str(task), "train800")


def test_vtab_classes_file_entry_without_training_sample_is_an_error_naming_it(tmp_path):
    task = make_vtab(tmp_path / "task", classes=3)
    (task / "classes.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(DataError, match=r"classes\.txt:4: class 'd' \(label 3\) has no sample in train800\.txt, "
                                        r"val200\.txt, train800val200\.txt.*remove it from the class list"):
        load_split(str(task), "train800")
    with pytest.raises(DataError, match=r"classes\.txt:4: class 'd'"):
        num_classes(str(task))
    (task / "classes.txt").write_text("a\nb\n")  # too few names: labels 2 are out of range, as before
    with pytest.raises(DataError, match=r"train800\.txt:3: label 2 is out of range for 2 classes"):
        load_split(str(task), "train800")


def test_folder_class_symlinks_that_put_images_in_two_classes_are_errors_naming_them(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=5)
    (root / "all").symlink_to(root, target_is_directory=True)
    with pytest.raises(DataError, match=r"pets/all: class folder 'all' is a symlink to .*which is the data set"):
        load_split(f"folder:{root}", "train800")
    (root / "all").unlink()
    (root / "kitty").symlink_to(root / "cat", target_is_directory=True)
    with pytest.raises(DataError, match=r"pets/kitty: class folder 'kitty' is a symlink to .*cat, the same folder "
                                        r"as class folder 'cat'"):
        num_classes(f"folder:{root}")
    (root / "kitty").unlink()
    (root / "dog" / "sneaky.png").symlink_to(root / "cat" / "00.png")  # one image file in two classes
    with pytest.raises(DataError, match=r"dog/sneaky\.png: the same image as .*cat/00\.png.*class 'dog' and in "
                                        r"class 'cat'"):
        load_split(f"folder:{root}", "test")
    (root / "dog" / "sneaky.png").unlink()
    (root / "dog" / "sneaky.png").symlink_to(root / "dog" / "00.png")  # twice in one class: kept once
    with pytest.warns(DataWarning, match=r"1 images are the same file as another of their class"):
        assert sum(len(load_split(f"folder:{root}", s)) for s in ("train800", "val200", "test")) == 10
    (root / "dog" / "sneaky.png").unlink()
    split = tmp_path / "split"
    make_folder(split / "train", per_class=5)
    make_folder(split / "test", per_class=2)
    (split / "test" / "cat" / "copy.png").symlink_to(split / "train" / "cat" / "03.png")
    with pytest.warns(DataWarning, match=r"1 images of .*split/test/ are also in .*split/train/ \(train/test overlap"):
        load_split(f"folder:{split}", "train800")
    (root / "bird").mkdir()
    (root / "bird" / "notes.txt").write_text("only non-image files")
    (root / "bird" / "data.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"pets/bird: class folder 'bird' holds no image files"):
        load_split(f"folder:{root}", "train800")


def test_single_class_tasks_are_errors(tmp_path):
    task = make_vtab(tmp_path / "task", classes=1)  # every label 0, no classes.txt
    with pytest.raises(DataError, match=r"task \(no classes\.txt\): 1 class .*single-class task cannot be "
                                        r"trained/evaluated meaningfully"):
        load_split(str(task), "train800")
    (task / "classes.txt").write_text("only\n")
    with pytest.raises(DataError, match=r"classes\.txt: 1 class \('only' is the only class listed\); a single-class"):
        num_classes(str(task))
    root = make_folder(tmp_path / "pets", per_class=3, classes=("cat",))
    with pytest.raises(DataError, match=r"pets: 1 class \(the only class folder is 'cat'\); a single-class"):
        load_split(f"folder:{root}", "train800")
    cub = make_fgvc(tmp_path / "cub", classes=1)
    with pytest.raises(DataError, match=r"cub \(train/val/test\.json\): 1 class .*single-class"):
        num_classes(f"fgvc:{cub}")


def test_one_image_with_two_labels_is_an_error_naming_both_lines(tmp_path):
    task = make_vtab(tmp_path / "task")
    _append(task / "train800.txt", "images/train800_1.png 2")  # line 2 says 1
    with pytest.raises(DataError, match=r"train800\.txt:7: image .*train800_1\.png has label 2 here but label 1 at "
                                        r".*train800\.txt:2"):
        load_split(str(task), "test")
    make_vtab(task)
    _append(task / "test.txt", "images/./train800_2.png 0")  # the same image, spelt differently, label 2 in train
    with pytest.raises(DataError, match=r"test\.txt:5: image .*train800_2\.png has label 0 here but label 2 at "
                                        r".*train800\.txt:3"):
        load_split(str(task), "train800", on_error="skip")  # not something skipping can fix


def test_duplicate_lines_warn_with_count_and_train_test_overlap_warns(tmp_path):
    task = make_vtab(tmp_path / "task")
    _append(task / "train800.txt", "images/train800_0.png 0", "images/train800_0.png 0", "images/train800_3.png 0")
    with pytest.warns(DataWarning, match=r"train800\.txt: 3 duplicate entries .*train800\.txt:7 repeats "
                                         r".*train800\.txt:1"):
        ds = load_split(str(task), "train800")
    assert len(ds) == 6 and ds.samples[0].origin.endswith("train800.txt:1")  # the first kept
    make_vtab(task)
    _append(task / "test.txt", "images/train800_0.png 0", "images/val200_1.png 1")  # labels as in training
    with pytest.warns(DataWarning, match=r"2 images of test\.txt are also in train800\.txt/val200\.txt/"
                                         r"train800val200\.txt \(train/test overlap") as rec:
        load_split(str(task), "train800")
    assert "test.txt:5 = " in str(rec[0].message)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "file-symlink", "folder-symlink"])
def test_paths_leaving_the_task_folder_are_errors_naming_the_line(tmp_path, kind):
    task = make_vtab(tmp_path / "task")
    outside = write_png(tmp_path / "elsewhere" / "x.png", 9)
    rel = {"dotdot": "images/../../elsewhere/x.png", "absolute": str(task / "images" / "train800_0.png"),
           "file-symlink": "images/link.png", "folder-symlink": "ext/x.png"}[kind]
    (task / "images" / "link.png").symlink_to(outside)
    (task / "ext").symlink_to(outside.parent, target_is_directory=True)
    _append(task / "test.txt", f"{rel} 0")
    message = {"dotdot": "leaves the folder", "absolute": "absolute path", "file-symlink": "symlink resolving outside",
               "folder-symlink": "resolves outside"}[kind]
    with pytest.raises(DataError, match=rf"test\.txt:5: {message}|test\.txt:5: path .*{message}"):
        load_split(str(task), "test")
    with pytest.warns(DataWarning, match="skipped 1 bad lines in test.txt"):
        assert len(load_split(str(task), "test", on_error="skip")) == 4
    (task / "images" / "inside.png").symlink_to(task / "images" / "test_0.png")  # a link that stays inside: fine
    (task / "test.txt").write_text("images/inside.png 2\nimages/test_1.png 0\n")
    assert len(load_split(str(task), "test")) == 2


def test_byte_order_marks_are_ignored(tmp_path):
    task = make_vtab(tmp_path / "task")
    for name in ("train800.txt", "test.txt"):
        (task / name).write_bytes(b"\xef\xbb\xbf" + (task / name).read_bytes())
    (task / "classes.txt").write_bytes("\ufeffa\nb\nc\n".encode())
    assert class_names(str(task)) == ["a", "b", "c"]
    assert len(load_split(str(task), "train800")) == 6 and len(load_split(str(task), "test")) == 4
    root = make_fgvc(tmp_path / "cub")
    (root / "train.json").write_bytes(b"\xef\xbb\xbf" + (root / "train.json").read_bytes())
    assert len(load_split(f"fgvc:{root}", "train800")) == 6


def test_bad_lines_of_any_split_fail_when_the_data_set_is_opened(tmp_path):
    task = make_vtab(tmp_path / "task")
    (task / "images" / "test_3.png").unlink()
    for call in (lambda: num_classes(str(task)), lambda: load_split(str(task), "train800")):
        with pytest.raises(DataError, match=r"test\.txt:4: image file not found"):
            call()  # before any training, not at the final evaluation
    with pytest.warns(DataWarning, match="skipped 1 bad lines in test.txt"):
        assert len(load_split(str(task), "train800", on_error="skip")) == 6


def test_fgvc_duplicate_keys_classes_only_in_test_and_paths_outside(tmp_path):
    root = make_fgvc(tmp_path / "cars", image_dir="")
    text = (root / "val.json").read_text()
    key, value = next(iter(json.loads(text).items()))
    (root / "val.json").write_text(text[:-1] + f', "{key}": {value}}}')  # a repeated json key, same label
    with pytest.warns(DataWarning, match=r"val\.json: 1 duplicate entries .*val\.json entry 4"):
        assert len(load_split(f"fgvc:{root}", "val200")) == 3
    (root / "val.json").write_text(text[:-1] + f', "{key}": {value + 1}}}')
    with pytest.raises(DataError, match=r"val\.json entry 4 .*has label \d here but label \d at .*val\.json entry 1"):
        load_split(f"fgvc:{root}", "val200")
    (root / "val.json").write_text(text)
    entries = json.loads((root / "test.json").read_text())
    write_png(root / "new.cls" / "a.png", 1)
    (root / "test.json").write_text(json.dumps({**entries, "new.cls/a.png": 9}))
    with pytest.raises(DataError, match=r"test\.json entry 4 \('new.cls/a.png'\): class '9' \(label 3\) has no "
                                        r"sample in train\.json, val\.json"):
        load_split(f"fgvc:{root}", "train800")
    (root / "test.json").write_text(json.dumps({**entries, "../outside.jpg": 1}))
    with pytest.raises(DataError, match=r"test\.json entry 4 \('\.\./outside\.jpg'\): path .* leaves the folder"):
        load_split(f"fgvc:{root}", "test")
