"""One fine-tuning run end to end: model + data + method -> trained task file and metrics.

`RunSpec` holds everything that defines a run; `run(spec, run_dir)` builds the backbone, the
data loaders of the task (`sparseft.loaders`), prepares the method (GPS selects here), trains with `sparseft.train`,
and writes the task file and summary into the run folder. The CLI, the demo and the benchmark
harness all go through this function, so they share one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft import distributed
from sparseft.api import evaluate_task  # noqa: F401 - re-exported: tests import it from here
from sparseft.cliopts import require
from sparseft.curves import TB_DIR
from sparseft.data import fingerprint
from sparseft.data.images import DataError
from sparseft.deltafile import read_delta
from sparseft.errors import DataWarning, InputError
from sparseft.export.hub import CARD_FILE, folder_config, model_card
from sparseft.fileutil import LOCK_FILE, check_output_folder, folder_lock, read_json, write_text_atomic
from sparseft.kinds.base import TaskKind, kind_for_data
from sparseft.loaders import DataSpec, TaskData
from sparseft.methods import BATCHNORM_DEFAULT_BEFORE, METHODS, MethodContext, get_method
from sparseft.methods.base import PLAN_FILE
from sparseft.methods.rates import backbone_family, recommended_lr
from sparseft.train import OPTIMIZER_DEFAULTS, TrainConfig, check_same_settings, fit

TASK_FILE = "delta.safetensors"
SEARCH_DIR = "lr-search"  # `--lr auto`'s tuning runs inside a run folder (sparseft.autolr)
DATA_FILE = "data.json"  # the data's fingerprint when the run started (`sparseft.data.fingerprint`)
RECORD_PATHS = ("task_file",)  # summary keys naming a file of the run folder: stored relative to it

PROTOCOL_SPLITS = {
    # protocol name: (train split, evaluation splits)
    "tune": ("train800", ("val200",)),
    "final": ("train800val200", ("test",)),
}


@dataclass
class RunSpec:
    """What defines a run. `model` is a timm name or an offline backbone name (`sparseft weights list`)."""

    model: str
    data: str
    method: str = "gps"
    options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pretrained: bool = False
    img_size: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    train_split: str = "train800val200"
    eval_splits: tuple[str, ...] = ("test",)
    preprocessing: str = "vtab"
    workers: int = 0
    cache_images: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        checks = [("batch_size", self.batch_size >= 1, ">= 1"), ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
                  ("workers", self.workers >= 0, ">= 0"),
                  ("img_size", self.img_size is None or self.img_size >= 1, ">= 1 when given"),
                  ("preprocessing", self.preprocessing in ("vtab", "fgvc"), "'vtab' or 'fgvc'")]
        for name, ok, rule in checks:
            require(ok, self, name, rule)

    def data_spec(self) -> DataSpec:
        """What the task's loaders need of this run (`sparseft.loaders.TaskData`)."""
        return DataSpec(data=self.data, img_size=self.img_size, preprocessing=self.preprocessing,
                        batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                        train_split=self.train_split, workers=self.workers, cache_images=self.cache_images,
                        seed=self.train.seed, drop_last=self.train.drop_last,
                        view_scale=float(self.options.get("view_scale", DataSpec.view_scale)))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_splits"] = list(self.eval_splits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        d["eval_splits"] = tuple(d.get("eval_splits", ("test",)))
        return cls(**d)


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", TASK_FILE, PLAN_FILE, "checkpoint.json", DATA_FILE,
             CARD_FILE)


def claim_run_dir(run_dir: Path, spec: RunSpec, *, resume: bool, overwrite: bool) -> None:
    """A run folder is sparseft's alone: a fresh run needs an empty (or new) folder, or `overwrite`;
    `resume` needs a run of the same settings there. Checked before any work is done."""
    if resume:
        check_same_settings(run_dir, spec.to_dict(), part="spec")
        return
    if not run_dir.exists():  # (a file there was refused by `run` before it took the folder's lock)
        return
    present = sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK_FILE, SEARCH_DIR))
    if not present:
        return
    if overwrite:
        return  # sparseft's files are removed once everything is checked (`_clear_run_files`)
    if "config.json" in present:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
                              "it, or choose another folder")
    raise FileExistsError(f"{run_dir} is not empty ({', '.join(present[:4])}{'…' if len(present) > 4 else ''}); "
                          "a run needs an empty or new folder (or --overwrite, which replaces sparseft's files)")


