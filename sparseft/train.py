"""Training and evaluation loop shared by every method.

`fit` trains whatever parameters of the model require gradients (the method decides which),
with AdamW or Adam, timm's cosine schedule with linear warm-up (stepped per update), optional
label smoothing, gradient clipping and bf16 autocast. It evaluates after every epoch and, given
a run folder, writes there:

    config.json        the run's settings (plus what the caller adds)
    metrics.jsonl      one JSON line per epoch
    checkpoint.*       the last finished epoch (trainables, buffers, optimizer): resumes exactly
    summary.json       final metrics, parameter counts, timing
    tb/                TensorBoard event files, when the tensorboard package is installed (`sparseft.curves`)

Each epoch reseeds the global RNG from (seed, epoch), so shuffling, augmentation and drop-path
after a resume are those of an uninterrupted run. A NaN or infinite loss stops the run with
`TrainingDiverged`; the checkpoint of the last good epoch stays. The step's loss and accuracy
count stay on the device: on a GPU they are read every 25 steps (`sparseft.steplog`), so no step
waits for the device (a NaN is then named up to 24 steps late); on a CPU every step, before the
update.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from sparseft import distributed
from sparseft.checkpoint import load_checkpoint, save_checkpoint
from sparseft.cliopts import require
from sparseft.curves import TB_DIR, CurveLog
from sparseft.delta import is_applied, parameter_summary
from sparseft.deltafile import save_delta
from sparseft.errors import InputError, SparseftError, TrainingWarning
from sparseft.fileutil import read_json, write_text_atomic
from sparseft.kinds.base import Meter, TaskKind, kind_of, summary_keys
from sparseft.progress import write_line
from sparseft.regularize import WeightAverage, make_mixup, mix_batch
from sparseft.steplog import StepLog

NOT_REPORTED = ("n", "per_class", "confusion")  # evaluation results kept out of the epoch metrics


class TrainingDiverged(SparseftError, RuntimeError):
    """The loss became NaN or infinite."""


def float_or_auto(text: str) -> float | str:
    """`--lr`'s value: a number, or "auto" (`sparseft train` tunes it; `sparseft.autolr`)."""
    return "auto" if text.strip().lower() == "auto" else float(text)


