"""Offline tasks in the VTAB-1k layout: writing a task folder, and the suites that can be provisioned.

A task has 800 train / 200 val / a fixed test set, written as RGB PNGs with `train800.txt`,
`val200.txt`, `train800val200.txt`, `test.txt`, `classes.txt` and `info.json` — so benchmark
code reads a provisioned task exactly like the real VTAB-1k. A suite (`mini-vtab`, see
`sparseft.data.minivtab`) registers its tasks with `register_suite`.

Layout: `<cache>/data/<suite>/<task>/` (sources under `<cache>/data/sources/`, see
`sparseft.data.sources`). A task is built in a temporary folder and renamed into place when
complete, so a finished task is never rebuilt and an interrupted one never looks finished.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sparseft.data._random import stable_permutation
from sparseft.data.images import DataError, to_rgb
from sparseft.data.sources import SOURCES, progress_log, source_file
from sparseft.errors import InputError
from sparseft.fileutil import cache_dir, give_umask_permissions, process_alive, sha256_file
from sparseft.progress import progress_bar

FORMAT_VERSION = 1
N_TRAIN, N_VAL, N_TEST = 800, 200, 2000
PNG_LEVEL = 3  # zlib level: level 6 is 2x slower for 8 % smaller files

ImageLike = np.ndarray | Image.Image | bytes


@dataclass
class TaskData:
    """A task's images: split name ("train", "val", "test") -> (images, labels), plus class names."""

    splits: dict[str, tuple[Sequence[ImageLike], Sequence[int]]]
    classes: list[str]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A provisionable task: where its images come from (keys of `SOURCES`) and how it is built.

    `build(files, seed)` returns the task's data; `write(dest, data, info, progress=...)` writes
    it (default: `write_task`, the VTAB-1k layout; segmentation tasks bring their own).
    """

    name: str
    classes: tuple[str, ...]
    sources: tuple[str, ...]
    source: str
    licence: str
    description: str
    build: Callable[[Mapping[str, Path], int], TaskData]
    seed: int = 0
    build_version: int = 1
    test_size: int = N_TEST
    write: Callable[..., Path] | None = None

    def summary(self) -> dict[str, Any]:
        """Static facts for listings (no files read)."""
        return {"task": self.name, "num_classes": len(self.classes), "classes": list(self.classes),
                "source": self.source, "licence": self.licence, "description": self.description,
                "splits": {"train800": N_TRAIN, "val200": N_VAL, "test": self.test_size}}


def split_indices(n: int, sizes: Sequence[int], seed: int, salt: str) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes, drawn by one seeded permutation of range(n).

    The indices stay in permuted order, so split files list the classes mixed, not grouped.
    """
    if sum(sizes) > n:
        raise DataError(f"{salt}: cannot draw {sum(sizes)} samples from {n}")
    order = stable_permutation(n, seed, salt)
    out, start = [], 0
    for size in sizes:
        out.append(order[start:start + size])
        start += size
    return out


# -- writing a task --------------------------------------------------------------------------

def _as_rgb_image(item: ImageLike) -> Image.Image:
    if isinstance(item, bytes):
        with Image.open(io.BytesIO(item)) as img:
            img.load()
            return to_rgb(img)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    arr = np.asarray(item)
    if arr.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr, "RGB")
    raise DataError(f"image arrays must be HxW or HxWx3, got shape {arr.shape}")


