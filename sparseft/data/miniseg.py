"""mini-seg: an offline semantic-segmentation task built from pinned package files.

`mini-seg/clipart-scenes`: 128x128 scenes of 1-3 openclipart drawings (Debian openclipart-png,
public domain) from seven categories pasted onto crops of CC0 / public-domain photos and
textures shipped in the scikit-image wheel. A drawing's alpha channel is its exact mask
(alpha >= 128); it is composited with its real alpha, later objects occluding earlier ones in
image and mask alike. Drawings used in test are never used in train/val (each category's
drawings are split by a hash of their sha256), and background crops for test come from
another part of each photo (columns 65-100 %) than those for train/val (0-60 %).

Everything is drawn from a fixed seed with `stable_uniform` (each scene from its own stream),
so two builds give byte-identical files. Importing this module registers the suite `mini-seg`
(`sparseft data fetch mini-seg`) with this task and `nuclei` (`sparseft.data.nuclei`: real
microscopy); `sparseft.data.segmentation` reads the result.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from sparseft.data._random import stable_uniform
from sparseft.data.images import DataError
from sparseft.data.minivtab import CLIPART_MAX_PIXELS, CLIPART_ROOT, dedupe_clipart, read_clipart
from sparseft.data.nuclei import N_TEST as NUCLEI_TEST
from sparseft.data.nuclei import NUCLEI_CLASSES, build_nuclei
from sparseft.data.segtasks import Scene, SegTaskData, write_segmentation_task
from sparseft.data.tasks import Task, register_suite
from sparseft.provision import read_members

SCENE_CLASSES = ("background", "animals", "food", "people", "transportation", "tools", "plants", "buildings")
CATEGORIES = SCENE_CLASSES[1:]
SCENE_SIZE = 128
N_TRAINVAL, N_TEST = 1000, 600  # train800 = the first 800 of train800val200, val200 the last 200
TEST_DRAWING_SHARE = 1 / 3  # of each category's drawings, used only in test
DRAWING_SIDE = 128  # drawings are cropped to their alpha box and shrunk to this longest side once
COVER = (0.10, 0.40)  # share of the scene each object's mask covers (before occlusion)
MAX_OBJECTS = 3
# CC0 / public-domain photos without a person, animal, food or vehicle in them (skimage.data docs).
BACKGROUNDS = ("brick.png", "grass.png", "gravel.png", "cell.png", "clock_motion.png", "text.png",
               "hubble_deep_field.jpg", "retina.jpg")
BACKGROUND_COLUMNS = {"trainval": (0.0, 0.60), "test": (0.65, 1.0)}  # disjoint parts of each photo
BACKGROUND_CROP = (0.4, 1.0)  # square crop side, as a share of the part's shorter side
OBJECT_COLUMNS = ("stem", "class", "drawing", "x", "y", "width", "height", "flipped")
_DRAWS = 6 + 6 * MAX_OBJECTS  # uniforms per scene: background (5), count (1), 6 per object slot


class Drawing(NamedTuple):
    """A usable drawing: its member name, RGBA pixels cropped to its alpha box, and mask share of that box."""

    name: str
    rgba: Image.Image
    fill: float


# -- drawings ---------------------------------------------------------------------------------

def prepare_drawing(name: str, raw: bytes) -> Drawing | str:
    """The drawing ready to paste, or why it is skipped: "no_alpha", "unreadable", "too_large",
    "opaque" (no pixel with alpha < 128) or "empty" (no pixel with alpha >= 128)."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.size[0] * img.size[1] > CLIPART_MAX_PIXELS:
                return "too_large"
            if not (img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info):
                return "no_alpha"
            img.load()
            rgba = img.convert("RGBA")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable"
    alpha = np.asarray(rgba.getchannel("A"))
    solid = alpha >= 128
    if solid.all():
        return "opaque"
    if not solid.any():
        return "empty"
    rgba = rgba.crop(rgba.getchannel("A").getbbox())
    if max(rgba.size) > DRAWING_SIDE:
        k = DRAWING_SIDE / max(rgba.size)
        new = (max(1, round(rgba.width * k)), max(1, round(rgba.height * k)))
        rgba = rgba.resize(new, Image.LANCZOS, reducing_gap=3.0)
    fill = float((np.asarray(rgba.getchannel("A")) >= 128).mean())
    return Drawing(name[len(CLIPART_ROOT):], rgba, fill) if fill > 0 else "empty"


