"""A data set's fingerprint: what a resumed run checks to know it still trains on the same data.

`take(data, datasets)` records, for the splits a run reads, the bytes of the data set's split
files (`train800val200.txt`, `test.txt`, `classes.txt`, FGVC's `train.json`, ...) and, for every
file the splits' samples name (images; segmentation masks too), its class, its size and a hash
of its bytes. Hashing reads every file while they total at most `FULL_HASH_BYTES` (the data sets
of VTAB-1k's training splits, mini-vtab, mini-seg); beyond that a deterministic share of the
files (chosen by a hash of their path, so the same ones every time) is hashed and the others are
compared by size. `changes(stored, current)` says, one phrase each, what differs: "train800val200.txt
(1 line added)", "3 images of class 'cat' changed (cat/01.png, ...)".

A data set the data layer does not know (a task kind's own data without files) has nothing to
record; its fingerprint is empty and always equal.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparseft.data.images import DataError
from sparseft.data.layouts import SPLITS
from sparseft.data.resolve import resolve_spec
from sparseft.fileutil import sha256_file

VERSION = 1
FULL_HASH_BYTES = 256 << 20  # every file is hashed while the splits' files total at most this
SHOWN = 3  # file names shown per change

_SPLIT_FILES = {  # the files a layout reads besides the images: what defines its splits and classes
    "vtab": (*(f"{s}.txt" for s in SPLITS), "classes.txt"),
    "seg": (*(f"{s}.txt" for s in (*SPLITS, "train", "val", "trainval")), "classes.txt"),
    "fgvc": ("train.json", "val.json", "test.json"),
    "folder": (),
}


def _root(data: str) -> tuple[Path | None, tuple[str, ...]]:
    """The data set's folder and the names of its split files (None, (): not a layout the data layer reads)."""
    try:
        resolved = resolve_spec(data)
    except DataError:  # a task kind's own data (no folder): only its samples' files, if any, are recorded
        return None, ()
    return resolved.path, _SPLIT_FILES[resolved.kind]


def _file_record(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    return {"bytes": len(raw), "lines": sum(1 for line in raw.splitlines() if line.strip()),
            "sha256": hashlib.sha256(raw).hexdigest()}


def _files_of(dataset: Any) -> list[tuple[str, Path, str | None]]:
    """(role, file, class) of each file a dataset's samples name: `Sample.path` is an image (of its class),
    `SegSample.image`/`.mask` an image and a mask. A dataset without `samples` names none."""
    classes = list(getattr(dataset, "classes", None) or [])
    out = []
    for sample in getattr(dataset, "samples", None) or ():
        fields = sample._asdict() if hasattr(sample, "_asdict") else {}
        label = fields.get("label")
        name = classes[label] if isinstance(label, int) and 0 <= label < len(classes) else None
        for key, value in fields.items():
            if isinstance(value, Path):
                out.append(("image" if key == "path" else key, value, name))
    return out


def _relative(path: Path, root: Path | None) -> str:
    """`path` relative to the data set's folder when it lies inside it (what messages show), else as it is."""
    if root is not None:
        rel = os.path.relpath(path, root)
        if not rel.startswith(".."):
            return Path(rel).as_posix()
    return str(path)


def _chosen(rel: str, share: float) -> bool:
    """Whether a file is among the hashed `share` of the files (the same files every time)."""
    return share >= 1.0 or int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) < share * 0x100000000


def take(data: str, datasets: Mapping[str, Any], *, like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of the splits `datasets` ({split: its Dataset}) of the data set `data`.

    `like`: a stored fingerprint to compare with: its share of hashed files is used, so the same
    files are hashed. A file that cannot be read is a `DataError` naming it.
    """
    root, split_files = _root(data)
    record: dict[str, Any] = {"version": VERSION, "root": str(root) if root is not None else None,
                              "split_files": {}, "splits": {}, "files": {}}
    for name in split_files:
        if root is not None and (root / name).is_file():
            record["split_files"][name] = _file_record(root / name)
    sizes: dict[str, tuple[str, Path, str | None, int]] = {}
    for split, dataset in datasets.items():
        listed = _files_of(dataset)
        record["splits"][split] = {"files": len(listed)}
        for role, path, name in listed:
            rel = _relative(path, root)
            if rel not in sizes:
                try:
                    sizes[rel] = (role, path, name, path.stat().st_size)
                except OSError as err:
                    raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
    total = sum(size for *_, size in sizes.values())
    share = float(like.get("hashed_share", 1.0)) if like else min(1.0, FULL_HASH_BYTES / max(total, 1))
    record["hashed_share"] = share
    for rel, (role, path, name, size) in sorted(sizes.items()):
        try:
            digest = sha256_file(path)[:16] if _chosen(rel, share) else None
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
        record["files"][rel] = [role, name, size, digest]
    return record


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _split_file_change(name: str, before: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> str | None:
    if before == now:
        return None
    if now is None:
        return f"{name} (removed)"
    if before is None:
        return f"{name} (added)"
    lines = now["lines"] - before["lines"]
    if lines:
        return f"{name} ({_plural(abs(lines), 'line')} {'added' if lines > 0 else 'removed'})"
    return f"{name} (edited)"


def _grouped(rels: list[str], files: Mapping[str, list[Any]], verb: str,
             before: Mapping[str, list[Any]] | None = None) -> list[str]:
    """'3 images of class 'cat' changed (a.png, b.png, c.png)', one phrase per (role, class); with `before`,
    'moved from class 'cat' to 'dog'', one phrase per (role, old class, new class)."""
    groups: dict[tuple[str, Any, Any], list[str]] = {}
    for rel in rels:
        role, name, *_ = files[rel]
        groups.setdefault((role, before[rel][1] if before else None, name), []).append(rel)
    out = []
    for (role, old, name), members in groups.items():
        shown = ", ".join(members[:SHOWN]) + (", …" if len(members) > SHOWN else "")
        if before:
            what = f"moved from class {old!r} to {name!r}"
        else:
            what = (f"of class {name!r} " if name is not None else "") + verb
        out.append(f"{_plural(len(members), role)} {what} ({shown})")
    return out


def changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints of one data set, one phrase each (empty: the same data)."""
    out = []
    before_files, now_files = stored.get("split_files", {}), current.get("split_files", {})
    for name in sorted(set(before_files) | set(now_files)):
        change = _split_file_change(name, before_files.get(name), now_files.get(name))
        if change:
            out.append(change)
    before, now = stored.get("files", {}), current.get("files", {})
    changed, relabelled = [], []
    for rel in sorted(set(before) & set(now)):
        (_, name_a, size_a, hash_a), (_, name_b, size_b, hash_b) = before[rel], now[rel]
        if name_a != name_b:
            relabelled.append(rel)
        if size_a != size_b or (hash_a is not None and hash_b is not None and hash_a != hash_b):
            changed.append(rel)
    out += _grouped(changed, now, "changed") + _grouped(relabelled, now, "", before=before)
    out += _grouped(sorted(set(now) - set(before)), now, "added")
    out += _grouped(sorted(set(before) - set(now)), before, "removed")
    if not out:  # the same files, listed otherwise (e.g. moved between splits)
        for split in sorted(set(stored.get("splits", {})) & set(current.get("splits", {}))):
            count_a, count_b = stored["splits"][split]["files"], current["splits"][split]["files"]
            if count_a != count_b:
                out.append(f"split {split} lists {count_b} files (was {count_a})")
    return out
