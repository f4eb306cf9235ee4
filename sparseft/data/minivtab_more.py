"""More mini-VTAB tasks of new kinds: national flags and game terrain tiles, with group-aware splits.

Same rules as `sparseft.data.minivtab_extra` (whose `Item`, `dedupe` and `grouped_task` are reused):
every source is a pinned Debian package (see `sparseft.data.sources`), images are read straight out
of the .deb, near-identical images share a group that never straddles two splits, and identical
pixels are kept once (dropped when under two classes). Importing this module adds the tasks below to
the suite `mini-vtab` (`sparseft data fetch mini-vtab --tasks civ_flags`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from sparseft.data.images import DataError, to_rgb
from sparseft.data.minivtab import MINI_VTAB, render_clipart
from sparseft.data.minivtab_extra import Item, _render_all, cap_groups, dedupe, grouped_task
from sparseft.data.tasks import Task, TaskData
from sparseft.provision import read_members

# -- Freeciv nation flags: which continent a nation's flag belongs to -----------------------------

FREECIV_ROOT = "usr/share/games/freeciv/"
FLAG_CLASSES = ("African", "American", "Asian", "European", "Oceanian")  # the nations' continental groups
FLAG_VARIANTS = ("", "-large", "-shield", "-shield-large")  # 29x20, 44x30, and the 14/19 px shield crops
FLAG_SIZE = 48


def nation_flags(rulesets: Mapping[str, bytes]) -> tuple[dict[str, int], dict[str, str], dict[str, int]]:
    """(flag -> continent, flag -> group, counts) from the nations' `.ruleset` files.

    A nation counts when exactly one of its `groups` is a continent of FLAG_CLASSES; its `flag`
    and `flag_alt` take that continent and share one group (the nation's first flag, merged across
    nations that share a flag). A flag used by nations of two continents is left out.
    """
    label: dict[str, set[int]] = {}
    parent: dict[str, str] = {}

    def root(f: str) -> str:
        while parent.setdefault(f, f) != f:
            f = parent[f]
        return f

    notes = {"nations": 0, "nations_without_one_continent": 0}
    for name in sorted(rulesets):
        text = rulesets[name].decode("utf-8", "replace")
        groups = re.search(r"^\s*groups\s*=\s*(.*)$", text, re.M)
        found = set(re.findall(r'"([^"]+)"', groups.group(1))) if groups else set()
        continents = [FLAG_CLASSES.index(c) for c in sorted(found & set(FLAG_CLASSES))]
        flags = [f for f in re.findall(r'^\s*flag(?:_alt)?\s*=\s*"([^"]*)"', text, re.M) if f and f != "-"]
        if not flags:
            continue
        notes["nations"] += 1
        if len(continents) != 1:
            notes["nations_without_one_continent"] += 1
            continue
        for f in flags:
            label.setdefault(f, set()).add(continents[0])
            parent[root(f)] = root(flags[0])
    one = {f: next(iter(c)) for f, c in label.items() if len(c) == 1}
    notes["flags_of_two_continents_dropped"] = len(label) - len(one)
    return one, {f: root(f) for f in one}, notes


def _build_civ_flags(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["freeciv"], lambda n: (n.startswith(FREECIV_ROOT + "nation/") and n.endswith(".ruleset"))
                     or (n.startswith(FREECIV_ROOT + "flags/") and n.endswith(".png")))
    labels, groups, notes = nation_flags({n: raw for n, raw in m.items() if n.endswith(".ruleset")})
    items, missing = [], 0
    for flag in sorted(labels):
        names = [f"{FREECIV_ROOT}flags/{flag}{v}.png" for v in FLAG_VARIANTS]
        if not all(n in m for n in names):
            missing += 1
            continue
        items += [Item(n, labels[flag], groups[flag], render_clipart(m[n], FLAG_SIZE)) for n in names]
    if not items:
        raise DataError("civ_flags: no nation flag found in the freeciv package")
    items, dup = dedupe(items)
    return grouped_task(items, FLAG_CLASSES, seed, "civ_flags",
                        {**notes, **dup, "flags_without_all_four_images": missing,
                         "groups": "a nation's flags (flag and flag_alt, all four images of each)",
                         "images_per_flag": "flag 29x20, large 44x30, shield 14x14, shield-large 19x19"})


# -- SuperTux terrain tiles: which world (biome) a 32x32 tile comes from --------------------------

SUPERTUX_ROOT = "usr/share/games/supertux2/images/tiles/"
TILE_CLASSES = ("castle", "forest", "halloween", "snow")
TILE_FOLDERS = {"castle": "castle", "snowcastle": "castle", "forest": "forest", "halloween": "halloween",
                "ghostwood": "halloween", "snow": "snow", "darksnow": "snow", "snowmountain": "snow",
                "retro_snow": "snow"}  # crystalcave (3 sheets) and lava (4 tiles a sheet) left out
TILE = 32
TILE_MIN_OPAQUE = 0.5  # a cell counts when at least half of it is opaque ...
TILE_MIN_STD = 8.0  # ... and it is not flat (grey-level std over its opaque pixels, 0-255)


def sheet_tiles(raw: bytes) -> list[tuple[int, int, Image.Image]]:
    """The (row, col, tile) of the 32x32 grid cells of a tile sheet worth keeping, on white."""
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        rgba = np.asarray(img.convert("RGBA"))
    out = []
    for r in range(rgba.shape[0] // TILE):
        for c in range(rgba.shape[1] // TILE):
            cell = rgba[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            opaque = cell[..., 3] > 0
            grey = cell[..., :3].astype(np.float64) @ (0.299, 0.587, 0.114)
            if opaque.mean() < TILE_MIN_OPAQUE or grey[opaque].std() < TILE_MIN_STD:
                continue
            out.append((r, c, to_rgb(Image.fromarray(np.ascontiguousarray(cell), "RGBA"))))
    return out


def _build_supertux_tiles(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["supertux"], lambda n: n.startswith(SUPERTUX_ROOT) and n.endswith(".png")
                     and n.removeprefix(SUPERTUX_ROOT).split("/")[0] in TILE_FOLDERS)
    items, sheets = [], 0
    for name in sorted(m):
        label = TILE_CLASSES.index(TILE_FOLDERS[name.removeprefix(SUPERTUX_ROOT).split("/")[0]])
        tiles = sheet_tiles(m[name])
        sheets += bool(tiles)
        items += [Item(f"{name}#{r:03d},{c:03d}", label, name, tile) for r, c, tile in tiles]
    items, dup = dedupe(items)
    return grouped_task(items, TILE_CLASSES, seed, "supertux_tiles",
                        {**dup, "sheets": sheets, "groups": "tile sheet (every tile of one sheet in one split)",
                         "tiles": f"{TILE}x{TILE} grid cells >= {TILE_MIN_OPAQUE:.0%} opaque, grey std >= "
                                  f"{TILE_MIN_STD:g}, composited on white", "folders": TILE_FOLDERS})


# -- Crossfire: what kind of object a 32x32 map tile shows ----------------------------------------

CROSSFIRE_BASE = "usr/share/games/crossfire-client/crossfire.base"
OBJECT_CLASSES = ("armour", "floor", "food", "jewels", "monster", "spell", "wall", "weapon")
OBJECT_FOLDERS = {"armour": "armour", "floor": "floor", "ground": "floor", "food": "food", "flesh": "food",
                  "jewel": "jewels", "talisman": "jewels", "monster": "monster", "spell": "spell",
                  "wall": "wall", "weapon": "weapon"}
OBJECT_FRAMES_CAP = 8  # images per object folder at most (animation frames, facings, wall pieces)
OBJECT_SIZE = 32


def crossfire_images(raw: bytes) -> dict[str, bytes]:
    """The PNGs of a Crossfire client image file: `IMAGE <size> <name>\\n` then <size> bytes, repeated."""
    out, pos = {}, 0
    while pos < len(raw):
        end = raw.index(b"\n", pos)
        tag, size, name = raw[pos:end].decode().split(" ", 2)
        if tag != "IMAGE":
            raise DataError(f"crossfire image file: unexpected record {raw[pos:end][:60]!r}")
        out[name.removeprefix("./")] = raw[end + 1:end + 1 + int(size)]
        pos = end + 1 + int(size)
    return out


def object_label_group(name: str) -> tuple[int, str] | None:
    """(class, object) of `arch/<category>/.../<face>.<frame>`; None for categories not used.

    The object is the folder and the face name without its frame suffix and trailing digits, so
    the frames and facings of one monster (`Bk.x11`, `Bk.x12`) and the pieces of one wall
    (`stonewall_1.111` ... `stonewall_15.111`) are one group.
    """
    parts = name.split("/")
    if len(parts) < 3 or parts[0] != "arch" or parts[1] not in OBJECT_FOLDERS:
        return None
    stem = re.sub(r"[\d_.-]+$", "", parts[-1].rsplit(".", 1)[0]) or parts[-1]
    return OBJECT_CLASSES.index(OBJECT_FOLDERS[parts[1]]), "/".join(parts[1:-1] + [stem.lower()])


def _build_crossfire_objects(files: Mapping[str, Path], seed: int) -> TaskData:
    m = crossfire_images(read_members(files["crossfire"], lambda n: n == CROSSFIRE_BASE)[CROSSFIRE_BASE])
    items, notes = _render_all(m, object_label_group, OBJECT_SIZE)
    items, dup = dedupe(items)
    items = cap_groups(items, OBJECT_FRAMES_CAP, seed, "crossfire_objects/cap")
    return grouped_task(items, OBJECT_CLASSES, seed, "crossfire_objects",
                        {**notes, **dup, "groups": "object: folder + face name less frame suffix and trailing digits",
                         "frames_per_object_cap": OBJECT_FRAMES_CAP, "folders": OBJECT_FOLDERS})


# -- the tasks, added to mini-vtab ------------------------------------------------------------

MORE_TASKS = [
    Task("civ_flags", FLAG_CLASSES, ("freeciv",), "Debian freeciv-data (nation flags and rulesets)",
         "GPL-2.0-or-later", "Freeciv nation flags by the nation's continent, 48x48 colour (4 renderings of each "
         "flag); unseen nations in test", _build_civ_flags, test_size=952),
    Task("supertux_tiles", TILE_CLASSES, ("supertux",), "Debian supertux-data (terrain tile sheets)",
         "GPL-3.0-or-later", "SuperTux 32x32 terrain tiles by world (castle, forest, halloween, snow); "
         "unseen tile sheets in test", _build_supertux_tiles, test_size=644),
    Task("crossfire_objects", OBJECT_CLASSES, ("crossfire",), "Debian crossfire-client-images (crossfire.base)",
         "GPL (version not stated)", "Crossfire map tiles by object category (armour, floor, food, ...), 32x32 colour; "
         "unseen objects in test", _build_crossfire_objects),
]
MINI_VTAB.update({t.name: t for t in MORE_TASKS})
