"""Checks that keep bad data from silently changing the task, shared by the layouts.

Per entry (a split-file line or json entry; `on_error="skip"` may skip these): a path that is
absolute or leaves the task folder (`..`, or a symlink resolving outside it), a missing image.

Per task (always errors, whatever `on_error` says, because skipping cannot fix them): one image
listed with two labels, fewer than two classes, a class with no training sample, a gap in the
labels when the class count is inferred from them. Repeated entries and images shared by a
training split and the test split are `DataWarning`s with the count.

By content (`check_content`, for every task kind, on the splits a run verifies): two image files
with the same decoded pixels are compared like two entries of one image: two labels (masks) in
the training split is a `DataError`; a repeat in training, or a copy in an evaluation split, a
`DataWarning` with the count.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from sparseft.data.images import DataError, DataWarning, Sample, sample_digests

# An admitted entry: the sample and its identity (the image's real path), for duplicate and overlap checks.
Entry = tuple[Sample, str]

SINGLE_CLASS = "a single-class task cannot be trained/evaluated meaningfully"


def read_text(path: Path, what: str) -> str:
    """A text file (split list, classes.txt, json) as UTF-8; a leading byte-order mark is dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise DataError(f"{path}: {what} not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read {what}: {err}") from err


class JsonPairs(list):
    """A json object as its (key, value) pairs in file order: repeated keys are kept, not overwritten."""


def read_json_pairs(path: Path) -> JsonPairs:
    """A json file that must hold one object; its entries as `JsonPairs` (see `JsonPairs`)."""
    text = read_text(path, "split file")
    try:
        data = json.loads(text, object_pairs_hook=JsonPairs)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a readable json file: {err}") from err
    if not isinstance(data, JsonPairs):
        raise DataError(f"{path}: expected a json object mapping image path -> integer label")
    return data


def inside(path: str, folder: str) -> bool:
    """Whether the (real, normalised) `path` is `folder` or lies under it."""
    return path == folder or path.startswith(folder if folder.endswith(os.sep) else folder + os.sep)


class PathGuard:
    """Resolves paths listed relative to a folder and refuses those that leave it.

    `locate(rel)` gives (path, identity, problem): the path as listed under the folder (what
    samples carry), the image's real path (two spellings of one image, or two symlinks to it,
    share it), and a message when the entry must be refused (else None). Real paths of folders
    are cached, so a long list costs about one `lstat` per line.
    """

    def __init__(self, root: Path, boundary: Path | None = None):
        self.root = root
        self.boundary = boundary if boundary is not None else root
        self.real_root = os.path.realpath(root)
        self.real_boundary = os.path.realpath(self.boundary)
        self._dirs: dict[str, str] = {}

    def _real_dir(self, rel_dir: str) -> str:
        real = self._dirs.get(rel_dir)
        if real is None:
            real = self._dirs[rel_dir] = os.path.realpath(os.path.join(self.root, rel_dir))
        return real

    def locate(self, rel: str, check_files: bool = True) -> tuple[Path, str, str | None]:
        path = self.root / rel
        fix = f"list images by paths inside {self.boundary}"
        if os.path.isabs(rel) or rel.startswith(("/", "\\")):
            return path, rel, f"absolute path {rel!r}: paths must be relative to {self.root}; {fix}"
        norm = os.path.normpath(rel)
        real_dir = self._real_dir(os.path.dirname(norm))
        real = os.path.join(real_dir, os.path.basename(norm))
        if not inside(os.path.normpath(os.path.join(self.real_root, norm)), self.real_boundary):
            return path, real, f"path {rel!r} leaves the folder {self.boundary}; {fix}"
        if not inside(real_dir, self.real_boundary):
            return path, real, (f"path {rel!r} resolves outside {self.boundary} (through a symlink, to {real}); "
                                f"{fix} (copy the image in, or link to a file inside)")
        if not check_files:
            return path, real, None
        try:
            mode = os.lstat(real).st_mode
        except OSError:
            return path, real, f"image file not found: {path}"
        if stat.S_ISLNK(mode):
            real = os.path.realpath(real)
            if not inside(real, self.real_boundary):
                return path, real, (f"path {rel!r} is a symlink resolving outside {self.boundary} (to {real}); "
                                    f"{fix} (copy the image in, or link to a file inside)")
            try:
                mode = os.stat(real).st_mode
            except OSError:
                return path, real, f"image file not found: {path} (a broken symlink)"
        if not stat.S_ISREG(mode):
            return path, real, f"image file not found: {path} (not a file)"
        return path, real, None


