"""Segmentation data: the images/ + masks/ loader, its bad-input errors, joint augmentation, and the
offline mini-seg builder on fake package files (no network)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_deb
from PIL import Image

from sparseft.data import DataError, class_names, load_split, miniseg, nuclei, resolve_spec
from sparseft.data.miniseg import BACKGROUND_COLUMNS, BACKGROUNDS, CATEGORIES, SCENE_CLASSES
from sparseft.data.segmentation import (
    IGNORE_INDEX,
    SegTransform,
    load_segmentation,
    read_seg_split,
    segmentation_classes,
)
from sparseft.data.sources import SOURCES
from sparseft.data.tasks import fetch_suite
from sparseft.fileutil import sha256_file
from sparseft.provision import Source

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _save(path: Path, arr: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("P", arr.shape[::-1], arr.tobytes()) if mode == "P" else Image.fromarray(arr)
    if mode == "P":
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(path, **kwargs)
    return path


def _image(h: int = 10, w: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _square(h: int = 10, w: int = 12, value: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[2:7, 3:9] = value
    return mask


def binary_folder(root: Path) -> Path:
    """Binary masks: a 0/255 PNG and a noisy JPEG (for a JPEG image), as Kvasir-SEG ships them."""
    _save(root / "images" / "a.png", _image())
    _save(root / "masks" / "a.png", _square())
    _save(root / "images" / "b.jpg", _image(40, 48, 1), quality=95)
    big = np.zeros((40, 48), dtype=np.uint8)
    big[8:30, 10:40] = 255
    _save(root / "masks" / "b.jpg", big, quality=70)
    (root / "train800.txt").write_text("a\nb\n\n")
    (root / "test.txt").write_text("b\n")
    return root


def multiclass_folder(root: Path) -> Path:
    """Index masks (mode L and mode P) with classes.txt and a 255 (ignore) pixel."""
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    first = _square(value=1)
    first[0, 0] = IGNORE_INDEX
    second = _square(value=2)
    second[5:, :2] = 1
    _save(root / "images" / "x.png", _image())
    _save(root / "masks" / "x.png", first)
    _save(root / "images" / "y.jpeg", _image(seed=3))
    _save(root / "masks" / "y.png", second, mode="P")
    (root / "train800.txt").write_text("x\ny\n")
    return root


# -- the loader ------------------------------------------------------------------------------

def test_binary_masks_are_thresholded_at_127(tmp_path):
    root = binary_folder(tmp_path)
    assert segmentation_classes(root) == (["background", "foreground"], True)
    assert segmentation_classes(root).num_classes == 2
    ds = load_segmentation(root, "train", verify=True)  # alias of train800
    assert len(ds) == 2 and ds.classes == ["background", "foreground"] and ds.ignore_index == 255
    image, mask = ds[0]
    assert image.mode == "RGB" and mask.dtype == np.uint8
    assert np.array_equal(mask, _square() // 255)
    _, noisy = ds[1]
    with Image.open(root / "masks" / "b.jpg") as jpeg:
        raw = np.asarray(jpeg.convert("L"))
    assert set(np.unique(raw)) - {0, 255}  # the JPEG really is noisy
    expected = np.zeros((40, 48), dtype=np.uint8)
    expected[8:30, 10:40] = 1
    assert np.array_equal(noisy, expected)


def test_index_masks_with_classes_txt_and_ignore_pixels(tmp_path):
    root = multiclass_folder(tmp_path)
    classes = segmentation_classes(root)
    assert classes.names == ["background", "cat", "dog"] and classes.num_classes == 3 and not classes.binary
    ds = load_segmentation(root, "train800", SegTransform(12, MEAN, STD, train=False, native_mask=False))
    x, y = ds[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32
    assert y.shape == (12, 12) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) == {0, 1, IGNORE_INDEX}  # nearest: no new values, 255 kept
    native = load_segmentation(root, "train800", SegTransform(12, MEAN, STD, train=False))  # evaluation's default
    x, y = native[0]
    raw = np.asarray(Image.open(native.samples[0].mask))
    assert x.shape == (3, 12, 12) and torch.equal(y, torch.from_numpy(raw.astype(np.int64)))  # the mask untouched
    _, y2 = ds[1]  # a palette PNG: the pixel values are the class ids, not the palette colours
    assert set(torch.unique(y2).tolist()) == {0, 1, 2}
    assert class_names(str(root)) == ["background", "cat", "dog"]
    assert resolve_spec(str(root)).kind == "seg" and resolve_spec(f"seg:{root}").kind == "seg"
    with pytest.raises(DataError, match="load_segmentation"):
        load_split(str(root), "train800")


def _expect(root: Path, split: str, pattern: str, verify: bool = True) -> None:
    with pytest.raises(DataError, match=pattern):
        load_segmentation(root, split, verify=verify)


def test_a_stem_without_image_or_mask_names_the_split_line(tmp_path):
    root = binary_folder(tmp_path)
    (root / "test.txt").write_text("b\nnope\n")
    _expect(root, "test", r"test\.txt:2: no image for stem 'nope'.*images/nope\.png")
    (root / "masks" / "b.jpg").unlink()
    _expect(root, "test", r"test\.txt:1: no mask for stem 'b'.*masks/b\.png")


def test_a_mask_of_another_size_names_the_mask(tmp_path):
    root = binary_folder(tmp_path)
    _save(root / "masks" / "a.png", _square(9, 12))
    _expect(root, "train800", r"masks/a\.png: mask is 12x9 but its image a\.png is 12x10")


def test_mask_values_outside_the_classes_name_the_value_and_file(tmp_path):
    root = multiclass_folder(tmp_path)
    bad = _square(value=2)
    bad[8, 4] = 7
    bad[9, 1] = 5
    _save(root / "masks" / "y.png", bad)
    _expect(root, "train800", r"masks/y\.png: mask value 5 \(first at x=1, y=9\) is not a class.*0\.\.2")
    _save(root / "masks" / "y.png", np.dstack([bad] * 3))
    _expect(root, "train800", r"masks/y\.png: index masks must be single-channel.*mode RGB")


def test_unreadable_image_or_mask_names_the_file(tmp_path):
    root = binary_folder(tmp_path)
    (root / "images" / "a.png").write_bytes(b"not a png")
    _expect(root, "train800", r"images/a\.png: cannot read image \(listed at .*train800\.txt:1\)")
    ds = load_segmentation(root, "test")  # lazily too
    (root / "masks" / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"masks/b\.jpg: cannot read mask"):
        ds[0]


def test_bad_split_files_are_errors_naming_them(tmp_path):
    root = binary_folder(tmp_path)
    (root / "val200.txt").write_text("\n \n")
    _expect(root, "val200", r"val200\.txt: empty split list", verify=False)
    (root / "val200.txt").write_text("a\nb\na\n")
    _expect(root, "val", r"val200\.txt:3: stem 'a' is listed twice \(also line 1\)", verify=False)
    (root / "val200.txt").write_text("../a\n")
    _expect(root, "val", r"val200\.txt:1: '\.\./a' is not a file stem", verify=False)
    _expect(root, "custom", r"custom\.txt: split file not found", verify=False)
    _save(root / "images" / "a.jpg", _image())
    _expect(root, "train800", r"train800\.txt:1: stem 'a' has 2 image files \(a\.jpg, a\.png", verify=False)


def test_binary_mask_saved_as_0_1_and_bad_class_lists_are_refused(tmp_path):
    root = binary_folder(tmp_path)
    _save(root / "masks" / "a.png", _square(value=1))
    _expect(root, "train800", r"masks/a\.png: binary mask holds only 0 and 1")
    (root / "classes.txt").write_text("background\n")
    with pytest.raises(DataError, match=r"classes\.txt: 1 classes"):
        segmentation_classes(root)
    (root / "classes.txt").write_text("background\npolyp\npolyp\n")
    with pytest.raises(DataError, match=r"classes\.txt:3: class 'polyp' is listed twice"):
        segmentation_classes(root)


def test_palette_binary_masks_are_read_by_index_and_an_empty_split_is_refused(tmp_path):
    root = binary_folder(tmp_path)
    mask = _square(value=1)  # palette index 1, whose colour (1, 254, 0) converts to a grey above 127 ...
    _save(root / "masks" / "a.png", mask, mode="P")
    with Image.open(root / "masks" / "a.png") as img:
        img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # ... and VOC's dark red (grey 38) would read as background
        img.save(root / "masks" / "a.png")
    got = load_segmentation(root, "train800", verify=True)[0][1]
    assert np.array_equal(got, (mask > 0).astype(np.uint8))
    _save(root / "masks" / "a.png", _square(value=3), mode="P")
    _expect(root, "train800", r"masks/a\.png: palette mask with indices \[0, 3\]")
    _save(root / "masks" / "a.png", np.zeros((10, 12), dtype=np.uint8))
    (root / "empty.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"empty\.txt: every mask of this split \(1 image, first masks/a\.png\) holds "
                                        r"only background, no pixel of 'foreground'"):
        load_segmentation(root, "empty", verify=True)


def test_index_masks_must_be_lossless(tmp_path):
    root = binary_folder(tmp_path)
    (root / "classes.txt").write_text("background\npolyp\n")
    (root / "only_b.txt").write_text("b\n")  # b's mask is a JPEG
    with pytest.raises(DataError, match=r"masks/b\.jpg: index masks must be lossless"):
        load_segmentation(root, "only_b", verify=True)


def test_any_named_split_file_works(tmp_path):
    root = binary_folder(tmp_path)
    (root / "fold1.txt").write_text("b\n")
    assert [s.image.name for s in read_seg_split(root, "fold1")] == ["b.jpg"]


# -- joint augmentation ----------------------------------------------------------------------

COLOURS = {1: (255, 0, 0), 2: (0, 0, 255)}


def _coloured_scene() -> tuple[Image.Image, np.ndarray]:
    """Black 64x48 image; a red square (class 1, its left edge void) and a blue bar (class 2),
    off-centre so flips show."""
    img = np.zeros((48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), dtype=np.uint8)
    for cls, (top, left, h, w) in ((1, (6, 4, 20, 22)), (2, (20, 40, 24, 10))):
        img[top:top + h, left:left + w] = COLOURS[cls]
        mask[top:top + h, left:left + w] = cls
    mask[6:26, 4:6] = IGNORE_INDEX  # a void strip on the red square's left edge, VOC style
    return Image.fromarray(img), mask


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 8 neighbours have their class: away from every edge bilinear blending touches
    (the border too: the crop's edge may cut right next to an object edge)."""
    m = np.pad(mask.astype(np.int64), 1, constant_values=-1)
    same = np.ones(mask.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= m[1 + dy:1 + dy + mask.shape[0], 1 + dx:1 + dx + mask.shape[1]] == mask
    return same


def test_crop_and_flip_keep_image_and_mask_aligned():
    image, mask = _coloured_scene()
    tf = SegTransform((32, 40), MEAN, STD, train=True)
    flips, boxes = set(), set()
    for seed in range(40):
        x, y = tf(image, mask, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 32, 40) and y.shape == (32, 40) and y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) <= {0, 1, 2, IGNORE_INDEX}  # nearest: ids never blended
        rgb = (x.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)) * 255
        inner = _interior(y.numpy())
        for cls, colour in COLOURS.items():
            sel = inner & (y.numpy() == cls)
            assert np.abs(rgb[sel] - colour).max(initial=0) < 1.0, (seed, cls)
        sel = inner & (y.numpy() == 0)
        assert np.abs(rgb[sel]).max(initial=0) < 1.0, seed
        red = y.numpy() == 1
        if red.any():  # the red square is left of the blue bar unless mirrored
            flips.add(bool(np.nonzero(red)[1].mean() > 20))
        boxes.add(tuple(torch.round(x[:, :3, :3].sum(dim=(1, 2)) * 1e3).tolist()) + (int(red.sum()),))
    assert flips == {True, False} and len(boxes) > 20


