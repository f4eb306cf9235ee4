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
from sparseft.data.layouts import canonical_split, fgvc_class_ids, fgvc_image_root, folder_split, read_split_file

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
    (task / "classes.txt").write_text("a\nb\nc\nd\n")
    assert class_names(str(task)) == ["a", "b", "c", "d"]
    assert load_split(str(task), "test").num_classes == 4


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
