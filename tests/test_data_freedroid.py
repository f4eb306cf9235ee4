"""The mini-VTAB tasks of sparseft.data.minivtab_freedroid on small fake packages made here; no network."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import pin_fake_deb, write_deb
from PIL import Image

from sparseft import provision
from sparseft.data import DataError
from sparseft.data import minivtab_extra as mx
from sparseft.data import minivtab_freedroid as fd
from sparseft.data.sources import SOURCES
from sparseft.data.tasks import fetch_suite, list_tasks


@pytest.fixture
def small_sizes(monkeypatch):
    monkeypatch.setattr(mx, "N_TRAIN", 40)
    monkeypatch.setattr(mx, "N_VAL", 10)
    monkeypatch.setattr(mx, "N_TEST", 30)


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _owners(data, owner_of) -> dict[str, set]:
    """Split -> the set of owners (model or item) of its images, looked up by their pixels."""
    return {k: {owner_of[np.asarray(img).tobytes()] for img in v[0]} for k, v in data.splits.items()}


def _disjoint(owners: dict[str, set]) -> bool:
    tr, va, te = owners["train"], owners["val"], owners["test"]
    return not (tr & va or tr & te or va & te)


# -- freedroid_facing -----------------------------------------------------------------------------

FRAME_W, FRAME_H = 6, 10


def _fake_droids(rng: np.random.Generator, models: list[str]) -> tuple[dict[str, bytes], dict[bytes, tuple]]:
    """Per model an atlas and one sheet: per direction 2 identical stand frames, 3 walk and 2 death
    frames. Also returns rendered pixels -> (model, direction, animation) to check the splits."""
    files, owner = {}, {}
    for model in models:
        frames = []
        for rot in range(8):
            stand = rng.integers(0, 256, (FRAME_H, FRAME_W, 4), dtype=np.uint8)
            frames += [(f"enemy_rot_{rot:02d}_stand-{i:02d}.png", stand, rot) for i in range(2)]
            frames += [(f"enemy_rot_{rot:02d}_{anim}-{i:02d}.png", rng.integers(0, 256, (FRAME_H, FRAME_W, 4),
                                                                                 dtype=np.uint8), rot)
                       for anim, n in (("walk", 3), ("death", 2)) for i in range(n)]
        sheet = np.zeros((FRAME_H, FRAME_W * len(frames), 4), dtype=np.uint8)
        lines = [f"* {model}_1.png size {sheet.shape[1]} {sheet.shape[0]}"]
        for i, (name, pixels, rot) in enumerate(frames):
            sheet[:, i * FRAME_W:(i + 1) * FRAME_W] = pixels
            lines.append(f"{name} {i * FRAME_W} 0 {FRAME_W} {FRAME_H} off -3 -9")
            rendered = fd.fit_square(Image.fromarray(pixels, "RGBA"), fd.FACING_SIZE, (255, 255, 255))
            owner[np.asarray(rendered).tobytes()] = (model, rot, name.split("_")[3].split("-")[0])
        files[f"{fd.DROIDS}{model}/atlas.txt"] = "\n".join(lines).encode()
        files[f"{fd.DROIDS}{model}/{model}_1.png"] = _encode(Image.fromarray(sheet, "RGBA"))
        files[f"{fd.DROIDS}{model}/portrait_0001.jpg"] = b"not read"
    return files, owner


def test_parse_atlas_reads_sheets_and_frames():
    atlas = fd.parse_atlas("* a_1.png size 64 64\nenemy_rot_00_walk-00.png 0 0 5 7 off -1 -2\n"
                           "* a_2.png size 64 64\nenemy_rot_03_stand-01.png 8 9 10 11 off 0 0\n\n")
    assert atlas == {"enemy_rot_00_walk-00.png": ("a_1.png", 0, 0, 5, 7),
                     "enemy_rot_03_stand-01.png": ("a_2.png", 8, 9, 10, 11)}


def test_facing_builder_labels_directions_and_keeps_a_model_in_one_split(tmp_path, small_sizes):
    rng = np.random.default_rng(0)
    files, owner = _fake_droids(rng, [f"m{i:02d}" for i in range(10)] + ["821"])
    deb = write_deb(tmp_path / "f.deb", files)
    data = fd._build_freedroid_facing({"freedroid": deb}, seed=0)
    assert data.classes == list(fd.FACING_CLASSES)
    # 4 distinct frames (stand once, walk 3 times) per direction of 10 models; death and 821 left out
    assert data.notes["pool_images"] == 10 * 8 * 4 and data.notes["pool_groups"] == 10
    assert data.notes["models"] == 10 and data.notes["repeated_frames_skipped"] == 10 * 8
    assert {k: len(v[1]) for k, v in data.splits.items()} == {"train": 40, "val": 10, "test": 30}
    for images, labels in data.splits.values():
        for img, label in zip(images, labels):
            model, rot, anim = owner[np.asarray(img).tobytes()]
            assert label == rot and anim in ("stand", "walk") and model != "821" and img.size == (64, 64)
    models = {k: {m for m, _, _ in v} for k, v in _owners(data, owner).items()}
    assert _disjoint(models)
    with pytest.raises(DataError, match="no droid sprite atlas"):
        fd._build_freedroid_facing({"freedroid": write_deb(tmp_path / "e.deb", {"x": b""})}, seed=0)


def test_facing_caps_the_frames_of_a_direction():
    rng = np.random.default_rng(1)
    atlas = {f"enemy_rot_02_walk-{i:02d}.png": ("s.png", i * 4, 0, 4, 4) for i in range(12)}
    sheet = rng.integers(0, 256, (4, 48, 4), dtype=np.uint8)
    items, repeated = fd.model_frames("m", atlas, {"s.png": sheet}, seed=0)
    assert len(items) == fd.FACING_FRAMES_CAP and repeated == 0
    assert {it.label for it in items} == {2} and {it.group for it in items} == {"m"}
    again, _ = fd.model_frames("m", atlas, {"s.png": sheet}, seed=0)
    assert [it.name for it in again] == [it.name for it in items]


# -- freedroid_items ------------------------------------------------------------------------------

def _block(series: str, *fields: str) -> str:
    return "{\n" + "".join(f"\t{f}\n" for f in fields) + f'\trotation_series = "{series}",\n}},\n'


MELEE = ('slot = "weapon",', "weapon = {", "\tmelee = true,", "},")
KINDS = {  # series prefix -> (fields, class)
    "weapons/knife": (MELEE, "melee weapon"),
    "weapons/gun": (('slot = "weapon",', "weapon = {", '\tammunition = {id = "x", clip = 2},', "},"), "gun"),
    "weapons/ammo": ((), "ammunition"),
    "helmets/cap": (('slot = "special",',), "armour"),
    "addons/chip": ((), "add-on"),
    "pills_potions/pill": (('right_use = {tooltip = _"Drink"},',), "usable"),
    "mug": ((), "other"),
}


def _specs() -> str:
    blocks = [_block("NONE_AVAILABLE_YET", 'slot = "weapon",')]
    for prefix, (fields, _) in KINDS.items():
        blocks += [_block(f"{prefix}_{c}", *fields) for c in "abcd"]
    blocks += [_block("pills_potions/pill_a")]  # listed again without right_use: still usable
    blocks += [_block("mug_a", 'slot = "shield",')]  # armour and other: left out
    return "item_list{\n" + "".join(blocks) + "}\n"


def test_item_kinds_follow_the_specs():
    labels, notes = fd.item_series(_specs())
    assert notes == {"item_specs": 31, "series_of_two_kinds_left_out": 1}
    expected = {f"{p}_{c}": fd.ITEM_CLASSES.index(k) for p, (_, k) in KINDS.items() for c in "abcd"}
    del expected["mug_a"]
    assert labels == expected
    assert fd.item_kind("\tid = 'x',\n") is None
    assert fd.item_group("helmets/yellow2") == fd.item_group("helmets/yellow") == "helmets/yellow"
    assert fd.item_group("drinking_mug_2") == "drinking_mug" and fd.item_group("weapons/22_ammo") == "weapons/22_ammo"


def test_render_portrait_cuts_the_item_out_of_its_black_frame():
    frame = np.zeros((180, 132, 3), dtype=np.uint8)
    frame[60:120, 50:70] = (200, 40, 90)  # a 20x60 item
    out = np.asarray(fd.render_portrait(_encode(Image.fromarray(frame))))
    assert out.shape == (64, 64, 3)
    lit = np.nonzero(out.max(axis=(0, 2)) > fd.ITEM_BLACK)[0]
    assert 20 <= len(lit) <= 23 and out[:, 32].max() > 150  # 60 px tall -> 64: as wide as 21 px, centred
    assert fd.render_portrait(_encode(Image.new("RGB", (132, 180)))).size == (64, 64)  # all black: kept whole


def _fake_items(rng: np.random.Generator) -> tuple[dict[str, bytes], dict[bytes, str]]:
    files, owner = {fd.ITEM_SPECS: _specs().encode()}, {}
    series = [f"{p}_{c}" for p in KINDS for c in "abcd"]
    for s in series:
        for i in range(1, 21 if s == "weapons/knife_a" else 7):  # knife_a has 20 frames: capped at 16
            frame = np.zeros((45, 33, 3), dtype=np.uint8)
            frame[5:40, 8:25] = rng.integers(60, 256, (35, 17, 3))
            raw = _encode(Image.fromarray(frame), "JPEG")
            files[f"{fd.ITEMS}{s}/portrait_{i:04d}.jpg"] = raw
            owner[np.asarray(fd.render_portrait(raw)).tobytes()] = s
        files[f"{fd.ITEMS}{s}/inv_image.png"] = b"not read"
    files[f"{fd.ITEMS}NONE_AVAILABLE_YET/portrait_0001.jpg"] = _encode(Image.new("RGB", (33, 45), "red"), "JPEG")
    return files, owner


def test_items_builder_keeps_an_item_in_one_split(tmp_path, small_sizes):
    files, owner = _fake_items(np.random.default_rng(2))
    data = fd._build_freedroid_items({"freedroid": write_deb(tmp_path / "i.deb", files)}, seed=0)
    assert data.classes == list(fd.ITEM_CLASSES)
    assert data.notes["pool_images"] == 26 * 6 + 16 and data.notes["pool_groups"] == 27  # mug_a left out
    assert data.notes["pool_per_class"]["melee weapon"] == 16 + 3 * 6
    assert {k: len(v[1]) for k, v in data.splits.items()} == {"train": 40, "val": 10, "test": 30}
    items = _owners(data, owner)
    assert _disjoint(items) and "mug_a" not in set().union(*items.values())
    for images, labels in data.splits.values():
        for img, label in zip(images, labels):
            prefix = owner[np.asarray(img).tobytes()].rsplit("_", 1)[0]
            assert data.classes[label] == KINDS[prefix][1]
    with pytest.raises(DataError, match="item_specs.lua not found"):
        fd._build_freedroid_items({"freedroid": write_deb(tmp_path / "e.deb", {"x": b""})}, seed=0)


# -- through the suite: a pinned fake package, and one that fails its pin --------------------------

def test_fetch_builds_freedroid_facing_from_a_pinned_fake_deb(tmp_path, monkeypatch, small_sizes):
    cache = tmp_path / "cache"
    droids = _fake_droids(np.random.default_rng(3), [f"m{i}" for i in range(8)])[0]
    pin_fake_deb(cache, monkeypatch, "freedroid", droids)
    root = fetch_suite("mini-vtab", ["freedroid_facing"], cache, progress=False)
    info = json.loads((root / "freedroid_facing" / "info.json").read_text())
    assert info["splits"] == {"train800": 40, "val200": 10, "train800val200": 50, "test": 30}
    assert info["notes"]["pool_images"] == 8 * 8 * 4 and info["image_sizes"] == ["64x64"]
    assert info["licence"] == "GPL-2.0-or-later" and info["sources"][0]["package"] == "freedroidrpg-data"


def test_a_freedroid_package_that_fails_its_pin_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    folder = cache / "data" / "sources" / SOURCES["freedroid"].key
    folder.mkdir(parents=True)
    tampered = write_deb(folder / "freedroidrpg-data_1.0-1_all.deb", {fd.ITEM_SPECS: _specs().encode()})

    def fake_download(src, dest, **kwargs):  # the "download" is the same tampered file: no network
        return write_deb(dest / tampered.name, {fd.ITEM_SPECS: _specs().encode()})

    monkeypatch.setattr(provision, "download", fake_download)
    with pytest.raises(DataError, match="fails verification.*refusing"):
        fetch_suite("mini-vtab", ["freedroid_items"], cache, progress=False)
    assert not (cache / "data" / "mini-vtab" / "freedroid_items").exists()


def test_the_freedroid_tasks_are_in_mini_vtab_after_the_others():
    names = [t.name for t in list_tasks("mini-vtab")]
    assert names[-2:] == ["freedroid_facing", "freedroid_items"] and "crossfire_objects" in names
    src = SOURCES["freedroid"]
    assert src.sha256 and src.pool_path and src.package == "freedroidrpg-data"
    assert all(t.sources == ("freedroid",) for t in fd.FREEDROID_TASKS)
