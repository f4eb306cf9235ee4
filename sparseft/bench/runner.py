"""Run a suite: every (backbone, task, method, seed) cell under the chosen protocol, resumably.

honest  for every grid point, train on train800 and evaluate on val200 (last epoch); retrain the
        best point on train800val200; report the LAST epoch's test accuracy.
paper   train once on train800val200 with fixed settings, evaluate on test after every epoch,
        report the BEST test accuracy over epochs (as the official repositories do).
screen  the honest protocol's tuning alone, first seed only: the grid on train800 -> val200 and
        nothing else; no test split is touched (which tasks a study keeps, `sparseft.bench.screen`).

Layout under the output folder:
    <backbone>/<task>/<label>/seed<s>/tune/<point>/   (honest only)
    <backbone>/<task>/<label>/seed<s>/final/          record.json = the cell's result
The record's score keys (`test_acc`, `last_test_acc`, `best_test_acc`, the tuning runs' `val_acc`)
hold the task's `metric`, named in the record: top-1 accuracy ("acc") for classification, the
dataset-level mIoU ("mIoU") for segmentation (whose run summaries keep pixel accuracy as `*_acc`).
A finished run (summary.json present) is never run again; an interrupted one resumes from its
checkpoint. GPS selections are cached per (backbone, task, split, selection options, seed), so
the grid's learning rates do not repeat the selection pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from sparseft.bench.cells import Cell, point_key, run_spec, runs_in_cell, select_cells, tunes
from sparseft.bench.check import check_suite
from sparseft.bench.suite import MethodEntry, Suite, task_name
from sparseft.errors import InputError
from sparseft.fileutil import FolderInUse, atomic_path, check_output_folder, folder_lock, write_text_atomic
from sparseft.methods.gps import SELECTION_OPTIONS
from sparseft.run import RunSpec, run, summary_record
from sparseft.train import TrainingDiverged, changed_settings


class Progress:
    """Which run of how many, elapsed time and an ETA from the runs finished so far."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.skipped = 0
        self.spent = 0.0
        self.start = time.perf_counter()

    def begin(self, what: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        ran = self.done - self.skipped
        eta = (self.spent / ran) * (self.total - self.done) if ran else float("nan")
        print(f"[run {self.done + 1}/{self.total}] {what} | elapsed {_hms(elapsed)} | ETA {_hms(eta)}", flush=True)

    def end(self, seconds: float | None) -> None:
        self.done += 1
        if seconds is None:
            self.skipped += 1
        else:
            self.spent += seconds


def _hms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _selection_cache(out: Path, spec: RunSpec, cell: Cell) -> Path | None:
    if spec.method != "gps" or spec.options.get("criterion", "gradient") not in ("gradient", "taylor"):
        return None
    key = json.dumps([cell.backbone.key, cell.backbone.weights, cell.backbone.pretrained, spec.data, spec.train_split,
                      cell.seed, spec.batch_size, spec.train.bf16, spec.preprocessing,
                      {k: spec.options.get(k) for k in SELECTION_OPTIONS}], sort_keys=True, default=str)
    return out / "selections" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".safetensors")


