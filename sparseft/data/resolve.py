"""Which data set a spec string names: its layout and its folder (`resolve_spec`).

The spec strings are described in `sparseft.data.spec`; this module only recognises them, so that
both the classification loaders (`spec`) and the segmentation loaders (`segmentation`) can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sparseft.data import layouts
from sparseft.data.images import DataError
from sparseft.data.tasks import SUITES, suite_dir

Kind = Literal["vtab", "fgvc", "folder", "seg"]


@dataclass(frozen=True)
class ResolvedSpec:
    """What a spec string names: the layout and the folder."""

    kind: Kind
    path: Path


def resolve_spec(spec: str, cache: str | Path | None = None) -> ResolvedSpec:
    """Turn a spec string into (layout, folder); a `DataError` says what was expected."""
    for prefix in ("vtab", "fgvc", "folder", "seg"):
        if spec.startswith(prefix + ":"):
            path = Path(spec[len(prefix) + 1:]).expanduser()
            if not path.is_dir():
                raise DataError(f"{spec}: {path} is not a folder")
            if prefix == "vtab" and not layouts.is_vtab_dir(path):
                raise DataError(f"{spec}: {path} has no train800.txt")
            if prefix == "fgvc" and not layouts.is_fgvc_dir(path):
                raise DataError(f"{spec}: {path} needs train.json and test.json")
            if prefix == "seg" and not layouts.is_segmentation_dir(path):
                raise DataError(f"{spec}: {path} needs images/ and masks/ subfolders")
            return ResolvedSpec(prefix, path)  # type: ignore[arg-type]
    path = Path(spec).expanduser()
    if path.is_dir():
        if layouts.is_segmentation_dir(path):
            return ResolvedSpec("seg", path)
        if layouts.is_vtab_dir(path):
            return ResolvedSpec("vtab", path)
        if layouts.is_fgvc_dir(path):
            return ResolvedSpec("fgvc", path)
        raise DataError(f"{spec}: neither a VTAB-1k task folder (train800.txt) nor an FGVC folder (train.json, "
                        "test.json); for class subfolders use folder:<dir>")
    suite, _, task = spec.partition("/")
    if suite in SUITES and task:
        if task not in SUITES[suite]:
            raise DataError(f"{spec}: {suite} has no task {task!r}; tasks: {', '.join(SUITES[suite])}")
        folder = suite_dir(suite, cache) / task
        if not layouts.is_vtab_dir(folder) or not (folder / "info.json").is_file():
            raise DataError(f"{spec}: not provisioned under {folder.parent}; run "
                            f"`sparseft data fetch {suite} --tasks {task}`")
        return ResolvedSpec("seg" if layouts.is_segmentation_dir(folder) else "vtab", folder)
    raise DataError(f"{spec}: no such folder, and not a provisioned task name like mini-vtab/fashion_mnist "
                    f"(suites: {', '.join(SUITES)})")
