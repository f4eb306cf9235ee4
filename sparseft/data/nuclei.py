"""mini-seg/nuclei: a binary segmentation task cut from real annotated microscopy.

The one segmentation image with a hand-made mask that a package ships here: the 512x512
fluorescence image of cell nuclei and its instance mask in the stardist wheel (from the 2018
Data Science Bowl, BBBC038, CC0). Every scene is a square crop of it, resized to 128x128,
mirrored and rotated by multiples of 90 degrees at random; the mask is binary (nucleus = any
instance). Train, val and test crops come from disjoint parts of the image, so no test pixel is
ever seen in training:

    train800: columns 0-60 %, rows 0-70 %    val200: columns 0-60 %, rows 75-100 %
    test:     columns 65-100 %, all rows

Crops of one part overlap each other: 800 training crops hold far less than 800 images'
worth of information. Each scene is drawn from its own `stable_uniform` stream, so builds are
byte-identical.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from sparseft.data._random import stable_uniform
from sparseft.data.images import DataError
from sparseft.data.segtasks import Scene, SegTaskData
from sparseft.provision import read_members

NUCLEI_CLASSES = ("background", "nucleus")
IMAGE, MASK = "stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif"
SCENE_SIZE = 128
N_TRAIN, N_VAL, N_TEST = 800, 200, 300
CROP_SIDE = (48, 96)  # pixels of the source image, before resizing to SCENE_SIZE
# (first column, last column, first row, last row) as shares of the image: disjoint parts
PARTS = {"train": (0.0, 0.60, 0.0, 0.70), "val": (0.0, 0.60, 0.75, 1.0), "test": (0.65, 1.0, 0.0, 1.0)}


def load_source(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image (H x W uint8) and its binary mask (H x W, 1 = nucleus) from the stardist wheel."""
    found = read_members(wheel, lambda name: name in (IMAGE, MASK))
    if set(found) != {IMAGE, MASK}:
        raise DataError(f"{wheel}: {', '.join(sorted({IMAGE, MASK} - set(found)))} missing")
    try:
        with Image.open(io.BytesIO(found[IMAGE])) as im, Image.open(io.BytesIO(found[MASK])) as ms:
            image, mask = np.asarray(im).astype(np.int64), np.asarray(ms)
    except (OSError, ValueError) as err:
        raise DataError(f"{wheel}: cannot read {IMAGE} or {MASK}: {err}") from err
    if image.shape != mask.shape or image.ndim != 2:
        raise DataError(f"{wheel}: image {image.shape} and mask {mask.shape} should be one 2-D size")
    scale = 255 / max(int(image.max()), 1) if image.max() > 255 else 1  # 16-bit container, 8-bit values
    return np.clip(image * scale, 0, 255).astype(np.uint8), (mask > 0).astype(np.uint8)


def crop(image: np.ndarray, mask: np.ndarray, part: str, u: np.ndarray, stem: str) -> Scene:
    """One scene from five uniforms: side, x, y (inside the part), mirror, quarter turns."""
    h, w = image.shape
    x0, x1, y0, y1 = PARTS[part]
    left, right, top, bottom = round(x0 * w), round(x1 * w), round(y0 * h), round(y1 * h)
    side = min(round(CROP_SIDE[0] + u[0] * (CROP_SIDE[1] - CROP_SIDE[0])), right - left, bottom - top)
    x = left + int(u[1] * (right - left - side + 1))
    y = top + int(u[2] * (bottom - top - side + 1))
    size = (SCENE_SIZE, SCENE_SIZE)
    img = np.asarray(Image.fromarray(image[y:y + side, x:x + side]).resize(size, Image.BILINEAR))
    msk = np.asarray(Image.fromarray(mask[y:y + side, x:x + side]).resize(size, Image.NEAREST))
    if u[3] < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    turns = int(u[4] * 4)
    img, msk = np.rot90(img, turns), np.rot90(msk, turns)
    rgb = np.ascontiguousarray(np.repeat(img[..., None], 3, axis=2))
    return Scene(stem, rgb, np.ascontiguousarray(msk), [(x, y, side, int(u[3] < 0.5), turns)])


def build_nuclei(files: Mapping[str, Path], seed: int) -> SegTaskData:
    """The nuclei task: N_TRAIN + N_VAL + N_TEST crops of the stardist image from disjoint parts."""
    image, mask = load_source(files["stardist"])
    counts = {"train": N_TRAIN, "val": N_VAL, "test": N_TEST}
    stems = {part: [f"{part}_{i:04d}" for i in range(n)] for part, n in counts.items()}
    scenes = [crop(image, mask, part, stable_uniform(5, seed, f"mini-seg/nuclei/{part}/{i}"), stem)
              for part in counts for i, stem in enumerate(stems[part])]
    splits = {"train800": stems["train"], "val200": stems["val"], "train800val200": stems["train"] + stems["val"],
              "test": stems["test"]}
    notes = {"source_image": f"{image.shape[1]}x{image.shape[0]}", "nucleus_share": round(float(mask.mean()), 4),
             "crop_side_px": f"{CROP_SIDE[0]}-{CROP_SIDE[1]}", "scene_size": SCENE_SIZE,
             "parts": {part: f"columns {a:.0%}-{b:.0%}, rows {c:.0%}-{d:.0%}" for part, (a, b, c, d) in PARTS.items()}}
    return SegTaskData(scenes, splits, list(NUCLEI_CLASSES), notes, ("stem", "x", "y", "side", "mirrored", "turns"))
