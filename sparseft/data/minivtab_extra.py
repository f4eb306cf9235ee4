"""Harder mini-VTAB tasks: game sprites, icons, emoji and font glyphs with group-aware splits.

Same rules as `sparseft.data.minivtab`: every source is a pinned package file (see
`sparseft.data.sources`), images are read straight out of the .deb, and each task gets 800
train / 200 val / a fixed test set drawn with the seeded machine-independent helpers and
written by `sparseft.data.tasks.write_task`. Importing this module adds the tasks below to the
suite `mini-vtab` (`sparseft data fetch mini-vtab --tasks wesnoth_units`).

What is new here is `grouped_split`: near-identical images (the animation frames of one
unit, the sizes of one icon, one character in several fonts) share a group, and a group never
straddles two splits. Exact duplicates (same rendered pixels) are kept once, and dropped
altogether when they occur under two classes (`dedupe`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sparseft.data._random import stable_permutation
from sparseft.data.images import DataError
from sparseft.data.minivtab import MINI_VTAB, render_clipart
from sparseft.data.tasks import N_TEST, N_TRAIN, N_VAL, Task, TaskData, split_indices
from sparseft.provision import read_members

SLACK = 1.1  # train/val pools get 10 % more images than they need, so whole groups fit


@dataclass
class Item:
    """One candidate image: its class, its near-duplicate group, and its pixels."""

    name: str
    label: int
    group: str
    image: Image.Image


def dedupe(items: Sequence[Item]) -> tuple[list[Item], dict[str, int]]:
    """Items with identical pixels kept once (the first by name), or dropped when under two classes.

    The groups of a kept item and of its dropped copies are merged (the copies' groups take the
    kept item's group), so their other near-duplicates cannot land in another split.
    """
    def digest(it: Item) -> bytes:
        return hashlib.sha256(f"{it.image.mode}{it.image.size}".encode() + it.image.tobytes()).digest()

    items = sorted(items, key=lambda it: it.name)
    keys = [digest(it) for it in items]
    classes: dict[bytes, set[int]] = {}
    for it, key in zip(items, keys):
        classes.setdefault(key, set()).add(it.label)
    first: dict[bytes, Item] = {}
    rename: dict[str, str] = {}
    kept: list[Item] = []
    notes = {"exact_duplicates_across_classes_dropped": 0, "exact_duplicates_within_class_dropped": 0}
    for it, key in zip(items, keys):
        if len(classes[key]) > 1:
            notes["exact_duplicates_across_classes_dropped"] += 1
        elif key in first:
            notes["exact_duplicates_within_class_dropped"] += 1
            rename.setdefault(it.group, first[key].group)
        else:
            first[key] = it
            kept.append(it)
    for it in kept:  # follow chains of merged groups
        for _ in range(16):
            if rename.get(it.group, it.group) == it.group:
                break
            it.group = rename[it.group]
    return kept, notes


def cap_groups(items: Sequence[Item], cap: int, seed: int, salt: str) -> list[Item]:
    """At most `cap` items of each group, a seeded choice (long animations do not dominate)."""
    by_group: dict[str, list[Item]] = {}
    for it in sorted(items, key=lambda it: it.name):
        by_group.setdefault(it.group, []).append(it)
    out = []
    for group in sorted(by_group):
        members = by_group[group]
        out += [members[i] for i in sorted(stable_permutation(len(members), seed, f"{salt}/{group}")[:cap])]
    return out


def grouped_split(labels: Sequence[int], groups: Sequence[str], seed: int, salt: str,
                  n_test: int | None = None, slack: float = SLACK) -> list[np.ndarray]:
    """Train/val/test indices (N_TRAIN, N_VAL, up to `n_test`, default N_TEST) such that no group is in two splits.

    Groups are stratified by the set of classes they hold (usually one class): within each
    stratum they are put in a seeded order and cut by their cumulative share of it: the first
    `slack * N_VAL / total` goes to the val pool, the next `slack * N_TRAIN / total` to the train
    pool, the rest to the test pool. Each split is then drawn from its pool by `split_indices`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    total, n_test = len(labels), N_TEST if n_test is None else n_test
    cut_val, cut_train = slack * N_VAL / total, slack * (N_VAL + N_TRAIN) / total
    if cut_train >= 1:
        raise DataError(f"{salt}: {total} images are too few for {N_TRAIN} train + {N_VAL} val and a test set")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    strata: dict[tuple[int, ...], list[str]] = {}
    for g in sorted(members):
        strata.setdefault(tuple(sorted(set(labels[members[g]].tolist()))), []).append(g)
    pools: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for stratum, keys in sorted(strata.items()):
        n_s, seen = sum(len(members[g]) for g in keys), 0
        for k in stable_permutation(len(keys), seed, f"{salt}/groups/{'-'.join(map(str, stratum))}"):
            size = len(members[keys[k]])
            mid = (seen + size / 2) / n_s
            pools["val" if mid < cut_val else "train" if mid < cut_train else "test"].append(keys[k])
            seen += size
    # rounding per stratum can leave val or train a few images short: top them up from test's groups
    spare = [pools["test"][i] for i in stable_permutation(len(pools["test"]), seed, f"{salt}/spare")]
    for split, need in (("val", N_VAL), ("train", N_TRAIN)):
        while sum(len(members[g]) for g in pools[split]) < need and spare:
            pools[split].append(spare.pop())
    pools["test"] = spare
    out = []
    n_test = min(n_test, sum(len(members[g]) for g in spare))
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", n_test)):
        pool = np.asarray(sorted(i for g in pools[split] for i in members[g]), dtype=np.int64)
        (pick,) = split_indices(len(pool), [n], seed, f"{salt}/{split}")
        out.append(pool[pick])
    return out


def grouped_task(items: Sequence[Item], classes: Sequence[str], seed: int, salt: str, notes: dict[str, Any],
                 n_test: int | None = None, slack: float = SLACK) -> TaskData:
    """The TaskData of `items` split by `grouped_split`, with pool and split counts in the notes."""
    labels, groups = [it.label for it in items], [it.group for it in items]
    idx = grouped_split(labels, groups, seed, salt, n_test, slack)
    splits = {name: ([items[i].image for i in ix], [items[i].label for i in ix])
              for name, ix in zip(("train", "val", "test"), idx)}
    counts = Counter(labels)
    notes = {**notes, "pool_images": len(items), "pool_groups": len(set(groups)),
             "pool_per_class": {classes[c]: counts[c] for c in range(len(classes))}}
    return TaskData(splits, list(classes), notes)


def _render_all(members: Mapping[str, bytes], label_group: Callable[[str], tuple[int, str] | None],
                size: int) -> tuple[list[Item], dict[str, int]]:
    """Items of the members that `label_group` maps to (label, group), fitted on white in size x size."""
    items, notes = [], {"unreadable_skipped": 0}
    for name in sorted(members):
        lg = label_group(name)
        if lg is None:
            continue
        try:
            items.append(Item(name, lg[0], lg[1], render_clipart(members[name], size)))
        except (OSError, ValueError, SyntaxError):
            notes["unreadable_skipped"] += 1
    return items, notes


# -- Battle for Wesnoth: unit sprites by race ----------------------------

WESNOTH_ROOT = "usr/share/games/wesnoth/1.16/data/core/images/"
UNIT_CLASSES = ("drakes", "dunefolk", "dwarves", "elves-wood", "goblins", "human-loyalists", "human-magi",
                "human-outlaws", "merfolk", "monsters", "nagas", "orcs", "saurians", "undead",
                "undead-necromancers", "undead-skeletal")
UNIT_FRAMES_CAP = 30  # frames per unit at most
WESNOTH_SIZE = 72


def unit_label_group(name: str) -> tuple[int, str] | None:
    """(race, unit) of `.../units/<race>/<unit>-<anim>-<frame>.png` or `.../units/<race>/<unit>/...`."""
    rest = name.removeprefix(WESNOTH_ROOT + "units/").split("/")
    if len(rest) < 2 or rest[0] not in UNIT_CLASSES or not name.endswith(".png"):
        return None
    unit = rest[1] if len(rest) > 2 else re.split(r"[-+.]", rest[1], maxsplit=1)[0]
    return UNIT_CLASSES.index(rest[0]), f"{rest[0]}/{unit}"


def _build_wesnoth_units(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["wesnoth"], lambda n: n.startswith(WESNOTH_ROOT + "units/") and n.endswith(".png"))
    items, notes = _render_all(m, unit_label_group, WESNOTH_SIZE)
    items, dup = dedupe(items)
    items = cap_groups(items, UNIT_FRAMES_CAP, seed, "wesnoth_units/cap")
    return grouped_task(items, UNIT_CLASSES, seed, "wesnoth_units", {**notes, **dup, "groups": "one unit type",
                                                                     "frames_per_unit_cap": UNIT_FRAMES_CAP})


# -- Oxygen icon theme: icon context ------------------------------------------------------------

OXYGEN_ROOT = "usr/share/icons/oxygen/base/"
ICON_CLASSES = ("actions", "apps", "devices", "mimetypes", "places", "status")
ICON_SIZES = ("22x22", "32x32", "48x48", "64x64", "128x128")  # 8/16 px are too coarse, 256 px too big
ICON_SIZE = 48


def icon_label_group(name: str) -> tuple[int, str] | None:
    """(context, icon name) of `.../oxygen/base/<size>/<context>/<icon>.png`."""
    parts = name.removeprefix(OXYGEN_ROOT).split("/")
    if len(parts) != 3 or parts[0] not in ICON_SIZES or parts[1] not in ICON_CLASSES:
        return None
    return ICON_CLASSES.index(parts[1]), f"{parts[1]}/{parts[2].removesuffix('.png')}"


def _build_oxygen_icons(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["oxygen"], lambda n: n.startswith(OXYGEN_ROOT) and n.endswith(".png"))
    items, notes = _render_all(m, icon_label_group, ICON_SIZE)
    items, dup = dedupe(items)
    return grouped_task(items, ICON_CLASSES, seed, "oxygen_icons",
                        {**notes, **dup, "groups": "icon name (all its sizes)", "sizes_used": list(ICON_SIZES)})


# -- EmojiOne (gemojione): emoji category -------------------------------------------------------

EMOJI_ROOT = "usr/share/rubygems-integration/all/gems/gemojione-3.3.0/"
EMOJI_CLASSES = ("activity", "flags", "food", "nature", "objects", "people", "symbols", "travel")
SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
EMOJI_SIZE = 64


def emoji_items(index: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """Code point sequence (lower case, as in the file names) -> (category, group), skin-tone variants left out."""
    out = {}
    for entry in index.values():
        code = entry["unicode"].lower()
        if entry.get("category") not in EMOJI_CLASSES or SKIN_TONES & set(code.split("-")):
            continue
        out[code] = (EMOJI_CLASSES.index(entry["category"]), code)
    return out


EMOJI_SLACK = 1.02  # one image per group: the pools need almost no slack, which leaves more for test


def _build_emoji(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["emojione"], lambda n: n.startswith(EMOJI_ROOT) and (n.endswith(".png") or
                                                                                 n.endswith("index.json")))
    wanted = emoji_items(json.loads(m[EMOJI_ROOT + "config/index.json"]))
    pngs = {n: raw for n, raw in m.items() if n.startswith(EMOJI_ROOT + "assets/png/")}
    items, notes = _render_all(pngs, lambda n: wanted.get(n.rsplit("/", 1)[1].removesuffix(".png").lower()),
                               EMOJI_SIZE)
    items, dup = dedupe(items)
    return grouped_task(items, EMOJI_CLASSES, seed, "emoji", {**notes, **dup, "labels": "index.json 'category'",
                                                              "skin_tone_variants": "left out"}, slack=EMOJI_SLACK)


NOTO_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_PX = 109  # the one size of the font's colour bitmaps


def render_noto(font: ImageFont.FreeTypeFont, code: str) -> Image.Image | None:
    """The emoji `code` (e.g. `1f1eb-1f1f7`) in Noto Color Emoji, fitted on white in EMOJI_SIZE px.

    None when the font does not shape the sequence into one glyph (wider than 1.3 em).
    """
    text = "".join(chr(int(c, 16)) for c in code.split("-"))
    left, top, right, bottom = font.getbbox(text)
    if right - left > 1.3 * NOTO_PX or right <= left:
        return None
    img = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
    ImageDraw.Draw(img).text((-left, -top), text, font=font, embedded_color=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return render_clipart(buf.getvalue(), EMOJI_SIZE)


def _build_noto_emoji(files: Mapping[str, Path], seed: int) -> TaskData:
    index = EMOJI_ROOT + "config/index.json"
    wanted = emoji_items(json.loads(read_members(files["emojione"], lambda n: n == index)[index]))
    font = ImageFont.truetype(io.BytesIO(read_members(files["noto_emoji"], lambda n: n == NOTO_FONT)[NOTO_FONT]),
                              NOTO_PX)
    items, unshaped = [], 0
    for code, (label, group) in sorted(wanted.items()):
        img = render_noto(font, code)
        if img is None:
            unshaped += 1
            continue
        items.append(Item(code, label, group, img))
    items, dup = dedupe(items)
    return grouped_task(items, EMOJI_CLASSES, seed, "noto_emoji",
                        {**dup, "labels": "EmojiOne's index.json 'category' of the same code points",
                         "not_one_glyph_skipped": unshaped, "skin_tone_variants": "left out"}, slack=EMOJI_SLACK)


# -- URW base 35 fonts: which typeface a glyph is set in ------------------------------------------

URW_ROOT = "usr/share/fonts/opentype/urw-base35/"
FONT_CLASSES = ("C059", "NimbusMonoPS", "NimbusRoman", "NimbusSans", "NimbusSansNarrow", "P052", "URWBookman",
                "URWGothic")
GLYPH_SIZE, GLYPH_PT = 32, 22
# Latin (with accents), Greek and Cyrillic letters and the digits: the repertoire all 32 fonts share
GLYPH_RANGES = ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x17F), (0x391, 0x3C9), (0x410, 0x44F))


def render_glyph(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray:
    """`char` in black on white, its baseline at 3/4 of a GLYPH_SIZE square, centred horizontally."""
    img = Image.new("L", (GLYPH_SIZE, GLYPH_SIZE), 255)
    ImageDraw.Draw(img).text((GLYPH_SIZE / 2, GLYPH_SIZE * 3 / 4), char, font=font, fill=0, anchor="ms")
    return np.asarray(img)


def _build_urw_fonts(files: Mapping[str, Path], seed: int) -> TaskData:
    m = read_members(files["urw"], lambda n: n.startswith(URW_ROOT) and n.endswith(".otf"))
    fonts = {n.removeprefix(URW_ROOT).removesuffix(".otf"): n for n in m}
    faces = sorted(f for f in fonts if f.split("-")[0] in FONT_CLASSES)
    if len(faces) != 4 * len(FONT_CLASSES):
        raise DataError(f"urw fonts: expected 4 styles of {len(FONT_CLASSES)} families, found {faces}")
    loaded = {f: ImageFont.truetype(io.BytesIO(m[fonts[f]]), GLYPH_PT) for f in faces}
    chars = [chr(c) for lo, hi in GLYPH_RANGES for c in range(lo, hi + 1) if chr(c).isalnum()]
    missing = {f: render_glyph(loaded[f], "\U0010fffd").tobytes() for f in faces}  # the .notdef box
    items, skipped = [], 0
    for char in chars:
        glyphs = {f: render_glyph(loaded[f], char) for f in faces}
        if any(g.tobytes() == missing[f] or g.min() == 255 for f, g in glyphs.items()):
            skipped += 1  # a character some font lacks is left out everywhere
            continue
        items += [Item(f"{ord(char):05x}/{f}", FONT_CLASSES.index(f.split("-")[0]), f"{ord(char):05x}",
                       Image.fromarray(g)) for f, g in glyphs.items()]
    items, dup = dedupe(items)
    return grouped_task(items, FONT_CLASSES, seed, "urw_fonts",
                        {**dup, "groups": "character (all 32 faces of it)", "characters_missing_in_a_face": skipped,
                         "faces": faces, "render": f"{GLYPH_PT} px, baseline at {GLYPH_SIZE * 3 // 4} of {GLYPH_SIZE}"})


# -- the tasks, added to mini-vtab ------------------------------------------------------------

EXTRA_TASKS = [
    Task("wesnoth_units", UNIT_CLASSES, ("wesnoth",), "Debian wesnoth-1.16-data (unit sprites)", "GPL-2.0-or-later",
         "Battle for Wesnoth unit sprites by race/faction folder, 72x72 colour; unseen units in test",
         _build_wesnoth_units),
    Task("oxygen_icons", ICON_CLASSES, ("oxygen",), "Debian oxygen-icon-theme", "LGPL-3.0-or-later",
         "Oxygen icons by freedesktop context (actions, apps, ...), 48x48 colour; unseen icons in test",
         _build_oxygen_icons),
    Task("emoji", EMOJI_CLASSES, ("emojione",), "Debian ruby-gemojione (EmojiOne 2 PNGs)", "CC-BY-SA-4.0",
         "EmojiOne emoji by category, 64x64 colour, skin-tone variants left out", _build_emoji, test_size=344),
    Task("noto_emoji", EMOJI_CLASSES, ("emojione", "noto_emoji"),
         "Debian fonts-noto-color-emoji, labels from ruby-gemojione's index", "OFL-1.1 (font); index CC-BY-SA-4.0",
         "Noto Color Emoji glyphs by EmojiOne category, 64x64 colour, skin-tone variants left out", _build_noto_emoji,
         test_size=322),
    Task("urw_fonts", FONT_CLASSES, ("urw",), "Debian fonts-urw-base35", "AGPL-3.0 with font exception",
         "which of 8 typefaces a glyph is set in (4 styles each), 32x32 grey; unseen characters in test",
         _build_urw_fonts),
]
MINI_VTAB.update({t.name: t for t in EXTRA_TASKS})
