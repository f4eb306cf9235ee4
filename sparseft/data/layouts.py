"""Readers for the three on-disk layouts: VTAB-1k (NOAH), FGVC (VPT json) and ImageFolder.

Each reader returns `Sample`s and checks them: a malformed entry, a file that does not exist
or a label out of range is a `DataError` naming the split file and line (or json entry);
`on_error="skip"` skips such entries with one warning giving the count.

Split names are VTAB-1k's: `train800`, `val200`, `train800val200`, `test` (aliases `train`,
`val`, `trainval`). Other layouts map them onto their own splits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from sparseft.data._random import stable_permutation
from sparseft.data.images import IMAGE_EXTENSIONS, DataError, OnError, Problems, Sample

SPLITS = ("train800", "val200", "train800val200", "test")
_ALIASES = {"train": "train800", "val": "val200", "trainval": "train800val200"}


def canonical_split(split: str) -> str:
    """`train800`/`val200`/`train800val200`/`test`, accepting `train`/`val`/`trainval` too."""
    name = _ALIASES.get(split, split)
    if name not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (or train, val, trainval)")
    return name


def _finish(samples: list[Sample], problems: Problems, source: str) -> list[Sample]:
    problems.finish()
    if not samples:
        raise DataError(f"{source}: no usable samples")
    return samples


def _admit(samples: list[Sample], problems: Problems, sample: Sample, num_classes: int | None, check_files: bool,
           note: str = "") -> None:
    """Append `sample` unless its label is out of range or (with `check_files`) its file is missing: report that."""
    label, where = sample.label, sample.origin
    if label < 0:
        problems.report(f"{where}: label {label} is negative{note}")
    elif num_classes is not None and label >= num_classes:
        problems.report(f"{where}: label {label} is out of range for {num_classes} classes{note}")
    elif check_files and not sample.path.is_file():
        problems.report(f"{where}: image file not found: {sample.path}")
    else:
        samples.append(sample)


# -- VTAB-1k (NOAH layout) -------------------------------------------------------------------

def read_split_file(path: str | Path, root: str | Path | None = None, *, num_classes: int | None = None,
                    on_error: OnError = "raise", check_files: bool = True) -> list[Sample]:
    """Parse a `relative/path label` list (one sample a line; blank lines ignored).

    Paths are relative to `root` (default: the list's folder) and may contain spaces (the
    label is the last field). Errors name the list file and the line number.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{path}: split file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read split file: {err}") from err
    problems = Problems(on_error, f"lines in {path.name}")
    samples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2:
            problems.report(f"{where}: malformed line {line.strip()!r}, expected '<relative/path> <label>'")
            continue
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            problems.report(f"{where}: malformed line {line.strip()!r}, label {label_text!r} is not an integer")
            continue
        _admit(samples, problems, Sample(root / rel, label, where), num_classes, check_files)
    return _finish(samples, problems, str(path))


def is_vtab_dir(path: str | Path) -> bool:
    """A VTAB-1k task folder is recognised by its `train800.txt`."""
    return (Path(path) / "train800.txt").is_file()


def vtab_split(task_dir: str | Path, split: str, *, num_classes: int | None = None, on_error: OnError = "raise",
               check_files: bool = True) -> list[Sample]:
    """Samples of one split of a VTAB-1k task folder (`<split>.txt`, paths relative to the folder)."""
    task_dir = Path(task_dir)
    return read_split_file(task_dir / f"{canonical_split(split)}.txt", task_dir, num_classes=num_classes,
                           on_error=on_error, check_files=check_files)


def vtab_classes(task_dir: str | Path) -> list[str]:
    """Class names of a VTAB-1k task folder.

    `classes.txt` (one name a line, as provisioned tasks have) if present; otherwise the
    classes are numbered 0..max label seen in any split file (the NOAH files carry no names).
    """
    task_dir = Path(task_dir)
    names_file = task_dir / "classes.txt"
    if names_file.is_file():
        names = [n.strip() for n in names_file.read_text(encoding="utf-8").splitlines() if n.strip()]
        if not names:
            raise DataError(f"{names_file}: no class names")
        return names
    top = -1
    for split in SPLITS:
        file = task_dir / f"{split}.txt"
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.strip().rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                top = max(top, int(parts[1]))
    if top < 0:
        raise DataError(f"{task_dir}: no labels found in its split files")
    return [str(i) for i in range(top + 1)]


# -- FGVC (VPT json splits) ------------------------------------------------------------------

FGVC_SPLITS = {"train800": ("train",), "val200": ("val",), "train800val200": ("train", "val"), "test": ("test",)}


def is_fgvc_dir(path: str | Path) -> bool:
    """An FGVC data-set folder holds VPT-style `train.json` and `test.json`."""
    return (Path(path) / "train.json").is_file() and (Path(path) / "test.json").is_file()


def _read_json_labels(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"{path}: split file not found") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable json file: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a json object mapping image path -> integer label")
    return data


