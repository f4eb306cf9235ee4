"""Image classification: one class label per image, top-1 accuracy, SupCon over images.

The fallback kind: any data no other kind claims (VTAB-1k, FGVC, ImageFolder layouts and the
provisioned mini-vtab tasks) is classification data, and a model that names no kind is a classifier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparseft.data import TwoViews, build_transform, class_names, load_split
from sparseft.data.checks import Item, check_content, sample_items
from sparseft.inference import eval_transform, predict
from sparseft.kinds.base import TaskKind, register
from sparseft.loaders import SeededViews
from sparseft.models import create_model
from sparseft.selection.objectives import ImageObjective


@dataclass
class PredictOptions:
    """What `sparseft predict` takes for a classification task only (the classes of whole images)."""

    top_k: int = field(default=5, metadata={"help": "classes shown per image (at most the task's classes)"})
    min_confidence: float | None = field(default=None, metadata={
        "help": "label an image whose top probability is below this (in (0, 1]) 'unknown' (printed first; the CSV "
                "gets a label column); default: none"})


@dataclass
class EvalOptions:
    """What `sparseft eval` takes for a classification task only (a segmentation task's evaluation is fixed)."""

    preprocessing: Literal["vtab", "fgvc"] | None = field(default=None, metadata={
        "help": "evaluation preprocessing (default: the one the task was trained with)"})


@register
class ClassificationKind(TaskKind):
    name = "classification"
    primary_metric = "top1"
    metric_key = "acc"  # top-1 accuracy: the key run summaries and bench records have always used
    best_keys = ("acc",)
    fallback = True
    prediction = "classes"
    predict_options = PredictOptions
    eval_options = EvalOptions

    def class_names(self, data: str) -> list[str]:
        return class_names(data)

    def verify_split(self, data: str, split: str) -> list[Item]:
        return sample_items(load_split(data, split, None).samples)  # every image opened, with its pixels' digest

    def check_splits(self, data: str, found: Mapping[str, Any], train_split: str, eval_splits: Sequence[str]) -> None:
        check_content(found, train_split, eval_splits)  # copies under other names (the layouts check paths)

    def dataset(self, data: str, split: str, transform: Any, *, seed: int = 0) -> Any:
        return load_split(data, split, transform)

    def transforms(self, config: Mapping[str, Any], spec: Any) -> tuple[Any, Any, Any]:
        return (build_transform(config, spec.preprocessing, train=False, img_size=spec.img_size),
                build_transform(config, spec.preprocessing, train=True, img_size=spec.img_size),
                TwoViews.from_config(config, spec.img_size, scale=(getattr(spec, "view_scale", 0.2), 1.0)))

    def selection_dataset(self, task_data: Any) -> Any:
        s = task_data.spec
        return SeededViews(task_data.dataset(s.train_split, task_data.views, False), s.seed)

    def train_is_fixed(self, spec: Any) -> bool:
        return spec.preprocessing == "vtab"  # fgvc's training crops are random

    def build_model(self, name: str, num_classes: int, *, img_size: int | None = None, weights: Any = None,
                    pretrained: bool = False, class_names: list[str] | None = None, **model_kwargs: Any) -> nn.Module:
        return create_model(name, num_classes, img_size=img_size, weights=weights, pretrained=pretrained,
                            **model_kwargs)

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        # y: class indices, or (mixup) per-class probabilities
        loss = F.cross_entropy(logits.float(), y.float() if y.dim() == 2 else y, reduction="sum",
                               label_smoothing=label_smoothing)
        return loss, len(y)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        labels = y.argmax(1) if y.dim() == 2 else y  # mixup's soft targets: their largest share
        return (logits.argmax(1) == labels).sum()

    def predicted_classes(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)

    def eval_dataset(self, model: nn.Module, data: str, split: str, extra: Mapping[str, Any],
                     preprocessing: str | None) -> Any:
        return load_split(data, split, eval_transform(model, extra, preprocessing))

    def selection_objective(self, model: nn.Module, head: str | None) -> ImageObjective:
        return ImageObjective()

    def predict(self, model: nn.Module, images: Any, **options: Any) -> list[Any]:
        return predict(model, images, **options)
