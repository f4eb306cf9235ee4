"""The front door: build a model, load any task file, merge and unmerge whatever method made it.

    model = sparseft.create_model("mobilenetv2_100_offline", num_classes=3)
    model = sparseft.load("runs/x/delta.safetensors")           # base rebuilt from the header
    model = sparseft.load("task.safetensors", model=my_base)    # or onto a base you built
    base = sparseft.base_model("task.safetensors")              # the base a task file was trained on
    sparseft.merge(model); sparseft.unmerge(model)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from sparseft import delta
from sparseft.data.resolve import resolve_spec
from sparseft.deltafile import DeltaFileError, TaskFile, TaskSource, base_mismatch, read_task
from sparseft.errors import InputError
from sparseft.hub.registry import REGISTRY
from sparseft.kinds.base import kind_named_in
from sparseft.methods import METHODS, Method
from sparseft.train import evaluate


def method_named_in(header: dict) -> str:
    """The method a task file's header names (files of 0.1 always name one; plain deltas are GPS's; a merged
    model file's header names the method it was merged from)."""
    return (header.get("extra", {}).get("method") or header.get("structure", {}).get("method")
            or header.get("selection", {}).get("method") or header.get("method") or "gps")


def _method(name: str, where: str) -> Method:
    if name not in METHODS:
        raise DeltaFileError(f"{where}: unknown method {name!r} (this sparseft knows {', '.join(sorted(METHODS))})")
    return METHODS[name]()


def _build(task: TaskFile, weights: str | Path | None) -> nn.Module:
    """The model a task file's header records (model name, classes, image size, the seed of a random
    init), with the base weights `weights`, or a merged model's own weights."""
    extra = task.header.get("extra", {})
    if "model" not in extra or "num_classes" not in extra:
        raise DeltaFileError(f"{task.path}: the header does not say which base model it belongs to; pass model=")
    try:
        kind = kind_named_in(task.header)  # classification for files that name none (0.1, 0.2)
    except InputError as err:
        raise DeltaFileError(f"{task.path}: {err}") from None
    with torch.random.fork_rng():  # a randomly initialised base is defined by its seed
        torch.manual_seed(extra.get("init_seed", 0))
        return kind.build_model(extra["model"], extra["num_classes"], img_size=extra.get("img_size"), weights=weights,
                                pretrained=extra.get("pretrained", False) and weights is None,
                                class_names=extra.get("class_names"))


def base_from_record(extra: dict[str, Any], where: str | Path, weights: str | Path | None = None) -> nn.Module:
    """The base a task record (a header's `extra`) names, as `base_model` builds it (for records kept outside a
    task file: a peft export's, a Hub-style folder's config)."""
    return _build(TaskFile({"extra": extra}, {}, where), weights)


def base_model(task_file: TaskSource, *, weights: str | Path | None = None) -> nn.Module:
    """The base model a task file was trained on, built from its header: the model name, image size,
    a head of the task's classes, the base weights (the recorded file, `weights`, or the offline or
    pretrained ones) and the seed of a randomly initialised base; a plain model (train mode).

    What `sparseft.load` loads the task onto, and what a `TaskBank` for the task's base is built on
    (tasks of other class counts swap their head in).
    """
    task = read_task(task_file)
    if task.merged:
        raise DeltaFileError(f"{task.path}: a merged model holds its full weights and needs no base; load it with "
                             "sparseft.load(path)")
    return _build(task, weights or task.header.get("extra", {}).get("weights"))


