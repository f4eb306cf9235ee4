"""Semantic segmentation data: the images/ + masks/ layout, its checks, and the Dataset (joint
augmentation is in `sparseft.data.segtransforms`).

Layout (Kvasir-SEG style, any number of splits):

    root/images/<stem>.png|jpg|jpeg    the images
    root/masks/<stem>.png|jpg|jpeg     one mask per image, same size
    root/<split>.txt                   one stem a line: train800, val200, train800val200, test, ...
    root/classes.txt                   optional: one class name a line, line i = class i (0 = background)

Without `classes.txt` masks are binary: a pixel > 127 is foreground (class 1), anything else
background (0), so 0/255 PNGs and noisy JPEG masks both work; a palette (mode P) mask is read by
its indices (0/1 or 0/255), not its colours. With it, masks are index PNGs (mode L or P, pixel
value = class index; JPEG refused) and 255 marks void pixels (`IGNORE_INDEX`), left out of the
loss and the metrics. Bad input is a `DataError` naming the file.

    ds = load_segmentation(root, "train800", SegTransform(224, mean, std, train=True), seed=0)
    image, mask = ds[0]   # float [3, H, W] normalised, long [H, W] with 255 = ignore
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sparseft.data.checks import read_text
from sparseft.data.images import DataError, open_rgb, pixel_digest, remembered
from sparseft.data.layouts import is_segmentation_dir  # noqa: F401 - re-exported (the layout is recognised there)
from sparseft.data.resolve import resolve_spec
from sparseft.data.segtransforms import (  # noqa: F401 - re-exported (joint augmentation lives there)
    SegTransform,
    collate_pairs,
    random_crop_box,
)

IGNORE_INDEX = 255
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".webp")
EXTENSIONS = (".png", ".jpg", ".jpeg")
BINARY_CLASSES = ("background", "foreground")
_ALIASES = {"train": "train800", "val": "val200", "trainval": "train800val200"}


class SegSample(NamedTuple):
    """One image of a split, its mask, and where the split listed it ("train800.txt:3")."""

    image: Path
    mask: Path
    origin: str


class SegClasses(NamedTuple):
    """The classes of a segmentation folder: names (index = class id) and whether masks are binary."""

    names: list[str]
    binary: bool

    @property
    def num_classes(self) -> int:
        return len(self.names)


# -- the layout ------------------------------------------------------------------------------

def segmentation_classes(root: str | Path) -> SegClasses:
    """Class names and count of a segmentation folder: `classes.txt`, else background/foreground."""
    file = Path(root) / "classes.txt"
    if not file.is_file():
        return SegClasses(list(BINARY_CLASSES), True)
    names: list[str] = []
    for lineno, line in enumerate(read_text(file, "class list").splitlines(), start=1):
        name = line.strip()
        if not name:
            raise DataError(f"{file}:{lineno}: empty class name (line i names class i, so no blank lines)")
        if name in names:
            raise DataError(f"{file}:{lineno}: class {name!r} is listed twice (also line {names.index(name) + 1})")
        names.append(name)
    if not 2 <= len(names) <= IGNORE_INDEX:
        raise DataError(f"{file}: {len(names)} classes; a segmentation task needs 2 to {IGNORE_INDEX} "
                        f"(index masks are 8-bit and {IGNORE_INDEX} means ignore)")
    return SegClasses(names, False)


def _by_stem(folder: Path) -> dict[str, list[str]]:
    """File names in `folder` with an image extension, grouped by stem."""
    out: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in EXTENSIONS and not name.startswith("."):
            out.setdefault(stem, []).append(name)
    return out


def _one_file(found: dict[str, list[str]], folder: Path, stem: str, where: str, what: str) -> Path:
    names = found.get(stem, [])
    if not names:
        raise DataError(f"{where}: no {what} for stem {stem!r}: expected {folder / stem}.png, .jpg or .jpeg")
    if len(names) > 1:
        raise DataError(f"{where}: stem {stem!r} has {len(names)} {what} files ({', '.join(names)} in "
                        f"{folder}); keep one")
    return folder / names[0]


def split_file(root: str | Path, split: str) -> Path:
    """`root/<split>.txt`; `train`, `val` and `trainval` stand for train800, val200, train800val200."""
    root = Path(root)
    file = root / f"{split}.txt"
    if not file.is_file() and split in _ALIASES:
        file = root / f"{_ALIASES[split]}.txt"
    return file


def read_seg_split(root: str | Path, split: str) -> list[SegSample]:
    """The samples of one split: every listed stem must have exactly one image and one mask.

    A missing or empty split file, a stem listed twice, a stem with a folder in it, or a stem
    without image or mask is a `DataError` naming the split file and line.
    """
    root = Path(root)
    file = split_file(root, split)
    if not file.is_file():
        raise DataError(f"{file}: split file not found (splits are <name>.txt files in {root})")
    images, masks = root / "images", root / "masks"
    for folder in (images, masks):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (a segmentation folder has images/ and masks/)")
    found_images, found_masks = _by_stem(images), _by_stem(masks)
    seen: dict[str, int] = {}
    samples = []
    for lineno, line in enumerate(read_text(file, "split file").splitlines(), start=1):
        stem = line.strip()
        if not stem:
            continue
        where = f"{file}:{lineno}"
        if "/" in stem or "\\" in stem or stem in (".", ".."):
            raise DataError(f"{where}: {stem!r} is not a file stem (a name without folder or extension)")
        if stem in seen:
            raise DataError(f"{where}: stem {stem!r} is listed twice (also line {seen[stem]})")
        seen[stem] = lineno
        samples.append(SegSample(_one_file(found_images, images, stem, where, "image"),
                                 _one_file(found_masks, masks, stem, where, "mask"), where))
    if not samples:
        raise DataError(f"{file}: empty split list (one stem a line expected)")
    return samples


# -- reading one pair ------------------------------------------------------------------------

def _open(path: Path, what: str, origin: str, data: bytes | None = None) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()
            return img
    except FileNotFoundError as err:
        raise DataError(f"{path}: {what} file not found (listed at {origin})") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read {what} (listed at {origin}): {err}") from err


def _binary_mask(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode == "P":  # a label image: its pixel values are palette indices, whatever their colours
        arr = np.asarray(img)
        values = set(np.unique(arr).tolist())
        if values <= {0, 1} or values <= {0, 255}:
            return (arr > 0).astype(np.uint8)
        raise DataError(f"{path}: palette mask with indices {sorted(values)[:6]}; a binary mask holds 0 and 1 (or "
                        "0 and 255); add classes.txt to read it as an index mask")
    arr = np.asarray(img if img.mode == "L" else img.convert("L"))
    if path.suffix.lower() == ".png" and img.mode in ("L", "P") and arr.max(initial=0) == 1:
        raise DataError(f"{path}: binary mask holds only 0 and 1; binary masks are 0/255 (> 127 = foreground), "
                        "or add classes.txt to read it as an index mask")
    return (arr > 127).astype(np.uint8)


def _index_mask(img: Image.Image, path: Path, num_classes: int) -> np.ndarray:
    if path.suffix.lower() in LOSSY_SUFFIXES:
        raise DataError(f"{path}: index masks must be lossless (PNG): {path.suffix} compression changes class ids at "
                        "object edges")
    if img.mode not in ("L", "P"):
        raise DataError(f"{path}: index masks must be single-channel PNGs (mode L or P), not mode {img.mode}")
    arr = np.asarray(img, dtype=np.uint8)
    values = np.unique(arr)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        y, x = (int(v[0]) for v in np.nonzero(arr == bad[0]))
        raise DataError(f"{path}: mask value {int(bad[0])} (first at x={x}, y={y}) is not a class: classes are "
                        f"0..{num_classes - 1} (classes.txt) and {IGNORE_INDEX} = ignore")
    return arr


def read_mask(path: str | Path, classes: SegClasses, origin: str = "", data: bytes | None = None) -> np.ndarray:
    """A mask file as a uint8 array of class ids (255 = ignore); `DataError` naming the file if bad.
    `data`: the file's bytes, when they have been read already."""
    path = Path(path)
    img = _open(path, "mask", origin or str(path), data)
    return _binary_mask(img, path) if classes.binary else _index_mask(img, path, classes.num_classes)


