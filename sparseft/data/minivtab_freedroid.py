"""Two mini-VTAB tasks of 3D-rendered sprites from FreedroidRPG: which way a figure faces, what an item is.

Same rules as `sparseft.data.minivtab_extra` (whose `Item`, `dedupe`, `cap_groups` and
`grouped_task` are reused): the source is a pinned Debian package (`freedroidrpg-data`, see
`sparseft.data.sources`), images are read straight out of the .deb, near-identical images share a
group that never straddles two splits, and identical pixels are kept once (dropped when under two
classes). Importing this module adds the tasks below to the suite `mini-vtab`
(`sparseft data fetch mini-vtab --tasks freedroid_facing,freedroid_items`).

- `freedroid_facing`: the droids and people of the game are pre-rendered in 8 directions; the label
  is the direction a figure faces on screen, the group its model, so test models are unseen.
- `freedroid_items`: each item is pre-rendered turning on a turntable (the shop's animation); the
  label is the item's kind read from `item_specs.lua`, the group the item, so test items are unseen.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from sparseft.data import minivtab_more  # noqa: F401 - imported first, so its tasks come before these
from sparseft.data._random import stable_permutation
from sparseft.data.images import DataError
from sparseft.data.minivtab import MINI_VTAB, fit_square
from sparseft.data.minivtab_extra import Item, cap_groups, dedupe, grouped_task
from sparseft.data.tasks import Task, TaskData
from sparseft.provision import read_members

FREEDROID_ROOT = "usr/share/freedroidrpg/data/"


def _open(raw: bytes) -> Image.Image:
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        return img.copy()


# -- facing: the direction a droid or person faces -------------------------------------------------

DROIDS = FREEDROID_ROOT + "graphics/droids/"
# enemy_rot_00 ... enemy_rot_07, checked on samples: 00 faces the viewer, then turning to the
# viewer's left (02 is the left profile), 04 shows the back, 06 the right profile
FACING_CLASSES = ("down", "down-left", "left", "up-left", "up", "up-right", "right", "down-right")
FACING_ANIMATIONS = ("stand", "walk", "attack", "gethit")  # death frames (lying on the floor) left out
FACING_LEFT_OUT = {"821": "a dome: looks the same from every side", "834": "a sphere: looks the same from every side",
                   "prologue": "an abstract shape for the intro, no front or back"}
FACING_FRAMES_CAP = 8  # frames per model and direction at most
FACING_SIZE = 64
_FRAME = re.compile(r"enemy_rot_(\d\d)_([a-z]+)-(\d+)\.png")


def parse_atlas(text: str) -> dict[str, tuple[str, int, int, int, int]]:
    """Frame name -> (sheet, x, y, w, h) of a FreedroidRPG `atlas.txt` (`* <sheet> size W H`, then
    `<frame> x y w h off ox oy` lines)."""
    out, sheet = {}, None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "*":
            sheet = parts[1]
        elif len(parts) >= 5 and sheet is not None:
            out[parts[0]] = (sheet, *(int(v) for v in parts[1:5]))
    return out


def model_frames(model: str, atlas: Mapping[str, tuple[str, int, int, int, int]], sheets: Mapping[str, np.ndarray],
                 seed: int) -> tuple[list[Item], int]:
    """The model's frames of FACING_ANIMATIONS, at most FACING_FRAMES_CAP distinct ones per direction
    (a seeded choice), each on white in FACING_SIZE px; and how many repeated frames were skipped."""
    by_rot: dict[int, list[str]] = {}
    for name in sorted(atlas):
        m = _FRAME.fullmatch(name)
        if m and m.group(2) in FACING_ANIMATIONS and int(m.group(1)) < len(FACING_CLASSES):
            by_rot.setdefault(int(m.group(1)), []).append(name)
    items, repeated = [], 0
    for rot, names in sorted(by_rot.items()):
        crops: dict[bytes, tuple[str, np.ndarray]] = {}
        for name in names:
            sheet, x, y, w, h = atlas[name]
            if sheet not in sheets or w <= 0 or h <= 0:
                continue
            crop = sheets[sheet][y:y + h, x:x + w]
            key = f"{crop.shape}".encode() + crop.tobytes()
            if key in crops:
                repeated += 1
            else:
                crops[key] = (name, crop)
        distinct = list(crops.values())
        for i in sorted(stable_permutation(len(distinct), seed, f"freedroid_facing/{model}/{rot}")[:FACING_FRAMES_CAP]):
            name, crop = distinct[i]
            image = fit_square(Image.fromarray(np.ascontiguousarray(crop), "RGBA"), FACING_SIZE, (255, 255, 255))
            items.append(Item(f"{model}/{name}", rot, model, image))
    return items, repeated


def _build_freedroid_facing(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["freedroid"], lambda n: n.startswith(DROIDS) and n.count("/") == DROIDS.count("/") + 1
                     and (n.endswith("/atlas.txt") or n.endswith(".png")))
    items, notes = [], {"models": 0, "repeated_frames_skipped": 0}
    for atlas_name in sorted(n for n in m if n.endswith("/atlas.txt")):
        model = atlas_name.removeprefix(DROIDS).split("/")[0]
        if model in FACING_LEFT_OUT:
            continue
        atlas = parse_atlas(m[atlas_name].decode("utf-8", "replace"))
        wanted = {sheet for sheet, *_ in atlas.values()}
        sheets = {s: np.asarray(_open(m[f"{DROIDS}{model}/{s}"]).convert("RGBA"))
                  for s in sorted(wanted) if f"{DROIDS}{model}/{s}" in m}
        got, repeated = model_frames(model, atlas, sheets, seed)
        notes["models"] += bool(got)
        notes["repeated_frames_skipped"] += repeated
        items += got
    if not items:
        raise DataError("freedroid_facing: no droid sprite atlas found in the freedroidrpg-data package")
    items, dup = dedupe(items)
    return grouped_task(items, FACING_CLASSES, seed, "freedroid_facing",
                        {**notes, **dup, "groups": "model (every frame and direction of one droid or person)",
                         "animations": list(FACING_ANIMATIONS), "frames_per_model_and_direction_cap": FACING_FRAMES_CAP,
                         "models_left_out": FACING_LEFT_OUT,
                         "directions": "enemy_rot_00..07 = " + ", ".join(FACING_CLASSES)})


# -- items: what kind of item a turntable rendering shows ------------------------------------------

ITEMS = FREEDROID_ROOT + "graphics/items/"
ITEM_SPECS = FREEDROID_ROOT + "base/item_specs.lua"
ITEM_CLASSES = ("add-on", "ammunition", "armour", "gun", "melee weapon", "other", "usable")
ITEM_LEFT_OUT = ("NONE_AVAILABLE_YET",)  # the placeholder ("?") of items without their own images
ITEM_FRAMES_CAP = 16  # turntable frames per item at most (of 32, about 11 degrees apart)
ITEM_SIZE = 64
_BLOCK = re.compile(r"^\{\n(.*?)^\},?$", re.M | re.S)


def item_kind(spec: str) -> tuple[str, str] | None:
    """(rotation series, kind) of one item's block of `item_specs.lua`; None without a rotation series.

    In order: a `slot = "weapon"` item is a melee weapon (`melee = true`) or a gun; any other slot
    (armour, shield, special = helmet, drive = boots) is armour; a series under `addons/` is an
    add-on, one under `weapons/` without a slot ammunition; an item with a `right_use` (books,
    pills, grenades, devices) is usable; the rest is other.
    """
    series = re.search(r'^\s*rotation_series\s*=\s*"([^"]+)"', spec, re.M)
    if series is None:
        return None
    slot = re.search(r'^\s*slot\s*=\s*"(\w+)"', spec, re.M)
    s, slot_name = series.group(1), slot.group(1) if slot else "none"
    if slot_name == "weapon":
        kind = "melee weapon" if re.search(r"\bmelee\s*=\s*true", spec) else "gun"
    elif slot_name != "none":
        kind = "armour"
    elif s.startswith("addons/"):
        kind = "add-on"
    elif s.startswith("weapons/"):
        kind = "ammunition"
    elif re.search(r"^\s*right_use\s*=", spec, re.M):
        kind = "usable"
    else:
        kind = "other"
    return s, kind


def item_series(specs: str) -> tuple[dict[str, int], dict[str, int]]:
    """Rotation series -> class of the items in `item_specs.lua`, and counts.

    A series several items share takes their kind; when they differ only by usable/other it is
    usable (a book or potion listed again among the other items), otherwise it is left out.
    """
    kinds: dict[str, set[str]] = {}
    blocks = _BLOCK.findall(specs)
    for block in blocks:
        found = item_kind(block)
        if found is not None and found[0] not in ITEM_LEFT_OUT:
            kinds.setdefault(found[0], set()).add(found[1])
    out, ambiguous = {}, 0
    for s, k in sorted(kinds.items()):
        if k == {"usable", "other"}:
            k = {"usable"}
        if len(k) == 1:
            out[s] = ITEM_CLASSES.index(next(iter(k)))
        else:
            ambiguous += 1
    return out, {"item_specs": len(blocks), "series_of_two_kinds_left_out": ambiguous}


def item_group(series: str) -> str:
    """The item a rotation series shows, trailing digits dropped so recolours such as
    `helmets/yellow2`, `helmets/yellow3` and `drinking_mug_2` stay with their original."""
    return re.sub(r"[\d_]+$", "", series) or series


ITEM_BLACK = 24  # a pixel whose channels are all at most this is background (the JPEGs' black is noisy)


def render_portrait(raw: bytes) -> Image.Image:
    """A turntable frame (a 132x180 JPEG on black) cut to the item's bounding box and fitted, aspect
    kept, into a black ITEM_SIZE square, so thin items (swords, cables) are not lost in black."""
    img = _open(raw).convert("RGB")
    ys, xs = np.nonzero(np.asarray(img).max(axis=2) > ITEM_BLACK)
    if len(xs):
        img = img.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return fit_square(img, ITEM_SIZE, (0, 0, 0))


def _build_freedroid_items(files: Mapping[str, Path], seed: int) -> TaskData:
    portrait = re.compile(re.escape(ITEMS) + r".+/portrait_\d+\.jpg")
    m = read_members(files["freedroid"], lambda n: n == ITEM_SPECS or portrait.fullmatch(n) is not None)
    if ITEM_SPECS not in m:
        raise DataError("freedroid_items: base/item_specs.lua not found in the freedroidrpg-data package")
    labels, notes = item_series(m[ITEM_SPECS].decode("utf-8", "replace"))
    items, series_found, unreadable = [], set(), 0
    for name in sorted(m):
        series = name.removeprefix(ITEMS).rsplit("/", 1)[0]
        if name == ITEM_SPECS or series not in labels:
            continue
        try:
            image = render_portrait(m[name])
        except (OSError, ValueError, SyntaxError):
            unreadable += 1
            continue
        series_found.add(series)
        items.append(Item(name, labels[series], item_group(series), image))
    items, dup = dedupe(items)
    items = cap_groups(items, ITEM_FRAMES_CAP, seed, "freedroid_items/cap")
    return grouped_task(items, ITEM_CLASSES, seed, "freedroid_items",
                        {**notes, **dup, "series_without_images": len(set(labels) - series_found),
                         "unreadable_skipped": unreadable, "series_left_out": list(ITEM_LEFT_OUT),
                         "groups": "item: rotation series less trailing digits (recolours stay together)",
                         "frames_per_item_cap": ITEM_FRAMES_CAP,
                         "labels": "item_specs.lua: weapon slot -> melee weapon / gun, other slots -> armour, "
                                   "addons/ -> add-on, weapons/ without slot -> ammunition, right_use -> usable, "
                                   "else other"})


# -- the tasks, added to mini-vtab ------------------------------------------------------------

FREEDROID_TASKS = [
    Task("freedroid_facing", FACING_CLASSES, ("freedroid",), "Debian freedroidrpg-data (droid and character atlases)",
         "GPL-2.0-or-later", "FreedroidRPG droids and people by the direction they face (8), 64x64 colour, "
         "3D-rendered; unseen models in test", _build_freedroid_facing),
    Task("freedroid_items", ITEM_CLASSES, ("freedroid",), "Debian freedroidrpg-data (item turntable renderings)",
         "GPL-2.0-or-later", "FreedroidRPG items by kind (add-on, ammunition, armour, gun, melee weapon, other, "
         "usable), 64x64 colour on black, 3D-rendered; unseen items in test", _build_freedroid_items),
]
MINI_VTAB.update({t.name: t for t in FREEDROID_TASKS})