def _load_merged(task: TaskFile, model: nn.Module | None, weights: str | Path | None) -> nn.Module:
    """A merged model file as a plain model (its record kept for predict and eval)."""
    if weights is not None:
        raise InputError(f"{task.path}: a merged model holds all its weights; it takes no base weights (--weights)")
    if model is None:
        model = _build(task, task.path)  # the architecture with this file's weights: no base is read or fetched
    elif delta.is_applied(model):
        raise delta.DeltaError("model already has sparseft deltas; unmerge it before loading a merged model")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(set(own) ^ set(task.tensors)) + [k for k, t in task.tensors.items()
                                                    if k in own and tuple(t.shape) != own[k]]
    if wrong:
        mismatch = base_mismatch(task.path, task.header, model)
        if mismatch is not None:
            raise mismatch
        raise DeltaFileError(f"{task.path}: the merged model's tensors do not fit this model: {wrong[:6]}")
    model.load_state_dict(task.tensors)
    delta.set_task_record(model, task.header.get("extra", {}))
    return model


def load(path: TaskSource, model: nn.Module | None = None, *, weights: str | Path | None = None) -> nn.Module:
    """Load a task file of any method; returns the model with the task applied (trainable, unmerged).

    `path`: the file, or the `TaskFile` `sparseft.read_delta` returned (the file is not read again).

    Without `model` the base is built from the header's record (`base_model`: model name, classes,
    image size, weights, and the seed of a randomly initialised base); `weights` overrides the
    recorded local weight file. A file made for another base is refused and the model left as it was.
    A merged model file (`sparseft merge --out`) gives a plain model with its weights and the task's
    record (class names, preprocessing), built from its header (or `model`); no base is needed.
    """
    task = read_task(path)
    if task.merged:
        return _load_merged(task, model, weights)
    method = _method(method_named_in(task.header), str(task.path))
    if model is None:
        model = base_model(task, weights=weights)
    return method.load(model, task)


def load_for_inference(task_file: TaskSource, *, weights: str | Path | None = None, merge: bool = True) -> nn.Module:
    """A task file's model in eval mode, merged when its method can merge (what users deploy); a merged
    model file as it is."""
    model = load(task_file, weights=weights)
    if not delta.is_applied(model):  # a merged model file: a plain model already
        return model.eval()
    method = method_for(model)
    if merge and method.mergeable:
        method.merge(model)
    return model.eval()


def describe_task(task_file: TaskSource) -> dict[str, Any]:
    """What `sparseft info` shows of a task file or a merged model file: method, sizes, base, record."""
    task = read_task(task_file)
    header, tensors = task
    out: dict[str, Any] = {"file": str(task.path), "bytes": Path(task.path).stat().st_size,
                           "method": method_named_in(header)}
    if task.merged:
        out.update({"merged": True, "content": "merged model: full weights, no base model needed",
                    "values": sum(t.numel() for t in tensors.values()), "tensors": len(tensors),
                    "merged_from": header.get("merged_from")})
    else:
        out.update({"merged": False, "added_values": sum(t.numel() for k, t in tensors.items()
                                                         if k.startswith("added/")),
                    "sparse_entries": sum(t.numel() for k, t in tensors.items()
                                          if k.startswith("sparse/") and k.endswith("/values")),
                    "full_values": sum(t.numel() for k, t in tensors.items() if k.startswith("full/")),
                    "buffers": sum(1 for k in tensors if k.startswith("buffer/"))})
    out.update({"base": None if task.merged else base_description(header.get("extra") or {}),
                "base_fingerprint": header["fingerprint"], "selection": header.get("selection"),
                "extra": header.get("extra"), "created": header.get("created")})
    return out


def base_description(extra: dict[str, Any]) -> str | None:
    """In words, the base model a task record names and where its weights come from (the record's `pretrained`
    is timm's download flag only: an offline backbone's weights come with its name)."""
    name = extra.get("model")
    if not isinstance(name, str):
        return None
    size = f" at {extra['img_size']} px" if extra.get("img_size") else ""
    if extra.get("weights"):
        source = f"the weights of {extra['weights']}"
    elif name in REGISTRY:
        source = f"the offline pretrained weights (`sparseft weights fetch {name}`)"
    elif extra.get("pretrained"):
        source = "timm's pretrained weights"
    else:
        source = f"random initialisation (seed {extra.get('init_seed', 0)})"
    return f"{name}{size}, {extra.get('num_classes')} classes, from {source}"