def split_key(raw: bytes, seed: int) -> bytes:
    """The sort key that splits a category's drawings into test and train/val: a hash of the file's sha256."""
    return hashlib.sha256(f"mini-seg/{seed}/{hashlib.sha256(raw).hexdigest()}".encode()).digest()


def load_drawings(deb: Path, seed: int) -> tuple[dict[str, dict[str, list[Drawing]]], dict[str, Any]]:
    """Each split's drawings per category ({"trainval": {...}, "test": {...}}) and build notes.

    Per category: byte duplicates removed (see `dedupe_clipart`), unusable drawings skipped
    (counted in the notes), identical renderings kept once; then ordered by `split_key` and the
    first `TEST_DRAWING_SHARE` go to test, the rest to train/val.
    """
    m = read_clipart(deb, CATEGORIES)
    per_class, notes = dedupe_clipart(m, CATEGORIES)
    notes = {**notes, "rendered_duplicates_dropped": 0}
    out: dict[str, dict[str, list[Drawing]]] = {"trainval": {}, "test": {}}
    rendered: set[bytes] = set()
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # huge drawings are skipped anyway
        for cls in CATEGORIES:
            names = sorted(per_class[cls], key=lambda n: split_key(m[n], seed))
            usable = []
            for got in pool.map(lambda n: prepare_drawing(n, m[n]), names):
                if isinstance(got, str):
                    notes[f"skipped_{got}"] = notes.get(f"skipped_{got}", 0) + 1
                    continue
                key = hashlib.sha256(got.rgba.tobytes() + repr(got.rgba.size).encode()).digest()
                if key in rendered:
                    notes["rendered_duplicates_dropped"] += 1
                    continue
                rendered.add(key)
                usable.append(got)
            if len(usable) < 2:
                raise DataError(f"mini-seg: category {cls!r} has {len(usable)} usable drawings; needs 2 or more")
            n_test = min(len(usable) - 1, max(1, round(len(usable) * TEST_DRAWING_SHARE)))
            out["test"][cls], out["trainval"][cls] = usable[:n_test], usable[n_test:]
            notes[f"drawings_{cls}"] = {"test": n_test, "trainval": len(usable) - n_test}
    return out, notes


# -- backgrounds and scenes -------------------------------------------------------------------

def load_backgrounds(wheel: Path) -> list[Image.Image]:
    """The background photos (`BACKGROUNDS`) from the scikit-image wheel, as RGB."""
    wanted = {f"skimage/data/{name}" for name in BACKGROUNDS}
    m = read_members(wheel, lambda n: n in wanted)
    photos = []
    for name in BACKGROUNDS:
        with Image.open(io.BytesIO(m[f"skimage/data/{name}"])) as img:
            photos.append(img.convert("RGB"))
    return photos


def background(photo: Image.Image, split: str, u: Sequence[float], size: int = SCENE_SIZE) -> Image.Image:
    """A square crop from the split's columns of `photo` (side 40-100 % of the part's shorter side),
    resized to `size`, mirrored when u[3] < 0.5. `u`: four uniforms in [0, 1)."""
    lo, hi = (int(f * photo.width) for f in BACKGROUND_COLUMNS[split])
    side = max(8, round((BACKGROUND_CROP[0] + u[0] * (BACKGROUND_CROP[1] - BACKGROUND_CROP[0]))
                        * min(hi - lo, photo.height)))
    left = lo + int(u[1] * (hi - lo - side + 1))
    top = int(u[2] * (photo.height - side + 1))
    crop = photo.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=2.0)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if u[3] < 0.5 else crop


def place(drawing: Drawing, u: Sequence[float], size: int = SCENE_SIZE) -> tuple[Image.Image, int, int, bool]:
    """The drawing scaled so its mask covers `COVER` of the scene (as far as it fits), maybe
    mirrored, and its top-left corner: (rgba, x, y, mirrored). `u`: four uniforms."""
    w0, h0 = drawing.rgba.size
    cover = COVER[0] + u[0] * (COVER[1] - COVER[0])
    k = min(math.sqrt(cover * size * size / (drawing.fill * w0 * h0)), size / max(w0, h0))
    w, h = min(size, max(4, round(w0 * k))), min(size, max(4, round(h0 * k)))
    rgba = drawing.rgba.resize((w, h), Image.BICUBIC)
    mirrored = u[1] < 0.5
    if mirrored:
        rgba = rgba.transpose(Image.FLIP_LEFT_RIGHT)
    return rgba, int(u[2] * (size - w + 1)), int(u[3] * (size - h + 1)), mirrored


