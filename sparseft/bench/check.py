"""A whole suite checked before its first run (`sparseft bench`, `--dry-run` too, and `run_suite`).

`check_suite(suite)` builds what every run of the suite would build, for every (backbone, task, row,
grid point): the `TrainConfig` and `RunSpec` (`sparseft.bench.cells.run_spec`) and the method with its
options (`sparseft.methods.get_method`: the option classes the CLI's flags come from, with their
rules). It reads every task's layout as a run does (the task kind's `class_names`: the folder, its
split files, every listed image present), checks that each backbone is a model sparseft can build,
and that the names a row refers to (its `backbones`, its `per_task` tasks) exist. So a bad value
fails in seconds, not when its run starts after earlier runs finished, and a dry run that exits 0
lists a suite that can run.

A refusal is one `SuiteError` line naming the suite file, the key as the file spells it and the row
it was found in: `suite.yaml: row 'full' (methods[1]) grid.lr: lr must be > 0 (and a float32), not -1`;
a suite-wide key names the row it was checked for: `train.epochs (row 'gps'): ...`. Command-line
flags in the methods' own messages are written as the keys a suite uses.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from sparseft.bench.cells import Cell, plan, run_spec
from sparseft.bench.suite import Backbone, Suite, SuiteError, task_name
from sparseft.cliopts import OptionValueError, flag_of, foreign_options, type_rule
from sparseft.data import DataError, resolve_spec
from sparseft.data.tasks import SUITES
from sparseft.errors import InputError, SparseftError
from sparseft.kinds.base import kind_for_data
from sparseft.methods import METHODS, get_method
from sparseft.models import check_img_size, check_model_name
from sparseft.run import RunSpec
from sparseft.train import TrainConfig

#: every name a suite key may take: the train settings, the run settings, every method's options
_KEYS = sorted({f.name for cls in (TrainConfig, RunSpec, *(m.Options for m in METHODS.values()))
                for f in dataclasses.fields(cls)}, key=len, reverse=True)


@dataclass(frozen=True)
class _Set:
    """A value of one run and where the suite sets it (`grid.lr`, `row 'gps' (methods[0]) options.k`)."""

    value: Any
    where: str


def check_suite(suite: Suite, *, files: bool = True) -> None:
    """Refuse (`SuiteError`, one line naming the file, key and row) a suite with anything that would fail a run.

    Checks every row's options, every grid value and train setting as each run combines them, the
    backbones, and the tasks: names that collide, a `<suite>/<task>` name no suite has. `files=False`
    leaves out what needs this machine's files (task folders and their layouts, provisioned tasks,
    environment variables in task paths, weight files), to check a shipped suite anywhere.
    """
    _check_backbones(suite, files)
    _check_rows(suite)
    _check_task_names(suite)
    for cell in _one_seed(plan(suite)):
        for point, stage in _points(suite, cell):
            _check_run(suite, cell, point, stage)
    if files:
        _check_task_data(suite)


# -- the values of every run --------------------------------------------------------------

def _one_seed(cells: Iterable[Cell]) -> list[Cell]:
    """One cell per (backbone, task, row): the seed changes no setting a check sees."""
    seen: dict[tuple[int, str, int], Cell] = {}
    for c in cells:
        seen.setdefault((id(c.backbone), c.task, id(c.entry)), c)
    return list(seen.values())


def _points(suite: Suite, cell: Cell) -> list[tuple[dict[str, Any], str]]:
    """The grid points a cell may run, with their stage (the paper point alone under the paper protocol)."""
    if suite.protocol == "paper":
        return [(cell.entry.paper_point(suite.grid), "paper")]
    return [(point, "final") for point in cell.entry.grid_points(suite.grid)]


def _row(suite: Suite, cell: Cell) -> str:
    i = next(i for i, m in enumerate(suite.methods) if m is cell.entry)
    return f"row {cell.entry.label!r} (methods[{i}])"


def _backbone(suite: Suite, cell: Cell) -> str:
    j = next(j for j, b in enumerate(suite.backbones) if b is cell.backbone)
    return f"backbones[{j}] ({cell.backbone.key})"


def _settings(suite: Suite, cell: Cell, point: dict[str, Any], stage: str) -> tuple[dict[str, _Set], dict[str, _Set]]:
    """The train settings and the method options of one run, each with where the suite sets it.

    The layers are those of `run_spec`, in its order (a later one overrides an earlier one).
    """
    row, entry, backbone = _row(suite, cell), cell.entry, _backbone(suite, cell)
    train: dict[str, _Set] = {}
    train.update({k: _Set(v, f"train.{k}") for k, v in suite.train.items()})
    train.update({k: _Set(v, f"{backbone} train.{k}") for k, v in cell.backbone.train.items()})
    train.update({k: _Set(v, f"{row} train.{k}") for k, v in entry.train.items()})
    task = task_name(cell.task)
    train.update({k: _Set(v, f"{row} per_task_train.{task}.{k}")
                  for k, v in entry.per_task_train.get(task, {}).items()})
    options: dict[str, _Set] = {"batchnorm": _Set(suite.batchnorm, "batchnorm")} if suite.batchnorm else {}
    options.update({k: _Set(v, f"{row} options.{k}") for k, v in entry.options.items()})
    options.update({k: _Set(v, f"{row} per_task.{task}.{k}") for k, v in entry.per_task.get(task, {}).items()})
    for k, v in point.items():
        where = (f"{row} paper.{k}" if stage == "paper" and k in entry.paper else
                 f"{row} grid.{k}" if k in entry.grid else f"grid.{k}")
        (train if k in ("lr", "weight_decay") else options)[k] = _Set(v, where)
    return train, options


def _check_run(suite: Suite, cell: Cell, point: dict[str, Any], stage: str) -> None:
    """One run's values: each of its type, the options the method has, then the run built as the runner builds it."""
    train, options = _settings(suite, cell, point, stage)
    method = cell.entry.method
    option_class = METHODS[method].Options
    mine = {f.name for f in dataclasses.fields(option_class)}
    foreign = [k for k in options if k not in mine]
    if foreign:
        owners = {name: m.Options for name, m in METHODS.items()}
        _refuse(suite, cell, options[foreign[0]].where, foreign_options(method, foreign, owners, show=repr) or "")
    typed = [(TrainConfig if k in TrainConfig.__dataclass_fields__ else RunSpec, k, s) for k, s in train.items()]
    typed += [(option_class, k, s) for k, s in options.items()]
    for cls, key, s in typed:
        rule = type_rule(cls, key, s.value)
        if rule is not None:
            _refuse(suite, cell, s.where, f"{key} must be {rule}, not {s.value!r}{_yaml_hint(s.value)}")
    places = {k: s.where for k, s in {**train, **options}.items()}
    places["img_size"] = f"{_backbone(suite, cell)} img_size"
    try:
        spec = run_spec(suite, cell, point, stage, False)
        get_method(spec.method, **spec.options)
    except InputError as err:
        if isinstance(err, OptionValueError):
            problem = f"{err.name} must be {_as_keys(err.rule)}, not {err.value!r}"
            named = [err.name, *_named(err.rule)]
        else:
            problem, named = _as_keys(str(err)), _named(str(err))
        where = next((places[n] for n in named if n in places), _row(suite, cell))
        _refuse(suite, cell, where, problem)


