"""The ImageFolder layout (`folder:<dir>`): one subfolder per class, split by `train`/`val`/`test`
subfolders or, without them, by a seeded per-class cut. Checked like the other layouts (see
`sparseft.data.layouts` and `sparseft.data.checks`): empty class folders, class folders linked
into other classes or the root, and fewer than two classes are `DataError`s naming them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from sparseft.data._random import stable_permutation
from sparseft.data.checks import (
    Entry,
    across_splits,
    inside,
    need_two_classes,
)
from sparseft.data.images import IMAGE_EXTENSIONS, DataError, DataWarning, Sample
from sparseft.data.layouts import canonical_split

# -- ImageFolder -----------------------------------------------------------------------------

FOLDER_FRACTIONS = (0.6, 0.2, 0.2)  # train, val, test of each class when the folder has no split


def _class_dirs(root: Path) -> list[str]:
    entries = sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    if not entries:
        raise DataError(f"{root}: no class subfolders")
    real_root = os.path.realpath(root)
    real = {e.name: os.path.realpath(e.path) for e in entries}
    for e in entries:
        if not e.is_symlink():
            continue
        target = real[e.name]
        if inside(real_root, target):
            what = "is" if target == real_root else "contains"
            raise DataError(f"{root / e.name}: class folder {e.name!r} is a symlink to {target}, which {what} the data "
                            f"set folder {root}: every image would also be in class {e.name!r}; replace the link "
                            "by a folder holding only that class's images")
        for other in entries:
            if other.name != e.name and (inside(target, real[other.name]) or inside(real[other.name], target)):
                how = ("the same folder as" if target == real[other.name] else
                       "inside" if inside(target, real[other.name]) else "a folder containing")
                raise DataError(f"{root / e.name}: class folder {e.name!r} is a symlink to {target}, {how} class "
                                f"folder {other.name!r}: those images would be in two classes; replace the link by "
                                "a folder holding only that class's images")
    return [e.name for e in entries]


def _images_under(folder: Path) -> list[Entry]:
    """Image files under `folder` (sorted, hidden names skipped, symlinked subfolders not followed,
    like `os.walk`), each with its real path. Labels are filled in by the caller."""
    out: list[Entry] = []

    def walk(path: Path, real: str) -> None:
        try:
            listing = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as err:  # not silently: the images in it would be missing without a word
            warnings.warn(DataWarning(f"{path}: cannot list this folder ({err.strerror or err}); its images are "
                                      "left out"), stacklevel=2)
            return
        subdirs = []
        for e in listing:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                if not e.is_symlink():
                    subdirs.append(e.name)
            elif Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                key = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                out.append((Sample(path / e.name, -1, ""), key))
        for name in subdirs:
            walk(path / name, os.path.join(real, name))

    walk(folder, os.path.realpath(folder))
    return out


def _has_split_dirs(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def folder_classes(root: str | Path) -> list[str]:
    """Class names of an ImageFolder tree: its sorted subfolder names (of `train/` if split)."""
    root = Path(root)
    top = root / "train" if _has_split_dirs(root) else root
    classes = _class_dirs(top)
    need_two_classes(len(classes), str(top), f"the only class folder is {classes[0]!r}")
    return classes


def _folder_entries(root: Path, classes: list[str], strict: bool = True) -> dict[int, list[Entry]]:
    """Each class's images under `root`. An image in two class folders (through symlinks) is a
    `DataError` naming both; the same image twice in one class is kept once, with a `DataWarning`.
    `strict`: a class folder that is not a known class, or holds no image, is a `DataError`."""
    known = set(classes)
    names = _class_dirs(root)
    extra = [c for c in names if c not in known]
    if extra and strict:
        raise DataError(f"{root}: class folders {extra} are not among the classes {classes}")
    out: dict[int, list[Entry]] = {}
    owner: dict[str, Sample] = {}
    repeats: list[str] = []
    for label, name in enumerate(classes):
        folder = root / name
        found = _images_under(folder) if folder.is_dir() else []
        if folder.is_dir() and not found and strict:
            raise DataError(f"{folder}: class folder {name!r} holds no image files; remove it or add images")
        kept = []
        for sample, key in found:
            sample = Sample(sample.path, label, f"{folder}/")
            seen = owner.setdefault(key, sample)
            if seen is sample:
                kept.append((sample, key))
            elif seen.label != label:
                raise DataError(f"{sample.path}: the same image as {seen.path} (through a symlink), but in class "
                                f"{name!r} and in class {classes[seen.label]!r}; an image must be in one class: "
                                "remove one of them")
            else:
                repeats.append(f"{sample.path} = {seen.path}")
        out[label] = kept
    if repeats:
        shown = "; ".join(repeats[:3]) + ("; ..." if len(repeats) > 3 else "")
        warnings.warn(f"{root}: {len(repeats)} images are the same file as another of their class (through "
                      f"symlinks) and were kept once: {shown}", DataWarning, stacklevel=3)
    return out


def _cut(samples: list[Sample], parts: Sequence[float], seed: int, salt: str) -> list[list[Sample]]:
    """Split one class's samples into len(parts) groups by a seeded permutation (rounded sizes)."""
    order = stable_permutation(len(samples), seed, salt)
    shuffled = [samples[i] for i in order]
    sizes = [round(p * len(samples)) for p in parts[1:]]
    first = len(samples) - sum(sizes)
    groups, start = [shuffled[:first]], first
    for size in sizes:
        groups.append(shuffled[start:start + size])
        start += size
    return groups


