"""Semantic segmentation: a class per pixel, pixel accuracy and mIoU / mDice, SupCon over class regions.

Its data is an images/ + masks/ folder (or a provisioned mini-seg task); its model a timm backbone
with a light decoder (`sparseft.seg.model`); its masks are scored at their own size (the logits
resized bilinearly), 255 ignored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sparseft.data import DataWarning, Sample, class_names, data_config, resolve_spec
from sparseft.data._random import stable_keys
from sparseft.data.checks import Item, check_content, need_two_classes, overlap, untrained_classes
from sparseft.data.segmentation import (
    IGNORE_INDEX,
    SegmentationDataset,
    SegTransform,
    background_name,
    collate_pairs,
    load_segmentation,
    segmentation_root,
    split_of,
)
from sparseft.errors import InputError
from sparseft.kinds.base import Meter, TaskKind, register
from sparseft.seg.metrics import SegMetrics
from sparseft.seg.model import create_segmentation_model
from sparseft.seg.predict import predict_masks
from sparseft.selection.objectives import RegionObjective

#: the SegMetrics scores an evaluation reports beside pixel accuracy ("acc") and the loss
SEG_METRICS = ("mIoU", "mDice", "mIoU_per_image", "mDice_per_image")


class SegViews(Dataset):
    """Two independently augmented (image, mask) views of item i, drawn from generators seeded by (seed, i)."""

    def __init__(self, dataset: Dataset, transform: Any, seed: int) -> None:
        self.dataset, self.transform = dataset, transform
        self.keys = stable_keys(len(dataset), seed, "selection views")  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Any:
        image, mask = self.dataset[i]  # the raw pair
        views = [self.transform(image, mask, torch.Generator().manual_seed(int(self.keys[i]) + v)) for v in (0, 1)]
        return [x for x, _ in views], [m for _, m in views]


class SegMeter(Meter):
    """Pixel accuracy and loss per valid pixel, plus SegMetrics' mIoU / mDice (the classes averaged
    follow the model's `class_names`). Built on every rank for a segmentation model, so the sync
    is collective; for a model that names no kind, at its first mask batch. Per class: pixels,
    pixel accuracy, and SegMetrics' dataset-level IoU and Dice."""

    unit = "pixels"

    def __init__(self, kind: TaskKind, model: nn.Module) -> None:
        super().__init__(kind, model)
        self.metrics = self._metrics() if getattr(model, "task", None) == kind.name else None

    def _metrics(self, num_classes: int | None = None) -> SegMetrics:
        classes = int(num_classes or self.model.num_classes)
        names = getattr(self.model, "class_names", None)
        names = names if names and len(names) == classes else None
        return SegMetrics(classes, ignore_index=IGNORE_INDEX, class_names=names)

    def add(self, out: torch.Tensor, target: torch.Tensor) -> None:
        self.metrics = self.metrics if self.metrics is not None else self._metrics(out.shape[1])
        self.metrics.update(out.argmax(1), target)

    def sync(self) -> None:
        super().sync()
        if self.metrics is not None:
            self.metrics.sync()

    def result(self) -> dict[str, float]:
        result = super().result()
        if self.metrics is not None:
            result.update({k: v for k, v in self.metrics.compute().items() if k in SEG_METRICS})
        return result

    def per_class(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        rows = super().per_class(names)
        if self.metrics is not None and self.metrics.num_classes == len(names):
            scores = list(self.metrics.compute()["per_class"].values())  # in class order
            for row, score in zip(rows.values(), scores):
                row.update(iou=score["iou"], dice=score["dice"])
        return rows


def check_mask_classes(train: SegmentationDataset, root: Path) -> None:
    """The training masks must hold two classes or more, and every class (else a `DataError`, as a class
    without training sample is for classification); when at least half of them hold only background,
    a `DataWarning` with the count (negative examples are fine, masks saved wrong are not)."""
    classes, file = train.seg_classes, split_of(train.samples[0])
    present = set().union(*(check.present for check in train.checks))
    shown = " and ".join(repr(classes.names[i]) for i in sorted(present))
    need_two_classes(len(present), file, f"only {shown} occurs in its masks")
    where = [f"{root / 'classes.txt'}:{i + 1}" if not classes.binary else file for i in range(classes.num_classes)]
    untrained_classes(classes.names, present, where, f"has no pixel in the masks of {file}",
                      "add training masks that hold it")
    empty = [s for s, check in zip(train.samples, train.checks) if not set(check.present) - {0}]
    if 2 * len(empty) >= len(train.samples):
        warnings.warn(f"{file}: {len(empty)} of its {len(train.samples)} masks hold only {background_name(classes)} "
                      f"(first masks/{empty[0].mask.name}); negative examples are fine, but if these are not meant to "
                      "be, check how their masks were saved", DataWarning, stacklevel=2)


@register
class SegmentationKind(TaskKind):
    name = "segmentation"
    primary_metric = "miou"
    metric_key = "mIoU"  # dataset-level mean IoU: the key run summaries and bench records have always used
    unit = "pixel"
    chance_check = False  # pixel accuracy below all-background can still be the better segmentation
    best_keys = ("acc", "mIoU")
    prediction = "masks"
    predict_hint = "take the masks from the model itself (model(x).argmax(1)); `sparseft eval` scores a split"

    def claims(self, data: str) -> bool:
        return resolve_spec(data).kind == "seg"  # images/ + masks/

    def claims_targets(self, targets: Any) -> bool:
        return isinstance(targets, (list, tuple)) or targets.dim() > 1  # masks, stacked or each at its size

    def class_names(self, data: str) -> list[str]:
        return class_names(data)

    def verify_split(self, data: str, split: str) -> SegmentationDataset:
        return load_segmentation(data, split, None, verify=True)  # every pair read; masks of only background refused

    def check_splits(self, data: str, found: Mapping[str, Any], train_split: str, eval_splits: Sequence[str]) -> None:
        """The checks classification data gets, on masks: the classes the training masks hold, and
        the training images found again in an evaluation split (by stem, and by their pixels)."""
        train: SegmentationDataset = found[train_split]
        check_mask_classes(train, segmentation_root(data))
        evals = [split for split in dict.fromkeys(eval_splits) if split != train_split]
        entries = {split: [(Sample(s.image, 0, s.origin), s.image.stem) for s in found[split].samples]
                   for split in (train_split, *evals)}
        names = {split: Path(split_of(found[split].samples[0])).name for split in entries}
        for split in evals:
            overlap(entries, names, [train_split], [split], f"train/{split} overlap: {split} scores are optimistic")
        check_content({split: [Item(s.origin, s.image, check.pixels, check.mask, f"mask {s.mask.name}")
                               for s, check in zip(ds.samples, ds.checks)] for split, ds in found.items()},
                      train_split, evals, noun="mask")

    def dataset(self, data: str, split: str, transform: Any, *, seed: int = 0) -> Any:
        # crops and flips drawn per (seed, epoch, item): the same under any process count
        return load_segmentation(data, split, transform, seed=seed)

    def transforms(self, config: Mapping[str, Any], spec: Any) -> tuple[Any, Any, Any]:
        return (SegTransform.from_config(config, train=False, img_size=spec.img_size),
                SegTransform.from_config(config, train=True, img_size=spec.img_size), None)

    def selection_dataset(self, task_data: Any) -> Any:
        s = task_data.spec
        return SegViews(task_data.dataset(s.train_split, None, False), task_data.train_transform, s.seed)

    def collate(self, loader: str) -> Callable | None:
        return collate_pairs if loader == "eval" else None  # evaluation masks keep their own sizes

    def build_model(self, name: str, num_classes: int, *, img_size: int | None = None, weights: Any = None,
                    pretrained: bool = False, class_names: list[str] | None = None, **model_kwargs: Any) -> nn.Module:
        if model_kwargs:
            raise InputError(f"segmentation models take no {', '.join(sorted(model_kwargs))} (e.g. --drop-path)")
        model = create_segmentation_model(name, num_classes, img_size=img_size, weights=weights,
                                          pretrained=pretrained)
        if class_names:
            model.class_names = list(class_names)  # which class is the background, for the metrics
        return model

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        valid = y != IGNORE_INDEX
        loss = F.cross_entropy(logits.float(), y, reduction="sum", ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)
        return loss, int(valid.sum())

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((logits.argmax(1) == y) & (y != IGNORE_INDEX)).sum()

    def predicted_classes(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)

    def terms_per_sample(self) -> bool:
        return False  # valid pixels

    def pairs(self, logits: torch.Tensor, y: Any, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Dense logits resized to their masks' size (one pair per image for a list of masks of different sizes)."""
        if isinstance(y, (list, tuple)):
            return [pair for i, m in enumerate(y) for pair in self.pairs(logits[i:i + 1], m[None], device)]
        y = y.to(device)
        if y.dim() > 1 and tuple(logits.shape[-2:]) != tuple(y.shape[-2:]):
            logits = F.interpolate(logits.float(), size=tuple(y.shape[-2:]), mode="bilinear", align_corners=False)
        return [(logits, y)]

    def meter(self, model: nn.Module) -> SegMeter:
        return SegMeter(self, model)

    def eval_dataset(self, model: nn.Module, data: str, split: str, extra: Mapping[str, Any],
                     preprocessing: str | None) -> Any:
        transform = SegTransform.from_config(data_config(model), train=False, img_size=extra.get("img_size"))
        return load_segmentation(data, split, transform)

    def selection_objective(self, model: nn.Module, head: str | None) -> RegionObjective:
        return RegionObjective()

    def predict(self, model: nn.Module, images: Any, **options: Any) -> list[Any]:
        return predict_masks(model, images, **options)