def _same_run(folder: Path, spec: RunSpec) -> bool:
    """Whether the run in `folder` was started with `spec` (a cached GPS selection file aside)."""
    try:
        stored = json.loads((folder / "config.json").read_text())["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    now = json.loads(json.dumps(spec.to_dict(), default=str))
    for d in (stored, now):
        d.get("options", {}).pop("selection", None)
    return not changed_settings(stored, now)


def _execute(out: Path, spec: RunSpec, cell: Cell, folder: Path, progress: Progress, what: str) -> dict[str, Any]:
    summary_path = folder / "summary.json"
    started = (folder / "config.json").exists()
    if started and not _same_run(folder, spec):  # e.g. a final run of a choice that a grid extension changed
        started = False
        summary_path.unlink(missing_ok=True)
    if summary_path.exists():
        progress.end(None)
        return json.loads(summary_path.read_text())
    cache = _selection_cache(out, spec, cell)
    if cache is not None and cache.exists() and "selection" not in spec.options:
        spec.options = {**spec.options, "selection": str(cache)}
    progress.begin(what)
    t0 = time.perf_counter()
    try:
        summary = run(spec, folder, resume=started, overwrite=not started)  # the folder is the suite's
    except TrainingDiverged as err:  # one diverging setting must not stop (or block) the suite
        summary = {"diverged": str(err), "final": {}, "params": {}, "history": []}
        print(f"  diverged: {err}", flush=True)
    seconds = time.perf_counter() - t0
    summary["wall_time_s"] = round(seconds, 2)
    write_text_atomic(summary_path, json.dumps(summary_record(summary), indent=1, default=str))
    if cache is not None and not cache.exists() and (folder / "selection.safetensors").exists():
        with atomic_path(cache) as tmp:
            shutil.copyfile(folder / "selection.safetensors", tmp)
    progress.end(seconds)
    return summary


def run_cell(suite: Suite, cell: Cell, out: Path, progress: Progress, show_epochs: bool) -> dict[str, Any] | None:
    """Run one cell (tuning and final run, or the paper run) and write its record.json.

    Returns None, running nothing, while another process holds the cell (or the cell whose choice it
    reuses): several `sparseft bench` processes on one results folder share out the cells.
    """
    folder = cell.folder(out)
    record_path = folder / "final" / "record.json"

    def finished() -> dict[str, Any] | None:
        if not record_path.exists():
            return None
        record = json.loads(record_path.read_text())
        check_record(suite, cell, record, record_path)
        for _ in range(runs_in_cell(suite, cell)):
            progress.end(None)
        return record

    done = finished()
    if done is not None:
        return done
    try:
        with folder_lock(folder):
            return finished() or _run_fresh_cell(suite, cell, out, progress, show_epochs)
    except FolderInUse as err:
        if progress.enabled:
            print(f"  skipped for now: {err}", flush=True)
        for _ in range(runs_in_cell(suite, cell)):
            progress.end(None)
        return None


def _run_fresh_cell(suite: Suite, cell: Cell, out: Path, progress: Progress, show_epochs: bool) -> dict[str, Any]:
    folder = cell.folder(out)
    record_path = folder / "final" / "record.json"
    name = f"{cell.backbone.key} / {task_name(cell.task)} / {cell.entry.label} / seed {cell.seed}"
    tuning: list[dict[str, Any]] = []
    points = cell.entry.grid_points(suite.grid)
    tuned_on, first_grid = None, None
    if suite.choices_from:  # another suite chose: no tuning runs here
        chosen, first_grid, stage = _choice_of(suite, cell, out), None, "final"
    elif suite.protocol == "honest" and len(points) == 1:
        chosen, stage = points[0], "final"  # nothing to choose: no tuning runs
    elif suite.protocol == "honest" and not tunes(suite, cell):  # tuning: first_seed
        first = Cell(cell.backbone, cell.task, cell.group, cell.entry, suite.seeds[0])
        first_record = run_cell(suite, first, out, Progress(0, False), show_epochs)  # checked, or run
        if first_record is None:
            raise FolderInUse(f"{first.folder(out)} (whose choice this seed reuses) is in use by another process")
        chosen, first_grid, stage = first_record["chosen"], first_record.get("grid"), "final"
        tuned_on = first.seed
    elif suite.protocol in ("honest", "screen"):
        def tune(point: dict[str, Any]) -> None:
            spec = run_spec(suite, cell, point, "tune", show_epochs)
            s = _execute(out, spec, cell, folder / "tune" / point_key(point), progress,
                         f"{name} tune {point_key(point)}")
            metric = f"val_{s.get('metric', 'acc')}"
            tuning.append({"point": point, "val_acc": s["final"].get(metric), "wall_time_s": s.get("wall_time_s"),
                           **({"diverged": s["diverged"]} if "diverged" in s else {})})

        for point in points:
            tune(point)
        for _ in range(suite.extend_edges):  # a best point on the grid's edge: try one step beyond it
            beyond = beyond_edge([t["point"] for t in tuning], _best(tuning)["point"])
            if beyond is None:
                break
            progress.total += 1
            tune(beyond)
        chosen, stage = _best(tuning)["point"], "final"
        if suite.protocol == "screen":
            return _write_screen_record(suite, cell, chosen, tuning, record_path)
    else:
        chosen, stage = cell.entry.paper_point(suite.grid), "paper"
    spec = run_spec(suite, cell, chosen, stage, show_epochs)
    s = _execute(out, spec, cell, folder / "final", progress, f"{name} {stage} {point_key(chosen)}")
    metric = s.get("metric", "acc")  # top-1 accuracy, or mIoU for segmentation
    # paper protocol: the best test score over epochs; with model EMA the EMA's (the official GPS script's best metric)
    test_acc = (s["final"].get(f"test_{metric}") if suite.protocol == "honest"
                else s.get(f"best_ema_test_{metric}", s.get(f"best_test_{metric}")))
    planned = run_spec(suite, cell, chosen, stage, False)  # `spec` may have gained the cached selection
    record = {
        "suite": suite.name, "protocol": suite.protocol, "backbone": cell.backbone.key, "task": task_name(cell.task),
        "data": cell.task, "group": cell.group, "label": cell.entry.label, "method": cell.entry.method,
        "options": planned.options, "train": _train_settings(planned),
        "seed": cell.seed, "chosen": chosen, "tuning": tuning, "grid_planned": _grid(suite, cell.entry),
        "grid": _tried(tuning) if tuning else (first_grid or _grid(suite, cell.entry)),
        "tuned_on_seed": cell.seed if tuning else tuned_on, "test_acc": test_acc,
        **({"choice_from": suite.choices_from} if suite.choices_from else {}),
        "tuning_failed": bool(tuning) and all(t["val_acc"] is None for t in tuning),
        "metric": metric, "last_test_acc": s["final"].get(f"test_{metric}"),
        "best_test_acc": s.get(f"best_test_{metric}"),
        **({"best_ema_test_acc": s[f"best_ema_test_{metric}"]} if f"best_ema_test_{metric}" in s else {}),
        # every score of the last epoch's test evaluation (segmentation: mDice, per-image means, pixel acc)
        "test_scores": {k.removeprefix("test_"): v for k, v in s["final"].items()
                        if k.startswith("test_") and k != "test_loss"},
        "diverged": s.get("diverged"),
        **{k: s["params"].get(k) for k in ("trainable_backbone", "trainable_head", "backbone_params",
                                            "backbone_percent")},
        "task_file_bytes": s.get("task_file_bytes"), "train_time_s": s.get("train_time_s"),
        "prepare_time_s": s.get("prepare_time_s"),
        "run_time_s": round(sum((t["wall_time_s"] or 0) for t in tuning) + (s.get("wall_time_s") or 0), 2),
        "final_dir": str((folder / "final").relative_to(out)),
    }
    write_text_atomic(record_path, json.dumps(record, indent=1, default=str))
    return record


def _write_screen_record(suite: Suite, cell: Cell, chosen: dict[str, Any], tuning: list[dict[str, Any]],
                         path: Path) -> dict[str, Any]:
    """A screen cell's record: the grid's validation scores and the best of them; no test score exists."""
    planned = run_spec(suite, cell, chosen, "final", False)
    best = _best(tuning)
    record = {"suite": suite.name, "protocol": suite.protocol, "backbone": cell.backbone.key,
              "task": task_name(cell.task), "data": cell.task, "group": cell.group, "label": cell.entry.label,
              "method": cell.entry.method, "options": planned.options, "train": _train_settings(planned),
              "seed": cell.seed, "chosen": chosen, "tuning": tuning, "grid_planned": _grid(suite, cell.entry),
              "grid": _tried(tuning), "tuned_on_seed": cell.seed, "val_acc": best["val_acc"], "test_acc": None,
              "tuning_failed": all(t["val_acc"] is None for t in tuning),
              "run_time_s": round(sum((t["wall_time_s"] or 0) for t in tuning), 2)}
    write_text_atomic(path, json.dumps(record, indent=1, default=str))
    return record


def _choice_of(suite: Suite, cell: Cell, out: Path) -> dict[str, Any]:
    """The point suite `choices_from` chose for this (backbone, task, row), from its results folder beside `out`.

    Raises FolderInUse (the cell waits, as for a cell another process holds) while that choice is not made yet.
    """
    other = out.parent / str(suite.choices_from)
    known = other / "suite.json"
    if known.exists() and json.loads(known.read_text()).get("name") != suite.choices_from:
        raise InputError(f"{other}: holds another suite's results, not {suite.choices_from!r}'s")
    first = Cell(cell.backbone, cell.task, cell.group, cell.entry, suite.seeds[0])
    record = first.folder(other) / "final" / "record.json"
    if not record.exists():
        raise FolderInUse(f"{record} (the choice this cell takes from {suite.choices_from}) does not exist yet; run "
                          f"that suite first")
    return json.loads(record.read_text())["chosen"]


def _best(tuning: list[dict[str, Any]]) -> dict[str, Any]:
    """The tuning run with the best validation score (ties: the one tried first)."""
    usable = [t for t in tuning if t["val_acc"] is not None] or tuning
    return max(usable, key=lambda t: t["val_acc"] or 0.0)


def _tried(tuning: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The values each grid key took over the tuning runs, sorted."""
    keys = sorted({k for t in tuning for k in t["point"]})
    return {k: sorted({t["point"][k] for t in tuning if k in t["point"]}) for k in keys}


def beyond_edge(tried: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any] | None:
    """One step past the grid's edge if `best` sits on it: for a one-key numeric grid (e.g. lr).

    The step is the ratio of the two values nearest that edge, snapped to the 1-3-10 ladder (1e-3, 3e-3,
    1e-2 -> 3e-4 below, 3e-2 above; then 1e-4, 1e-1). None when the grid has several keys or `best` is
    inside it.
    """
    keys = {k for p in tried for k in p}
    if len(keys) != 1:
        return None
    (key,) = keys
    values = sorted({p[key] for p in tried})
    if len(values) < 2 or not all(isinstance(v, (int, float)) and v > 0 for v in values):
        return None
    if best[key] == values[0]:
        target, beyond = values[0] * values[0] / values[1], (lambda v: v < values[0])
    elif best[key] == values[-1]:
        target, beyond = values[-1] * values[-1] / values[-2], (lambda v: v > values[-1])
    else:
        return None
    exponent = math.floor(math.log10(target))
    ladder = [float(f"{m}e{e}") for e in range(exponent - 1, exponent + 2) for m in (1, 3)]
    nxt = min((v for v in ladder if beyond(v)), key=lambda v: abs(math.log(v / target)))
    return {key: nxt}


def _train_settings(spec: RunSpec) -> dict[str, Any]:
    """The training settings a record keeps (those that define the result; the seed is the cell's)."""
    return {k: v for k, v in spec.train.to_dict().items() if k not in ("progress", "eval_every", "seed")}


def _expected_tuned_on(suite: Suite, cell: Cell) -> int | None:
    if suite.choices_from:
        return None
    if tunes(suite, cell):
        return cell.seed
    if suite.protocol in ("honest", "screen") and len(cell.entry.grid_points(suite.grid)) > 1:
        return suite.seeds[0]
    return None


def check_record(suite: Suite, cell: Cell, record: dict[str, Any], path: Path) -> None:
    """Refuse a finished cell whose record was made with other settings than the suite's now.

    Grid, options, training settings and the seed that tuned must all match: a record is reused
    only when re-running the cell would repeat it.
    """
    if "grid" not in record:
        raise InputError(f"{path}: made by an older sparseft (no grid recorded); use another --out")
    record = {**record, "grid": record.get("grid_planned", record["grid"])}  # the suite's grid, before extensions
    stage = "paper" if suite.protocol == "paper" else "final"
    spec = run_spec(suite, cell, record["chosen"], stage, False)
    now = {"grid": _grid(suite, cell.entry), "options": spec.options,
           "train": _train_settings(spec),
           "tuned_on_seed": _expected_tuned_on(suite, cell)}
    for key, value in now.items():
        if key not in record:  # records of the first 0.2 runs have no "train"
            continue
        before = json.loads(json.dumps(record[key], sort_keys=True, default=str))
        if before != json.loads(json.dumps(value, sort_keys=True, default=str)):
            raise InputError(f"{path}: made with other settings ({key}: {record[key]} -> {value}); use another "
                             "--out, or delete that cell's folder to run it again")


def check_results_folder(out: Path, suite: Suite) -> None:
    """Refuse a results folder that cannot be written (`fileutil.check_output_folder`) or that holds another
    suite's or another protocol's records."""
    check_output_folder(out, label="--out", what="the suite's results")
    known = out / "suite.json"
    if not known.exists():
        return
    try:
        before = json.loads(known.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{known}: unreadable ({err}); use another --out") from err
    for key in ("name", "protocol"):
        if before.get(key) != getattr(suite, key):
            raise InputError(f"{out}: holds results of {key} {before.get(key)!r}, not {getattr(suite, key)!r}; "
                             "use another --out (records of different protocols must not mix)")


def _grid(suite: Suite, entry: MethodEntry) -> dict[str, list[Any]]:
    """The suite's planned grid of this row, per key (before any extension past an edge)."""
    return {k: list(v) for k, v in sorted({**suite.grid, **entry.grid}.items())}


def checked_cells(suite: Suite, out: Path, only: list[str] | None = None) -> list[Cell]:
    """The cells `run_suite` would run into `out`, after every check it makes before the first run (nothing is
    written): the whole suite (`check_suite`), the labels in `only`, and the results folder."""
    check_suite(suite)
    cells = select_cells(suite, only)
    check_results_folder(out, suite)
    return cells


def run_suite(suite: Suite, out: str | Path, *, progress: bool = True, show_epochs: bool = False,
              only: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every cell of `suite` (or of the rows labelled in `only`) into `out`, skipping finished ones; returns
    the records. The whole suite is checked first (`check_suite`): a bad value or task fails before any run."""
    out = Path(out)
    cells = checked_cells(suite, out, only)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "suite.json", json.dumps({"name": suite.name, "protocol": suite.protocol,
                                                      "source": suite.source, "tasks": suite.tasks,
                                                      "train": suite.train, "grid": suite.grid,
                                                      "seeds": suite.seeds, "tuning": suite.tuning,
                                                      "extend_edges": suite.extend_edges,
                                                      "choices_from": suite.choices_from,
                                                      "batchnorm": suite.batchnorm},
                                                     indent=1, default=str))
    tracker = Progress(sum(runs_in_cell(suite, c) for c in cells), progress)
    t0 = time.perf_counter()
    ran = [run_cell(suite, cell, out, tracker, show_epochs) for cell in cells]
    records = [r for r in ran if r is not None]
    if progress:
        print(f"suite {suite.name}: {len(records)} cells in {_hms(time.perf_counter() - t0)} "
              f"({tracker.skipped} runs already done)")
        if len(records) < len(ran):
            print(f"{len(ran) - len(records)} cells were in use by another process: run the command again when "
                  "it has finished to complete the suite and its report")
    return records
