"""The paper's kind of qualitative figure: image | ground truth | each method's prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparseft.api import load_for_inference
from sparseft.data.segmentation import load_segmentation
from sparseft.data.segtasks import voc_palette
from sparseft.errors import InputError
from sparseft.fileutil import atomic_path
from sparseft.seg.predict import predict_masks


def mask_colours() -> np.ndarray:
    """The colour of each mask value [256, 3] uint8: the VOC colours the data's and predicted mask PNGs
    carry (background black, 255 = ignore cream)."""

    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def prediction_figure(task_files: dict[str, str | Path], data: str, out: str | Path, *, split: str = "test",
                      n_images: int = 4) -> Path:
    """Draw `n_images` of `split` (the first ones): image, ground truth, then each task file's prediction.

    `task_files`: row label -> task file of a segmentation run on `data` (loaded merged, in eval mode).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not task_files:
        raise InputError("prediction_figure needs at least one task file")
    raw = load_segmentation(data, split)
    pairs = [raw[i] for i in range(min(n_images, len(raw)))]  # (RGB image, mask at the image's size)
    images = [image for image, _ in pairs]
    columns = {"image": [np.asarray(image) for image in images], "ground truth": [mask for _, mask in pairs]}
    for label, path in task_files.items():
        columns[label] = [p.mask for p in predict_masks(load_for_inference(path), images)]
    colours = mask_colours()
    n = len(pairs)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), 1.6 * n), squeeze=False)
    for col, (title, cells) in enumerate(columns.items()):
        for row in range(n):
            ax = axes[row][col]
            shown = cells[row] if title == "image" else colours[cells[row]]
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out
