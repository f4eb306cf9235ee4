"""What a suite runs: its cells (backbone x task x row x seed), how many runs each takes, and each run's spec.

`plan` lists every cell, `select_cells` those of some row labels (`sparseft bench --only`),
`runs_in_cell` counts a cell's training runs and `run_spec` builds the `RunSpec` of one run of a cell
at one grid point: the runner (`sparseft.bench.runner`) runs those specs and the suite check
(`sparseft.bench.check`) builds the very same ones before the first run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparseft.bench.suite import Backbone, MethodEntry, Suite, SuiteError, task_name
from sparseft.run import RunSpec, with_optimizer_defaults
from sparseft.train import TrainConfig


@dataclass(frozen=True, eq=False)
class Cell:
    """One (backbone, task, row, seed) of a suite: one record.json in its own folder."""

    backbone: Backbone
    task: str
    group: str
    entry: MethodEntry
    seed: int

    def folder(self, out: Path) -> Path:
        return out / self.backbone.key.replace("/", "_") / task_name(self.task) / self.entry.label / f"seed{self.seed}"


def point_key(point: dict[str, Any]) -> str:
    """A grid point as a folder name (`lr=0.001`; `default` for the empty point)."""
    return ",".join(f"{k}={point[k]}" for k in sorted(point)) or "default"


def plan(suite: Suite) -> list[Cell]:
    """Every cell, seed by seed: an interrupted suite has whole seeds (every method on every task) done."""
    groups = suite.task_groups()
    seeds = suite.seeds[:1] if suite.protocol == "screen" else suite.seeds
    return [Cell(b, task, groups[task], m, seed) for seed in seeds for b in suite.backbones for task in groups
            for m in suite.methods_for(b)]


def tunes(suite: Suite, cell: Cell) -> bool:
    """Whether this cell runs its own grid (honest protocol, more than one point, and its seed tunes)."""
    return (suite.protocol in ("honest", "screen") and not suite.choices_from
            and len(cell.entry.grid_points(suite.grid)) > 1
            and (suite.tuning == "each_seed" or cell.seed == suite.seeds[0]))


def run_spec(suite: Suite, cell: Cell, point: dict[str, Any], stage: str, progress: bool) -> RunSpec:
    """The run of `cell` at grid `point` in `stage` (tune, final, paper): the suite's train settings, then the
    backbone's, then the row's, then the row's `per_task_train` ones for this task (each overrides the one
    before), the point's lr and weight decay; the options
    are the suite's BatchNorm policy, the row's, the row's `per_task` ones for this task, the point's others.
    An optimiser or weight decay no level sets is the method's default (`sparseft.run.with_optimizer_defaults`)."""
    settings = {**suite.train, **cell.backbone.train, **cell.entry.train,
                **cell.entry.per_task_train.get(task_name(cell.task), {})}
    train_kwargs = {k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__}
    train_kwargs.update({k: point[k] for k in ("lr", "weight_decay") if k in point})
    epochs = int(train_kwargs.get("epochs", TrainConfig.epochs))
    config = TrainConfig(**train_kwargs, seed=cell.seed, progress=progress,
                         eval_every=1 if stage == "paper" else max(epochs, 1))
    policy = {"batchnorm": suite.batchnorm} if suite.batchnorm else {}
    options = {**policy, **cell.entry.options, **cell.entry.per_task.get(task_name(cell.task), {}),
               **{k: v for k, v in point.items() if k not in ("lr", "weight_decay")}}
    splits = {"tune": ("train800", ("val200",)), "final": ("train800val200", ("test",)),
              "paper": ("train800val200", ("test",))}[stage]
    spec = RunSpec(model=cell.backbone.name, data=cell.task, method=cell.entry.method, options=options,
                   weights=cell.backbone.weights, pretrained=cell.backbone.pretrained,
                   img_size=cell.backbone.img_size, batch_size=int(settings.get("batch_size", 32)),
                   eval_batch_size=int(settings.get("eval_batch_size", 128)),
                   preprocessing=settings.get("preprocessing", "vtab"), workers=int(settings.get("workers", 0)),
                   train_split=splits[0], eval_splits=splits[1], train=config)
    # the optimiser a row leaves open is filled in here as `run` would (the method's paper's, else sparseft's),
    # so that a record and a run folder's config name it, and compare with those of earlier runs
    return with_optimizer_defaults(spec)[0]


def runs_in_cell(suite: Suite, cell: Cell) -> int:
    """Training runs a cell needs: grid points + the final run (honest), the grid points (screen), or one."""
    if suite.protocol == "screen":
        return len(cell.entry.grid_points(suite.grid))
    return len(cell.entry.grid_points(suite.grid)) + 1 if tunes(suite, cell) else 1


def select_cells(suite: Suite, only: Iterable[str] | None = None) -> list[Cell]:
    """The cells of `plan`, or those of the rows labelled in `only` (`--only`).

    A label that no row has is a `SuiteError` naming the labels there are: a typo must not run
    nothing, or less than asked, and report success.
    """
    wanted = list(dict.fromkeys(only or ()))
    labels = list(dict.fromkeys(m.label for m in suite.methods))
    unknown = [label for label in wanted if label not in labels]
    if unknown:
        raise SuiteError(f"{suite.source}: --only {' '.join(unknown)}: no row has "
                         f"{'this label' if len(unknown) == 1 else 'these labels'}; labels: {', '.join(labels)}")
    return [c for c in plan(suite) if not wanted or c.entry.label in wanted]
