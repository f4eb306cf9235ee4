"""The `sparseft data` command: `data fetch <suite> [--tasks ...] [--cache DIR]` and `data list`.

`register_cli(subparsers)` adds the command to the main parser; each sub-command sets
`args.func`, a callable taking the parsed namespace and returning the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparseft.data.tasks import SUITES, fetch_suite, suite_dir, task_status
from sparseft.errors import SparseftError


def _split_tasks(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [t for v in values for t in v.split(",") if t]


def cmd_fetch(args: argparse.Namespace) -> int:
    """Provision the suite's tasks; prints where they are."""
    try:
        root = fetch_suite(args.suite, _split_tasks(args.tasks), args.cache, force=args.force,
                           progress=not args.quiet)
    except SparseftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(root)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the suite's tasks: classes, split sizes, whether provisioned, size on disk, licence."""
    try:
        rows = task_status(args.suite, args.cache)
    except SparseftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.suite} under {suite_dir(args.suite, args.cache)}")
    w = max([14, *(len(r["task"]) for r in rows)])  # the longest task name (crossfire_objects, freedroid_facing)
    header = f"{'task':<{w}} {'classes':>7} {'train':>5} {'val':>4} {'test':>5}  {'status':<13} {'MB':>6}  licence"
    print(header)
    print("-" * len(header))
    for r in rows:
        s = r["splits"]
        status = "provisioned" if r["provisioned"] else ("stale" if r["stale"] else "not fetched")
        size = f"{r['bytes'] / 1e6:6.1f}" if "bytes" in r else f"{'-':>6}"
        print(f"{r['task']:<{w}} {r['num_classes']:>7} {s['train800']:>5} {s['val200']:>4} {s['test']:>5}  "
              f"{status:<13} {size}  {r['licence']}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `data` command (with `fetch` and `list`) to a main parser's subparsers."""
    data = subparsers.add_parser("data", help="provision and list offline data sets",
                                 description="Provision offline benchmark suites (mini-VTAB) into the cache.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{fetch,list}")

    fetch = sub.add_parser("fetch", help="download, verify and build a suite's tasks")
    fetch.add_argument("suite", choices=sorted(SUITES))
    fetch.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks (space or comma separated)")
    fetch.add_argument("--cache", type=Path, default=None,
                       help="cache folder (default: $SPARSEFT_CACHE or ~/.cache/sparseft)")
    fetch.add_argument("--force", action="store_true", help="rebuild tasks that are already provisioned")
    fetch.add_argument("--quiet", action="store_true", help="no progress output")
    fetch.set_defaults(func=cmd_fetch)

    lst = sub.add_parser("list", help="list a suite's tasks and whether they are provisioned")
    lst.add_argument("suite", nargs="?", default="mini-vtab", choices=sorted(SUITES))
    lst.add_argument("--cache", type=Path, default=None)
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_list)
    return data
