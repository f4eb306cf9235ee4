"""Task kinds as registered objects: what differs between classification, segmentation, and any kind to come.

A `TaskKind` owns everything that depends on what a task predicts: recognising its data (the kind
follows the data), its class names, building the model and head, its datasets, transforms and
batching, the training loss and per-batch bookkeeping, its evaluation metrics (`Meter`), GPS's
selection objective, and prediction. `run`, `api`, `loaders`, `train`, `selection` and `inference`
ask the kind; none of them tests for one.

    @register
    class MyKind(TaskKind):
        name = "my-kind"
        ...

The name is what a task file's header records (`extra["task"]`); a model says its kind with its
`task` attribute (none: classification). This module is a leaf: the built-in kinds live in
`sparseft.kinds.classification` and `sparseft.kinds.segmentation` (registered when `sparseft` is
imported).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from sparseft import distributed
from sparseft.errors import InputError

#: the kind of a model or a header that names none (every task file before kinds were recorded)
DEFAULT_KIND = "classification"


class Meter:
    """Evaluation bookkeeping of one pass: correct / counted terms, summed loss and the sample count.

    A kind's meter adds its own metrics by overriding `update`, `sync` and `result`. `acc` is
    top-1 accuracy for classification and pixel accuracy for segmentation (the key kept for
    compatibility with run summaries and bench records).
    """

    def __init__(self, kind: TaskKind, model: nn.Module) -> None:
        self.kind, self.model = kind, model
        self.correct = self.total = self.images = 0
        self.loss_sum = 0.0
        self.counts = torch.zeros(2, 0, dtype=torch.float64)  # per class: [predicted, true] (images or pixels)

    def update(self, logits: torch.Tensor, y: Any, device: torch.device) -> None:
        self.images += len(y)
        for out, target in self.kind.pairs(logits, y, device):
            loss, n = self.kind.loss_sum(out, target)
            self.loss_sum += loss.item()
            self.correct += self.kind.correct(out, target)
            self.total += n
            self._count(out, target)
            self.add(out, target)

    def _count(self, out: torch.Tensor, target: torch.Tensor) -> None:
        if out.dim() < 2 or target.is_floating_point() or target.dim() != out.dim() - 1:
            return  # not class scores against class indices (e.g. a regression kind)
        classes = out.shape[1]
        valid = (target >= 0) & (target < classes)
        counts = torch.stack([torch.bincount(out.argmax(1)[valid].flatten().cpu(), minlength=classes),
                              torch.bincount(target[valid].flatten().cpu(), minlength=classes)]).double()
        self.counts = _padded(self.counts, classes) + _padded(counts, self.counts.shape[1])

    def add(self, out: torch.Tensor, target: torch.Tensor) -> None:
        """A kind's own metrics of one (logits, targets) pair."""

    def sync(self) -> None:
        """Sum the counts over the ranks of a process group (collective)."""
        sums = distributed.all_reduce_sum(torch.tensor([self.correct, self.total, self.loss_sum, self.images],
                                                       dtype=torch.float64))
        self.correct, self.total, self.loss_sum, self.images = (int(sums[0]), int(sums[1]), float(sums[2]),
                                                                int(sums[3]))
        classes = int(distributed.all_reduce_max(torch.tensor([self.counts.shape[1]], dtype=torch.float64))[0])
        self.counts = distributed.all_reduce_sum(_padded(self.counts, classes))

    def result(self) -> dict[str, float]:
        """`acc`, the mean `loss`, `n`; `top_pred_share` / `top_true_share`: the share of the class predicted most
        often / most common in the targets (what `not_learning` reads)."""
        shares = self.counts.amax(1) / self.counts.sum(1).clamp(min=1) if self.counts.numel() else torch.zeros(2)
        return {"acc": self.correct / max(self.total, 1), "loss": self.loss_sum / max(self.total, 1),
                "n": self.images, "top_pred_share": float(shares[0]), "top_true_share": float(shares[1])}


def _padded(counts: torch.Tensor, classes: int) -> torch.Tensor:
    """`counts` ([2, C]) with zero columns up to `classes`."""
    return torch.nn.functional.pad(counts, (0, max(classes - counts.shape[1], 0)))


