"""`sparseft reproduce`: a paper's suite run as its official code runs it, the paper's numbers beside ours.

    sparseft reproduce gps-vtab --data /data/vtab-1k --dry-run    # checks; the per-task plan, a GPU-time estimate
    sparseft reproduce gps-vtab --data /data/vtab-1k --out results/gps-vtab [--protocol both]

A target is one official table (`sparseft.bench.official.TABLES`: gps-vtab, gps-fgvc, spt-vtab,
sct-vtab) and its generated paper suite (`sparseft.bench.official.suites`), restricted to the rows
that run the paper's own method. `prepare` checks, before anything runs: the data under `--data`
(every task's split files; one `DataError` line naming each missing task or file and where to get
the benchmark), the backbone weights (the paper's exact pretrained tag in the local timm/Hugging Face
cache, or `--weights FILE`; one line naming the tag and the official file when absent), and then the
whole suite as `sparseft bench` checks it. `dry_run_plan` prints the per-task settings, the runs and
an estimated GPU time (an estimate from assumed per-image costs, stated with it). `reproduce` runs
the suite with the paper protocol (and/or the honest one, each in its own results folder) through
`sparseft.bench.run_suite` and writes `reproduce.md` / `reproduce.csv`: per task, the paper's
published number (`sparseft.bench.official.published`; "not recorded" where this package has none),
ours and the difference.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseft.bench.cells import Cell, run_spec, runs_in_cell
from sparseft.bench.official import TABLES
from sparseft.bench.official.published import PUBLISHED, Published
from sparseft.bench.official.suites import TARGETS, paper_labels, suite_data
from sparseft.bench.official.table import Table
from sparseft.bench.report import load_records, write_report
from sparseft.bench.runner import checked_cells, run_suite
from sparseft.bench.suite import Suite, suite_from_mapping, task_name
from sparseft.data import DataError
from sparseft.errors import InputError
from sparseft.fileutil import write_text_atomic

#: where to get each benchmark, as the official repositories point to it (named in the data error)
DATA_SOURCES = {
    "vtab-1k": "VTAB-1k in the NOAH layout: github.com/ZhangYuanhan-AI/NOAH (data/vtab-source), as the GPS, SSF and "
               "SCT READMEs point to it",
    "fgvc": "FGVC with VPT's JSON splits: github.com/KMnP/vpt (README, 'Datasets preparation'), as the GPS README "
            "points to it",
}
#: the files sparseft reads of each task folder (docs/data.md, "Layouts")
SPLIT_FILES = {"vtab-1k": ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"),
               "fgvc": ("train.json", "val.json", "test.json")}
PROTOCOLS = ("paper", "honest", "both")

#: ASSUMED per-image costs (seconds) of ViT-B/16 at 224 px under mixed precision on one A100-class GPU, used only
#: for the dry run's GPU-time estimate; not measured by sparseft (no GPU where this was written)
ASSUMED_TRAIN_S_PER_IMAGE = 1 / 400  # forward + backward + update: about 400 images/s
ASSUMED_EVAL_S_PER_IMAGE = 1 / 1200  # forward only: about 1200 images/s
_TRAIN_RATE, _EVAL_RATE = 1 / ASSUMED_TRAIN_S_PER_IMAGE, 1 / ASSUMED_EVAL_S_PER_IMAGE
ESTIMATE_RULE = (f"ESTIMATE, not a measurement: per run, (training images x (epochs + 1 for the selection / "
                 f"sensitivity pass) x {ASSUMED_TRAIN_S_PER_IMAGE:.4f} s) + (test images x evaluations x "
                 f"{ASSUMED_EVAL_S_PER_IMAGE:.5f} s); the per-image costs are ASSUMED for ViT-B/16 at 224 px, mixed "
                 f"precision, one A100-class GPU (about {_TRAIN_RATE:.0f} training and {_EVAL_RATE:.0f} evaluation "
                 "images/s). Evaluations: every epoch under the paper protocol, once under the honest one.")


@dataclass
class Reproduction:
    """A target made ready to run: its table, published numbers, the suites per protocol and the backbone used."""

    target: str
    table: Table
    published: Published
    data: Path
    suites: dict[str, Suite]  # protocol -> suite
    tasks: list[str]
    backbone: str
    weights: str | None  # the backbone's weight file (--weights), None: timm's pretrained tag
    weights_note: str  # where the backbone's weights come from, or why they are missing (a dry run shows it)
    paper_backbone: bool = True  # False when a caller swapped the backbone (tests, trials): the report says so
    groups: dict[str, str] = field(default_factory=dict)  # task -> group


def _benchmark_tasks(table: Table, tasks: Sequence[str] | None) -> list[str]:
    known = table.tasks()
    if not tasks:
        return known
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise InputError(f"--tasks {', '.join(unknown)}: not a task of {table.name}; its tasks: {', '.join(known)}")
    return [t for t in known if t in tasks]


def check_data(table: Table, root: Path, tasks: Sequence[str]) -> None:
    """Every task folder under `root` with the split files sparseft reads; else one `DataError` line naming each
    missing task or file and where to get the benchmark."""
    where = DATA_SOURCES[table.benchmark]
    if not root.is_dir():
        raise DataError(f"--data {root}: not a folder; it must hold the {table.benchmark} task folders "
                        f"({', '.join(tasks)}). Get {where}; layouts: docs/data.md")
    problems = []
    for task in tasks:
        folder = root / task
        if not folder.is_dir():
            problems.append(f"{task}/ (no folder)")
            continue
        missing = [name for name in SPLIT_FILES[table.benchmark] if not (folder / name).is_file()]
        if missing:
            problems.append(f"{task}/ (missing {', '.join(missing)})")
    if problems:
        raise DataError(f"--data {root}: {table.benchmark} is incomplete: {'; '.join(problems)}. Get {where}; "
                        "layouts: docs/data.md")


def _cached_pretrained(tag: str) -> str | None:
    """The local file of timm's pretrained weights `tag` (its Hugging Face hub cache), None when not downloaded."""
    import huggingface_hub
    import timm

    cfg = timm.models.get_pretrained_cfg(tag)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = huggingface_hub.try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def check_weights(table: Table, weights: str | None, download: bool) -> str:
    """Where the paper's backbone weights come from (a line for the plan and the report); `InputError` naming
    the tag and the official file when they are not on this machine and may not be downloaded."""
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise InputError(f"--weights {weights}: no such file (it replaces timm's {table.backbone}, the paper's "
                             f"{table.backbone_file})")
        return f"--weights {weights} (in place of timm's {table.backbone})"
    cached = _cached_pretrained(table.backbone)
    if cached is not None:
        return f"timm's {table.backbone}, cached at {cached}"
    if download:
        return f"timm's {table.backbone}, downloaded on first use (--download)"
    raise InputError(f"the paper's backbone weights are not on this machine: timm's {table.backbone} (the official "
                     f"code loads {table.backbone_file}); download them once (`python -c \"import timm; "
                     f"timm.create_model('{table.backbone}', pretrained=True)\"`, or pass --download), or pass "
                     "--weights FILE (a copy converted with `sparseft weights convert`)")