def _clear_run_files(run_dir: Path) -> None:
    """Remove sparseft's files from a folder being overwritten (the user's other files stay)."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        name = path.name
        if name in RUN_FILES or (name.startswith("checkpoint-e") and name.endswith(".safetensors")):
            path.unlink()
        elif name == TB_DIR and path.is_dir():  # the old run's TensorBoard event files
            shutil.rmtree(path)


def _absolute_data(data: str) -> str:
    """`<prefix:>path` with the path made absolute when it exists (named tasks stay as they are)."""
    prefix, sep, rest = (data.partition(":") if data.split(":", 1)[0] in ("vtab", "fgvc", "folder", "seg")
                         else ("", "", data))
    if not rest.strip():
        raise InputError(f"--data {data!r} names no folder")
    path = Path(rest)
    return f"{prefix}{sep}{path.resolve()}" if path.exists() else data


def _make_run_dir(run_dir: Path, overwrite: bool) -> None:
    if overwrite:
        _clear_run_files(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _finished(run_dir: Path, spec: RunSpec) -> bool:
    """Whether the run in `run_dir` trained all its epochs and wrote its summary."""
    if not (run_dir / "summary.json").is_file():
        return False
    checkpoint = run_dir / "checkpoint.json"
    return not checkpoint.is_file() or json.loads(checkpoint.read_text()).get("epoch", -1) + 1 >= spec.train.epochs


def _resumed_batchnorm(run_dir: Path, spec: RunSpec) -> str | None:
    """The BatchNorm policy a resumed run trained with, unless `--batchnorm` is given now (None).

    A run recorded before runs kept their policy gets it written into its config.json: its
    `batchnorm` option, else the method's default of that time, so that `fit`'s settings check
    sees a later change of default. (`claim_run_dir` has checked that config.json holds a spec.)"""
    path = run_dir / "config.json"
    stored = read_json(path, ValueError, "run record")
    if "batchnorm" not in stored:
        stored["batchnorm"] = (stored["spec"].get("options", {}).get("batchnorm")
                               or BATCHNORM_DEFAULT_BEFORE.get(spec.method) or get_method(spec.method).batchnorm_mode())
        write_text_atomic(path, json.dumps(stored, indent=1))
    return None if "batchnorm" in spec.options else stored["batchnorm"]


def record_path(run_dir: Path, stored: str) -> Path:
    """A file a run's record names, as a path to use now. Records hold the run folder's files relative
    to it; older ones held them absolute (or relative to where the run was started): then the run
    folder's own file of that name wins, so a moved run folder names its own files."""
    own = run_dir / Path(stored).name
    return own if own.exists() or not Path(stored).exists() else Path(stored)


