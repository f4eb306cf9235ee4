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

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from sparseft import distributed
from sparseft.cliopts import flag_of, foreign_options
from sparseft.errors import InputError, UsageError

#: the commands whose options depend on the task kind
Command = Literal["predict", "eval"]


class KindOptionError(UsageError, InputError):
    """An option of `sparseft predict`/`eval` (or of the Python call behind it) that another task kind
    owns: refused as an option of another method is (exit status 2)."""


@dataclasses.dataclass
class NoOptions:
    """The options of a kind that has none of its own for a command."""

#: the kind of a model or a header that names none (every task file before kinds were recorded)
DEFAULT_KIND = "classification"


class Meter:
    """Evaluation bookkeeping of one pass: correct / counted terms, summed loss and the sample count.

    A kind's meter adds its own metrics by overriding `update`, `sync` and `result`. `acc` is
    top-1 accuracy for classification and pixel accuracy for segmentation (the key kept for
    compatibility with run summaries and bench records). After `keep_confusion()` it also counts
    (true class, predicted class) pairs of the kind's `predicted_classes`, and `details()` gives
    per-class results and the confusion matrix.
    """

    #: what one count of the confusion matrix is ("images"; "pixels" for segmentation)
    unit: ClassVar[str] = "images"

    def __init__(self, kind: TaskKind, model: nn.Module) -> None:
        self.kind, self.model = kind, model
        self.correct = self.total = self.images = 0
        self.loss_sum = 0.0
        self.counting = False
        self.confusion: torch.Tensor | None = None  # [true, predicted] counts once counting

    def keep_confusion(self) -> None:
        """Count (true class, predicted class) pairs from now on (sized by the model's `num_classes`,
        else by the first batch's logits)."""
        self.counting = True
        classes = getattr(self.model, "num_classes", None)
        if isinstance(classes, int) and classes > 0 and self.confusion is None:
            self.confusion = torch.zeros(classes, classes, dtype=torch.int64)

    def update(self, logits: torch.Tensor, y: Any, device: torch.device) -> None:
        self.images += len(y)
        for out, target in self.kind.pairs(logits, y, device):
            loss, n = self.kind.loss_sum(out, target)
            self.loss_sum += loss.item()
            self.correct += int(self.kind.correct(out, target))
            self.total += n
            self.add(out, target)
            if self.counting:
                self._count(out, target)

    def _count(self, out: torch.Tensor, target: torch.Tensor) -> None:
        pred = self.kind.predicted_classes(out)
        if pred is None:  # a kind without classes
            return
        if self.confusion is None:
            self.confusion = torch.zeros(out.shape[1], out.shape[1], dtype=torch.int64)
        c = self.confusion.shape[0]
        target = target.to(pred.device).long()
        valid = (target >= 0) & (target < c)  # segmentation's ignore index (255) is no class
        pairs = torch.bincount(target[valid] * c + pred[valid].long(), minlength=c * c)
        self.confusion += pairs.reshape(c, c).cpu()

    def add(self, out: torch.Tensor, target: torch.Tensor) -> None:
        """A kind's own metrics of one (logits, targets) pair."""

    def sync(self) -> None:
        """Sum the counts over the ranks of a process group (collective)."""
        sums = distributed.all_reduce_sum(torch.tensor([self.correct, self.total, self.loss_sum, self.images],
                                                       dtype=torch.float64))
        self.correct, self.total, self.loss_sum, self.images = (int(sums[0]), int(sums[1]), float(sums[2]),
                                                                int(sums[3]))
        if self.confusion is not None:
            distributed.all_reduce_sum(self.confusion)

    def result(self) -> dict[str, float]:
        return {"acc": self.correct / max(self.total, 1), "loss": self.loss_sum / max(self.total, 1),
                "n": self.images}

    def per_class(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        """Per class, from the confusion matrix: `n` (its items: images, or pixels), `correct` and
        `acc` (correct / n; NaN for a class with no item)."""
        m = self.confusion if self.confusion is not None else torch.zeros(len(names), len(names), dtype=torch.int64)
        n, correct = m.sum(1), m.diagonal()
        return {name: {"n": int(n[c]), "correct": int(correct[c]),
                       "acc": float(correct[c]) / float(n[c]) if n[c] else math.nan}
                for c, name in enumerate(names)}

    def details(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """`per_class` results and the `confusion` matrix ({"classes", "unit", "matrix"}: rows are the
        true classes, columns the predicted ones) after `keep_confusion`; {} for a kind without classes.

        `class_names`: one per class (default: the model's `class_names`, else the class indices).
        """
        if self.confusion is None:
            return {}
        c = self.confusion.shape[0]
        names = list(class_names or getattr(self.model, "class_names", None) or [])
        if len(names) != c:
            if class_names is not None:
                raise InputError(f"{len(names)} class names for a model of {c} classes")
            names = [str(i) for i in range(c)]
        return {"per_class": self.per_class(names),
                "confusion": {"classes": names, "unit": self.unit, "matrix": self.confusion.tolist()}}


#: what a run that learnt nothing is told to try next (`TaskKind.not_learning`), unless its caller knows better
NEXT_STEP = ("try `--lr auto` (or a rate 3-10x lower if the loss grew, higher if it barely moved), more epochs, "
             "or check the labels")


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
    #: the kind's own options of `sparseft predict` and `sparseft eval`, as dataclasses (`sparseft.cliopts` makes
    #: their flags); an option another kind owns is refused for this one (`check_options`)
    predict_options: ClassVar[type] = NoOptions
    eval_options: ClassVar[type] = NoOptions

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

    def verify_split(self, data: str, split: str) -> Any:
        """Open every item of a split now, so a run fails before it trains, not at its evaluation; returns
        what `check_splits` compares (None: nothing)."""
        raise NotImplementedError

    def check_data(self, data: str, train_split: str, eval_splits: Sequence[str]) -> None:
        """Verify every split a run uses (`verify_split`) and check them together (`check_splits`): what
        `sparseft train` does before it computes anything."""
        found = {split: self.verify_split(data, split) for split in dict.fromkeys((train_split, *eval_splits))}
        self.check_splits(data, found, train_split, eval_splits)

    def check_splits(self, data: str, found: Mapping[str, Any], train_split: str, eval_splits: Sequence[str]) -> None:
        """Checks between a run's verified splits (`found`: split -> what `verify_split` returned); none by default."""

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
                    pretrained: bool = False, class_names: list[str] | None = None, **model_kwargs: Any) -> nn.Module:
        """The kind's model; `model_kwargs` go to the architecture (e.g. `drop_path_rate`)."""
        raise NotImplementedError

    # -- training and evaluation ---------------------------------------------------------------
    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        """The summed training loss of a batch and its number of terms."""
        raise NotImplementedError

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The terms of a batch predicted right (the `acc` bookkeeping): a 0-d tensor where the logits are, so
        that the training loop need not wait for the device to read it."""
        return torch.zeros((), dtype=torch.int64, device=logits.device)

    def predicted_classes(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The predicted class of each term (image, pixel) of a batch's logits, shaped as its targets;
        None for a kind without classes (no per-class results or confusion matrix)."""
        return None

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

    def not_learning(self, result: dict[str, Any], split: str, step: str | None = None) -> str | None:
        """Why an evaluation result with its confusion matrix (`evaluate(..., details=True)`) says the model
        learnt nothing usable, with a next step; None when it did.

        One class predicted for every image (pixel), or an accuracy no better than always answering
        the most common class of the split (`chance_check`). `step`: the next step to suggest (default
        `NEXT_STEP`; the runs of `--lr auto`, whose rate is tuned, suggest others).
        """
        matrix = torch.tensor(result.get("confusion", {}).get("matrix") or [], dtype=torch.float64)
        if matrix.dim() != 2 or matrix.sum() == 0:
            return None
        total = matrix.sum()
        predicted, true = matrix.sum(0), matrix.sum(1)
        step = step or NEXT_STEP
        if int((predicted > 0).sum()) == 1 and int((true > 0).sum()) > 1:
            return f"the model predicts one class for every {self.unit} of {split}; {step}"
        majority = float(true.max() / total)
        if self.chance_check and majority < 1.0 and result["acc"] <= majority:
            return (f"{split} accuracy {result['acc']:.3f} is no better than always answering its most common class "
                    f"({majority:.3f}); {step}")
        return None

    def eval_dataset(self, model: nn.Module, data: str, split: str, extra: Mapping[str, Any],
                     preprocessing: str | None) -> Any:
        """The evaluation Dataset of a saved task (`sparseft eval`) with its recorded preprocessing."""
        raise NotImplementedError

    def check_options(self, task_file: Any, command: Command, given: Iterable[str], *, flags: bool = True) -> None:
        """Refuse options of `command` given for a task of this kind that only other kinds take, as an option
        of another method is refused: one line naming the option, whose it is and what this kind takes
        (`KindOptionError`). `given`: the options' field names; `flags`: name them as flags (the command
        line), else as parameters with their flags (the Python API)."""
        show = flag_of if flags else (lambda n: f"{n} ({flag_of(n)})")
        problem = foreign_options(self.name, given, kind_options(command), kind="task kind", show=show)
        if problem:
            raise KindOptionError(f"{task_file} is a {self.name} task: {problem}")

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


def kind_options(command: Command) -> dict[str, type]:
    """Each registered kind's own options of `command` (a dataclass), by kind name."""
    return {name: getattr(kind, f"{command}_options") for name, kind in KINDS.items()}


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
