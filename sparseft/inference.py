"""Inference on images: the top-k classes a model (a trained task) gives new images.

    model = sparseft.load("runs/x/delta.safetensors")
    preds = sparseft.predict(model, ["a.jpg", "b.png"], top_k=3)
    preds[0].labels, preds[0].probs             # most probable first

A model loaded from a task file is run with that task's preprocessing and class names (its
header's record); `sparseft predict TASK_FILE INPUT...` is this plus `sparseft.api.load_for_inference`
(merged where the method can merge), `find_images` (files and folders) and `write_csv`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from PIL import Image
from torch import nn

from sparseft.data import build_transform, data_config
from sparseft.data.folder import _images_under
from sparseft.data.images import IMAGE_EXTENSIONS, DataError, OnError, open_rgb, to_rgb
from sparseft.delta import task_record
from sparseft.errors import InputError
from sparseft.fileutil import write_text_atomic
from sparseft.kinds.base import kind_of
from sparseft.progress import progress_bar

ImageInput = str | os.PathLike | Image.Image
T = TypeVar("T")


#: the label of an image whose top probability is below `predict(..., min_confidence=P)`
UNKNOWN = "unknown"


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first; `path` when the image came from a file.

    `error` says why the image was skipped (only with `on_error="skip"`); its lists are empty then.
    `unknown`: its top probability is below the `min_confidence` asked for; `label` is then "unknown".
    """

    labels: list[str]
    probs: list[float]
    indices: list[int]
    path: Path | None = None
    error: str | None = None
    unknown: bool = False

    @property
    def label(self) -> str | None:
        """The decision: the top class, "unknown" below `min_confidence`, None for a skipped image."""
        return None if self.error is not None else UNKNOWN if self.unknown else self.labels[0]


def eval_transform(model: nn.Module, extra: Mapping[str, Any] | None = None,
                   preprocessing: Literal["vtab", "fgvc"] | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform of a task: the preprocessing and image size recorded in its task
    file's header `extra` (`preprocessing` overrides it); without one, VTAB's resize to the model's input size."""

    extra = extra or {}
    return build_transform(data_config(model), preprocessing or extra.get("preprocessing", "vtab"), train=False,
                           img_size=extra.get("img_size"))


def find_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The image files `inputs` name: files as given (whatever their extension), folders searched
    recursively for image files (by extension; sorted; hidden names and symlinked folders skipped).

    What exists but cannot be read (a broken link, a FIFO, a file without permission, a folder named
    like an image that holds none) is listed as it is: reading it reports it (`predict` skips it
    with `on_error="skip"`). A path that does not exist is a FileNotFoundError, any other folder
    without image files a DataError.
    """

    out: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(sample.path for sample, _ in _images_under(path))
            if found:
                out.extend(found)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:  # named as an image: reading it says what it is
                out.append(path)
            else:
                raise DataError(f"{raw}: no image files in this folder")
        elif os.path.lexists(path):
            out.append(path)
        else:
            raise FileNotFoundError(f"{raw}: no such file or folder")
    return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's own train/eval mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def check_batch_options(batch_size: Any, on_error: Any) -> None:
    """Refuse a `batch_size` that is not a whole number >= 1 or an `on_error` other than raise/skip."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size (--batch-size) must be a whole number >= 1, not {batch_size!r}")
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', not {on_error!r}")


def predict_batches(model: nn.Module, items: Sequence[Any] | torch.Tensor, batch_size: int,
                    run_batch: Callable[[Any], list[T]], *, progress: bool = False) -> list[T]:
    """The one prediction loop of every task kind: `items` in slices of `batch_size`, each given to
    `run_batch` (one result per item, in order) in eval mode under `torch.no_grad()`, with a progress
    bar; the model's train/eval modes are restored."""
    results: list[T] = []
    with eval_mode(model), torch.no_grad(), progress_bar(total=len(items), desc="predict", unit="img",
                                                          enabled=progress, leave=False) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            results.extend(run_batch(chunk))
            bar.update(len(chunk))
    return results


def _read(items: Sequence[Any], transform: Callable[[Image.Image], torch.Tensor],
          on_error: OnError) -> tuple[torch.Tensor | None, list[Path | None], dict[int, str]]:
    """One batch of files or PIL images: (stacked tensors of the readable ones, paths, errors by position)."""
    tensors, paths, errors = [], [], {}
    for i, item in enumerate(items):
        path = Path(item) if isinstance(item, (str, os.PathLike)) else None
        paths.append(path)
        if path is None and not isinstance(item, Image.Image):
            raise TypeError(f"images: expected file paths or PIL images, not {type(item).__name__}")
        try:
            image = open_rgb(path) if path is not None else to_rgb(item)
        except DataError as err:
            if on_error == "raise":
                raise
            errors[i] = str(err)
            continue
        tensors.append(transform(image))
    return (torch.stack(tensors) if tensors else None), paths, errors