def _claim_partial(dest: Path) -> Path:
    """A new temporary folder `.<task>.partial-<pid>-*` beside `dest`.

    The pid in the name is the lock: partial folders of processes that are gone are removed
    first, those of live processes (another build under way) are left alone.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if not (pid.isdigit() and process_alive(int(pid)) and int(pid) != os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=dest.parent))


def is_complete(task_dir: str | Path, version: int | None = None) -> bool:
    """A finished task folder: `info.json` (written last) present, and of `version` if given."""
    info = Path(task_dir) / "info.json"
    if not info.is_file():
        return False
    if version is None:
        return True
    try:
        meta = json.loads(info.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("build_version") == version and meta.get("format_version") == FORMAT_VERSION


@contextlib.contextmanager
def building(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest`, renamed to `dest` when the block ends without error.

    Write `info.json` last inside it: a finished task is never rebuilt and an interrupted one
    never looks finished (see `is_complete`). The folder is removed if the block fails.
    """
    tmp = _claim_partial(dest)
    try:
        yield tmp
        give_umask_permissions(tmp)  # mkdtemp makes 0700: the task folder gets what mkdir would give
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):  # another process finished it first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_splits(name: str, data: TaskData) -> None:
    for split in ("train", "val", "test"):
        if split not in data.splits:
            raise DataError(f"{name}: missing split {split!r}")
        images, labels = data.splits[split]
        if len(images) != len(labels) or not len(images):
            raise DataError(f"{name}: split {split} has {len(images)} images and {len(labels)} labels")
        bad = [int(v) for v in labels if not 0 <= int(v) < len(data.classes)]
        if bad:
            raise DataError(f"{name}: split {split} has labels {sorted(set(bad))[:5]} outside "
                            f"0..{len(data.classes) - 1}")


def _write_images(folder: Path, data: TaskData, bar_name: str | None) -> tuple[dict[str, list[str]],
                                                                              set[tuple[int, int]]]:
    """The PNGs of every split under `folder/images/<split>/`; returns (split -> list lines, image sizes).

    `bar_name`: the task name for the progress bar (None: no bar).
    """
    lists: dict[str, list[str]] = {}
    jobs: list[tuple[str, ImageLike]] = []
    for name in ("train", "val", "test"):
        images, labels = data.splits[name]
        (folder / "images" / name).mkdir(parents=True)
        width = max(5, len(str(len(images) - 1)))
        rels = [f"images/{name}/{i:0{width}d}.png" for i in range(len(images))]
        jobs += zip(rels, images)
        lists[name] = [f"{rel} {int(label)}" for rel, label in zip(rels, labels)]

    def save(job: tuple[str, ImageLike]) -> tuple[int, int]:
        img = _as_rgb_image(job[1])
        img.save(folder / job[0], format="PNG", compress_level=PNG_LEVEL)
        return img.size

    return lists, save_in_parallel(save, jobs, bar_name)


def save_in_parallel(save: Callable[[Any], tuple[int, int]], jobs: Sequence[Any],
                     bar_name: str | None) -> set[tuple[int, int]]:
    """Run `save(job)` for every job on threads (PNG encoding releases the GIL, so threads use every
    core), with a progress bar; returns the set of image sizes the saves report."""
    sizes: set[tuple[int, int]] = set()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            progress_bar(total=len(jobs), desc=f"  {bar_name}: writing", unit="img",
                         enabled=None if bar_name is not None else False, leave=False) as bar:
        for size in pool.map(save, jobs):
            sizes.add(size)
            bar.update(1)
    return sizes


