"""Readers for the benchmark layouts VTAB-1k (NOAH) and FGVC (VPT json); ImageFolder is in `folder.py`.

Each reader returns `Sample`s and checks them: a malformed entry, a file that does not exist,
a path leaving the data-set folder or a label out of range is a `DataError` naming the split
file and line (or json entry); `on_error="skip"` skips such entries with one warning giving
the count. A data set is read and checked as a whole when it is opened (`vtab_task`,
`fgvc_task`, `folder_split`): what would silently change the task (one image with two
labels, a gap in inferred labels, a class without training sample, a single class, a class
folder linked into another) is always a `DataError`; see `sparseft.data.checks`.

Split names are VTAB-1k's: `train800`, `val200`, `train800val200`, `test` (aliases `train`,
`val`, `trainval`). Other layouts map them onto their own splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sparseft.data.checks import (
    Entry,
    JsonPairs,
    PathGuard,
    across_splits,
    contiguous_labels,
    dedupe,
    need_two_classes,
    read_json_pairs,
    read_text,
    trained_classes,
)
from sparseft.data.images import DataError, OnError, Problems, Sample
from sparseft.errors import InputError

SPLITS = ("train800", "val200", "train800val200", "test")
_ALIASES = {"train": "train800", "val": "val200", "trainval": "train800val200"}


def canonical_split(split: str) -> str:
    """`train800`/`val200`/`train800val200`/`test`, accepting `train`/`val`/`trainval` too."""
    name = _ALIASES.get(split, split)
    if name not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (or train, val, trainval)")
    return name


def _nonempty(samples: list[Sample], source: str) -> list[Sample]:
    if not samples:
        raise DataError(f"{source}: no usable samples")
    return samples


def _admit(entries: list[Entry], problems: Problems, guard: PathGuard, rel: str, label: int, where: str,
           num_classes: int | None, check_files: bool, note: str = "") -> None:
    """Append the entry unless its label is out of range, its path leaves the folder or (with
    `check_files`) its file is missing: report that instead."""
    if label < 0:
        problems.report(f"{where}: label {label} is negative{note}")
        return
    if num_classes is not None and label >= num_classes:
        problems.report(f"{where}: label {label} is out of range for {num_classes} classes{note}")
        return
    path, key, problem = guard.locate(rel, check_files)
    if problem is not None:
        problems.report(f"{where}: {problem}")
    else:
        entries.append((Sample(path, label, where), key))


@dataclass(frozen=True)
class LoadedTask:
    """A data set read and checked as a whole: its class names and the samples of each split.

    `splits` maps the canonical split names to their samples; a split whose file is missing is
    absent and `split()` says which file.
    """

    classes: list[str]
    splits: dict[str, list[Sample]]
    sources: dict[str, str]

    def split(self, split: str) -> list[Sample]:
        name = canonical_split(split)
        if name not in self.splits:
            raise DataError(f"{self.sources[name]}: split file not found")
        return _nonempty(self.splits[name], self.sources[name])


# -- VTAB-1k (NOAH layout) -------------------------------------------------------------------

def _read_split_entries(path: Path, guard: PathGuard, num_classes: int | None, on_error: OnError,
                        check_files: bool) -> list[Entry]:
    text = read_text(path, "split file")
    problems = Problems(on_error, f"lines in {path.name}")
    entries: list[Entry] = []
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
        _admit(entries, problems, guard, rel, label, where, num_classes, check_files)
    problems.finish()
    return dedupe(entries, str(path))


def read_split_file(path: str | Path, root: str | Path | None = None, *, num_classes: int | None = None,
                    on_error: OnError = "raise", check_files: bool = True) -> list[Sample]:
    """Parse a `relative/path label` list (one sample a line; blank lines ignored).

    Paths are relative to `root` (default: the list's folder), may contain spaces (the label is
    the last field) and must stay inside `root`. Errors name the list file and the line number.
    A repeated entry is dropped with a `DataWarning`; one image with two labels is an error.
    """
    path = Path(path)
    guard = PathGuard(Path(root) if root is not None else path.parent)
    entries = _read_split_entries(path, guard, num_classes, on_error, check_files)
    return _nonempty([s for s, _ in entries], str(path))


def is_vtab_dir(path: str | Path) -> bool:
    """A VTAB-1k task folder is recognised by its `train800.txt`."""
    return (Path(path) / "train800.txt").is_file()


def _read_class_names(file: Path) -> list[tuple[str, int]] | None:
    """(name, line number) of each class in `classes.txt`; None when there is no such file."""
    if not file.is_file():
        return None
    names = [(n.strip(), i) for i, n in enumerate(read_text(file, "class list").splitlines(), start=1) if n.strip()]
    if not names:
        raise DataError(f"{file}: no class names")
    return names


def vtab_task(task_dir: str | Path, *, num_classes: int | None = None, on_error: OnError = "raise",
              check_files: bool = True) -> LoadedTask:
    """Read and check every split file of a VTAB-1k task folder.

    Classes: `classes.txt` (one name a line, as provisioned tasks have) if present; otherwise
    the labels present in the split files, which must then be 0..N-1 (the NOAH files carry no
    names). `num_classes` (default: the class count) bounds the labels. Besides the per-line
    checks of `read_split_file`: one image with two labels in two splits, fewer than two
    classes, a class with no sample in train800/val200/train800val200, or a gap in inferred
    labels is a `DataError`; an image in a training split and in test (or in train800 and
    val200) is a `DataWarning` with the count.
    """
    task_dir = Path(task_dir)
    classes_file = task_dir / "classes.txt"
    listed = _read_class_names(classes_file)
    names = [name for name, _ in listed] if listed is not None else None
    if names is not None:
        need_two_classes(len(names), str(classes_file), f"{names[0]!r} is the only class listed")
    limit = num_classes if num_classes is not None else len(names) if names is not None else None
    guard = PathGuard(task_dir)
    files = {split: task_dir / f"{split}.txt" for split in SPLITS}
    entries = {split: _read_split_entries(file, guard, limit, on_error, check_files)
               for split, file in files.items() if file.is_file()}
    shown = {split: file.name for split, file in files.items()}
    across_splits(entries, shown, train=("train800",), val=("val200",), test=("test",), combined=("train800val200",))
    first_seen: dict[int, Sample] = {}
    for split in SPLITS:
        for sample, _ in entries.get(split, ()):
            first_seen.setdefault(sample.label, sample)
    if names is None:
        if not first_seen:
            raise DataError(f"{task_dir}: no labels found in its split files")
        contiguous_labels(first_seen, "Fix that label (or give the task a classes.txt naming every class).")
        classes = [str(i) for i in range(len(first_seen))]
        need_two_classes(len(classes), f"{task_dir} (no classes.txt)",
                         f"label {classes[0]} is the only label in its split files")
        where = [first_seen[i].origin for i in range(len(classes))]
    else:
        classes = names
        where = [f"{classes_file}:{lineno}" for _, lineno in listed or ()]
    bound = len(classes) if limit is None else min(limit, len(classes))
    trained_classes(classes[:bound], entries, ("train800", "val200", "train800val200"), shown, where)
    return LoadedTask(classes, {split: [s for s, _ in e] for split, e in entries.items()},
                      {split: str(file) for split, file in files.items()})


def is_segmentation_dir(path: str | Path) -> bool:
    """A segmentation folder is recognised by its `images/` and `masks/` subfolders."""
    return (Path(path) / "images").is_dir() and (Path(path) / "masks").is_dir()


# -- FGVC (VPT json splits) ------------------------------------------------------------------

FGVC_SPLITS = {"train800": ("train",), "val200": ("val",), "train800val200": ("train", "val"), "test": ("test",)}


def is_fgvc_dir(path: str | Path) -> bool:
    """An FGVC data-set folder holds VPT-style `train.json` and `test.json`."""
    return (Path(path) / "train.json").is_file() and (Path(path) / "test.json").is_file()


def _valid_json_label(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fgvc_json(dataset_dir: Path) -> dict[str, JsonPairs]:
    return {name: read_json_pairs(dataset_dir / f"{name}.json") for name in ("train", "val", "test")
            if (dataset_dir / f"{name}.json").is_file()}


def _class_ids(dataset_dir: Path, data: dict[str, JsonPairs]) -> list[int]:
    ids = sorted({v for pairs in data.values() for _, v in pairs if _valid_json_label(v)})
    if not ids:
        raise DataError(f"{dataset_dir}: no valid labels in train/val/test.json")
    need_two_classes(len(ids), f"{dataset_dir} (train/val/test.json)", f"label {ids[0]} is the only label")
    return ids


def fgvc_class_ids(dataset_dir: str | Path) -> list[int]:
    """The sorted distinct labels over train/val/test json; label i of the model is the i-th.

    VPT maps each split's sorted distinct labels to 0..C-1 (CUB's 1..200 become 0..199); using
    the union of all splits gives the same result and stays right if a split lacks a class.
    """
    dataset_dir = Path(dataset_dir)
    return _class_ids(dataset_dir, _fgvc_json(dataset_dir))


def _image_root(dataset_dir: Path, train: JsonPairs | None) -> Path:
    first = train[0][0] if train else None
    candidates = [dataset_dir / "images", dataset_dir / "Images", dataset_dir]
    if first is not None:
        for root in candidates:
            if (root / first).is_file():
                return root
    raise DataError(f"{dataset_dir}: cannot find the first image of train.json ({first!r}) under "
                    f"{', '.join(str(c) for c in candidates)}")


def fgvc_image_root(dataset_dir: str | Path) -> Path:
    """Where the json paths are relative to: `images/`, `Images/` or the folder itself.

    VPT's layouts: CUB and NABirds `<dir>/images`, Stanford Dogs `<dir>/Images`, Flowers and
    Cars `<dir>`. The first candidate that holds the first listed image of train.json wins.
    """
    dataset_dir = Path(dataset_dir)
    return _image_root(dataset_dir, read_json_pairs(dataset_dir / "train.json"))


def _json_entries(path: Path, pairs: JsonPairs, guard: PathGuard, class_ids: Sequence[int], num_classes: int | None,
                  on_error: OnError, check_files: bool) -> list[Entry]:
    index = {cid: i for i, cid in enumerate(class_ids)}
    problems = Problems(on_error, f"entries in {path.name}")
    entries: list[Entry] = []
    for pos, (rel, raw) in enumerate(pairs, start=1):
        where = f"{path} entry {pos} ({rel!r})"
        if not isinstance(raw, int) or isinstance(raw, bool):
            shown = dict(raw) if isinstance(raw, JsonPairs) else raw
            problems.report(f"{where}: malformed entry, label {shown!r} is not an integer")
            continue
        if raw < 0:
            problems.report(f"{where}: label {raw} is negative")
            continue
        if raw not in index:
            problems.report(f"{where}: label {raw} is not one of the data set's classes")
            continue
        _admit(entries, problems, guard, rel, index[raw], where, num_classes, check_files, note=f" (raw label {raw})")
    problems.finish()
    return dedupe(entries, str(path))


def fgvc_task(dataset_dir: str | Path, *, num_classes: int | None = None, on_error: OnError = "raise",
              check_files: bool = True) -> LoadedTask:
    """Read and check train/val/test.json of an FGVC folder (the checks of `vtab_task`; the
    classes are the raw labels, see `fgvc_class_ids`, and must all occur in train or val)."""
    dataset_dir = Path(dataset_dir)
    data = _fgvc_json(dataset_dir)
    ids = _class_ids(dataset_dir, data)
    root = _image_root(dataset_dir, data.get("train"))
    guard = PathGuard(root, boundary=dataset_dir)
    entries = {name: _json_entries(dataset_dir / f"{name}.json", pairs, guard, ids, num_classes, on_error,
                                   check_files) for name, pairs in data.items()}
    shown = {name: f"{name}.json" for name in ("train", "val", "test")}
    across_splits(entries, shown, train=("train",), val=("val",), test=("test",))
    first_seen: dict[int, str] = {}
    for name in ("train", "val", "test"):
        for sample, _ in entries.get(name, ()):
            first_seen.setdefault(sample.label, sample.origin)
    classes = [str(c) for c in ids]
    where = [first_seen.get(i, str(dataset_dir)) for i in range(len(ids))]
    bound = len(classes) if num_classes is None else min(num_classes, len(classes))
    trained_classes(classes[:bound], entries, ("train", "val"), shown, where)
    splits, sources = {}, {}
    for split, names in FGVC_SPLITS.items():
        missing = [n for n in names if n not in entries]
        sources[split] = str(dataset_dir / f"{missing[0] if missing else names[-1]}.json")
        if not missing:
            splits[split] = [s for n in names for s, _ in entries[n]]
            sources[split] = " + ".join(str(dataset_dir / f"{n}.json") for n in names)
    return LoadedTask(classes, splits, sources)