def folder_split(root: str | Path, split: str, *, seed: int = 0) -> list[Sample]:
    """Samples of an ImageFolder tree (`<root>/<class>/**/<image>`).

    Two layouts: `<root>/train/<class>/` + `<root>/test/<class>/` (+ optional `val/`) use those
    folders (without `val/`, 20 % of each train class is held out as val200); a plain tree is
    split per class, seeded and deterministic, 60 % train800 / 20 % val200 / 20 % test. Files
    whose extension is not an image type are ignored (ImageFolder's convention).
    """
    root = Path(root)
    split = canonical_split(split)
    classes = folder_classes(root)
    if _has_split_dirs(root):
        has_val = (root / "val").is_dir()
        parts = ("train", "val", "test") if has_val else ("train", "test")
        if split == "test" or has_val:
            wanted = {"train800": ("train",), "val200": ("val",), "train800val200": ("train", "val"),
                      "test": ("test",)}[split]
        else:
            wanted = ("train",)  # val200 is cut from train/
        trees: dict[str, list[Entry]] = {}
        for name in parts:
            try:
                groups = _folder_entries(root / name, classes, strict=name in wanted)
            except DataError:
                if name in wanted:
                    raise
                continue  # reported when that split is loaded; here it only serves the overlap check
            trees[name] = [e for label in sorted(groups) for e in groups[label]]
        across_splits(trees, {n: f"{root / n}/" for n in parts}, train=("train",), val=("val",), test=("test",))
        if split == "test" or has_val:
            samples = [s for name in wanted for s, _ in trees[name]]
        else:
            samples = []
            for label in range(len(classes)):
                group = [s for s, _ in trees["train"] if s.label == label]
                train, val = _cut(group, (0.8, 0.2), seed, f"{classes[label]}")
                samples += {"train800": train, "val200": val, "train800val200": train + val}[split]
    else:
        groups = _folder_entries(root, classes)
        samples = []
        for label in sorted(groups):
            train, val, test = _cut([s for s, _ in groups[label]], FOLDER_FRACTIONS, seed, f"{classes[label]}")
            samples += {"train800": train, "val200": val, "train800val200": train + val, "test": test}[split]
    if not samples:
        raise DataError(f"{root}: split {split} has no images")
    return samples
