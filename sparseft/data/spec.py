"""One entry point for every data set: a spec string -> a split's Dataset.

Spec strings:

- `<dir>` a VTAB-1k task folder (recognised by its `train800.txt`), or an FGVC folder
  (recognised by `train.json` + `test.json`); `vtab:<dir>` / `fgvc:<dir>` say it explicitly.
- `folder:<dir>` an ImageFolder tree (class subfolders; see `folder.folder_split`).
- `<dir>` with `images/` and `masks/` subfolders (or `seg:<dir>`): a segmentation data set,
  read with `sparseft.data.segmentation.load_segmentation` (`class_names` works for it too).
- `<suite>/<task>`, e.g. `mini-vtab/fashion_mnist`: a task provisioned offline by
  `sparseft data fetch` under the cache (`<cache>/data/<suite>/<task>`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparseft.data import folder, layouts, segmentation
from sparseft.data.images import DataError, ImageDataset, OnError
from sparseft.data.resolve import Kind, ResolvedSpec, resolve_spec  # noqa: F401 - re-exported


def class_names(spec: str, cache: str | Path | None = None) -> list[str]:
    """The class names of the data set `spec` names (numbers where the layout has no names).

    The whole data set is listed and checked (every split file, every listed image exists; see
    docs/data.md, "Bad input"), so a run fails here, before it trains, not at its final evaluation.
    """
    r = resolve_spec(spec, cache)
    if r.kind == "seg":
        return segmentation.segmentation_classes(r.path).names
    if r.kind == "vtab":
        return layouts.vtab_task(r.path).classes
    if r.kind == "fgvc":
        return layouts.fgvc_task(r.path).classes
    return folder.folder_classes(r.path)


def num_classes(spec: str, cache: str | Path | None = None) -> int:
    """How many classes the data set `spec` names has (the size of the model's head)."""
    return len(class_names(spec, cache))


def load_split(spec: str, split: str, transform: Callable[[Any], Any] | None = None, *,
               num_classes: int | None = None, on_error: OnError = "raise", verify: bool = False,
               seed: int = 0, cache: str | Path | None = None) -> ImageDataset:
    """The Dataset of one split of the data set `spec`, yielding `(transform(rgb), label)`.

    `split`: `train800`, `val200`, `train800val200` or `test` (FGVC: train/val/train+val/test
    json; ImageFolder: a seeded split, `seed`). `num_classes`: labels at or above it are
    errors (default: the data set's own class count). `on_error="skip"` skips bad entries
    with one warning instead of raising. The whole data set is listed and checked now, every
    split (see docs/data.md, "Bad input"); `verify=True` also opens every image of this split.
    """
    r = resolve_spec(spec, cache)
    if r.kind == "seg":
        raise DataError(f"{spec}: a segmentation data set (images/ + masks/); load it with "
                        "sparseft.data.segmentation.load_segmentation")
    if r.kind == "folder":
        names = folder.folder_classes(r.path)
        samples = folder.folder_split(r.path, split, seed=seed)
    else:
        read = layouts.vtab_task if r.kind == "vtab" else layouts.fgvc_task
        task = read(r.path, num_classes=num_classes, on_error=on_error)
        names, samples = task.classes, task.split(split)
    limit = num_classes if num_classes is not None else len(names)
    classes = (names + [str(i) for i in range(len(names), limit)])[:limit]
    dataset = ImageDataset(samples, transform, classes=classes, num_classes=limit)
    if verify:
        dataset.verify(on_error)
        if not len(dataset):
            raise DataError(f"{spec}: split {split} has no readable images")
    return dataset
