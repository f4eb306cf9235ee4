"""Benchmark suites: which methods × tasks × backbones × seeds to run, and how.

A suite is a YAML file (the shipped ones live in `sparseft/bench/suites/`, usable by name):

    name: mini-vtab-quick
    protocol: honest              # honest | paper | screen (the report always says which)
    tasks:                        # group -> data specs (VTAB-1k folders, mini-vtab/<task>, ...)
      natural: [mini-vtab/clipart]
      specialized: [mini-vtab/elpv]
    backbones:
      - {name: dinov2_vits14_offline, img_size: 56}
    train: {epochs: 5, batch_size: 32, weight_decay: 1.0e-4, warmup_epochs: 1}
    grid: {lr: [1.0e-3, 3.0e-3]}  # honest protocol: tuned on train800 -> val200
    methods:
      - {label: gps, method: gps, options: {k: 1}, grid: {lr: [3.0e-3, 1.0e-2]}}
      - {label: full, method: full, grid: {lr: [1.0e-4, 3.0e-4]}}
    seeds: [0, 1, 2]
    tuning: first_seed            # honest: the grid runs with the first seed, its choice serves every seed
                                  # (each_seed: every seed tunes its own)
    extend_edges: 2               # honest tuning: when the best point of a one-key grid (lr) is on its edge,
                                  # try one step beyond (the edge pair's ratio), up to this many times; 0: never
    batchnorm: update             # BatchNorm statistics for every method (update | frozen); default: each
                                  # method's own. A row's `options: {batchnorm: ...}` overrides it.
    choices_from: other-suite     # honest: no grid here; each (backbone, task, row) takes the point the
                                  # finished suite `other-suite` chose (its results folder beside this one's)

A method's `train:` overrides the suite's training settings (e.g. `optimizer: adam`), and its
`per_task_train: {task name: {setting: value}}` those of single tasks (the official per-task lr,
batch size, drop-path of the paper suites, `sparseft.bench.official`). Grid keys
`lr` and `weight_decay` set the optimiser; any other key is a method option (e.g.
`k` for GPS). `per_task: {task name: {option: value}}` overrides options for single tasks (e.g.
GPS's K=2 on Patch Camelyon); `${VAR}` in task specs is expanded from the environment. The
paper protocol runs each method once with its `paper` settings (default: the first value of
each grid key) and reports the best test accuracy over epochs.

`load_suite` reads the file's structure; `sparseft.bench.check.check_suite` checks the values
(options, grid, train settings, backbones, task data) before the first run.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sparseft.errors import InputError
from sparseft.methods import METHODS

PROTOCOLS = ("honest", "paper", "screen")
TUNING = ("first_seed", "each_seed")
TRAIN_KEYS = {"epochs", "lr", "weight_decay", "optimizer", "warmup_epochs", "warmup_lr", "min_lr",
              "label_smoothing", "grad_clip", "bf16", "drop_path", "ema_decay", "mixup", "cutmix", "drop_last"}
RUN_KEYS = {"batch_size", "eval_batch_size", "preprocessing", "workers"}


class SuiteError(InputError):
    """A suite file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Backbone:
    name: str
    img_size: int | None = None
    weights: str | None = None
    pretrained: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the suite's train settings

    @property
    def key(self) -> str:
        return f"{self.name}@{self.img_size}" if self.img_size else self.name