def _with_run_paths(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A summary as returned and shown: its paths of the run folder's files under `run_dir` as it is now."""
    return {**summary, **{key: str(record_path(run_dir, summary[key])) for key in RECORD_PATHS
                          if isinstance(summary.get(key), str)}}


def summary_record(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary as a run folder records it: the run folder's files by their names (relative to it)."""
    return {**summary, **{key: Path(summary[key]).name for key in RECORD_PATHS if isinstance(summary.get(key), str)}}


def _data_fingerprint(kind: TaskKind, spec: RunSpec, like: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of the splits the run reads (`sparseft.data.fingerprint.take`)."""
    splits = dict.fromkeys((spec.train_split, *spec.eval_splits))
    return fingerprint.take(spec.data, {s: kind.dataset(spec.data, s, None) for s in splits}, like=like)


def _check_data(run_dir: Path, kind: TaskKind, spec: RunSpec) -> None:
    """Resuming: the data must be what the run started with (its `DATA_FILE`), else a `DataError` naming what
    changed. A run started before runs kept a fingerprint resumes with a warning that nothing was checked."""
    path = run_dir / DATA_FILE
    if not path.is_file():
        warnings.warn(f"{run_dir}: no {DATA_FILE} (the run was started by an older sparseft): resuming without "
                      "checking that the data is the data it started with", DataWarning, stacklevel=2)
        return
    stored = read_json(path, DataError, "data fingerprint")
    if not isinstance(stored, dict) or not isinstance(stored.get("files"), dict):
        raise DataError(f"{path}: not a data fingerprint; restore it, or start a new run")
    if stored.get("version") != fingerprint.VERSION:
        warnings.warn(f"{path}: a fingerprint of another format (version {stored.get('version')!r}, this sparseft "
                      f"reads {fingerprint.VERSION}): resuming without checking that the data is the data it started "
                      "with", DataWarning, stacklevel=2)
        return
    found = fingerprint.changes(stored, _data_fingerprint(kind, spec, like=stored))
    if found:
        shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
        raise DataError(f"{spec.data}: data changed since the run in {run_dir} started: {shown}; resume refused: "
                        "start a new run or restore the data")


def _claim(run_dir: Path, spec: RunSpec, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """`claim_run_dir`; then, resuming a finished run, its summary (None: there is training to do)."""
    claim_run_dir(run_dir, spec, resume=resume, overwrite=overwrite)
    if resume and _finished(run_dir, spec):
        if (run_dir / TASK_FILE).is_file() or not (run_dir / "checkpoint.json").is_file():
            return _with_run_paths(json.loads((run_dir / "summary.json").read_text()), run_dir)  # nothing rewritten
        (run_dir / "summary.json").unlink()  # its task file is gone: written again from the last checkpoint
    return None


def run(spec: RunSpec, run_dir: str | Path | None = None, *, resume: bool = False,
        overwrite: bool = False, log_dir: str | Path | None = None) -> dict[str, Any]:
    """Train `spec.method` on `spec.data`; returns the summary (also written to the run folder).

    The run folder must be empty or new (`overwrite=True` replaces sparseft's files in it);
    `resume=True` continues the run there, refusing changed settings. Under torchrun every rank
    calls `run` (see `sparseft.distributed`): rank 0 checks and writes the folder, every rank
    returns rank 0's summary. `log_dir`: TensorBoard event files there (default: the run folder's tb/ when the
    tensorboard package is installed).
    """
    spec = dataclasses.replace(spec, data=_absolute_data(spec.data))
    if run_dir is not None and (not str(run_dir).strip() or str(run_dir) != str(run_dir).strip()):
        raise InputError(f"--out {str(run_dir)!r} is not a usable folder name")
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        check_output_folder(run_dir, label="--out", what="the run (its config, checkpoints and task file)")
    with contextlib.ExitStack() as held:
        if run_dir is not None:  # one process per run folder: a second `train --out` on it is refused
            distributed.run_on_main(lambda: held.enter_context(_locked_run_dir(run_dir)))
        resumed = distributed.run_on_main(lambda: _started_train(run_dir)) if resume and run_dir else None
        spec, optimizer_source = with_optimizer_defaults(spec, resumed)
        return _run(spec, run_dir, resume=resume, overwrite=overwrite, optimizer_source=optimizer_source,
                    log_dir=log_dir)


def _started_train(run_dir: Path) -> dict[str, Any]:
    """The training settings the run in `run_dir` started with ({} when there is none to read: `claim_run_dir`
    names what is wrong)."""
    try:
        stored = json.loads((run_dir / "config.json").read_text())["spec"]["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return stored if isinstance(stored, dict) else {}


def with_optimizer_defaults(spec: RunSpec, resumed: dict[str, Any] | None = None) -> tuple[RunSpec, str]:
    """`spec` with the optimiser settings it leaves open (`optimizer`, `weight_decay` None) filled in, and where
    they come from, as `run` records it (`optimizer_source`): "given"; resuming, the values the run started
    with; else the method's paper's (`Method.train_defaults`, e.g. GPS's Adam without weight decay); else
    sparseft's (`sparseft.train.OPTIMIZER_DEFAULTS`). Every entry point (the CLI, the Python API, the
    benchmark suites) gets the same defaults through this function."""
    paper = METHODS[spec.method].train_defaults if spec.method in METHODS else {}  # an unknown one: `_run` says so
    sources: dict[str, str] = {}
    filled: dict[str, Any] = {}
    for key, default in OPTIMIZER_DEFAULTS.items():
        if getattr(spec.train, key) is not None:
            sources[key] = "given"
        elif resumed and resumed.get(key) is not None:
            filled[key], sources[key] = resumed[key], "the resumed run's"
        elif key in paper:
            filled[key], sources[key] = paper[key], f"{spec.method}'s paper's (Method.train_defaults)"
        else:
            filled[key], sources[key] = default, "sparseft's default"
    distinct = set(sources.values())
    source = distinct.pop() if len(distinct) == 1 else "; ".join(f"{k}: {v}" for k, v in sources.items())
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, **filled)), source


def _learning_rate(spec: RunSpec, model: nn.Module) -> tuple[TrainConfig, str]:
    """The run's training settings with its learning rate filled in, and where the rate comes from."""
    if spec.train.lr is not None:
        return spec.train, "given"
    lr, source = recommended_lr(spec.method, backbone_family(model))
    if spec.train.progress and distributed.is_main():
        print(f"[sparseft] lr {lr:g}: {source}; --lr sets another, --lr auto tunes it on val200", file=sys.stderr)
    return dataclasses.replace(spec.train, lr=lr), source


@contextlib.contextmanager
def _locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock; a folder the lock created and nothing else filled is removed after."""
    created = not run_dir.exists()
    try:
        with folder_lock(run_dir):
            yield
    finally:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            with contextlib.suppress(OSError):  # another process may have just claimed it
                run_dir.rmdir()


def _run(spec: RunSpec, run_dir: Path | None, *, resume: bool, overwrite: bool,
         optimizer_source: str = "given", log_dir: str | Path | None = None) -> dict[str, Any]:
    if run_dir is not None:
        finished = distributed.run_on_main(lambda: _claim(run_dir, spec, resume=resume, overwrite=overwrite))
        if finished is not None:
            return finished
        if resume and spec.train.progress is not False and distributed.is_main():
            print(f"[sparseft] resuming {run_dir}: its plan ({PLAN_FILE}) and last checkpoint are reused",
                  file=sys.stderr)

    # everything is checked before anything is computed or removed: options, model, data
    kept = distributed.run_on_main(lambda: _resumed_batchnorm(run_dir, spec)) if resume and run_dir else None
    method = get_method(spec.method, **spec.options, **({"batchnorm": kept} if kept else {}))
    kind = kind_for_data(spec.data)  # the task kind follows the data (sparseft.kinds)
    names = kind.class_names(spec.data)
    classes = len(names)
    torch.manual_seed(spec.train.seed)
    model = kind.build_model(spec.model, classes, img_size=spec.img_size, weights=spec.weights,
                             pretrained=spec.pretrained, class_names=names,
                             **({"drop_path_rate": spec.train.drop_path} if spec.train.drop_path else {}))
    model = model.to(distributed.default_device())
    method.check(model)
    train, lr_source = _learning_rate(spec, model)
    distributed.check_global_batch(spec.batch_size)  # before anything is written
    kind.check_data(spec.data, spec.train_split, spec.eval_splits)  # every image opens, splits agree: fail now
    started = None  # a fresh run's data fingerprint (rank 0's), written just before training starts

    def check_or_take() -> None:
        nonlocal started
        if resume:
            _check_data(run_dir, kind, spec)
        else:
            started = _data_fingerprint(kind, spec)

    if run_dir is not None:
        distributed.run_on_main(check_or_take)
    data = TaskData(spec.data_spec(), model)
    if run_dir is not None:
        distributed.run_on_main(lambda: _make_run_dir(run_dir, overwrite))
    ctx = MethodContext(loader=lambda kind: data.loader(kind), seed=spec.train.seed, progress=spec.train.progress,
                        bf16=spec.train.bf16, run_dir=run_dir)
    t0 = time.perf_counter()
    model = method.prepare(model, ctx)
    prepare_time = time.perf_counter() - t0
    task = kind.name
    info = {"spec": spec.to_dict(), "batchnorm": method.batchnorm_mode(), "num_classes": classes,
            "data_config": data.config, "task": task, "lr_source": lr_source, "optimizer_source": optimizer_source}
    eval_loaders = {split.replace("800", "").replace("200", ""): data.loader("eval", split)
                    for split in spec.eval_splits}
    task_file = None

    def save_task(m: nn.Module, folder: Path) -> None:
        nonlocal task_file
        task_file = method.save(m, folder / TASK_FILE, extra={
            "model": spec.model, "task": task, "num_classes": classes, "img_size": spec.img_size, "data": spec.data,
            "preprocessing": spec.preprocessing, "class_names": names,
            "weights": str(Path(spec.weights).resolve()) if spec.weights else None,
            "pretrained": spec.pretrained, "init_seed": spec.train.seed, "train_split": spec.train_split})

    if started is not None:
        write_text_atomic(run_dir / DATA_FILE, json.dumps(started, separators=(",", ":")))
    summary = fit(model, data.loader("train"), train, eval_loaders=eval_loaders, run_dir=run_dir,
                  resume=resume, save_task=save_task, run_info=info, hook=method.training_hook(model), log_dir=log_dir)
    summary.update({"method": spec.method, "model": spec.model, "data": spec.data, "task": task,
                    "metric": kind.metric_key, "num_classes": classes,
                    "prepare_time_s": round(prepare_time, 2), "lr": train.lr, "lr_source": lr_source,
                    "optimizer": train.optimizer, "weight_decay": train.weight_decay,
                    "optimizer_source": optimizer_source, **ctx.info})
    if task_file is not None:  # in the run folder: recorded relative to it, returned as a path to use
        summary["task_file"] = str(task_file)
        summary["task_file_bytes"] = Path(task_file).stat().st_size
    if run_dir is not None and distributed.is_main():
        record = summary_record(summary)
        write_text_atomic(run_dir / "summary.json", json.dumps(record, indent=1, default=str))
        if task_file is not None:  # the model card: what a Hub-style folder of this task shows (sparseft.export.hub)
            write_text_atomic(run_dir / CARD_FILE, model_card(folder_config(read_delta(task_file)), record))
    return distributed.broadcast_object(summary)  # rank 0's (it saved the task file) on every rank

