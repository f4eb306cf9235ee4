"""What `sparseft eval` shows beyond the overall score: the per-class table and the confusion matrix files.

    result = sparseft.api.evaluate_task("runs/x/delta.safetensors", "mini-vtab/clipart")
    print(per_class_table(result))              # one line per class
    write_confusion(result, "runs/x/eval-test")  # confusion.csv and confusion.png

`result` is what `evaluate_task` returns (its "per_class" and "confusion"; `sparseft.kinds.Meter.details`).
The matrix's rows are the true classes and its columns the predicted ones; it counts images for
classification and pixels for segmentation (void pixels left out).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparseft.errors import InputError
from sparseft.fileutil import atomic_path, check_output_folder, write_text_atomic

#: the files `write_confusion` writes into its folder
CONFUSION_FILES = ("confusion.csv", "confusion.png")


def _number(value: float, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def per_class_table(result: Mapping[str, Any]) -> str:
    """The per-class results as an aligned text table: class, images (or pixels), correct, accuracy,
    and IoU / Dice where the kind gives them ("-" for a class without items); "" without per-class results."""
    rows = result.get("per_class")
    if not rows:
        return ""
    unit = (result.get("confusion") or {}).get("unit", "images")
    extra = [k for k in ("iou", "dice") if any(k in r for r in rows.values())]
    header = ["class", unit, "correct", "accuracy", *(k.replace("iou", "IoU").replace("dice", "Dice") for k in extra)]
    table = [[str(name), str(r["n"]), str(r["correct"]), _number(r["acc"]), *(_number(r.get(k)) for k in extra)]
             for name, r in rows.items()]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     .rstrip() for line in [header, *table])


def _confusion(result: Mapping[str, Any]) -> Mapping[str, Any]:
    confusion = result.get("confusion")
    if not confusion:
        raise InputError("the result has no confusion matrix (evaluate_task(..., per_class=True), a task kind "
                         "with classes)")
    return confusion


def confusion_csv(result: Mapping[str, Any]) -> str:
    """The confusion matrix as CSV text: a header `true \\ predicted, <class>...`, then one row per true class."""
    confusion = _confusion(result)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["true \\ predicted", *confusion["classes"]])
    for name, row in zip(confusion["classes"], confusion["matrix"]):
        writer.writerow([name, *row])
    return text.getvalue()


def check_confusion_folder(folder: str | Path, *, overwrite: bool = False) -> Path:
    """Before any work: `folder` is a folder that can be written (`fileutil.check_output_folder`), and its
    confusion files are not replaced unless `overwrite`."""
    path = check_output_folder(folder, label="--confusion", what=" and ".join(CONFUSION_FILES))
    present = [path / name for name in CONFUSION_FILES if (path / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{present[0]} exists; pass --overwrite to replace it, or choose another folder")
    return path


def write_confusion(result: Mapping[str, Any], folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write `confusion.csv` and `confusion.png` (rows: true class; colours: the share of each true class)
    into `folder` (created), each file atomically; returns their paths. Existing files are refused
    unless `overwrite`."""
    confusion = _confusion(result)
    path = check_confusion_folder(folder, overwrite=overwrite)
    path.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = (path / name for name in CONFUSION_FILES)
    write_text_atomic(csv_path, confusion_csv(result))
    with atomic_path(png_path) as tmp:
        _draw(confusion, tmp)
    return [csv_path, png_path]


def _draw(confusion: Mapping[str, Any], path: Path) -> None:
    """The matrix as a heat map (no pyplot: no global backend or figure state), counts written in
    each cell when there are at most 25 classes."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, counts = list(confusion["classes"]), np.asarray(confusion["matrix"], dtype=np.float64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(max(4.0, 0.45 * len(names) + 2.5), 30.0)
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=f"share of the true class's {confusion['unit']}")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 6 else 0)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(names) <= 25:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