def trained_on(extra: dict[str, Any], data: str, split: str) -> str | None:
    """Why scoring `split` of `data` reads images the task was trained on (its record's data and training
    split: the final protocol trains on train800val200, so its val200 is training data), or None. Files
    written before the record held `train_split` say nothing."""
    trained = extra.get("train_split")
    if not trained or not extra.get("data") or not _same_data(extra["data"], data):
        return None
    parts = {"train800val200": {"train800val200", "train800", "val200", "train", "val"},
             "train800": {"train800", "train"}}.get(trained, {trained})
    if split not in parts:
        return None
    return (f"this task was trained on {trained} of {extra['data']}, which holds the {split} split: the score is "
            "on training images, not held-out ones (use --split test)")


def _same_data(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return resolve_spec(a).path.resolve() == resolve_spec(b).path.resolve()
    except Exception:  # noqa: BLE001 - data that does not resolve here is not the same data
        return False


def evaluate_task(task_file: TaskSource, data: str, split: str = "test", *, batch_size: int = 128,
                  weights: str | None = None, preprocessing: str | None = None, merge: bool = True,
                  per_class: bool = True) -> dict[str, Any]:
    """The metrics of a saved task on a split of `data` (those of its task kind: accuracy, mIoU, ...).

    The base model, image size and (unless `preprocessing` is given) the evaluation preprocessing
    are those the task was trained with, from the task file's header. Mergeable methods are
    evaluated merged: what users deploy.

    With `per_class` (kinds with classes): "per_class", {class name: {"n", "correct", "acc"}} (n:
    images; for segmentation pixels, plus "iou" and "dice"), and "confusion", {"classes", "unit",
    "matrix"} (rows: true class, columns: predicted class). `sparseft.evalreport` prints and writes them.
    """

    task = read_task(task_file)  # read and verified once: the load below takes it as it is
    task_file = task.path
    header = task.header
    extra = header.get("extra", {})
    kind = kind_named_in(header)
    names = kind.class_names(data)
    if "num_classes" in extra and len(names) != extra["num_classes"]:
        raise InputError(f"{task_file}: the task has {extra['num_classes']} classes but {data} has "
                         f"{len(names)}; evaluate it on the data it was trained for")
    trained = extra.get("class_names")
    if trained and trained != names:
        raise InputError(f"{task_file}: the task was trained on classes {trained[:4]}…, {data} has {names[:4]}…; "
                         "evaluate it on the data it was trained for")

    kind.check_options(task_file, "eval", [] if preprocessing is None else ["preprocessing"], flags=False)
    model = load_for_inference(task, weights=weights, merge=merge)
    ds = kind.eval_dataset(model, data, split, extra, preprocessing)
    return evaluate(model, DataLoader(ds, batch_size=batch_size, collate_fn=kind.collate("eval")), details=per_class,
                    class_names=names)


def method_for(model: nn.Module) -> Method:
    """The method that applied the model's task (GPS's life cycle for a bare `sparseft.apply`)."""
    if not delta.is_applied(model):
        raise delta.DeltaError("model has no sparseft deltas (sparseft.load, sparseft.apply or a method's "
                               "prepare first)")
    name = delta.method_of(model)
    if name not in METHODS and not delta.added_parameters(model):
        name = "gps"  # a selection of the user's own: the engine's life cycle, as GPS's
    return _method(name, "model")


def merge(model: nn.Module) -> nn.Module:
    """Fold the model's task into its weights, whatever method made it (clear error where it cannot)."""
    return method_for(model).merge(model)


def unmerge(model: nn.Module) -> nn.Module:
    """Back to the base model bit-exactly, from an applied or a merged model of any method."""
    return method_for(model).unmerge(model)