def dedupe(entries: Iterable[Entry], source: str) -> list[Entry]:
    """Drop repeated entries of one split (same image, same label), keeping the first, with one
    `DataWarning` giving the count; one image listed with two labels is a `DataError` naming both."""
    first: dict[str, Sample] = {}
    kept: list[Entry] = []
    repeats: list[str] = []
    for sample, key in entries:
        seen = first.get(key)
        if seen is None:
            first[key] = sample
            kept.append((sample, key))
        elif seen.label != sample.label:
            raise conflict(seen, sample)
        else:
            repeats.append(f"{sample.origin} repeats {seen.origin}")
    if repeats:
        shown = "; ".join(repeats[:3]) + ("; ..." if len(repeats) > 3 else "")
        warnings.warn(f"{source}: {len(repeats)} duplicate entries (the same image with the same label listed "
                      f"again) ignored, the first kept: {shown}", DataWarning, stacklevel=3)
    return kept


def conflict(first: Sample, second: Sample) -> DataError:
    return DataError(f"{second.origin}: image {second.path} has label {second.label} here but label {first.label} "
                     f"at {first.origin}; one image must have one label: fix or remove one of the two entries")


def across_splits(splits: Mapping[str, Sequence[Entry]], names: Mapping[str, str], *, train: Sequence[str],
                  val: Sequence[str], test: Sequence[str], combined: Sequence[str] = ()) -> None:
    """Checks between splits: one image with two labels is a `DataError` naming both entries; an
    image in both `train` and `val`, or in a training split (`train`, `val`, `combined`) and in
    `test`, is a `DataWarning` with the count."""
    first: dict[str, Sample] = {}
    for entries in splits.values():
        for sample, key in entries:
            seen = first.setdefault(key, sample)
            if seen.label != sample.label:
                raise conflict(seen, sample)

    overlap(splits, names, train, val, "train/val overlap: validation scores are optimistic")
    overlap(splits, names, [*train, *val, *combined], test, "train/test overlap: test scores are optimistic")


def overlap(splits: Mapping[str, Sequence[Entry]], names: Mapping[str, str], a: Sequence[str], b: Sequence[str],
            why: str) -> None:
    """A `DataWarning` with the count when entries of the splits `b` name the same image (key) as entries
    of the splits `a`, saying `why` it matters."""
    left: dict[str, Sample] = {}
    for name in a:
        for sample, key in splits.get(name, ()):
            left.setdefault(key, sample)
    shared = [(sample.origin, left[key].origin) for name in b for sample, key in splits.get(name, ()) if key in left]
    if shared:
        a_names = "/".join(names[n] for n in a if n in splits)
        b_names = "/".join(names[n] for n in b if n in splits)
        warn_shared(shared, f"images of {b_names} are also in {a_names}", why)


def warn_shared(pairs: Sequence[tuple[str, str]], lead: str, why: str) -> None:
    """One `DataWarning`: "<count> <lead> (<why>): a = b; c = d; e = f; ..." (the first three pairs)."""
    shown = "; ".join(f"{a} = {b}" for a, b in pairs[:3]) + ("; ..." if len(pairs) > 3 else "")
    warnings.warn(f"{len(pairs)} {lead} ({why}): {shown}", DataWarning, stacklevel=3)


def need_two_classes(count: int, where: str, what: str) -> None:
    """A task needs at least two classes: else a `DataError` naming `where` (saying `what`)."""
    if count < 2:
        raise DataError(f"{where}: {count} class{'' if count == 1 else 'es'} ({what}); {SINGLE_CLASS}: "
                        "a task needs at least two classes; check that this is the right folder and its labels")


def contiguous_labels(first_seen: Mapping[int, Sample], fix: str) -> None:
    """Labels inferred as the classes must be exactly 0..N-1: a gap is a `DataError` naming the line
    of the label past it (the most likely typo: the largest)."""
    if not first_seen:
        return
    present = sorted(first_seen)
    if present[-1] + 1 == len(present):
        return
    have = set(present)
    missing = [i for i in range(present[-1]) if i not in have]
    top = first_seen[present[-1]]
    raise DataError(f"{top.origin}: label {top.label} leaves a gap in the labels: labels {_ranges(present)} are "
                    f"present but {_ranges(missing)} {'is' if len(missing) == 1 else 'are'} not; without "
                    f"classes.txt the classes are the labels present and must be 0..N-1. {fix}")