def test_augmentation_is_deterministic_for_a_seed(tmp_path):
    image, mask = _coloured_scene()
    tf = SegTransform(32, MEAN, STD, train=True)
    a = tf(image, mask, torch.Generator().manual_seed(5))
    b = tf(image, mask, torch.Generator().manual_seed(5))
    c = tf(image, mask, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    root = multiclass_folder(tmp_path)
    ds = load_segmentation(root, "train800", tf, seed=3)
    first = ds[1]
    assert all(torch.equal(p, q) for p, q in zip(first, ds[1]))  # same item, same epoch: same draw
    ds.set_epoch(1)
    assert not torch.equal(first[0], ds[1][0])
    again = load_segmentation(root, "train800", tf, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(first, again[1]))
    # training moves the data set to each epoch: new crops every epoch, the same under any process count
    from sparseft.train import TrainConfig, fit

    epochs = []
    again.set_epoch = epochs.append
    loader = torch.utils.data.DataLoader(again, batch_size=4)
    fit(torch.nn.Conv2d(3, 4, 1), loader, TrainConfig(epochs=2, lr=1e-3, progress=False))
    assert epochs == [0, 1]


def test_evaluation_only_resizes():
    image, mask = _coloured_scene()
    config = {"input_size": (3, 24, 32), "mean": MEAN, "std": STD}
    x, y = SegTransform.from_config(config, train=False)(image, mask)
    assert x.shape == (3, 24, 32)
    assert torch.equal(y, torch.from_numpy(mask.astype(np.int64)))  # scored at the data's own size
    x, y = SegTransform(config["input_size"][1:], MEAN, STD, train=False, native_mask=False)(image, mask)
    assert torch.equal(y, torch.from_numpy(np.asarray(Image.fromarray(mask).resize((32, 24), Image.NEAREST),
                                                      dtype=np.int64)))
    with pytest.raises(ValueError, match="native_mask"):
        SegTransform(24, MEAN, STD, train=True, native_mask=True)


def test_masks_of_different_sizes_are_collated_as_a_list():
    from sparseft.data.segmentation import collate_pairs

    same = collate_pairs([(torch.zeros(3, 8, 8), torch.zeros(5, 6, dtype=torch.long))] * 2)
    assert same[0].shape == (2, 3, 8, 8) and same[1].shape == (2, 5, 6)
    mixed = collate_pairs([(torch.zeros(3, 8, 8), torch.zeros(5, 6, dtype=torch.long)),
                           (torch.zeros(3, 8, 8), torch.ones(7, 4, dtype=torch.long))])
    assert mixed[0].shape == (2, 3, 8, 8) and [tuple(m.shape) for m in mixed[1]] == [(5, 6), (7, 4)]


# -- mini-seg on fake package files ----------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _drawing(rng: np.random.Generator, mode: str = "RGBA") -> bytes:
    """A random-coloured ellipse on a transparent canvas of random size."""
    w, h = (int(v) for v in rng.integers(24, 90, 2))
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (h / 2.4)) ** 2 + ((xx - w / 2) / (w / 2.4)) ** 2 <= 1
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = rng.integers(0, 256, 3, dtype=np.uint8)
    rgba[..., 3] = np.where(inside, 255, 0)
    img = Image.fromarray(rgba)
    return _png(img.convert("LA") if mode == "LA" else img)


