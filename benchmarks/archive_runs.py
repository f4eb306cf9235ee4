"""Keep what a suite needs to resume, without its weights: copy a results folder's records to another folder.

    python benchmarks/archive_runs.py RESULTS/SUITE ARCHIVE/SUITE     # keep (e.g. into the repository)
    python benchmarks/archive_runs.py ARCHIVE/SUITE RESULTS/SUITE     # and back, before `sparseft bench` resumes

Copied: suite.json, every finished cell's final/record.json, every finished run's summary.json and config.json
(a few kB each) and `--lr auto`'s choice.json. `sparseft bench` never runs a cell with a record again, nor a
run with a summary (a tuning point), and a finished run resumes as finished, so a suite (or
benchmarks/lr_check.py) resumed from the copy re-runs only what had not finished. Not copied: task files, checkpoints,
selections and data fingerprints (megabytes per run); a report made from the copy lacks the selection
figures. Files already in the destination are left as they are; the copy is idempotent.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEPT = ("suite.json", "record.json", "summary.json", "choice.json")


def kept(path: Path) -> bool:
    """A record, or the config of a finished run (one with a summary)."""
    return path.name in KEPT or (path.name == "config.json" and (path.parent / "summary.json").is_file())


def archive(src: Path, dst: Path) -> int:
    """Copy the records under `src` to the same places under `dst`; returns how many files were new."""
    if not src.is_dir():
        raise SystemExit(f"{src}: no such folder")
    copied = 0
    for path in sorted(src.rglob("*.json")):
        if not kept(path):
            continue
        target = dst / path.relative_to(src)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
        copied += 1
    return copied


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    print(f"{archive(src, dst)} new files in {dst}")