def _ranges(values: Sequence[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts)


def trained_classes(classes: Sequence[str], splits: Mapping[str, Sequence[Entry]], train: Sequence[str],
                    names: Mapping[str, str], where_class: Sequence[str]) -> None:
    """Every class needs a sample in a training split: else a `DataError` naming the class
    (`where_class[i]` says where class i is defined: its classes.txt line, or a split line)."""
    seen = {sample.label for name in train for sample, _ in splits.get(name, ())}
    files = ", ".join(names[n] for n in train if n in splits) or "the training splits"
    untrained_classes(classes, seen, where_class, f"has no sample in {files}", "add training images for it")


def untrained_classes(classes: Sequence[str], seen: Iterable[int], where_class: Sequence[str], lacks: str,
                      fix: str) -> None:
    """A class that never occurs in training (not in `seen`) is a `DataError` naming the first such class
    where it is defined (`where_class[i]`) and counting the others: the class `lacks` something; `fix`."""
    present = set(seen)
    missing = [i for i in range(len(classes)) if i not in present]
    if missing:
        i = missing[0]
        others = ", ".join(repr(classes[j]) for j in missing[1:4]) + (", ..." if len(missing) > 4 else "")
        more = f" (nor {'does' if len(missing) == 2 else 'do'} {others})" if others else ""
        raise DataError(f"{where_class[i]}: class {classes[i]!r} (label {i}) {lacks}{more}; a class the model never "
                        f"sees in training cannot be learnt: remove it from the class list or {fix}")


# -- by content ------------------------------------------------------------------------------

class Item(NamedTuple):
    """One verified item of a split, for `check_content`: where it is listed, its image file, the digest of
    its decoded pixels (`sparseft.data.images.pixel_digest`), its target (a label, a mask's digest) and
    that target as messages show it ("label 3", "mask masks/a.png")."""

    where: str
    path: Path
    pixels: str
    target: Hashable
    shown: str


def sample_items(samples: Iterable[Sample]) -> list[Item]:
    """Open every image (`sample_digests`: an unreadable one is a `DataError` naming it) and give the
    `Item`s that `check_content` compares (each shown by its split line, or its path for a class folder)."""
    return [Item(str(s.path) if s.origin.endswith("/") else s.origin, s.path, digest, s.label, f"label {s.label}")
            for s, digest in sample_digests(samples)]


def _same_file(a: Item, b: Item) -> bool:
    """Two entries of one file (the path checks above report those)."""
    return os.path.realpath(a.path) == os.path.realpath(b.path)


def check_content(found: Mapping[str, Sequence[Item]], train: str, evals: Iterable[str], noun: str = "label") -> None:
    """Compare the images of different files by their pixels, in the splits a run verified (`found`):
    two with different targets in the `train` split is a `DataError` naming both ("one image must have
    one label"); two with the same target there, or an image of an evaluation split (`evals`) with the
    pixels of a training image, is a `DataWarning` with the count and the first pairs. Two entries of one
    file are left to the path checks (`dedupe`, `across_splits`, `overlap`)."""
    first: dict[str, Item] = {}
    repeats: list[tuple[str, str]] = []
    for item in found.get(train, ()):
        seen = first.setdefault(item.pixels, item)
        if seen is item or _same_file(seen, item):
            continue
        if seen.target != item.target:
            raise DataError(f"{item.where}: image {item.path} has the same pixels as {seen.path} ({seen.where}) but "
                            f"{item.shown} here and {seen.shown} there; one image must have one {noun}: fix or remove "
                            "one of the two")
        repeats.append((item.where, seen.where))
    if repeats:
        warn_shared(repeats, f"images of split {train} have the same pixels as another of its images, with the same "
                    f"{noun}", "repeated images weigh more in training")
    for split in dict.fromkeys(evals):
        shared = [(item, first[item.pixels]) for item in found.get(split, ()) if split != train
                  and item.pixels in first and not _same_file(item, first[item.pixels])]
        if shared:
            other = sum(item.target != seen.target for item, seen in shared)
            note = f"; {other} of them with another {noun}" if other else ""
            warn_shared([(item.where, seen.where) for item, seen in shared],
                        f"images of split {split} have the same pixels as images of split {train}",
                        f"train/{split} overlap under other names: {split} scores are optimistic{note}")
