"""Semantic segmentation: a class per pixel, pixel accuracy and mIoU / mDice, SupCon over class regions.

Its data is an images/ + masks/ folder (or a provisioned mini-seg task); its model a timm backbone
with a light decoder (`sparseft.seg.model`); its masks are scored at their own size (the logits
resized bilinearly), 255 ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sparseft.data import class_names, data_config, resolve_spec
from sparseft.data._random import stable_keys
from sparseft.data.segmentation import IGNORE_INDEX, SegTransform, collate_pairs, load_segmentation
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
    is collective; for a model that names no kind, at its first mask batch."""

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

    def verify_split(self, data: str, split: str) -> None:
        load_segmentation(data, split, None, verify=True)

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
                    pretrained: bool = False, class_names: list[str] | None = None) -> nn.Module:
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

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        return int(((logits.argmax(1) == y) & (y != IGNORE_INDEX)).sum())

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

    def check_eval_options(self, task_file: Any, preprocessing: str | None) -> None:
        if preprocessing is not None:
            raise InputError(f"--preprocessing {preprocessing}: {task_file} is a segmentation task, whose evaluation "
                             "is fixed (the image resized to the model's input, the mask kept at its own size)")

    def eval_dataset(self, model: nn.Module, data: str, split: str, extra: Mapping[str, Any],
                     preprocessing: str | None) -> Any:
        transform = SegTransform.from_config(data_config(model), train=False, img_size=extra.get("img_size"))
        return load_segmentation(data, split, transform)

    def selection_objective(self, model: nn.Module, head: str | None) -> RegionObjective:
        return RegionObjective()

    def predict(self, model: nn.Module, images: Any, **options: Any) -> list[Any]:
        return predict_masks(model, images, **options)
