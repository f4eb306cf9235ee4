"""Masks for new images from a segmentation task: what `sparseft predict` does for masks.

    model = sparseft.load("runs/seg/delta.safetensors")
    preds = predict_masks(model, ["a.jpg", "b.png"])   # uint8 class ids at each image's own size
    write_masks(preds, "masks/")                        # masks/a.png, masks/b.png (palette PNGs)

Each image is resized to the model's input (the task's evaluation preprocessing), the logits are
resized back to the image's own size (bilinear) and the most probable class is kept per pixel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sparseft.data import data_config
from sparseft.data.images import DataError, OnError, open_rgb, to_rgb
from sparseft.data.segmentation import SegTransform
from sparseft.data.segtasks import voc_palette
from sparseft.delta import task_record
from sparseft.errors import InputError
from sparseft.fileutil import atomic_path, check_output_folder
from sparseft.inference import check_batch_options, predict_batches
from sparseft.kinds.base import kind_of

ImageInput = str | os.PathLike | Image.Image


@dataclass
class MaskPrediction:
    """One image's mask: class ids [H, W] (uint8) at the image's size; `error` when it was skipped."""

    mask: np.ndarray | None
    path: Path | None = None
    error: str | None = None


def _image_transform(model: nn.Module):
    transform = SegTransform.from_config(data_config(model), train=False, img_size=task_record(model).get("img_size"))
    return lambda image: transform(image, np.zeros((image.height, image.width), dtype=np.uint8))[0]


def predict_masks(model: nn.Module, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 16,
                  progress: bool = False, on_error: OnError = "raise") -> list[MaskPrediction]:
    """The predicted mask of each image (files or PIL images), one `MaskPrediction` each, in order.

    An unreadable file raises `DataError` naming it, or with `on_error="skip"` gets a prediction
    with `error` set and no mask. The model's train/eval modes are restored.
    """

    if kind_of(model).prediction != "masks":
        raise InputError("predict_masks needs a segmentation model (a task trained on images/ + masks/ data); "
                         "sparseft.predict gives the classes of a classification task")
    check_batch_options(batch_size, on_error)
    items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
    transform = _image_transform(model)
    first = next(iter(model.parameters()))

    def run_batch(chunk: list[ImageInput]) -> list[MaskPrediction]:
        batch = [_open(item, on_error) for item in chunk]
        read = [b for b in batch if b.error is None]
        if read:
            x = torch.stack([transform(b.image) for b in read]).to(first.device, first.dtype)
            for b, logits in zip(read, model(x)):
                size = (b.image.height, b.image.width)
                full = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
                b.mask = full.argmax(1)[0].to(torch.uint8).cpu().numpy()
        return [MaskPrediction(b.mask, b.path, b.error) for b in batch]

    return predict_batches(model, items, batch_size, run_batch, progress=progress)


@dataclass
class _Item:
    path: Path | None
    image: Image.Image | None = None
    error: str | None = None
    mask: np.ndarray | None = None


def _open(item: ImageInput, on_error: OnError) -> _Item:
    path = Path(item) if isinstance(item, (str, os.PathLike)) else None
    if path is None and not isinstance(item, Image.Image):
        raise TypeError(f"images: expected file paths or PIL images, not {type(item).__name__}")
    try:
        return _Item(path, open_rgb(path) if path is not None else to_rgb(item))
    except DataError as err:
        if on_error == "raise":
            raise
        return _Item(path, error=str(err))


def mask_file_names(paths: Sequence[Path]) -> list[str]:
    """`<stem>.png` for each image; two images with one stem (ignoring case, as macOS and Windows
    do) are refused: their masks would collide."""
    seen: dict[str, Path] = {}
    for p in paths:
        name = f"{p.stem}.png".casefold()
        if name in seen:
            raise InputError(f"{p} and {seen[name]} would both write {p.stem}.png; predict them into separate "
                             "folders")
        seen[name] = p
    return [f"{p.stem}.png" for p in paths]


def check_destinations(paths: Sequence[Path], folder: str | Path, *, overwrite: bool = False) -> None:
    """Before any work: no mask may replace one of the input images, nor an existing file unless `overwrite`."""
    folder = Path(folder)
    targets = [folder / n for n in mask_file_names(paths)]
    inputs = {p.resolve() for p in paths}
    hit = next((t for t in targets if t.resolve() in inputs), None)
    if hit is not None:
        raise InputError(f"{hit} is an input image and would be replaced by its mask; choose another --out folder")
    clash = [t for t in targets if t.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]} exists ({len(clash)} of the masks would replace files); pass "
                              "--overwrite, or choose another folder")


def write_masks(preds: Sequence[MaskPrediction], folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write each prediction's mask as `<folder>/<image stem>.png`: a palette PNG whose pixel values are
    the class ids (its colours, the VOC ones the data's masks carry, only show them). Existing files are
    refused unless `overwrite`."""

    good = [p for p in preds if p.mask is not None]
    if any(p.path is None for p in good):
        raise InputError("write_masks names files after the images' paths; predictions of PIL images have none")
    folder = check_output_folder(folder, what="the mask PNGs")
    check_destinations([p.path for p in good], folder, overwrite=overwrite)
    names = mask_file_names([p.path for p in good])
    folder.mkdir(parents=True, exist_ok=True)
    colours = voc_palette()
    written = []
    for p, name in zip(good, names):
        img = Image.fromarray(p.mask)  # mode L; a palette makes it P with the same pixel values
        img.putpalette(colours)
        with atomic_path(folder / name) as tmp:
            img.save(tmp, format="PNG")
        written.append(folder / name)
    return written