def _named(text: str) -> list[str]:
    """The keys whose command-line flags `text` mentions, in the order they appear."""
    found = [(m.start(), key) for key in _KEYS for m in re.finditer(re.escape(flag_of(key)) + r"(?![\w-])", text)]
    return [key for _, key in sorted(found)]


def _as_keys(text: str) -> str:
    """`text` with `--flag` written as the key a suite uses (`--lora-r` -> `lora_r`), and `key (key)` as `key`."""
    for key in _KEYS:
        text = re.sub(re.escape(flag_of(key)) + r"(?![\w-])", key, text)
        text = text.replace(f"{key} ({key})", key)
    return text


def _yaml_hint(value: Any) -> str:
    """For text that reads as a number: how YAML (1.1) wants it written (`1e-3` is text, `1.0e-3` a number)."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    return f" (YAML reads {value} as text; write a number such as {number!r})"


def _refuse(suite: Suite, cell: Cell | None, where: str, problem: str) -> NoReturn:
    """Raise the one-line refusal: the file, where in it (and, for a suite-wide key, the row), what is wrong."""
    if cell is not None and not where.startswith("row "):
        where = f"{where} (row {cell.entry.label!r})"
    raise SuiteError(f"{suite.source}: {where}: {problem}")


# -- backbones, rows, tasks ---------------------------------------------------------------

def _check_backbones(suite: Suite, files: bool) -> None:
    """Each backbone's fields of their types, a model sparseft can build, its weight file present."""
    for j, b in enumerate(suite.backbones):
        for key in ("name", "img_size", "weights", "pretrained"):
            rule = type_rule(Backbone, key, getattr(b, key))
            if rule is not None:
                _refuse(suite, None, f"backbones[{j}] {key}", f"must be {rule}, not {getattr(b, key)!r}")
        try:
            check_model_name(b.name)
        except InputError as err:
            _refuse(suite, None, f"backbones[{j}] name", str(err))
        try:  # a value below 1 gets the rule of img_size itself, with each run's values
            if isinstance(b.img_size, int) and not isinstance(b.img_size, bool) and b.img_size >= 1:
                check_img_size(b.name, b.img_size)
        except InputError as err:
            _refuse(suite, None, f"backbones[{j}] ({b.key}) img_size", str(err).replace(" (--img-size)", ""))
        if files and b.weights is not None and not Path(b.weights).expanduser().is_file():
            _refuse(suite, None, f"backbones[{j}] ({b.key}) weights", f"{b.weights} is not a file")