def write_task(dest: str | Path, data: TaskData, info: Mapping[str, Any] | None = None, *,
               progress: bool = True) -> Path:
    """Write a task in the VTAB-1k layout at `dest`, atomically (temp folder, then rename).

    `data.splits` needs "train", "val" and "test". Images go to `images/<split>/<i>.png` as RGB
    PNGs; the four split lists, `classes.txt` and `info.json` (last) complete the folder.
    """
    dest = Path(dest)
    _check_splits(dest.name, data)
    with building(dest) as tmp:
        lists, sizes = _write_images(tmp, data, dest.name if progress else None)
        files = {"train800.txt": lists["train"], "val200.txt": lists["val"],
                 "train800val200.txt": lists["train"] + lists["val"], "test.txt": lists["test"]}
        for fname, lines in files.items():
            (tmp / fname).write_text("\n".join(lines) + "\n")
        (tmp / "classes.txt").write_text("\n".join(data.classes) + "\n")
        meta = dict(info or {})
        meta.update({
            "format_version": FORMAT_VERSION, "num_classes": len(data.classes), "classes": list(data.classes),
            "splits": {"train800": len(lists["train"]), "val200": len(lists["val"]),
                       "train800val200": len(lists["train"]) + len(lists["val"]), "test": len(lists["test"])},
            "image_sizes": [f"{w}x{h}" for w, h in sorted(sizes)],
            "notes": dict(data.notes),
        })
        (tmp / "info.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return dest


# -- suites ----------------------------------------------------------------------------------

SUITES: dict[str, dict[str, Task]] = {}


def register_suite(suite: str, tasks: Iterable[Task]) -> dict[str, Task]:
    """Add (or replace) a suite of tasks; returns its name -> task mapping (the registry's own dict)."""
    SUITES[suite] = {t.name: t for t in tasks}
    return SUITES[suite]


def suite_dir(suite: str = "mini-vtab", cache: str | Path | None = None) -> Path:
    """`<cache>/data/<suite>`; `cache` defaults to `sparseft.fileutil.cache_dir()`."""
    return (Path(cache) if cache is not None else cache_dir()) / "data" / suite


def list_tasks(suite: str = "mini-vtab") -> list[Task]:
    """The tasks of a suite, in a fixed order."""
    if suite not in SUITES:
        raise InputError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    return list(SUITES[suite].values())


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def task_status(suite: str = "mini-vtab", cache: str | Path | None = None) -> list[dict[str, Any]]:
    """Per task: the static summary plus whether it is provisioned, its split sizes and bytes on disk."""
    root = suite_dir(suite, cache)
    out = []
    for task in list_tasks(suite):
        row = task.summary()
        folder = root / task.name
        row["path"] = str(folder)
        row["provisioned"] = is_complete(folder, task.build_version)
        row["stale"] = folder.is_dir() and is_complete(folder) and not row["provisioned"]
        if row["provisioned"]:
            meta = json.loads((folder / "info.json").read_text())
            row["splits"] = meta["splits"]
            row["bytes"] = _tree_bytes(folder)
        out.append(row)
    return out


def fetch_suite(suite: str = "mini-vtab", tasks: Iterable[str] | None = None, cache: str | Path | None = None, *,
                force: bool = False, progress: bool = True) -> Path:
    """Provision `tasks` (default: all) of `suite` under `<cache>/data/<suite>`; returns that folder.

    Finished tasks are kept unless `force`; sources are downloaded once, verified by sha256 and
    kept under `<cache>/data/sources`.
    """
    known = {t.name: t for t in list_tasks(suite)}
    names = list(tasks) if tasks is not None else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown {suite} tasks {unknown}; tasks: {', '.join(known)}")
    root = suite_dir(suite, cache)
    log = progress_log(progress) or (lambda message: None)
    for name in names:
        task = known[name]
        dest = root / name
        if not force and is_complete(dest, task.build_version):
            log(f"{suite}/{name}: already provisioned at {dest}")
            continue
        t0 = time.perf_counter()
        log(f"{suite}/{name}: building from {task.source}")
        files = {key: source_file(key, cache, progress=progress) for key in task.sources}
        data = task.build(files, task.seed)
        info = {"suite": suite, "task": name, "build_version": task.build_version, "seed": task.seed,
                "source": task.source, "licence": task.licence, "description": task.description,
                "sources": [{"package": SOURCES[k].package, "version": SOURCES[k].version, "file": files[k].name,
                             "sha256": sha256_file(files[k])} for k in task.sources]}
        (task.write or write_task)(dest, data, info, progress=progress)
        log(f"{suite}/{name}: done in {time.perf_counter() - t0:.1f} s ({_tree_bytes(dest) / 1e6:.1f} MB at {dest})")
    return root