def _fake_openclipart(path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = "usr/share/openclipart/png/"
    files = {}
    for cls in CATEGORIES:
        for i in range(6):
            files[f"{root}{cls}/sub/d{i}.png"] = _drawing(rng, "LA" if i == 5 else "RGBA")
    files[f"{root}food/no_alpha.png"] = _png(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))
    files[f"{root}food/opaque.png"] = _png(Image.new("RGBA", (20, 20), (10, 20, 30, 255)))
    files[f"{root}tools/broken.png"] = b"\x89PNG broken"
    files[f"{root}computer/not_a_class.png"] = _drawing(rng)
    links = {f"{root}animals/copy_of_d0.png": "sub/d0.png"}
    return write_deb(path, files, links)


def _fake_skimage(path: Path) -> dict[str, str]:
    rng = np.random.default_rng(1)
    members = {}
    with zipfile.ZipFile(path, "w") as zf:
        for name in BACKGROUNDS:
            buf = io.BytesIO()
            shape = (70, 90, 3) if name.endswith(".jpg") else (60, 80)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                buf, format="JPEG" if name.endswith(".jpg") else "PNG")
            zf.writestr(f"skimage/data/{name}", buf.getvalue())
            members[f"skimage/data/{name}"] = hashlib.sha256(buf.getvalue()).hexdigest()
    return members