def _check_rows(suite: Suite) -> None:
    """The names a row refers to exist: its `backbones` are the suite's, its `per_task` keys name tasks of it."""
    backbones = list(dict.fromkeys(b.name for b in suite.backbones))
    tasks = [task_name(spec) for spec in suite.task_groups()]
    for i, m in enumerate(suite.methods):
        row = f"row {m.label!r} (methods[{i}])"
        missing = [name for name in m.backbones if name not in backbones]
        if missing:
            _refuse(suite, None, f"{row} backbones", f"{', '.join(missing)} is not a backbone of this suite, so the "
                                                     f"row would never run; backbones: {', '.join(backbones)}")
        unknown = [(key, name) for key in ("per_task", "per_task_train") for name in getattr(m, key)
                   if name not in tasks]
        if unknown:
            key, name = unknown[0]
            _refuse(suite, None, f"{row} {key}.{name}", f"no task of this suite is named {name!r}, so these settings "
                                                        f"would never be used; tasks: {', '.join(tasks)}")


def _check_task_names(suite: Suite) -> None:
    """One folder of results per task: names must not collide; `<suite>/<task>` must be a task of that suite."""
    seen: dict[str, tuple[str, str]] = {}  # task name -> (where, spec)
    for group, specs in suite.tasks.items():
        for i, spec in enumerate(specs):
            where = f"tasks.{group}[{i}]"
            name = task_name(spec)
            if name in seen:
                first, other = seen[name]
                clash = "is listed twice" if other == spec else f"has the name {name!r} of {first} ({other})"
                _refuse(suite, None, where, f"{spec} {clash}: their results would share one folder")
            seen[name] = (where, spec)
            prefix, _, task = spec.partition("/")
            if prefix in SUITES and task and not Path(spec).exists() and task not in SUITES[prefix]:
                _refuse(suite, None, where, f"{spec}: {prefix} has no task {task!r}; tasks: "
                                            f"{', '.join(SUITES[prefix])}")


def _check_task_data(suite: Suite) -> None:
    """Every task's data as a run reads it first (its kind's `class_names`); tasks to provision named together."""
    unprovisioned: dict[str, list[str]] = {}
    for group, specs in suite.tasks.items():
        for i, spec in enumerate(specs):
            where = f"tasks.{group}[{i}]"
            unset = [v for v in re.findall(r"\$\{?(\w+)", spec) if v not in os.environ]
            if unset:
                _refuse(suite, None, where, f"{spec}: the environment variable {unset[0]} is not set (the suite's task "
                                            "paths are read from it)")
            prefix, _, task = spec.partition("/")
            if prefix in SUITES and task in SUITES[prefix] and not Path(spec).exists():
                try:
                    resolve_spec(spec)
                except DataError:
                    unprovisioned.setdefault(prefix, []).append(task)
                continue
            try:
                kind_for_data(spec).class_names(spec)
            except (SparseftError, OSError) as err:
                _refuse(suite, None, where, str(err))
    if unprovisioned:
        names = [f"{prefix}/{task}" for prefix, tasks in unprovisioned.items() for task in tasks]
        fetch = "; ".join(f"sparseft data fetch {prefix} --tasks {','.join(tasks)}"
                          for prefix, tasks in unprovisioned.items())
        raise SuiteError(f"{suite.source}: tasks {', '.join(names)} are not provisioned (a run does not fetch them); "
                         f"run `{fetch}`")
