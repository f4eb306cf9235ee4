"""The paper's kind of qualitative figure: image | ground truth | each method's prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sparseft.fileutil import atomic_path


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (background black, ignore white), [num_classes + 1, 3] uint8."""
    rng = np.random.default_rng(7)
    colours = rng.integers(40, 256, (num_classes, 3), dtype=np.uint8)
    colours[0] = 0
    return np.vstack([colours, [[255, 255, 255]]])


def colourise(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Class ids [H, W] (255 = ignore) as an RGB image."""
    ids = np.where(mask == 255, len(colours) - 1, mask)
    return colours[ids]


@torch.no_grad()
def prediction_figure(task_files: dict[str, str | Path], data: str, out: str | Path, *, split: str = "test",
                      n_images: int = 4) -> Path:
    """Draw `n_images` of `split` (the first ones): image, ground truth, then each task file's prediction.

    `task_files`: row label -> task file of a segmentation run on `data` (loaded merged, in eval mode).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseft.data import data_config
    from sparseft.data.segmentation import SegTransform, load_segmentation
    from sparseft.deltafile import read_delta
    from sparseft.inference import load_for_inference

    if not task_files:
        raise ValueError("prediction_figure needs at least one task file")
    raw = load_segmentation(data, split)
    n = min(n_images, len(raw))
    columns = {"image": [], "ground truth": []}
    colours = None
    for label, path in task_files.items():
        extra = read_delta(path)[0].get("extra", {})
        model = load_for_inference(path)
        transform = SegTransform.from_config(data_config(model), train=False, img_size=extra.get("img_size"))
        preds = []
        for i in range(n):
            image, mask = raw[i]
            x, y = transform(image, mask)  # y at the data's own size: the prediction is resized to it
            logits = torch.nn.functional.interpolate(model(x[None]).float(), size=tuple(y.shape), mode="bilinear",
                                                     align_corners=False)
            preds.append(logits.argmax(1)[0].numpy())
            if len(columns["image"]) < n:
                columns["image"].append(np.asarray(image.resize(y.shape[::-1])))
                columns["ground truth"].append(y.numpy())
        if colours is None:
            colours = palette(int(extra.get("num_classes") or max(int(p.max()) for p in preds) + 1))
        columns[label] = preds
    fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), 1.6 * n), squeeze=False)
    for col, (title, images) in enumerate(columns.items()):
        for row in range(n):
            ax = axes[row][col]
            shown = images[row] if title == "image" else colourise(images[row], colours)
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
