"""What the exporters share: the task's record (base, classes, preprocessing) and writing a folder atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from sparseft.data.transforms import data_config
from sparseft.errors import InputError
from sparseft.fileutil import give_umask_permissions


class ExportError(InputError):
    """A task that cannot be written in the asked format (the message says why), or an output in the way."""


def preprocessing_record(model: nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    """What a consumer needs to feed the model: input size, resize interpolation, mean/std, the recipe name."""
    cfg = data_config(model)
    size = extra.get("img_size") or int(cfg["input_size"][-1])
    return {"recipe": extra.get("preprocessing", "vtab"), "input_size": [3, size, size],
            "interpolation": cfg.get("interpolation", "bicubic"), "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]], "crop_pct": float(cfg.get("crop_pct", 1.0))}


def task_summary(extra: dict[str, Any]) -> dict[str, Any]:
    """The task's facts a config or card shows: base model, task kind, classes, image size, method."""
    return {"base_model": extra.get("model"), "task": extra.get("task", "classification"),
            "num_classes": extra.get("num_classes"), "class_names": extra.get("class_names"),
            "img_size": extra.get("img_size"), "method": extra.get("method")}


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    """The folder `--out` names, refused before any work when it is a file or holds files (unless `overwrite`)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ExportError(f"--out {out} is a file; name a folder to write")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it, or choose "
                              "another folder")
    return path


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it takes `out`'s place in one rename.

    A failure leaves `out` as it was. An existing non-empty `out` is replaced only with `overwrite`.
    """
    out = check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        yield tmp
        give_umask_permissions(tmp)  # mkdtemp makes 0700 and safetensors' writer 0600: what mkdir/open give
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