def _fake_stardist(path: Path) -> dict[str, str]:
    """A 16-bit nuclei image (bright discs on a dark ground, left half brighter) and its instance mask."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:96, :120]
    image = rng.integers(0, 20, (96, 120)).astype(np.uint16)
    mask = np.zeros((96, 120), dtype=np.uint16)
    for label in range(1, 13):
        cy, cx = rng.integers(6, 90), rng.integers(6, 114)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
        mask[disc], image[disc] = label, 150 + 20 * (cx < 60)
    members = {}
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in (("img2d", image), ("mask2d", mask)):
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, format="TIFF")
            zf.writestr(f"stardist/data/images/{name}.tif", buf.getvalue())
            members[f"stardist/data/images/{name}.tif"] = hashlib.sha256(buf.getvalue()).hexdigest()
    return members


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    """A cache holding a fake openclipart-png .deb, a fake scikit-image wheel and a fake stardist wheel, each
    pinned by its own hashes."""
    cache = tmp_path / "cache"
    clip, sk, sd = SOURCES["openclipart"], SOURCES["skimage"], SOURCES["stardist"]
    for src in (clip, sk, sd):
        (cache / "data" / "sources" / src.key).mkdir(parents=True)
    deb = _fake_openclipart(cache / "data" / "sources" / clip.key / "fake.deb")
    members = _fake_skimage(cache / "data" / "sources" / sk.key / "fake.whl")
    monkeypatch.setitem(SOURCES, "stardist", Source(sd.package, sd.version, "pypi", sd.licence, members=_fake_stardist(
        cache / "data" / "sources" / sd.key / "fake.whl")))
    monkeypatch.setattr(nuclei, "N_TRAIN", 12)
    monkeypatch.setattr(nuclei, "N_VAL", 4)
    monkeypatch.setattr(nuclei, "N_TEST", 6)
    monkeypatch.setitem(SOURCES, "openclipart", Source(clip.package, clip.version, "deb", clip.licence,
                                                       sha256=sha256_file(deb), pool_path=clip.pool_path))
    monkeypatch.setitem(SOURCES, "skimage", Source(sk.package, sk.version, "pypi", sk.licence, members=members))
    monkeypatch.setattr(miniseg, "N_TRAINVAL", 20)
    monkeypatch.setattr(miniseg, "N_TEST", 10)
    return cache


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mini_seg_builds_from_the_package_files(fake_sources):
    root = fetch_suite("mini-seg", None, fake_sources, progress=False) / "clipart-scenes"
    info = json.loads((root / "info.json").read_text())
    assert info["splits"] == {"train800": 16, "val200": 4, "train800val200": 20, "test": 10}
    assert info["kind"] == "segmentation" and info["image_sizes"] == ["128x128"]
    assert info["notes"]["skipped_no_alpha"] == 1 and info["notes"]["skipped_opaque"] == 1
    assert info["notes"]["skipped_unreadable"] == 1 and info["notes"]["duplicates_within_class_dropped"] == 1
    assert (root / "classes.txt").read_text().split() == list(SCENE_CLASSES)
    assert class_names("mini-seg/clipart-scenes", fake_sources) == list(SCENE_CLASSES)
    lists = {s: (root / f"{s}.txt").read_text().split() for s in ("train800", "val200", "train800val200", "test")}
    assert lists["train800val200"] == lists["train800"] + lists["val200"]
    assert not set(lists["train800val200"]) & set(lists["test"])
    ds = load_segmentation("mini-seg/clipart-scenes", "train800val200", cache=fake_sources, verify=True)
    assert ds.num_classes == 8 and len(ds) == 20
    seen = set()
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.size == (128, 128) and mask.shape == (128, 128)
        assert mask.max() < 8 and (mask > 0).any()
        seen |= set(np.unique(mask).tolist())
        with Image.open(ds.samples[i].mask) as stored:
            assert stored.mode == "P"  # index PNG
    assert len(seen) >= 5


def test_mini_seg_test_drawings_are_never_used_in_train_or_val(fake_sources):
    root = fetch_suite("mini-seg", None, fake_sources, progress=False) / "clipart-scenes"
    rows = [line.split("\t") for line in (root / "objects.tsv").read_text().splitlines()[1:]]
    test = {r[2] for r in rows if r[0].startswith("test_")}
    trainval = {r[2] for r in rows if r[0].startswith("trainval_")}
    assert test and trainval and not test & trainval
    assert {r[1] for r in rows} <= set(CATEGORIES)
    notes = json.loads((root / "info.json").read_text())["notes"]
    assert notes["drawings_animals"] == {"test": 2, "trainval": 4}


def test_mini_seg_rebuilds_byte_identically(fake_sources, tmp_path):
    first = _files(fetch_suite("mini-seg", None, fake_sources, progress=False))
    again = _files(fetch_suite("mini-seg", None, fake_sources, force=True, progress=False))
    assert first == again
    assert {k.split("/")[0] for k in first if "/masks/" in k} == {"clipart-scenes", "nuclei"}


def test_nuclei_crops_come_from_disjoint_parts_and_keep_image_and_mask_aligned(fake_sources):
    root = fetch_suite("mini-seg", ["nuclei"], fake_sources, progress=False) / "nuclei"
    info = json.loads((root / "info.json").read_text())
    assert info["splits"] == {"train800": 12, "val200": 4, "train800val200": 16, "test": 6}
    assert info["classes"] == ["background", "nucleus"]
    ds = load_segmentation("mini-seg/nuclei", "train800val200", cache=fake_sources, verify=True)
    assert ds.num_classes == 2
    inside, outside = [], []
    for i in range(len(ds)):
        image, mask = ds[i]
        pixels = np.asarray(image)[..., 0]
        assert image.size == (128, 128) and set(np.unique(mask)) <= {0, 1}
        if mask.any():
            inside.append(pixels[mask == 1].mean())
        outside.append(pixels[mask == 0].mean())
    assert inside and min(inside) > 100 > max(outside)  # the discs are bright where the mask says
    rows = [line.split("\t") for line in (root / "objects.tsv").read_text().splitlines()[1:]]
    w, h = 120, 96
    for stem, x, y, side, _, _ in rows:  # each crop inside its part (test pixels never in train or val)
        x0, x1, y0, y1 = nuclei.PARTS[stem.split("_")[0]]
        x, y, side = int(x), int(y), int(side)
        assert round(x0 * w) <= x and x + side <= round(x1 * w) and round(y0 * h) <= y and y + side <= round(y1 * h)


def test_background_crops_stay_in_their_columns():
    photo = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (100, 1))).convert("RGB")  # value = column
    rng = np.random.default_rng(0)
    for split, (lo, hi) in BACKGROUND_COLUMNS.items():
        for _ in range(30):
            crop = np.asarray(miniseg.background(photo, split, rng.random(4), size=32))[..., 0]
            assert lo * 200 - 3 <= crop.min() and crop.max() <= hi * 200 + 3


def test_real_mini_seg_smoke():
    from sparseft.data.tasks import is_complete, suite_dir

    if not is_complete(suite_dir("mini-seg") / "clipart-scenes"):
        pytest.skip("mini-seg/clipart-scenes not provisioned (sparseft data fetch mini-seg)")
    ds = load_segmentation("mini-seg/clipart-scenes", "test", SegTransform(64, MEAN, STD, train=False))
    assert len(ds) == 600 and ds.num_classes == 8
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and y.shape == (128, 128) and int(y.max()) < 8  # masks at the data's size
    assert len(load_segmentation("mini-seg/clipart-scenes", "train800")) == 800
    if is_complete(suite_dir("mini-seg") / "nuclei"):
        ds = load_segmentation("mini-seg/nuclei", "test", verify=True)
        share = np.mean([ds[i][1].mean() for i in range(0, len(ds), 10)])
        assert len(ds) == 300 and ds.num_classes == 2 and 0.1 < share < 0.35  # nuclei cover ~20 %