def compose(stem: str, photos: Sequence[Image.Image], pools: Mapping[str, Sequence[Drawing]], split: str,
            u: Sequence[float], size: int = SCENE_SIZE) -> Scene:
    """One scene from `_DRAWS` uniforms: background, 1-`MAX_OBJECTS` objects, in order (later on top)."""
    bg = background(photos[int(u[0] * len(photos))], split, u[1:5], size)
    canvas = np.asarray(bg, dtype=np.int32).copy()
    mask = np.zeros((size, size), dtype=np.uint8)
    objects = []
    for slot in range(1 + int(u[5] * MAX_OBJECTS)):
        v = u[6 + 6 * slot:12 + 6 * slot]
        cls = CATEGORIES[int(v[0] * len(CATEGORIES))]
        pool = pools[cls]
        drawing = pool[int(v[1] * len(pool))]
        rgba, x, y, mirrored = place(drawing, v[2:6], size)
        arr = np.asarray(rgba, dtype=np.int32)
        alpha = arr[..., 3:4]
        box = (slice(y, y + rgba.height), slice(x, x + rgba.width))
        canvas[box] = (arr[..., :3] * alpha + canvas[box] * (255 - alpha) + 127) // 255
        mask[box][arr[..., 3] >= 128] = SCENE_CLASSES.index(cls)
        objects.append((cls, drawing.name, x, y, rgba.width, rgba.height, int(mirrored)))
    return Scene(stem, canvas.astype(np.uint8), mask, objects)


def build_scenes(files: Mapping[str, Path], seed: int, *, n_trainval: int = N_TRAINVAL,
                 n_test: int = N_TEST) -> SegTaskData:
    """The clipart-scenes task: `n_trainval` scenes (train800 = the first 80 %, val200 the rest)
    and `n_test` test scenes, from the openclipart .deb and the scikit-image wheel."""
    pools, notes = load_drawings(files["openclipart"], seed)
    photos = load_backgrounds(files["skimage"])
    n_val = n_trainval // 5
    stems = {"trainval": [f"trainval_{i:04d}" for i in range(n_trainval)],
             "test": [f"test_{i:04d}" for i in range(n_test)]}

    def scene(job: tuple[str, int]) -> Scene:
        split, i = job
        u = stable_uniform(_DRAWS, seed, f"mini-seg/{split}/{i}")
        return compose(stems[split][i], photos, pools[split], split, u)

    jobs = [(split, i) for split in ("trainval", "test") for i in range(len(stems[split]))]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        scenes = list(pool.map(scene, jobs))
    trainval = stems["trainval"]
    splits = {"train800": trainval[:n_trainval - n_val], "val200": trainval[n_trainval - n_val:],
              "train800val200": trainval, "test": stems["test"]}
    notes.update({"scene_size": SCENE_SIZE, "objects_per_scene": f"1-{MAX_OBJECTS}",
                  "object_cover": f"{COVER[0]:.2f}-{COVER[1]:.2f} of the scene each, before occlusion",
                  "backgrounds": list(BACKGROUNDS),
                  "background_columns": {k: f"{a:.0%}-{b:.0%}" for k, (a, b) in BACKGROUND_COLUMNS.items()},
                  "test_drawing_share": round(TEST_DRAWING_SHARE, 4)})
    return SegTaskData(scenes, splits, list(SCENE_CLASSES), notes, OBJECT_COLUMNS)


def _build(files: Mapping[str, Path], seed: int) -> SegTaskData:
    return build_scenes(files, seed, n_trainval=N_TRAINVAL, n_test=N_TEST)  # module values read at call time


MINI_SEG: dict[str, Task] = register_suite("mini-seg", [
    Task("clipart-scenes", SCENE_CLASSES, ("openclipart", "skimage"),
         "Debian openclipart-png drawings on PyPI scikit-image photos",
         "public domain (drawings); CC0 / public domain (photos)",
         "128x128 scenes of 1-3 clip-art objects of 7 categories on photo crops; index masks",
         _build, test_size=N_TEST, write=write_segmentation_task),
    Task("nuclei", NUCLEI_CLASSES, ("stardist",), "PyPI stardist's nuclei image and its hand-made mask",
         "CC0 (image and mask, BBBC038)",
         "128x128 crops of one fluorescence image of cell nuclei from disjoint parts for train, val and test; "
         "binary masks", build_nuclei, test_size=NUCLEI_TEST, write=write_segmentation_task),
])
