"""The harder mini-VTAB tasks (sparseft.data.minivtab_extra) on small fake packages made here; no network."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from helpers import pin_fake_deb, write_deb
from PIL import Image

from sparseft import provision
from sparseft.data import DataError
from sparseft.data import minivtab_extra as mx
from sparseft.data.sources import SOURCES, source_file
from sparseft.data.tasks import fetch_suite
from sparseft.provision import Source


@pytest.fixture
def small_sizes(monkeypatch):
    monkeypatch.setattr(mx, "N_TRAIN", 40)
    monkeypatch.setattr(mx, "N_VAL", 10)
    monkeypatch.setattr(mx, "N_TEST", 30)


def _png(rng: np.random.Generator, size: int = 20) -> bytes:
    """A random RGBA sprite (opaque blob on transparency)."""
    rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((size, size)) < 0.7, 255, 0)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _check(data, names_by_split, groups_of, n_train=40, n_val=10):
    sizes = {k: len(v[1]) for k, v in data.splits.items()}
    assert sizes["train"] == n_train and sizes["val"] == n_val and sizes["test"] > 0
    pixels = {k: {np.asarray(img).tobytes() for img in v[0]} for k, v in data.splits.items()}
    assert sum(len(p) for p in pixels.values()) == sum(sizes.values())  # no image twice, in or across splits
    assert not (pixels["train"] & pixels["test"] or pixels["val"] & pixels["test"] or pixels["train"] & pixels["val"])
    if not names_by_split:
        return
    groups = {k: {groups_of[n] for n in names} for k, names in names_by_split.items()}
    assert not (groups["train"] & groups["test"] or groups["val"] & groups["test"] or groups["train"] & groups["val"])


# -- the split helpers ------------------------------------------------------------------------

def test_grouped_split_keeps_groups_whole_and_is_seeded(small_sizes):
    rng = np.random.default_rng(0)
    groups = [f"g{i // 3}" for i in range(300)]  # 100 groups of 3
    labels = [int(g[1:]) % 4 for g in groups]
    tr, va, te = mx.grouped_split(labels, groups, seed=0, salt="t")
    assert (len(tr), len(va), len(te)) == (40, 10, 30)
    sets = [{groups[i] for i in ix} for ix in (tr, va, te)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), mx.grouped_split(labels, groups, 0, "t")))
    assert not np.array_equal(tr, mx.grouped_split(labels, groups, 1, "t")[0])
    # groups spanning classes (one character in every font) are kept whole too
    mixed = mx.grouped_split([i % 4 for i in range(300)], [f"c{i // 4}" for i in range(300)], 0, "m")
    assert not {i // 4 for i in mixed[0]} & {i // 4 for i in mixed[2]}
    with pytest.raises(DataError, match="too few"):
        mx.grouped_split(labels[:50], groups[:50], 0, "t")
    del rng


def test_dedupe_drops_cross_class_copies_and_merges_groups():
    a, b, c = (Image.new("RGB", (2, 2), v) for v in ((0, 0, 0), (9, 9, 9), (5, 5, 5)))
    items = [mx.Item("1", 0, "x", a), mx.Item("2", 0, "y", a.copy()),  # same pixels, same class: kept once
             mx.Item("3", 0, "y", c),  # y's other image joins group x
             mx.Item("4", 0, "z", b), mx.Item("5", 1, "w", b.copy())]  # same pixels, two classes: both dropped
    kept, notes = mx.dedupe(items)
    assert [it.name for it in kept] == ["1", "3"] and {it.group for it in kept} == {"x"}
    assert notes == {"exact_duplicates_across_classes_dropped": 2, "exact_duplicates_within_class_dropped": 1}


# -- builders on fake packages ----------------------------------------------------------------

def _fake_wesnoth(path: Path) -> tuple[Path, dict[str, str]]:
    rng = np.random.default_rng(1)
    files, groups = {}, {}
    for race in ("drakes", "dwarves", "orcs"):
        for unit in range(8):
            for frame in range(5):
                name = f"{mx.WESNOTH_ROOT}units/{race}/u{unit}-attack-{frame}.png"
                files[name] = _png(rng)
                groups[name] = f"{race}/u{unit}"
    files[mx.WESNOTH_ROOT + "units/trolls/big.png"] = _png(rng)  # not a class of the task
    return write_deb(path, files), groups


def test_wesnoth_units_builder_splits_by_unit(tmp_path, small_sizes):
    deb, groups = _fake_wesnoth(tmp_path / "w.deb")
    assert mx.unit_label_group(mx.WESNOTH_ROOT + "units/elves-wood/archer+female-bow-2.png") == (3, "elves-wood/archer")
    assert mx.unit_label_group(mx.WESNOTH_ROOT + "units/dwarves/thunderer/a-1.png") == (2, "dwarves/thunderer")
    data = mx._build_wesnoth_units({"wesnoth": deb}, seed=0)
    assert data.classes == list(mx.UNIT_CLASSES)
    assert data.notes["pool_images"] == 120 and data.notes["pool_groups"] == 24
    assert set(data.splits["train"][1]) <= {mx.UNIT_CLASSES.index(r) for r in ("drakes", "dwarves", "orcs")}
    # map each written image back to its member to check the groups
    m = mx.read_members(deb, lambda n: n in groups)
    by_pixels = {np.asarray(mx.render_clipart(raw, mx.WESNOTH_SIZE)).tobytes(): n for n, raw in m.items()}
    names = {k: [by_pixels[np.asarray(img).tobytes()] for img in v[0]] for k, v in data.splits.items()}
    _check(data, names, groups)
    for split, (images, labels) in data.splits.items():
        assert all(img.size == (72, 72) for img in images)
        assert [mx.UNIT_CLASSES.index(n.split("/")[-2]) for n in names[split]] == list(labels)


def test_emoji_builder_uses_the_index_categories_and_skips_skin_tones(tmp_path, small_sizes):
    rng = np.random.default_rng(2)
    index, files = {}, {}
    for i in range(100):
        code = f"1f{300 + i:03x}"
        index[f"e{i}"] = {"unicode": code.upper(), "category": ("food", "flags", "travel")[i % 3]}
        files[f"{mx.EMOJI_ROOT}assets/png/{code.upper()}.png"] = _png(rng, 64)
    index["tone"] = {"unicode": "1F300-1F3FB", "category": "food"}
    files[f"{mx.EMOJI_ROOT}assets/png/1F300-1F3FB.png"] = _png(rng, 64)
    index["mod"] = {"unicode": "1F3FB", "category": "modifier"}
    files[f"{mx.EMOJI_ROOT}config/index.json"] = json.dumps(index).encode()
    deb = write_deb(tmp_path / "e.deb", files)
    data = mx._build_emoji({"emojione": deb}, seed=0)
    assert data.notes["pool_images"] == 100  # the skin-tone variant and the modifier are left out
    assert {k: len(v[1]) for k, v in data.splits.items()} == {"train": 40, "val": 10, "test": 30}
    assert {data.classes[y] for y in data.splits["test"][1]} <= {"food", "flags", "travel"}
    _check(data, {}, {})  # one image per emoji: no image in two splits


def test_urw_fonts_builder_keeps_each_character_in_one_split(tmp_path, small_sizes, monkeypatch):
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    families = {"DejaVuSans": ("", "-Bold", "-Oblique", "-BoldOblique"),
                "DejaVuSerif": ("", "-Bold", "-Italic", "-BoldItalic"),
                "DejaVuSansMono": ("", "-Bold", "-Oblique", "-BoldOblique")}
    files = {f"{mx.URW_ROOT}{fam}{sfx or '-Regular'}.otf": (ttf / f"{fam}{sfx}.ttf").read_bytes()
             for fam, sfxs in families.items() for sfx in sfxs}
    deb = write_deb(tmp_path / "f.deb", files)
    monkeypatch.setattr(mx, "FONT_CLASSES", tuple(families))
    monkeypatch.setattr(mx, "GLYPH_RANGES", ((0x41, 0x5A), (0x391, 0x3A9)))  # A-Z, Greek capitals
    data = mx._build_urw_fonts({"urw": deb}, seed=0)
    assert data.classes == list(families)
    # Latin A and Greek Alpha render alike in a font: merged into one group, so one split
    assert data.notes["exact_duplicates_within_class_dropped"] > 0
    assert all(img.size == (32, 32) for img in data.splits["test"][0])
    assert {k: len(v[1]) for k, v in data.splits.items()} == {"train": 40, "val": 10, "test": 30}
    _check(data, {}, {})  # pixel-level: no glyph image in two splits
    with pytest.raises(DataError, match="expected 4 styles"):
        mx._build_urw_fonts({"urw": write_deb(tmp_path / "g.deb", dict(list(files.items())[:5]))}, seed=0)


def test_fetch_builds_oxygen_from_a_pinned_fake_deb_and_refuses_a_wrong_hash(tmp_path, monkeypatch, small_sizes):
    rng = np.random.default_rng(3)
    files = {f"{mx.OXYGEN_ROOT}{size}/{ctx}/icon{i}.png": _png(rng, int(size.split("x")[0]))
             for ctx in mx.ICON_CLASSES for i in range(12) for size in ("22x22", "48x48")}
    files[mx.OXYGEN_ROOT + "16x16/apps/icon0.png"] = _png(rng, 16)  # a size not used
    cache = tmp_path / "cache"
    deb = pin_fake_deb(cache, monkeypatch, "oxygen", files)
    src = SOURCES["oxygen"]
    root = fetch_suite("mini-vtab", ["oxygen_icons"], cache, progress=False)
    info = json.loads((root / "oxygen_icons" / "info.json").read_text())
    assert info["splits"] == {"train800": 40, "val200": 10, "train800val200": 50, "test": 30}
    assert info["notes"]["pool_images"] == 144 and info["notes"]["pool_groups"] == 72
    assert info["image_sizes"] == ["48x48"]

    # a package file that does not match the pinned sha256 is refused, and nothing is kept
    monkeypatch.setitem(SOURCES, "oxygen", Source(src.package, src.version, "deb", src.licence, sha256="0" * 64))
    monkeypatch.setattr(provision, "download", lambda s, dest, **k: (dest / "x.deb").write_bytes(deb.read_bytes())
                        and dest / "x.deb")
    with pytest.raises(DataError, match="fails verification"):
        source_file("oxygen", cache, progress=False)


def test_the_extra_tasks_are_in_mini_vtab():
    from sparseft.data.tasks import list_tasks

    names = [t.name for t in list_tasks("mini-vtab")]
    assert names[:7] == ["fashion_mnist", "mnist5k", "animal_mnist", "elpv", "digits", "textures", "clipart"]
    assert set(names[7:12]) == {"wesnoth_units", "oxygen_icons", "emoji", "noto_emoji", "urw_fonts"}  # then _more
    assert all(SOURCES[k].sha256 for t in mx.EXTRA_TASKS for k in t.sources)