def _suite(table: Table, target: str, root: Path, tasks: list[str], protocol: str, *, backbone: dict[str, Any],
           train: dict[str, Any]) -> Suite:
    """The target's paper suite on `root`'s tasks: only the rows of the paper's method, the given protocol."""
    name = TARGETS[target]
    data = suite_data(name)
    labels = paper_labels(name)
    prefix = "fgvc:" if table.benchmark == "fgvc" else ""
    data["tasks"] = {group: [f"{prefix}{root / task_name(spec)}" for spec in specs if task_name(spec) in tasks]
                     for group, specs in data["tasks"].items()}
    data["tasks"] = {group: specs for group, specs in data["tasks"].items() if specs}
    data["methods"] = [m for m in data["methods"] if m["label"] in labels]
    for m in data["methods"]:  # a task left out must not be named by a row (check_suite refuses that)
        for key in ("per_task", "per_task_train"):
            if key in m:
                m[key] = {t: v for t, v in m[key].items() if t in tasks}
    data["backbones"] = [{**data["backbones"][0], **backbone}]
    data["train"] = {**data.get("train", {}), **train}
    if train:  # a caller's overrides (tests, trials) win over the rows' settings too
        for m in data["methods"]:
            m["train"] = {**m.get("train", {}), **train}
            for overrides in m.get("per_task_train", {}).values():
                for key in train:
                    overrides.pop(key, None)
    data["name"] = f"reproduce-{target}"
    return suite_from_mapping(data, f"sparseft reproduce {target}", protocol)