def read_pair(sample: SegSample, classes: SegClasses,
              contents: Sequence[bytes] | None = None) -> tuple[Image.Image, np.ndarray]:
    """The sample's RGB image and its mask (uint8 class ids), checked to have the same size.
    `contents`: the bytes of the image and of the mask file, when they have been read already."""
    image = open_rgb(sample.image, sample.origin, contents[0] if contents else None)
    mask = read_mask(sample.mask, classes, sample.origin, contents[1] if contents else None)
    if mask.shape != (image.height, image.width):
        raise DataError(f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image.name} "
                        f"is {image.width}x{image.height} (listed at {sample.origin})")
    return image, mask


class PairCheck(NamedTuple):
    """What reading one pair found: the digests of the image's pixels and of the mask (`pixel_digest`),
    and the classes its mask holds (ignore left out)."""

    pixels: str
    mask: str
    present: tuple[int, ...]


def check_pair(sample: SegSample, classes: SegClasses) -> PairCheck:
    """Read a pair (`read_pair`: a bad file is a `DataError` naming it) and say what it holds; remembered
    for byte-identical files in this process (`sparseft.data.images.remembered`)."""
    def check(contents: list[bytes]) -> PairCheck:
        image, mask = read_pair(sample, classes, contents)
        present = tuple(int(v) for v in np.unique(mask) if v != IGNORE_INDEX)
        return PairCheck(pixel_digest(image), pixel_digest(mask), present)

    how = ("segmentation pair", classes.binary, classes.num_classes, sample.mask.suffix.lower())
    return remembered([(sample.image, "image", sample.origin), (sample.mask, "mask", sample.origin)], how, check)


