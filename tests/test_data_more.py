"""The mini-VTAB tasks of sparseft.data.minivtab_more on small fake packages made here; no network."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import pin_fake_deb, write_deb
from PIL import Image

from sparseft.data import DataError
from sparseft.data import minivtab_extra as mx
from sparseft.data import minivtab_more as mm
from sparseft.data.sources import SOURCES
from sparseft.data.tasks import fetch_suite, list_tasks


@pytest.fixture
def small_sizes(monkeypatch):
    monkeypatch.setattr(mx, "N_TRAIN", 40)
    monkeypatch.setattr(mx, "N_VAL", 10)
    monkeypatch.setattr(mx, "N_TEST", 30)


def _png(rng: np.random.Generator, w: int, h: int, opaque: float = 1.0) -> bytes:
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((h, w)) < opaque, 255, 0)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _splits_disjoint(data) -> None:
    pixels = {k: {np.asarray(img).tobytes() for img in v[0]} for k, v in data.splits.items()}
    assert sum(len(p) for p in pixels.values()) == sum(len(v[1]) for v in data.splits.values())


def _ruleset(groups: str, flag: str, alt: str = "-") -> bytes:
    return f'[nation_x]\nname=_("X")\ngroups={groups}\nflag="{flag}"\nflag_alt = "{alt}"\n'.encode()


# -- civ_flags ------------------------------------------------------------------------------------

def _fake_freeciv(path, rng):
    nation, flags = mm.FREECIV_ROOT + "nation/", mm.FREECIV_ROOT + "flags/"
    files = {}
    for i in range(60):
        continent = ("African", "Asian", "European")[i % 3]
        alt = f"n{i}_old" if i % 10 == 0 else "-"
        files[f"{nation}n{i}.ruleset"] = _ruleset(f'"Modern", "{continent}"', f"n{i}", alt)
        for f in [f"n{i}"] + ([alt] if alt != "-" else []):
            for v, (w, h) in zip(mm.FLAG_VARIANTS, ((29, 20), (44, 30), (14, 14), (19, 19))):
                files[f"{flags}{f}{v}.png"] = _png(rng, w, h)
    files[nation + "two.ruleset"] = _ruleset('"European", "Asian"', "two")  # two continents: left out
    files[nation + "shared.ruleset"] = _ruleset('"American"', "n1")  # n1 is Asian's too: left out
    files[nation + "nocontinent.ruleset"] = _ruleset('"Imaginary"', "n2")
    files[nation + "noflag.ruleset"] = _ruleset('"African"', "gone")  # no flag images
    return write_deb(path, files)


def test_nation_flags_parses_groups_and_merges_a_nations_flags():
    labels, groups, notes = mm.nation_flags({
        "a.ruleset": _ruleset('"Ancient", "European"', "rome", "italy"),
        "b.ruleset": _ruleset('"Modern", "European", "Core"', "italy"),
        "c.ruleset": _ruleset('"Asian", "European"', "turkey"),
        "d.ruleset": _ruleset('"African"', "egypt"),
        "e.ruleset": _ruleset('"Asian"', "egypt"),
    })
    assert labels == {"rome": 3, "italy": 3}
    assert groups["rome"] == groups["italy"]
    assert notes == {"nations": 5, "nations_without_one_continent": 1, "flags_of_two_continents_dropped": 1}


def test_civ_flags_builder_keeps_a_nation_in_one_split(tmp_path, small_sizes):
    deb = _fake_freeciv(tmp_path / "f.deb", np.random.default_rng(0))
    data = mm._build_civ_flags({"freeciv": deb}, seed=0)
    assert data.classes == list(mm.FLAG_CLASSES)
    assert data.notes["pool_images"] == 4 * 65 and data.notes["pool_groups"] == 59  # n1 is shared: dropped
    assert data.notes["flags_of_two_continents_dropped"] == 1 and data.notes["flags_without_all_four_images"] == 1
    assert {k: len(v[1]) for k, v in data.splits.items()} == {"train": 40, "val": 10, "test": 30}
    assert all(img.size == (48, 48) for img in data.splits["train"][0])
    assert {data.classes[y] for y in data.splits["test"][1]} <= {"African", "Asian", "European"}
    _splits_disjoint(data)
    # every image of a flag (and of a nation's second flag) lands in one split
    m = mm.read_members(deb, lambda n: n.endswith(".png"))
    owner = {np.asarray(mm.render_clipart(raw, 48)).tobytes(): n.rsplit("/", 1)[1].split("-")[0].removesuffix(".png")
             .removesuffix("_old") for n, raw in m.items()}
    nations = {k: {owner[np.asarray(img).tobytes()] for img in v[0]} for k, v in data.splits.items()}
    tr, va, te = nations["train"], nations["val"], nations["test"]
    assert not (tr & te or va & te or tr & va)
    with pytest.raises(DataError, match="no nation flag"):
        mm._build_civ_flags({"freeciv": write_deb(tmp_path / "e.deb", {"x": b""})}, seed=0)


# -- supertux_tiles -------------------------------------------------------------------------------

def test_sheet_tiles_keeps_opaque_textured_cells():
    rng = np.random.default_rng(1)
    sheet = np.zeros((64, 96, 4), dtype=np.uint8)
    sheet[:32, :32] = rng.integers(0, 256, (32, 32, 4))  # textured
    sheet[:32, :32, 3] = 255
    sheet[:32, 32:64] = (10, 200, 10, 255)  # opaque but flat
    sheet[32:, :32, :3] = rng.integers(0, 256, (32, 32, 3))
    sheet[32:, :32, 3] = 255
    sheet[32:40, :32, 3] = 0  # 3/4 opaque: kept, on white
    buf = io.BytesIO()
    Image.fromarray(sheet, "RGBA").save(buf, format="PNG")
    tiles = mm.sheet_tiles(buf.getvalue())
    assert [(r, c) for r, c, _ in tiles] == [(0, 0), (1, 0)]
    assert all(t.size == (32, 32) and t.mode == "RGB" for _, _, t in tiles)
    assert np.asarray(tiles[1][2])[:8].min() == 255


def test_supertux_builder_keeps_each_sheet_in_one_split(tmp_path, small_sizes):
    rng = np.random.default_rng(2)
    files = {}
    for folder in ("castle", "snowcastle", "forest", "ghostwood", "darksnow", "snow"):
        for i in range(5):
            files[f"{mm.SUPERTUX_ROOT}{folder}/sheet{i}.png"] = _png(rng, 64, 64)  # 4 tiles each
    files[mm.SUPERTUX_ROOT + "lava/lava-1.png"] = _png(rng, 64, 64)  # not a class of the task
    deb = write_deb(tmp_path / "s.deb", files)
    data = mm._build_supertux_tiles({"supertux": deb}, seed=0)
    assert data.classes == list(mm.TILE_CLASSES)
    assert data.notes["pool_images"] == 120 and data.notes["pool_groups"] == 30
    assert {k: len(v[1]) for k, v in data.splits.items()} == {"train": 40, "val": 10, "test": 30}
    _splits_disjoint(data)
    sheet_of = {}
    for name, raw in mm.read_members(deb, lambda n: n.endswith(".png")).items():
        for _, _, tile in mm.sheet_tiles(raw):
            sheet_of[np.asarray(tile).tobytes()] = name
    sheets = {k: {sheet_of[np.asarray(img).tobytes()] for img in v[0]} for k, v in data.splits.items()}
    assert not (sheets["train"] & sheets["test"] or sheets["val"] & sheets["test"] or sheets["train"] & sheets["val"])
    assert all("lava" not in s for ss in sheets.values() for s in ss)


# -- crossfire_objects -----------------------------------------------------------------------------

def _crossfire_base(images: dict[str, bytes]) -> bytes:
    return b"".join(f"IMAGE {len(raw)} ./{name}\n".encode() + raw for name, raw in images.items())


def test_crossfire_reader_and_object_groups():
    raw = _crossfire_base({"arch/a/b.111": b"\x89PNG one", "arch/c/d.112": b"two\nlines"})
    assert mm.crossfire_images(raw) == {"arch/a/b.111": b"\x89PNG one", "arch/c/d.112": b"two\nlines"}
    with pytest.raises(DataError, match="unexpected record"):
        mm.crossfire_images(b"JUNK 3 x\nabc")
    assert mm.object_label_group("arch/monster/giant/DreadKnight/Bk.x11") == (4, "monster/giant/DreadKnight/bk")
    assert mm.object_label_group("arch/wall/stone/stonewall_12.111") == (6, "wall/stone/stonewall")
    assert mm.object_label_group("arch/flesh/ant/ant_leg.111") == (2, "flesh/ant/ant_leg")
    assert mm.object_label_group("arch/system/bug.111") is None


def test_fetch_builds_crossfire_objects_from_a_pinned_fake_deb(tmp_path, monkeypatch, small_sizes):
    rng = np.random.default_rng(3)
    images = {f"arch/{cat}/thing{i}/obj{i}.{frame}": _png(rng, 32, 32, 0.8)
              for cat in ("weapon", "armour", "food", "flesh") for i in range(12) for frame in ("111", "112", "x13")}
    images["arch/spell/big.111"] = _png(rng, 64, 96, 0.8)
    images["arch/system/bug.111"] = _png(rng, 32, 32)
    cache = tmp_path / "cache"
    pin_fake_deb(cache, monkeypatch, "crossfire", {mm.CROSSFIRE_BASE: _crossfire_base(images)})
    root = fetch_suite("mini-vtab", ["crossfire_objects"], cache, progress=False)
    info = json.loads((root / "crossfire_objects" / "info.json").read_text())
    assert info["splits"] == {"train800": 40, "val200": 10, "train800val200": 50, "test": 30}
    assert info["notes"]["pool_images"] == 145 and info["notes"]["pool_groups"] == 49
    assert info["notes"]["pool_per_class"]["food"] == 72  # food and flesh are one class
    assert info["image_sizes"] == ["32x32"]


def test_the_more_tasks_are_in_mini_vtab():
    names = [t.name for t in list_tasks("mini-vtab")]
    assert {"civ_flags", "supertux_tiles", "crossfire_objects"} <= set(names)
    assert all(SOURCES[k].sha256 and SOURCES[k].pool_path for t in mm.MORE_TASKS for k in t.sources)