def _top_k(logits: torch.Tensor, k: int, names: Sequence[str] | None,
           min_confidence: float | None = None) -> list[Prediction]:
    if names is not None and len(names) != logits.shape[1]:
        raise InputError(f"class_names has {len(names)} names but the model gives {logits.shape[1]} classes")
    probs, indices = logits.float().softmax(dim=1).topk(min(k, logits.shape[1]), dim=1)
    out = []
    for p, i in zip(probs.tolist(), indices.tolist()):
        unknown = min_confidence is not None and p[0] < min_confidence
        out.append(Prediction([names[j] if names is not None else str(j) for j in i], p, i, unknown=unknown))
    return out


def check_min_confidence(min_confidence: Any, names: Sequence[str] | None = None) -> None:
    """Refuse a `min_confidence` that is not a number in (0, 1], or one for a task with a class named "unknown"."""
    if min_confidence is None:
        return
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) or not (
            0 < min_confidence <= 1):
        raise InputError(f"min_confidence (--min-confidence) must be a probability in (0, 1], not {min_confidence!r}")
    if names is not None and UNKNOWN in names:
        raise InputError(f"min_confidence (--min-confidence): the task has a class named {UNKNOWN!r}, so a "
                         "low-confidence image could not be told from it")


def predict(model: nn.Module, images: torch.Tensor | ImageInput | Sequence[ImageInput], *, top_k: int = 5,
            class_names: Sequence[str] | None = None,
            transform: Callable[[Image.Image], torch.Tensor] | None = None, batch_size: int = 64,
            progress: bool | None = False, on_error: OnError = "raise",
            min_confidence: float | None = None) -> list[Prediction]:
    """The `top_k` most probable classes (softmax of the logits) of each image, one Prediction each.

    `images`: a preprocessed float batch [N, C, H, W], used as it is; or image files / PIL images
    (one or a list), opened as RGB and preprocessed by `transform`. Defaults, for a model loaded
    from a task file: that task's evaluation preprocessing and class names (its record); else VTAB's
    resize to the model's input size and the class indices as strings. `top_k` is clipped to
    the number of classes. An unreadable file raises `DataError` naming it, or with
    `on_error="skip"` gets a Prediction with `error` set and no labels. Runs under
    `torch.no_grad()` in eval mode on the model's device and in its dtype; the model's train/eval modes are restored.
    `min_confidence` P in (0, 1]: an image whose top probability is below P is marked `unknown`
    (its `label` is "unknown"; its top-k stay as they are).
    """
    kind = kind_of(model)
    if kind.prediction != "classes":
        raise InputError(f"predict gives the classes of whole images, and this task is {kind.name}: "
                         f"{kind.predict_hint}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k (--top-k) must be a whole number >= 1, not {top_k!r}")
    check_batch_options(batch_size, on_error)
    record = task_record(model)
    if class_names is None:
        class_names = record.get("class_names") or None
    names = list(class_names) if class_names is not None else None
    check_min_confidence(min_confidence, names)
    if isinstance(images, torch.Tensor):
        if transform is not None:
            raise InputError("transform applies to image files and PIL images; a tensor batch is used as it is")
        if images.ndim != 4 or not images.is_floating_point():
            raise InputError(f"a tensor of images must be a float batch [N, C, H, W], not {images.dtype} of shape "
                             f"{tuple(images.shape)}")
        items: Any = images
    else:
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        transform = transform or eval_transform(model, record)
    first = next(iter(model.parameters()), torch.empty(0))
    # images come as float32 (files) or the caller's float dtype: run them in the model's (a bf16/fp64 model)
    device, dtype = first.device, first.dtype if first.is_floating_point() else None

    def run_batch(chunk: Any) -> list[Prediction]:
        if isinstance(chunk, torch.Tensor):
            x, paths, errors = chunk, [None] * len(chunk), {}
        else:
            x, paths, errors = _read(chunk, transform, on_error)
        found = iter(_top_k(model(x.to(device, dtype)), top_k, names, min_confidence) if x is not None else ())
        return [Prediction([], [], [], path, errors[i]) if i in errors else replace(next(found), path=path)
                for i, path in enumerate(paths)]

    return predict_batches(model, items, batch_size, run_batch, progress=progress)


def write_csv(predictions: Iterable[Prediction], path: str | Path, *, label: bool = False) -> None:
    """The predictions (skipped images left out) as a CSV file written atomically: columns path,
    (with `label`: the decision, the top class or "unknown"), then label_1, prob_1, ..., label_k, prob_k."""

    rows = [p for p in predictions if p.error is None]
    k = max((len(p.labels) for p in rows), default=0)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", *(["label"] if label else []),
                     *(f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "prob"))])
    for p in rows:
        writer.writerow(["" if p.path is None else str(p.path), *([p.label] if label else []),
                         *(v for name, prob in zip(p.labels, p.probs) for v in (name, f"{prob:.6f}"))])
    write_text_atomic(path, text.getvalue())