def background_name(classes: SegClasses) -> str:
    """How messages name class 0: "background" when it is one (binary masks, or so named), else by its name."""
    name = classes.names[0]
    return "background" if classes.binary or name.lower() in ("background", "bg") else f"class 0 ({name!r})"


def split_of(sample: SegSample) -> str:
    """The split file that listed a sample (its origin without the line number)."""
    return sample.origin.rsplit(":", 1)[0]


def refuse_only_background(samples: Sequence[SegSample], checks: Sequence[PairCheck], classes: SegClasses) -> None:
    """A split whose every mask holds only class 0 (or ignore) is a `DataError` naming its split file:
    it can neither train nor score a segmentation model (masks saved or read the wrong way)."""
    if not samples or any(set(check.present) - {0} for check in checks):
        return
    others = [repr(name) for name in classes.names[1:]]
    listed = (" or ".join(others) if len(others) <= 2 else
              ", ".join(others[:3]) + (", ..." if len(others) > 3 else "") + " or any other class")
    how = ("binary masks are 0/255 (> 127 = foreground) or palette images with indices 0/1" if classes.binary else
           f"index masks hold the class ids 0..{classes.num_classes - 1} of classes.txt, {IGNORE_INDEX} = ignore")
    count = f"{len(samples)} image{'' if len(samples) == 1 else 's'}"
    raise DataError(f"{split_of(samples[0])}: every mask of this split ({count}, first masks/{samples[0].mask.name}) "
                    f"holds only {background_name(classes)}, no pixel of {listed}; a split without objects can "
                    f"neither train nor score a segmentation model: check the masks ({how})")


# -- the Dataset -----------------------------------------------------------------------------

PairTransform = Callable[[Image.Image, np.ndarray, "torch.Generator | None"], Any]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed of one item in one epoch (independent of worker count and order)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()[:8], "little") >> 1


class SegmentationDataset(Dataset):
    """(image, mask) pairs of one split: `transform(image, mask, generator)` or the raw pair.

    With `seed`, item i of epoch e is augmented from its own generator seeded by (seed, e, i),
    so runs repeat exactly whatever the DataLoader's workers (call `set_epoch` each epoch);
    without it the augmentation draws from torch's global RNG. Unreadable files, a mask of
    another size or with values outside the classes raise `DataError` naming the file.
    """

    def __init__(self, samples: Sequence[SegSample], classes: SegClasses, transform: PairTransform | None = None,
                 *, seed: int | None = None):
        self.samples = list(samples)
        self.seg_classes = classes
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.checks: list[PairCheck] = []  # filled by `verify`

    @property
    def classes(self) -> list[str]:
        return list(self.seg_classes.names)

    @property
    def num_classes(self) -> int:
        return self.seg_classes.num_classes

    ignore_index = IGNORE_INDEX

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        image, mask = read_pair(self.samples[index], self.seg_classes)
        if self.transform is None:
            return image, mask
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        return self.transform(image, mask, generator)

    def verify(self) -> SegmentationDataset:
        """Read every pair now (`check_pair`, kept in `checks`), so a bad file fails before training rather
        than in epoch 37; a split whose masks hold only background is refused (`refuse_only_background`)."""
        self.checks = [check_pair(sample, self.seg_classes) for sample in self.samples]
        refuse_only_background(self.samples, self.checks, self.seg_classes)
        return self

    def __repr__(self) -> str:
        return f"SegmentationDataset({len(self)} images, {self.num_classes} classes)"


def segmentation_root(spec: str | Path, cache: str | Path | None = None) -> Path:
    """The folder of a segmentation data set: a folder, `seg:<dir>` or a task like `mini-seg/clipart-scenes`."""
    resolved = resolve_spec(str(spec), cache)
    if resolved.kind != "seg":
        raise DataError(f"{spec}: not a segmentation folder (images/ and masks/ subfolders expected)")
    return resolved.path


def load_segmentation(spec: str | Path, split: str, transform: PairTransform | None = None, *,
                      seed: int | None = None, verify: bool = False,
                      cache: str | Path | None = None) -> SegmentationDataset:
    """The Dataset of one split of a segmentation folder or provisioned task (see `segmentation_root`).

    Every listed stem is checked for its image and mask now; `verify=True` also reads every
    pair (sizes, mask values).
    """
    root = segmentation_root(spec, cache)
    dataset = SegmentationDataset(read_seg_split(root, split), segmentation_classes(root), transform, seed=seed)
    return dataset.verify() if verify else dataset
