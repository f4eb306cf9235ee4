"""Writing a provisioned segmentation task in the images/ + masks/ layout (see `segmentation`).

`write_segmentation_task(dest, data, info)` is the `Task.write` of segmentation suites: RGB
PNG images, index PNG masks (mode P with a VOC-style palette, so they are viewable; the pixel
value is the class id, 255 = ignore), one `<split>.txt` of stems per split, `classes.txt`,
an optional `objects.tsv` (what was drawn where) and `info.json` last, all in a temporary
folder renamed into place when complete (`tasks.building`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sparseft.data.images import DataError
from sparseft.data.segmentation import IGNORE_INDEX
from sparseft.data.tasks import FORMAT_VERSION, PNG_LEVEL, building, save_in_parallel

SPLIT_NAMES = ("train800", "val200", "train800val200", "test")


@dataclass
class Scene:
    """One image of a segmentation task: its stem, RGB pixels, class-id mask and (optional) object rows."""

    stem: str
    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W uint8 class ids, 255 = ignore
    objects: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class SegTaskData:
    """A segmentation task's scenes, its split lists (split name -> stems) and class names."""

    scenes: list[Scene]
    splits: dict[str, list[str]]
    classes: list[str]
    notes: dict[str, Any] = field(default_factory=dict)
    object_columns: tuple[str, ...] = ()


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (768 values): class i gets a distinct colour, 255 cream (void)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    palette[3 * IGNORE_INDEX:] = [224, 224, 192]
    return palette


def _check(name: str, data: SegTaskData) -> None:
    stems = [s.stem for s in data.scenes]
    if len(set(stems)) != len(stems):
        raise DataError(f"{name}: scene stems repeat")
    known = set(stems)
    for split in SPLIT_NAMES:
        listed = data.splits.get(split)
        if not listed:
            raise DataError(f"{name}: split {split!r} is missing or empty")
        if any(s not in known for s in listed):
            raise DataError(f"{name}: split {split} lists stems without a scene")
    n = len(data.classes)
    for s in data.scenes:
        if s.image.dtype != np.uint8 or s.image.ndim != 3 or s.image.shape[2] != 3:
            raise DataError(f"{name}/{s.stem}: images must be HxWx3 uint8, got {s.image.dtype} {s.image.shape}")
        if s.mask.dtype != np.uint8 or s.mask.shape != s.image.shape[:2]:
            raise DataError(f"{name}/{s.stem}: mask {s.mask.dtype} {s.mask.shape} does not fit image {s.image.shape}")
        bad = np.setdiff1d(np.unique(s.mask), [*range(n), IGNORE_INDEX])
        if bad.size:
            raise DataError(f"{name}/{s.stem}: mask values {bad[:5].tolist()} outside 0..{n - 1} and {IGNORE_INDEX}")


def _write_scenes(folder: Path, scenes: Sequence[Scene], bar_name: str | None) -> set[tuple[int, int]]:
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    palette = voc_palette()

    def save(scene: Scene) -> tuple[int, int]:
        Image.fromarray(scene.image, "RGB").save(folder / "images" / f"{scene.stem}.png", format="PNG",
                                                  compress_level=PNG_LEVEL)
        height, width = scene.mask.shape
        mask = Image.frombytes("P", (width, height), np.ascontiguousarray(scene.mask).tobytes())
        mask.putpalette(palette)
        mask.save(folder / "masks" / f"{scene.stem}.png", format="PNG", compress_level=PNG_LEVEL)
        return scene.image.shape[1], scene.image.shape[0]

    return save_in_parallel(save, scenes, bar_name)


def write_segmentation_task(dest: str | Path, data: SegTaskData, info: Mapping[str, Any] | None = None, *,
                            progress: bool = True) -> Path:
    """Write a segmentation task at `dest` atomically (temporary folder, then rename); returns `dest`.

    `data.splits` needs train800, val200, train800val200 and test (other splits are written too).
    """
    dest = Path(dest)
    _check(dest.name, data)
    with building(dest) as tmp:
        sizes = _write_scenes(tmp, data.scenes, dest.name if progress else None)
        for split, stems in data.splits.items():
            (tmp / f"{split}.txt").write_text("\n".join(stems) + "\n")
        (tmp / "classes.txt").write_text("\n".join(data.classes) + "\n")
        if data.object_columns:
            rows = ["\t".join(data.object_columns)]
            rows += ["\t".join(str(v) for v in (s.stem, *row)) for s in data.scenes for row in s.objects]
            (tmp / "objects.tsv").write_text("\n".join(rows) + "\n")
        meta = dict(info or {})
        meta.update({
            "format_version": FORMAT_VERSION, "kind": "segmentation", "ignore_index": IGNORE_INDEX,
            "num_classes": len(data.classes), "classes": list(data.classes),
            "splits": {split: len(stems) for split, stems in data.splits.items()},
            "image_sizes": [f"{w}x{h}" for w, h in sorted(sizes)],
            "notes": dict(data.notes),
        })
        (tmp / "info.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return dest