@dataclass(frozen=True)
class MethodEntry:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    backbones: tuple[str, ...] = ()  # restrict to these backbone names (empty: all)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)  # task name -> option overrides
    train: dict[str, Any] = field(default_factory=dict)  # this method's overrides of the train settings
    per_task_train: dict[str, dict[str, Any]] = field(default_factory=dict)  # task name -> train overrides

    def grid_points(self, default_grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
        grid = {**default_grid, **self.grid}
        keys = sorted(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]

    def paper_point(self, default_grid: dict[str, list[Any]]) -> dict[str, Any]:
        grid = {**default_grid, **self.grid}
        return {**{k: v[0] for k, v in grid.items()}, **self.paper}


@dataclass
class Suite:
    name: str
    protocol: str
    tasks: dict[str, list[str]]
    backbones: list[Backbone]
    methods: list[MethodEntry]
    train: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    tuning: str = "first_seed"
    batchnorm: str | None = None  # every method's BatchNorm statistics policy (a row's options may override)
    extend_edges: int = 2  # honest tuning: up to this many steps past a grid edge the best point sits on
    choices_from: str | None = None  # honest: take each cell's chosen point from this suite's results
    source: str = ""

    def task_groups(self) -> dict[str, str]:
        """data spec -> group name."""
        return {spec: group for group, specs in self.tasks.items() for spec in specs}

    def methods_for(self, backbone: Backbone) -> list[MethodEntry]:
        return [m for m in self.methods if not m.backbones or backbone.name in m.backbones]


def task_name(spec: str) -> str:
    """Short name of a data spec for folders and tables ('mini-vtab/clipart' -> 'clipart')."""
    return Path(spec.split(":", 1)[-1].rstrip("/")).name


def shipped_suites() -> list[str]:
    folder = resources.files("sparseft.bench") / "suites"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _resolve(name_or_path: str | Path) -> tuple[str, str]:
    path = Path(name_or_path)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as err:
            raise SuiteError(f"{path}: not a suite file: not UTF-8 text ({err.reason} at byte {err.start})") from err
    shipped = resources.files("sparseft.bench") / "suites" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped.read_text(), f"suites/{name_or_path}.yaml"
    raise SuiteError(f"{name_or_path}: no such suite file, and not a shipped suite ({', '.join(shipped_suites())})")


def _need(data: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in data:
        raise SuiteError(f"{where}: missing key '{key}'")
    if not isinstance(data[key], kind):
        raise SuiteError(f"{where}: '{key}' must be {getattr(kind, '__name__', kind)}, got {data[key]!r}")
    if key in ("tasks", "backbones", "methods") and not data[key]:
        raise SuiteError(f"{where}: '{key}' is empty, so the suite would run nothing; name at least one")
    return data[key]


def _mapping(value: Any, where: str) -> dict:
    """A mapping the suite gives (an absent or empty key: {}); anything else is refused, naming where."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: must be a mapping (key: value), not {value!r}")
    return value


def load_suite(name_or_path: str | Path, protocol: str | None = None) -> Suite:
    """Read and validate a suite (a path or a shipped suite's name); `protocol` overrides the file's."""

    text, where = _resolve(name_or_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SuiteError(f"{where}: not valid YAML ({err})") from err
    return suite_from_mapping(data, where, protocol)


def suite_from_mapping(data: Any, where: str, protocol: str | None = None) -> Suite:
    """A suite from its mapping (a suite file's content; `where` names it in errors), validated as `load_suite`
    validates a file: a suite built in code (`sparseft reproduce`) is held to the same rules."""
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: expected a mapping at the top level")
    unknown = set(data) - {"name", "protocol", "tasks", "backbones", "methods", "train", "grid", "seeds",
                           "tuning", "batchnorm", "extend_edges", "choices_from", "description"}
    if unknown:
        raise SuiteError(f"{where}: unknown keys {sorted(unknown)}")
    proto = protocol or data.get("protocol", "honest")
    if proto not in PROTOCOLS:
        raise SuiteError(f"{where}: protocol must be one of {PROTOCOLS}, not {proto!r}")
    tasks = _need(data, "tasks", dict, where)
    for group, specs in tasks.items():
        if not isinstance(specs, list) or not specs:
            raise SuiteError(f"{where}: tasks.{group} must be a non-empty list of data specs")
        tasks[group] = [os.path.expandvars(str(spec)) for spec in specs]  # e.g. ${VTAB_ROOT}/cifar
    train = _mapping(data.get("train"), f"{where}: train")
    bad = set(train) - TRAIN_KEYS - RUN_KEYS
    if bad:
        raise SuiteError(f"{where}: unknown train settings {sorted(bad)}")
    backbones = []
    for i, b in enumerate(_need(data, "backbones", list, where)):
        if not isinstance(b, dict) or "name" not in b:
            raise SuiteError(f"{where}: backbones[{i}] needs a 'name'")
        extra = set(b) - {"name", "img_size", "weights", "pretrained", "train"}
        if extra:
            raise SuiteError(f"{where}: backbones[{i}] has unknown keys {sorted(extra)}")
        train_b = _mapping(b.get("train"), f"{where}: backbones[{i}] train")
        bad = set(train_b) - TRAIN_KEYS - RUN_KEYS
        if bad:
            raise SuiteError(f"{where}: backbones[{i}] has unknown train settings {sorted(bad)}")
        backbones.append(Backbone(name=b["name"], img_size=b.get("img_size"), weights=b.get("weights"),
                                  pretrained=b.get("pretrained", False), train=train_b))  # types: bench.check
        if any(other.key == backbones[-1].key for other in backbones[:-1]):
            raise SuiteError(f"{where}: backbones[{i}]: {backbones[-1].key} is listed twice (results would collide)")
    methods = []
    labels: set[tuple[str, frozenset]] = set()
    for i, m in enumerate(_need(data, "methods", list, where)):
        if isinstance(m, str):
            m = {"label": m, "method": m}
        if not isinstance(m, dict) or "method" not in m:
            raise SuiteError(f"{where}: methods[{i}] needs a 'method'")
        if not isinstance(m["method"], str) or m["method"] not in METHODS:
            raise SuiteError(f"{where}: methods[{i}]: unknown method {m['method']!r} "
                             f"(known: {', '.join(sorted(METHODS))})")
        label = m.get("label", m["method"])
        if not isinstance(label, str) or not label.strip() or label in (".", "..") or any(c in label for c in "/\\"):
            raise SuiteError(f"{where}: methods[{i}]: label {label!r} must be a name (it names the row's results "
                             "folder: no '/', not empty)")
        row = f"{where}: methods[{i}] (label {label!r})"
        extra = set(m) - {"label", "method", "options", "grid", "paper", "backbones", "per_task", "train",
                          "per_task_train"}
        if extra:
            raise SuiteError(f"{row} has unknown keys {sorted(extra)}")
        names = m.get("backbones") or []
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise SuiteError(f"{row} backbones: must be a list of backbone names, not {names!r}")
        restricted = frozenset(names)
        for other_label, other in labels:  # one label may appear once per backbone
            if other_label == label and (not restricted or not other or restricted & other):
                raise SuiteError(f"{where}: methods[{i}]: label {label!r} used twice for the same backbone")
        labels.add((label, restricted))
        parts = {key: _mapping(m.get(key), f"{row} {key}")
                 for key in ("options", "grid", "paper", "per_task", "train", "per_task_train")}
        for key in ("per_task", "per_task_train"):
            for task, overrides in parts[key].items():
                _mapping(overrides, f"{row} {key}.{task}")
        for task, overrides in parts["per_task_train"].items():
            bad = set(overrides) - TRAIN_KEYS - RUN_KEYS
            if bad:
                raise SuiteError(f"{row} per_task_train.{task} has unknown train settings {sorted(bad)}")
        methods.append(MethodEntry(label=label, method=m["method"], backbones=tuple(names), **parts))
        bad = set(methods[-1].train) - TRAIN_KEYS - RUN_KEYS
        if bad:
            raise SuiteError(f"{where}: methods[{i}] has unknown train settings {sorted(bad)}")
    grid = _mapping(data.get("grid"), f"{where}: grid")
    for key, values in [*grid.items(), *(kv for m in methods for kv in m.grid.items())]:
        if not isinstance(values, list) or not values:
            raise SuiteError(f"{where}: grid '{key}' must be a non-empty list")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SuiteError(f"{where}: seeds must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"{where}: seeds {seeds} repeat a seed")
    tuning = data.get("tuning", "first_seed")
    if tuning not in TUNING:
        raise SuiteError(f"{where}: tuning must be one of {TUNING}, not {tuning!r}")
    batchnorm = data.get("batchnorm")
    if batchnorm not in (None, "update", "frozen"):
        raise SuiteError(f"{where}: batchnorm must be 'update' or 'frozen', not {batchnorm!r}")
    extend = data.get("extend_edges", 2)
    if not isinstance(extend, int) or isinstance(extend, bool) or extend < 0:
        raise SuiteError(f"{where}: extend_edges must be an integer >= 0, not {extend!r}")
    choices_from = data.get("choices_from")
    if choices_from is not None and (not isinstance(choices_from, str) or proto != "honest"):
        raise SuiteError(f"{where}: choices_from must name another suite, and only an honest suite takes it")
    return Suite(name=data.get("name", Path(where).stem), protocol=proto, tasks=tasks, backbones=backbones,
                 methods=methods, train=train, grid=grid, seeds=seeds, tuning=tuning, batchnorm=batchnorm,
                 extend_edges=extend, choices_from=choices_from, source=where)