class TaskKind:
    """One kind of task. Subclasses set `name`, `primary_metric`, `metric_key` and override what differs."""

    name: ClassVar[str] = ""
    #: what the kind's main score is (`top1`, `miou`, ...): the name for docs and reports
    primary_metric: ClassVar[str] = ""
    #: the key of that score in evaluation results, run summaries and bench records (`acc`, `mIoU`)
    metric_key: ClassVar[str] = "acc"
    #: result keys whose best value over the epochs a run summary keeps (`best_<split>_<key>`)
    best_keys: ClassVar[tuple[str, ...]] = ("acc",)
    #: a kind that takes any data no other kind claims (classification)
    fallback: ClassVar[bool] = False
    #: what `predict` gives for an image: "classes" (top-k, a CSV), "masks" (PNGs), or None (no predict)
    prediction: ClassVar[str | None] = None
    #: what to do instead, when `sparseft.predict` (classes of whole images) does not apply to the kind
    predict_hint: ClassVar[str] = "`sparseft eval` scores a split"

    # -- data --------------------------------------------------------------------------------
    def claims(self, data: str) -> bool:
        """Whether the data spec names data of this kind (the task kind follows the data)."""
        return False

    def claims_targets(self, targets: Any) -> bool:
        """Whether a batch's targets are of this kind (a model that names no kind is scored by its data)."""
        return False

    def class_names(self, data: str) -> list[str]:
        """The class (or output) names of the data; checks the whole data set."""
        raise NotImplementedError

    def verify_split(self, data: str, split: str) -> None:
        """Open every item of a split now, so a run fails before it trains, not at its evaluation."""
        raise NotImplementedError

    def dataset(self, data: str, split: str, transform: Any, *, seed: int = 0) -> Any:
        """The Dataset of one split with `transform` applied."""
        raise NotImplementedError

    def transforms(self, config: Mapping[str, Any], spec: Any) -> tuple[Any, Any, Any]:
        """(eval, train, selection views) transforms for a `sparseft.loaders.DataSpec`."""
        raise NotImplementedError

    def selection_dataset(self, task_data: Any) -> Any:
        """The Dataset of GPS's selection pass (two views per item) for a `sparseft.loaders.TaskData`."""
        raise NotImplementedError

    def train_is_fixed(self, spec: Any) -> bool:
        """Whether the training transform is deterministic (its samples can be cached)."""
        return False

    def collate(self, loader: str) -> Callable | None:
        """The collate function of a loader ("select", "train", "eval"); None: torch's default."""
        return None

    # -- model -------------------------------------------------------------------------------
    def build_model(self, name: str, num_classes: int, *, img_size: int | None = None, weights: Any = None,
                    pretrained: bool = False, class_names: list[str] | None = None) -> nn.Module:
        raise NotImplementedError

    # -- training and evaluation ---------------------------------------------------------------
    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        """The summed training loss of a batch and its number of terms."""
        raise NotImplementedError

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        """The terms of a batch predicted right (the `acc` bookkeeping)."""
        return 0

    def terms_per_sample(self) -> bool:
        """Whether a batch's loss terms are its samples (else they must be counted over the ranks)."""
        return True

    def pairs(self, logits: torch.Tensor, y: Any, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, targets) pairs to score for an evaluation batch."""
        return [(logits, y.to(device))]

    def meter(self, model: nn.Module) -> Meter:
        return Meter(self, model)

    #: what one prediction is about, in `not_learning`'s messages
    unit: ClassVar[str] = "image"
    #: whether scoring no better than the most common class means nothing was learnt (not for pixel accuracy)
    chance_check: ClassVar[bool] = True

    def not_learning(self, result: dict[str, Any], split: str) -> str | None:
        """Why an evaluation result (a `Meter.result`) says the model learnt nothing usable, with a next step.

        One class predicted for every image (pixel), or an accuracy no better than always answering
        the most common class of the split. None when neither holds.
        """
        if "top_pred_share" not in result or not result.get("n"):
            return None
        step = ("try `--lr auto` (or a rate 3-10x lower if the loss grew, higher if it barely moved), more epochs, "
                "or check the labels")
        if result["top_pred_share"] >= 1.0:
            return f"the model predicts one class for every {self.unit} of {split}; {step}"
        if self.chance_check and result["top_true_share"] < 1.0 and result["acc"] <= result["top_true_share"]:
            return (f"{split} accuracy {result['acc']:.3f} is no better than always answering its most common class "
                    f"({result['top_true_share']:.3f}); {step}")
        return None

    def eval_dataset(self, model: nn.Module, data: str, split: str, extra: Mapping[str, Any],
                     preprocessing: str | None) -> Any:
        """The evaluation Dataset of a saved task (`sparseft eval`) with its recorded preprocessing."""
        raise NotImplementedError

    def check_eval_options(self, task_file: Any, preprocessing: str | None) -> None:
        """Refuse evaluation options that do not apply to this kind."""

    # -- selection and prediction -------------------------------------------------------------
    def selection_objective(self, model: nn.Module, head: str | None) -> Any:
        """GPS's objective for this kind (see `sparseft.selection.objectives`)."""
        raise NotImplementedError

    def predict(self, model: nn.Module, images: Any, **options: Any) -> list[Any]:
        """Predictions for images (files or PIL images)."""
        raise NotImplementedError


KINDS: dict[str, TaskKind] = {}


def register(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: make a task kind known by its `name` (a later one of the same name replaces it)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    KINDS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    KINDS.pop(name, None)


def get_kind(name: str) -> TaskKind:
    if name not in KINDS:
        raise InputError(f"unknown task kind {name!r} (this sparseft knows {', '.join(sorted(KINDS))})")
    return KINDS[name]


def kind_of(model: nn.Module, targets: Any = None) -> TaskKind:
    """The kind of a model: its `task` attribute; for a model that names none, the kind whose
    targets `targets` are (a batch's labels or masks), else classification."""
    name = getattr(model, "task", None)
    if isinstance(name, str) and name:
        return get_kind(name)
    if targets is not None:
        for kind in reversed(list(KINDS.values())):
            if not kind.fallback and kind.claims_targets(targets):
                return kind
    return get_kind(DEFAULT_KIND)


def summary_keys() -> tuple[str, ...]:
    """Every registered kind's `best_keys`, once each (a run summary keeps the best of those it has)."""
    return tuple(dict.fromkeys(key for kind in KINDS.values() for key in kind.best_keys))


def kind_named_in(header: Mapping[str, Any]) -> TaskKind:
    """The kind a task file's header records (`extra["task"]`; files without one are classification)."""
    return get_kind(header.get("extra", {}).get("task") or DEFAULT_KIND)


def kind_for_data(data: str) -> TaskKind:
    """The kind whose data `data` names: the newest registered kind that claims it, else the fallback."""
    for kind in reversed(list(KINDS.values())):
        if not kind.fallback and kind.claims(data):
            return kind
    for kind in KINDS.values():
        if kind.fallback:
            return kind
    raise InputError(f"{data}: no task kind takes this data")