@dataclass
class TrainConfig:
    """Optimisation settings; defaults suit a short CPU run, the papers use 100 epochs.

    The field help is also the `sparseft train` flags' help (`sparseft.cliopts`).
    """

    epochs: int = field(default=10, metadata={"help": "training epochs"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: the method's recommended rate for the backbone family, "
                "docs/learning-rates.md; `sparseft train --lr auto` tunes it on val200)",
        "convert": float_or_auto})
    weight_decay: float | None = field(default=None, metadata={
        "help": "weight decay (default: the method's paper's, GPS 0; else 1e-4)"})
    optimizer: Literal["adamw", "adam"] | None = field(default=None, metadata={
        "help": "optimizer (default: the method's paper's, GPS adam; else adamw)"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length (epochs)"})
    warmup_lr: float = field(default=1e-7, metadata={"help": "learning rate at the start of the warm-up"})
    min_lr: float = field(default=1e-8, metadata={"help": "cosine schedule's final learning rate"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the loss"})
    grad_clip: float | None = field(default=None, metadata={"help": "clip the gradient norm to this value"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth of the backbone (timm drop_path_rate)"})
    ema_decay: float | None = field(default=None, metadata={
        "help": "keep timm's model EMA with this decay and evaluate it too (official GPS FGVC: 0.9998)"})
    mixup: float = field(default=0.0, metadata={"help": "timm Mixup alpha (0: off); soft targets, smoothing included"})
    cutmix: float = field(default=0.0, metadata={"help": "timm CutMix alpha (0: off)"})
    drop_last: bool = field(default=False, metadata={
        "help": "drop the last partial training (and selection) batch, as the official GPS loaders do"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast (pays off for ViT-S/B at 224 px on CPUs with AMX, and on GPUs)"})
    seed: int = field(default=0, metadata={"help": "seed for selection, shuffling and initialisation"})
    eval_every: int = field(default=1, metadata={"help": "evaluate every N epochs (the last always)"})
    progress: bool | None = field(default=None, metadata={
        "help": "progress bars on stderr (default: only when stderr is a terminal)"})

    def __post_init__(self) -> None:
        """Refuse settings that cannot train, naming the flag: before any data is read."""
        finite = {n: getattr(self, n) for n in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr",
                                                "label_smoothing", "drop_path", "mixup", "cutmix")
                  if getattr(self, n) is not None}
        checks = [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("lr", self.lr is None or (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                                       and 0 < self.lr < 3.4e38), "> 0 (and a float32)"),
            ("weight_decay", self.weight_decay is None or self.weight_decay >= 0, ">= 0"),
            ("optimizer", self.optimizer in (None, "adamw", "adam"), "'adamw' or 'adam'"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("warmup_lr", self.warmup_lr >= 0, ">= 0"),
            ("min_lr", 0 <= self.min_lr and (self.lr is None or self.min_lr <= self.lr), "between 0 and --lr"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0 when given"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("drop_path", 0 <= self.drop_path < 1, "in [0, 1)"),
            ("ema_decay", self.ema_decay is None or 0 <= self.ema_decay <= 1, "in [0, 1] when given"),
            ("mixup", self.mixup >= 0, ">= 0"),
            ("cutmix", self.cutmix >= 0, ">= 0"),
        ]
        checks += [(n, math.isfinite(v), "a finite number") for n, v in finite.items()]
        for name, ok, rule in checks:
            require(ok, self, name, rule)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_defaults(self, defaults: dict[str, Any] | None = None) -> TrainConfig:
        """These settings with the optimiser settings not given (None) filled in: from `defaults` (a method's
        `train_defaults`), then `OPTIMIZER_DEFAULTS`. (`sparseft.run.run` fills them and records from where.)"""
        fill = {**OPTIMIZER_DEFAULTS, **(defaults or {})}
        filled = {k: fill[k] for k in OPTIMIZER_DEFAULTS if getattr(self, k) is None}
        return replace(self, **filled) if filled else self


#: the optimiser settings of a run whose caller and method set none (`Method.train_defaults` sets a paper's)
OPTIMIZER_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "weight_decay": 1e-4}


def changed_settings(stored: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON trees (display settings and notes aside: 'progress',
    the workers, the world size, where the optimiser settings came from)."""
    if isinstance(stored, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(stored) | set(new)):
            if key in ("progress", "workers", "eval_batch_size", "world_size", "optimizer_source"):
                continue
            out += changed_settings(stored.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if stored == new else [f"{prefix[:-1]}: {stored!r} -> {new!r}"]


def check_same_settings(run_dir: Path, settings: dict[str, Any], part: str | None = None) -> None:
    """A resumed run must continue with the settings it started with (`part`: compare that key only)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: nothing to resume (no config.json); start the run without --resume")
    stored = read_json(path, ValueError, "run record")
    if part is not None:
        stored = stored.get(part) if isinstance(stored, dict) else None
    if not isinstance(stored, dict):
        raise InputError(f"{path}: not a sparseft run record; start a new run folder")
    changed = changed_settings(stored, json.loads(json.dumps(settings, default=str)))
    if changed:
        raise InputError(f"{path}: --resume with changed settings ({'; '.join(changed[:4])}); resume with the "
                         "original settings or start a new run folder")


def _non_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of trainable parameters (or their optimizer state) holding NaN or inf."""
    bad = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        state = optimizer.state.get(p, {})
        tensors = [p.detach()] + [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            bad.append(name)
    return bad


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise InputError("the model has no trainable parameters")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    raise InputError(f"optimizer must be 'adamw' or 'adam', not {config.optimizer!r}")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _loss_sum(kind: TaskKind, logits: torch.Tensor, y: torch.Tensor,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """The kind's summed training loss of a batch and its number of terms (images, valid pixels, ...)."""
    return kind.loss_sum(logits, y, label_smoothing)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, bf16: bool = False, progress: bool | None = False,
             desc: str = "eval", details: bool = False, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The task kind's metrics of `model` on `loader` (eval mode): "acc", the mean loss, "n", and the kind's own.

    Classification: top-1 accuracy and mean cross-entropy. Masks as targets ([B, H, W] or a list
    of [H, W] of different sizes, 255 = ignore): the logits are resized (bilinear) to the masks'
    size, so a model run at a smaller input is scored at the data's resolution; pixel accuracy as
    "acc", the mean cross-entropy per valid pixel, and `sparseft.seg.SegMetrics`' mIoU / mDice
    (dataset-level and per image; the classes averaged follow the model's `class_names`).
    The kind is the model's (`sparseft.kinds.kind_of`); a model that names none is scored as its targets say.
    Collective under a process group: every rank passes the same loader, evaluates the samples
    r::W of it and the counts are summed over the ranks. `details`: also "per_class" and
    "confusion" (`sparseft.kinds.Meter.details`, named by `class_names`) for kinds with classes.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)

    def new_meter(targets: Any = None) -> Meter:
        meter = kind_of(model, targets).meter(model)
        if details:
            meter.keep_confusion()
        return meter

    meter = new_meter() if getattr(model, "task", None) else None  # on every rank
    for x, y in distributed.progress(distributed.shard(loader, "samples"), desc, progress):
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        meter = meter if meter is not None else new_meter(y)
        meter.update(logits, y, device)
    meter = meter if meter is not None else new_meter()
    model.train(was_training)
    if distributed.active():
        meter.sync()
    if meter.images == 0:
        raise InputError("evaluation loader yielded no samples")
    return {**meter.result(), **(meter.details(class_names) if details else {})}


def _data_parallel(model: nn.Module) -> nn.Module:
    """`model` in DistributedDataParallel for the training forward (its trainable parameters only).

    Buffers are not broadcast: BatchNorm statistics are each rank's own (rank 0's are saved).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device = _device_of(model)
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # renamed flag
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   **{"forward_sync_buffers" if newer else "broadcast_buffers": False})


def fit(model: nn.Module, train_loader: Iterable, config: TrainConfig, *,
        eval_loaders: dict[str, Iterable] | None = None, run_dir: str | Path | None = None,
        resume: bool = False, save_task: Callable[[nn.Module, Path], Any] | None = None,
        run_info: dict[str, Any] | None = None, hook: Any = None, log_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the model's trainable parameters; returns {"history", "final", "summary"}.

    TensorBoard event files (per step loss and lr, per epoch every metric; `sparseft.curves`) go to
    `log_dir`, by default to the run folder's `tb/` when the tensorboard package is installed.

    A loader whose `dataset` has `set_epoch` (segmentation data sets seeded per item) gets it
    called before each epoch; with `persistent_workers=True` the workers would keep epoch 0's copy.
    `eval_loaders` are evaluated every `config.eval_every` epochs and after the last one
    (e.g. {"val": ..., "test": ...}).
    `save_task(model, path)` writes the task file at the end (default: a sparse delta when the
    model has one). With `resume=True` a run folder's checkpoint is continued; a finished run
    returns its summary without training.

    `hook` (a method's training hook, e.g. `sparseft.regrow.Regrower`) gets `before_step(step,
    total)` before each forward and `after_step(step, total, optimizer)` after each optimizer step;
    its `state_tensors()` travel in the checkpoint and come back through `load_state_tensors`.

    Under a process group (torchrun) every rank calls `fit` with the same loaders: each batch of
    `train_loader` is one step of the whole group (each rank computes a slice of it, the model
    is wrapped in DistributedDataParallel for the training forward), evaluation is split by
    sample, and only rank 0 writes files.
    """
    if config.lr is None:
        raise InputError("lr (--lr): fit needs a learning rate; `sparseft.run.run` fills in the method's recommended "
                         "one (sparseft.methods.rates.recommended_lr)")
    config = config.with_defaults()  # a caller other than `run` may leave the optimiser to sparseft's defaults
    eval_loaders = eval_loaders or {}
    run_dir = Path(run_dir) if run_dir is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    loop = _Loop(model, train_loader, config, params, hook, run_dir)
    start = _start_run(loop, run_dir, resume, run_info)
    if start.finished is not None:
        return start.finished
    history, step, train_time = start.history, start.step, start.train_time
    loop.scheduler.step_update(step)
    loop.forward = _data_parallel(model) if loop.world > 1 else model
    if loop.main:
        where = log_dir if log_dir is not None else run_dir / TB_DIR if run_dir is not None else None
        loop.curves = CurveLog(where, explicit=log_dir is not None, start_step=step)
    try:
        history, step, train_time = _epochs(loop, start, eval_loaders, run_dir, history, step, train_time)
    finally:
        loop.curves.close()

    names = [*eval_loaders, *(f"ema_{n}" for n in eval_loaders if loop.ema is not None)]
    summary = _summary(model, history, train_time, loop.world, names)
    return _finish(model, summary, loop, run_dir, save_task, run_info)


def _epochs(loop: _Loop, start: _Start, eval_loaders: dict[str, Iterable], run_dir: Path | None,
            history: list[dict[str, Any]], step: int, train_time: float) -> tuple[list[dict[str, Any]], int, float]:
    """The epochs from `start`: train, evaluate, report, checkpoint, log the curves."""
    config = loop.config
    for epoch in range(start.epoch, config.epochs):
        metrics, step, epoch_time = _train_epoch(loop, epoch, step)
        train_time += epoch_time
        _evaluate_epoch(loop, epoch, metrics, eval_loaders)
        history.append(metrics)
        if config.progress is not False and loop.main:  # the epoch's numbers: results, on their own line
            shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            write_line(shown)
        if run_dir is not None:
            _save_epoch(loop, run_dir, epoch, start.epoch, metrics, {"epoch": epoch, "step": step, "history": history,
                                                                    "train_time_s": train_time})
        loop.curves.epoch(metrics)
    return history, step, train_time


def _finish(model: nn.Module, summary: dict[str, Any], loop: _Loop, run_dir: Path | None,
            save_task: Callable[[nn.Module, Path], Any] | None, run_info: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0 writes the task file and summary.json of a finished run; returns the summary."""
    if run_dir is not None and loop.main:
        if save_task is None:
            if is_applied(model):
                save_delta(model, run_dir / "delta.safetensors", extra=run_info)
        else:
            save_task(model, run_dir)
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


class _Loop:
    """What every step of a `fit` needs: the model (and its DDP wrapper), optimizer, schedule and hook."""

    def __init__(self, model: nn.Module, train_loader: Iterable, config: TrainConfig, params: list[nn.Parameter],
                 hook: Any, run_dir: Path | None) -> None:
        self.model, self.config, self.params, self.hook = model, config, params, hook
        self.device = _device_of(model)
        self.world, self.main = distributed.world_size(), distributed.is_main()
        self.optimizer = make_optimizer(params, config)
        self.train_batches = distributed.shard(train_loader, "slices")
        steps_per_epoch = len(self.train_batches)  # type: ignore[arg-type]
        self.total_steps = max(1, config.epochs * steps_per_epoch)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=self.total_steps, lr_min=config.min_lr,
                                           warmup_t=int(round(config.warmup_epochs * steps_per_epoch)),
                                           warmup_lr_init=config.warmup_lr, t_in_epochs=False)
        self.stem = run_dir / "checkpoint" if run_dir else None
        self.forward: nn.Module = model  # the training forward: under a process group, `fit` wraps it in DDP
        self.curves = CurveLog(None)  # rank 0's TensorBoard log (`fit` opens it)
        self.ema = WeightAverage(model, config.ema_decay) if config.ema_decay is not None else None
        self.mixup = make_mixup(config.mixup, config.cutmix, config.label_smoothing, model)

    def extra_tensors(self) -> dict[str, torch.Tensor] | None:
        """What the checkpoint keeps beside the model: the hook's state and the EMA."""
        extra = {**(self.hook.state_tensors() if self.hook is not None else {}),
                 **(self.ema.state_tensors() if self.ema is not None else {})}
        return extra or None

    def restore_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.ema is not None:
            self.ema.load_state_tensors(tensors)
        if self.hook is not None:
            self.hook.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("ema/")})


@dataclass
class _Start:
    """Where `fit` starts: a fresh run, a checkpoint's epoch, or (`finished`) a finished run's summary."""

    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    train_time: float = 0.0
    finished: dict[str, Any] | None = None


def _start_run(loop: _Loop, run_dir: Path | None, resume: bool, run_info: dict[str, Any] | None) -> _Start:
    """The run folder: the settings check, the checkpoint resumed or a fresh start (config.json,
    metrics.jsonl written by rank 0); a finished run's summary when there is nothing to redo."""
    if run_dir is None:
        return _Start()
    start = _Start()
    stem, hook = loop.stem, loop.hook
    summary_path = run_dir / "summary.json"
    settings = json.loads(json.dumps({"train": loop.config.to_dict(), **(run_info or {}), "world_size": loop.world},
                                     default=str))
    if resume:
        check_same_settings(run_dir, settings)
    if resume and stem.with_suffix(".json").exists():
        restore = loop.restore_extra if hook is not None or loop.ema is not None else None
        record = load_checkpoint(stem, loop.model, loop.optimizer, restore_extra=restore)
        start = _Start(record["history"], record["epoch"] + 1, record["step"], record.get("train_time_s", 0.0))
        if start.epoch >= loop.config.epochs and summary_path.exists():
            return _Start(finished=json.loads(summary_path.read_text()))
    elif resume and summary_path.exists():  # finished, its checkpoint gone: nothing to redo or overwrite
        return _Start(finished=json.loads(summary_path.read_text()))
    elif (run_dir / "config.json").exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True or choose another folder")
    distributed.barrier()  # every rank has read the folder before rank 0 writes to it
    if loop.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(settings, indent=1))
        write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in start.history))
    return start


def _train_epoch(loop: _Loop, epoch: int, step: int) -> tuple[dict[str, Any], int, float]:
    """One epoch of training steps from global step `step`: (its metrics, the step after it, its time)."""
    config, model, optimizer, hook, world = loop.config, loop.model, loop.optimizer, loop.hook, loop.world
    train_batches, device, stem = loop.train_batches, loop.device, loop.stem
    forward = loop.forward
    torch.manual_seed(_epoch_seed(config.seed, epoch))
    if loop.mixup is not None:  # timm's Mixup draws from numpy
        import numpy as np

        np.random.seed(_epoch_seed(config.seed, epoch) % 2**32)
    dataset = getattr(train_batches, "dataset", None)
    if hasattr(dataset, "set_epoch"):  # a data set that seeds each item's augmentation itself
        dataset.set_epoch(epoch)
    model.train()
    t0 = time.perf_counter()
    seen = 0
    bar = distributed.progress(train_batches, f"epoch {epoch + 1}/{config.epochs}", config.progress)

    def on_step(done: int, loss: float, lr: float) -> None:
        loop.curves.step(done, loss, lr)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")

    log = StepLog.for_device(device, on_step)  # the losses are read from the device in batches

    def stop_if_diverged(bad: tuple[int, float] | None) -> None:
        if bad is not None:
            where = f" (last good checkpoint: {stem}.json, epoch {epoch})" if stem and epoch > 0 else ""
            raise TrainingDiverged(f"loss is {bad[1]} at epoch {epoch + 1}, step {bad[0]}; "
                                   f"lower the learning rate{where}")

    for i, (x, y) in enumerate(bar):
        x, y = x.to(device), y.to(device)
        kind = kind_of(model, y)  # the model's task kind, or (a model naming none) its targets
        if loop.mixup is not None:
            if kind.name != "classification":
                raise InputError(f"mixup/cutmix (--mixup, --cutmix) mix class labels; {kind.name} has none to mix")
            x, y = mix_batch(loop.mixup, x, y)  # soft targets, label smoothing included
        if hook is not None:
            hook.before_step(step, loop.total_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = forward(x)
        smoothing = 0.0 if loop.mixup is not None else config.label_smoothing  # mixup's targets are smoothed
        loss_sum_batch, terms = _loss_sum(kind, logits, y, smoothing)  # images, valid pixels, ...
        if world == 1:
            loss = mean_loss = loss_sum_batch / max(terms, 1)
            global_terms = terms
        else:  # a rank's loss is its share of the global batch's mean (DDP averages the gradients)
            global_terms = (distributed.global_sizes(train_batches)[i] if kind.terms_per_sample()
                            else int(distributed.all_reduce_sum(torch.tensor(float(terms))).item()))
            loss = loss_sum_batch * (world / max(global_terms, 1))
            mean_loss = distributed.all_reduce_sum(loss.detach().clone()) / world  # the same on every rank
        seen += terms  # on a CPU a non-finite loss stops the run here, before it changes the model
        stop_if_diverged(log.add(step + 1, mean_loss, global_terms, kind.correct(logits.detach(), y),
                                 optimizer.param_groups[0]["lr"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(loop.params, config.grad_clip)
        optimizer.step()
        if loop.ema is not None:
            loop.ema.update(model)
        step += 1
        loop.scheduler.step_update(step)
        if hook is not None:
            hook.after_step(step, loop.total_steps, optimizer)
    stop_if_diverged(log.read())
    loss_sum, correct = log.loss_sum, log.correct
    if world > 1:
        correct, seen = (int(v) for v in distributed.all_reduce_sum(torch.tensor([correct, seen])))
    epoch_time = time.perf_counter() - t0
    metrics: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                               "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                               "epoch_time_s": round(epoch_time, 3)}
    return metrics, step, epoch_time


#: the next step a run that learns nothing is told to try, where its caller knows better than the default
#: (`sparseft.kinds.base.NEXT_STEP`: "try `--lr auto` ..."): `--lr auto` sets it around its own runs
NOT_LEARNING_STEP: ContextVar[str | None] = ContextVar("sparseft_not_learning_step", default=None)


def _evaluate_epoch(loop: _Loop, epoch: int, metrics: dict[str, Any], eval_loaders: dict[str, Iterable]) -> None:
    """Every `eval_every` epochs and after the last: each eval loader's metrics into `metrics`."""
    config = loop.config
    due = (epoch + 1) % max(config.eval_every, 1) == 0 or epoch + 1 == config.epochs
    for name, loader in (eval_loaders.items() if due else ()):
        last = epoch + 1 == config.epochs  # the last evaluation also says whether the model learnt anything
        result = evaluate(loop.model, loader, bf16=config.bf16, details=last)
        reason = kind_of(loop.model).not_learning(result, name, NOT_LEARNING_STEP.get()) if last else None
        if reason and loop.main:
            warnings.warn(reason, TrainingWarning, stacklevel=2)
        metrics.update({f"{name}_{key}": value for key, value in result.items() if key not in NOT_REPORTED})
        if loop.ema is not None:  # the average too, as the official script does ("ema_test_acc", ...)
            averaged = evaluate(loop.ema.module, loader, bf16=config.bf16)
            metrics.update({f"ema_{name}_{key}": v for key, v in averaged.items() if key not in NOT_REPORTED})


def _save_epoch(loop: _Loop, run_dir: Path, epoch: int, start_epoch: int, metrics: dict[str, Any],
                record: dict[str, Any]) -> None:
    """The end-of-epoch NaN check, then (rank 0) the checkpoint and the epoch's line of metrics.jsonl."""
    stem = loop.stem
    bad = _non_finite(loop.model, loop.optimizer)
    if bad:  # never write a checkpoint that cannot be resumed
        where = (f"; the last finite checkpoint is {stem}.json (epoch {epoch})" if epoch > start_epoch or
                 stem.with_suffix(".json").exists() else "")
        raise TrainingDiverged(f"non-finite values in {', '.join(bad[:3])} after epoch {epoch + 1}; lower "
                               f"the learning rate{where}")
    if loop.main:
        save_checkpoint(stem, loop.model, loop.optimizer, record, extra=loop.extra_tensors())
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")


def _summary(model: nn.Module, history: list[dict[str, Any]], train_time: float, world: int,
             eval_loaders: Iterable[str]) -> dict[str, Any]:
    """The run's summary: history, final epoch, parameter counts, time and each eval split's best metrics."""
    summary = {"history": history, "final": history[-1] if history else {},
               "params": parameter_summary(model), "train_time_s": round(train_time, 2), "world_size": world}
    for name in eval_loaders:
        for key in summary_keys():  # every kind's (acc, mIoU, ...): those the history holds are kept
            values = [h[f"{name}_{key}"] for h in history if f"{name}_{key}" in h]
            if values:
                summary[f"best_{name}_{key}"] = max(values)
    return summary