def _valid_json_label(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def fgvc_class_ids(dataset_dir: str | Path) -> list[int]:
    """The sorted distinct labels over train/val/test json; label i of the model is the i-th.

    VPT maps each split's sorted distinct labels to 0..C-1 (CUB's 1..200 become 0..199); using
    the union of all splits gives the same result and stays right if a split lacks a class.
    """
    dataset_dir = Path(dataset_dir)
    ids: set[int] = set()
    for name in ("train", "val", "test"):
        file = dataset_dir / f"{name}.json"
        if file.is_file():
            ids.update(v for v in _read_json_labels(file).values() if _valid_json_label(v))
    if not ids:
        raise DataError(f"{dataset_dir}: no valid labels in train/val/test.json")
    return sorted(ids)


def fgvc_image_root(dataset_dir: str | Path) -> Path:
    """Where the json paths are relative to: `images/`, `Images/` or the folder itself.

    VPT's layouts: CUB and NABirds `<dir>/images`, Stanford Dogs `<dir>/Images`, Flowers and
    Cars `<dir>`. The first candidate that holds the first listed image of train.json wins.
    """
    dataset_dir = Path(dataset_dir)
    first = next(iter(_read_json_labels(dataset_dir / "train.json")), None)
    candidates = [dataset_dir / "images", dataset_dir / "Images", dataset_dir]
    if first is not None:
        for root in candidates:
            if (root / first).is_file():
                return root
    raise DataError(f"{dataset_dir}: cannot find the first image of train.json ({first!r}) under "
                    f"{', '.join(str(c) for c in candidates)}")


def read_json_split(path: str | Path, image_root: str | Path, class_ids: Sequence[int], *,
                    num_classes: int | None = None, on_error: OnError = "raise",
                    check_files: bool = True) -> list[Sample]:
    """Samples of a VPT-style json split (`{"relative/path.jpg": label, ...}`).

    Labels are mapped to 0..C-1 through `class_ids` (see `fgvc_class_ids`). Errors name the
    json file and the entry (its position and key): json files carry no useful line numbers.
    """
    path, image_root = Path(path), Path(image_root)
    index = {cid: i for i, cid in enumerate(class_ids)}
    problems = Problems(on_error, f"entries in {path.name}")
    samples = []
    for pos, (rel, raw) in enumerate(_read_json_labels(path).items(), start=1):
        where = f"{path} entry {pos} ({rel!r})"
        if not isinstance(raw, int) or isinstance(raw, bool):
            problems.report(f"{where}: malformed entry, label {raw!r} is not an integer")
            continue
        if raw < 0:
            problems.report(f"{where}: label {raw} is negative")
            continue
        if raw not in index:
            problems.report(f"{where}: label {raw} is not one of the data set's classes")
            continue
        _admit(samples, problems, Sample(image_root / rel, index[raw], where), num_classes, check_files,
               note=f" (raw label {raw})")
    return _finish(samples, problems, str(path))


def fgvc_split(dataset_dir: str | Path, split: str, *, num_classes: int | None = None, on_error: OnError = "raise",
               check_files: bool = True) -> list[Sample]:
    """Samples of an FGVC data set: train800 -> train.json, val200 -> val.json,
    train800val200 -> both, test -> test.json."""
    dataset_dir = Path(dataset_dir)
    root = fgvc_image_root(dataset_dir)
    ids = fgvc_class_ids(dataset_dir)
    samples: list[Sample] = []
    for name in FGVC_SPLITS[canonical_split(split)]:
        samples += read_json_split(dataset_dir / f"{name}.json", root, ids, num_classes=num_classes,
                                   on_error=on_error, check_files=check_files)
    return samples


# -- ImageFolder -----------------------------------------------------------------------------

FOLDER_FRACTIONS = (0.6, 0.2, 0.2)  # train, val, test of each class when the folder has no split


def _class_dirs(root: Path) -> list[str]:
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no class subfolders")
    return names


def _images_under(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return files


def _has_split_dirs(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def folder_classes(root: str | Path) -> list[str]:
    """Class names of an ImageFolder tree: its sorted subfolder names (of `train/` if split)."""
    root = Path(root)
    return _class_dirs(root / "train" if _has_split_dirs(root) else root)


def _folder_samples(root: Path, classes: list[str]) -> dict[int, list[Sample]]:
    known = set(classes)
    extra = [c for c in _class_dirs(root) if c not in known]
    if extra:
        raise DataError(f"{root}: class folders {extra} are not among the classes {classes}")
    out: dict[int, list[Sample]] = {}
    for label, name in enumerate(classes):
        folder = root / name
        files = _images_under(folder) if folder.is_dir() else []
        if folder.is_dir() and not files:
            raise DataError(f"{folder}: class folder {name!r} holds no image files; remove it or add images")
        out[label] = [Sample(f, label, f"{folder}/") for f in files]
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
        if split == "test":
            groups = _folder_samples(root / "test", classes)
            samples = [s for label in sorted(groups) for s in groups[label]]
        elif (root / "val").is_dir():
            samples = []
            for name in (("train",) if split == "train800" else ("val",) if split == "val200" else ("train", "val")):
                groups = _folder_samples(root / name, classes)
                samples += [s for label in sorted(groups) for s in groups[label]]
        else:
            groups = _folder_samples(root / "train", classes)
            samples = []
            for label in sorted(groups):
                train, val = _cut(groups[label], (0.8, 0.2), seed, f"{classes[label]}")
                samples += {"train800": train, "val200": val, "train800val200": train + val}[split]
    else:
        groups = _folder_samples(root, classes)
        samples = []
        for label in sorted(groups):
            train, val, test = _cut(groups[label], FOLDER_FRACTIONS, seed, f"{classes[label]}")
            samples += {"train800": train, "val200": val, "train800val200": train + val, "test": test}[split]
    if not samples:
        raise DataError(f"{root}: split {split} has no images")
    return samples