def prepare(target: str, data: str | Path, *, protocol: str = "paper", weights: str | None = None,
            download: bool = False, tasks: Sequence[str] | None = None, strict_weights: bool = True,
            model: str | None = None, img_size: int | None = None,
            train: dict[str, Any] | None = None) -> Reproduction:
    """Check the data and the weights of `target` on `data` and build its suites (nothing is run or written).

    `strict_weights=False` (a dry run) notes missing weights instead of refusing. `model`, `img_size` and
    `train` replace the paper's backbone and settings (for tests and short trials; the report says the
    backbone is not the paper's)."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    table = TABLES[target]
    root = Path(data).expanduser().resolve()
    chosen = _benchmark_tasks(table, tasks)
    check_data(table, root, chosen)
    if model is not None:
        backbone = {"name": model, "img_size": img_size, "pretrained": False, **({"weights": weights} if weights
                                                                                else {})}
        note = (f"{weights or 'its random initialisation'} (a trial with {model}: NOT the paper's backbone "
                f"{table.backbone})")
    else:
        try:
            note = check_weights(table, weights, download)
        except InputError:
            if strict_weights:
                raise
            note = "MISSING: " + _missing_weights_line(table)
        backbone = ({"weights": str(Path(weights).expanduser().resolve()), "pretrained": False} if weights
                    else {"pretrained": True})
    protocols = ["paper", "honest"] if protocol == "both" else [protocol]
    suites = {p: _suite(table, target, root, chosen, p, backbone=backbone, train=dict(train or {}))
              for p in protocols}
    groups = {task_name(spec): group for group, specs in next(iter(suites.values())).tasks.items() for spec in specs}
    return Reproduction(target=target, table=table, published=PUBLISHED[target], data=root, suites=suites,
                        tasks=chosen, backbone=model or table.backbone, weights=weights, weights_note=note,
                        paper_backbone=model is None, groups=groups)


def _missing_weights_line(table: Table) -> str:
    return (f"timm's {table.backbone} is not cached here (the official file: {table.backbone_file}); a run "
            "stops until it is downloaded, --download is given, or --weights names a copy")


# ---------------------------------------------------------------- the plan (--dry-run)


def _count(path: Path) -> int:
    """Images a split file lists (VTAB-1k: its non-empty lines; FGVC: its JSON object's entries)."""
    if path.suffix == ".json":
        return len(json.loads(path.read_text()))
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def split_sizes(table: Table, root: Path, task: str, stage: str) -> tuple[int, int]:
    """(training images, evaluation images) of a run of `task` in `stage` (paper / final: train800val200 ->
    test; tune: train800 -> val200), counted in the split files."""
    folder = root / task
    if table.benchmark == "fgvc":
        train = ("train.json",) if stage == "tune" else ("train.json", "val.json")
        return sum(_count(folder / f) for f in train), _count(folder / ("val.json" if stage == "tune" else "test.json"))
    train_file, eval_file = ("train800.txt", "val200.txt") if stage == "tune" else ("train800val200.txt", "test.txt")
    return _count(folder / train_file), _count(folder / eval_file)


def estimate_gpu_seconds(train_images: int, eval_images: int, epochs: int, evaluations: int) -> float:
    """The dry run's GPU-time estimate of one run (see ESTIMATE_RULE: assumed per-image costs)."""
    return ((train_images * (epochs + 1)) * ASSUMED_TRAIN_S_PER_IMAGE
            + eval_images * evaluations * ASSUMED_EVAL_S_PER_IMAGE)


def _setting_text(cell: Cell, suite: Suite) -> str:
    spec = run_spec(suite, cell, cell.entry.paper_point(suite.grid), "paper", False)
    t = spec.train
    parts = [f"lr {t.lr:g}", f"batch {spec.batch_size}", f"{t.optimizer} wd {t.weight_decay:g}",
             f"warm-up {t.warmup_epochs:g} ep from {t.warmup_lr:g}", f"min lr {t.min_lr:g}"]
    parts += [f"drop-path {t.drop_path:g}"] if t.drop_path else []
    parts += [f"EMA {t.ema_decay:g}"] if t.ema_decay is not None else []
    parts += [f"mixup {t.mixup:g} / cutmix {t.cutmix:g}"] if t.mixup or t.cutmix else []
    parts += [f"smoothing {t.label_smoothing:g}"] if t.label_smoothing else []
    parts += ["drop-last"] if t.drop_last else []
    parts += ["bf16"] if t.bf16 else ["fp32"]
    parts += [f"preprocessing {spec.preprocessing}"]
    options = {k: v for k, v in spec.options.items() if k != "batchnorm"}
    parts += [", ".join(f"{k} {v}" for k, v in options.items())] if options else []
    return "; ".join(parts)


def plan_rows(rep: Reproduction, out: Path) -> list[dict[str, Any]]:
    """One row per (protocol, task, suite row): its settings, runs, images and estimated GPU seconds; every check
    `sparseft bench` makes before its first run is made (the results folder `out/<protocol>` included)."""
    rows = []
    for protocol, suite in rep.suites.items():
        for cell in checked_cells(suite, out / protocol):
            task = task_name(cell.task)
            spec = run_spec(suite, cell, cell.entry.paper_point(suite.grid), "paper", False)
            runs = runs_in_cell(suite, cell)
            train_images, eval_images = split_sizes(rep.table, rep.data, task, "paper")
            evaluations = spec.train.epochs if protocol == "paper" else 1
            seconds = runs * estimate_gpu_seconds(train_images, eval_images, spec.train.epochs, evaluations)
            rows.append({"protocol": protocol, "task": task, "group": cell.group, "row": cell.entry.label,
                         "seed": cell.seed, "epochs": spec.train.epochs, "runs": runs, "train_images": train_images,
                         "eval_images": eval_images, "evaluations": evaluations, "gpu_s": seconds,
                         "settings": _setting_text(cell, suite)})
    return rows


def plan_text(rep: Reproduction, out: Path) -> str:
    """The dry run's plan: what would run, with which settings, and an estimated GPU time."""
    t = rep.table
    lines = [f"sparseft reproduce {rep.target}: {t.paper.upper()} on {t.benchmark} as {t.repository} @ {t.commit[:10]} "
             "runs it (settings per task: sparseft/bench/official/" f"{t.paper}.py)",
             f"data: {rep.data} ({len(rep.tasks)} task(s), every split file present)",
             f"backbone: {rep.backbone}; weights: {rep.weights_note}"]
    for protocol in rep.suites:
        lines.append(_protocol_label(protocol, t))
    rows = plan_rows(rep, out)
    lines.append(f"results: {out}/<protocol> (nothing written by a dry run)")
    lines.append("")
    lines.append("protocol | task | row | epochs | runs | train / test images | evaluations | est. GPU-h | settings")
    for r in rows:
        lines.append(f"{r['protocol']} | {r['task']} | {r['row']} | {r['epochs']} | {r['runs']} | "
                     f"{r['train_images']} / {r['eval_images']} | {r['evaluations']} | {r['gpu_s'] / 3600:.2f} | "
                     f"{r['settings']}")
    total_runs = sum(r["runs"] for r in rows)
    total = sum(r["gpu_s"] for r in rows) / 3600
    lines += ["", f"total: {total_runs} training run(s), about {total:.1f} GPU-hours", ESTIMATE_RULE]
    return "\n".join(lines)


def _protocol_label(protocol: str, table: Table) -> str:
    if protocol == "paper":
        return (f"PAPER PROTOCOL ({table.protocol}): the settings were chosen by the paper's authors on test accuracy "
                "and the score is the best test top-1 over epochs; not an unbiased estimate")
    return ("HONEST scoring: the same settings, the LAST epoch's test top-1 (no choice made on the test labels by "
            "sparseft; the settings themselves are still the authors')")


# ---------------------------------------------------------------- running and the report


def reproduce(rep: Reproduction, out: str | Path, *, progress: bool = True) -> Path:
    """Run the suites of `rep` (results in `out/<protocol>`) and write `out/reproduce.md` and `.csv`; the .md path."""
    out = Path(out)
    for protocol, suite in rep.suites.items():
        run_suite(suite, out / protocol, progress=progress)
        write_report(out / protocol)
    return write_reproduce_report(rep, out)


def _scores(folder: Path) -> dict[tuple[str, str], tuple[float, str]]:
    """(task, method) -> (our top-1 in %, the row it comes from): the best over a method's rows (SPT's budget
    sweep, as its official protocol reports), from the records of a results folder."""
    try:
        records = load_records(folder)
    except FileNotFoundError:
        return {}
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for r in records:
        if r.get("test_acc") is None or r.get("diverged"):
            continue
        key = (r["task"], r["method"])
        score = 100 * r["test_acc"]
        if key not in best or score > best[key][0]:
            best[key] = (score, r["label"])
    return best


def _fmt(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.2f}"


def _diff(ours: float | None, paper: float | None) -> str:
    return "–" if ours is None or paper is None else f"{ours - paper:+.2f}"


def report_rows(rep: Reproduction, out: Path) -> list[dict[str, Any]]:
    """Per (task, method): the paper's number, ours under each protocol run, and the differences."""
    scores = {p: _scores(out / p) for p in rep.suites}
    methods = list(dict.fromkeys(m.method for s in rep.suites.values() for m in s.methods))
    rows = []
    for task in rep.tasks:
        for method in methods:
            paper = rep.published.number(method, task)
            row: dict[str, Any] = {"group": rep.groups.get(task, ""), "task": task, "method": method,
                                   "paper": paper}
            for p in rep.suites:
                ours, label = scores[p].get((task, method), (None, ""))
                row[f"ours_{p}"], row[f"row_{p}"] = ours, label
                row[f"diff_{p}"] = None if ours is None or paper is None else ours - paper
            rows.append(row)
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _means(rep: Reproduction, rows: list[dict[str, Any]], method: str, protocol: str) -> dict[str, float | None]:
    """Our mean over tasks and mean of group means (None while a task has no score)."""
    mine = [r for r in rows if r["method"] == method]
    scores = [r[f"ours_{protocol}"] for r in mine]
    if not mine or any(s is None for s in scores):
        return {"tasks": None, "groups": None}
    by_group: dict[str, list[float]] = {}
    for r in mine:
        by_group.setdefault(r["group"], []).append(r[f"ours_{protocol}"])
    return {"tasks": _mean(scores), "groups": _mean([_mean(v) for v in by_group.values()])}


def write_reproduce_report(rep: Reproduction, out: Path) -> Path:
    """`out/reproduce.md` (the paper's numbers beside ours) and `out/reproduce.csv` (the same, one row per task)."""
    t, pub = rep.table, rep.published
    rows = report_rows(rep, out)
    protocols = list(rep.suites)
    lines = [f"# Reproducing {t.paper.upper()} on {t.benchmark} (`sparseft reproduce {rep.target}`)", ""]
    lines += [f"- {_protocol_label(p, t)}." for p in protocols]
    lines += [f"- Paper: {pub.paper}. Published per-task numbers: {pub.source}."]
    lines += [f"- Published numbers, note: {note}." for note in pub.notes]
    lines += [f"- Settings: the official code, {t.repository} @ {t.commit[:10]}, per task as "
              f"`sparseft/bench/official/{t.paper}.py` holds them; what sparseft still does differently: "
              "docs/reproduce.md.",
              f"- Backbone: {rep.backbone}; weights: {rep.weights_note}."]
    if not rep.paper_backbone:
        lines.append(f"- **Not the paper's backbone** ({t.backbone}): these numbers are not comparable with the "
                     "paper's.")
    lines += [f"- Data: {rep.data}.", ""]
    header = ["group", "task", "method", "paper (published)"]
    for p in protocols:
        header += [f"ours, {p}" + (" (best over epochs)" if p == "paper" else " (last epoch)"), f"difference ({p})"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["group"], r["task"], r["method"], _fmt(r["paper"])]
        for p in protocols:
            ours = r[f"ours_{p}"]
            shown = "not run yet" if ours is None else f"{ours:.2f}"
            if ours is not None and r[f"row_{p}"] != r["method"]:
                shown += f" ({r[f'row_{p}']})"
            cells += [shown, _diff(ours, r["paper"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for method in dict.fromkeys(r["method"] for r in rows):
        for p in protocols:
            means = _means(rep, rows, method, p)
            if means["tasks"] is None:
                lines.append(f"- {method}, {p}: mean not computed until every task has a score.")
                continue
            ours = f"mean over tasks {means['tasks']:.2f}"
            if t.benchmark == "vtab-1k":
                ours += f", mean of the group means {means['groups']:.2f}"
            published = pub.mean_for(method)
            paper = published if len(rep.tasks) == len(t.tasks()) else None
            if paper is None:
                lines.append(f"- {method}, {p}: {ours}; the paper's mean: "
                             + ("not recorded." if published is None else "not compared (a subset of the tasks ran)."))
            elif pub.mean_of in means:
                lines.append(f"- {method}, {p}: {ours}; the paper's mean {paper:.2f} ({pub.mean_source}); "
                             f"difference {means[pub.mean_of] - paper:+.2f} (against our "
                             + ("mean over tasks)." if pub.mean_of == "tasks" else "mean of the group means)."))
            else:
                lines.append(f"- {method}, {p}: {ours}; the paper's mean {paper:.2f} ({pub.mean_source}); which "
                             "average the paper reports is not recorded, so no difference is computed.")
    lines += ["", "Scores are top-1 accuracy in %. SPT rows are the best over the budget sweep (the row that gave it "
              "in brackets), as its official protocol reports them. 'not recorded': this package holds no "
              "published number for it (sparseft/bench/official/published.py); none is estimated."]
    md = out / "reproduce.md"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(md, "\n".join(lines) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    fields = ["group", "task", "method", "paper"] + [f"{k}_{p}" for p in protocols for k in ("ours", "row", "diff")]
    writer.writerow(fields)
    for r in rows:
        writer.writerow(["" if r[f] is None else (round(r[f], 4) if isinstance(r[f], float) and math.isfinite(r[f])
                                                  else r[f]) for f in fields])
    write_text_atomic(out / "reproduce.csv", buf.getvalue())
    return md


__all__ = ["ASSUMED_EVAL_S_PER_IMAGE", "ASSUMED_TRAIN_S_PER_IMAGE", "DATA_SOURCES", "ESTIMATE_RULE", "PROTOCOLS",
           "TARGETS", "Reproduction", "check_data", "check_weights", "estimate_gpu_seconds", "plan_rows",
           "plan_text", "prepare", "reproduce", "split_sizes", "write_reproduce_report"]
