"""`sparseft train --lr auto`: choose the learning rate on val200, then train on train800val200.

The benchmark harness's honest protocol for one run: the method's recommended rate and its two
neighbours on the 1-3-10 ladder (`sparseft.methods.rates`) each train on train800 and are scored
on val200 at their last epoch, with the run's own schedule, seed and options; while the best
rate sits on the edge of what was tried, one more rung beyond it is tried (at most `extend`
times). The best rate (ties: the one tried first) then trains on the run's training split and
is evaluated on its evaluation splits, in the run folder itself. The tuning runs live in
`<run folder>/lr-search/lr=<rate>/` (whole run folders: `--resume` continues them) and the choice,
with every rate's validation score, in `lr-search/choice.json` and the final summary's
`lr_search`. No test split is read before the choice is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparseft import distributed
from sparseft.data.images import DataError
from sparseft.data.spec import load_split
from sparseft.errors import InputError, TrainingWarning
from sparseft.fileutil import LOCK_FILE, write_text_atomic
from sparseft.methods.rates import backbone_family, ladder, recommended_lr, search_grid
from sparseft.models import create_model
from sparseft.progress import labelled
from sparseft.run import SEARCH_DIR, RunSpec, run
from sparseft.train import NOT_LEARNING_STEP

EXTEND = 2  # rungs tried beyond the grid's edge at most


#: what a run of `--lr auto` that learns nothing is told to try (the default advice is `--lr auto` itself)
TUNING_STEP = ("--lr auto's tuning run at lr {lr:g} scores this rate against the others; if every rate does this, "
               "try more epochs (a longer schedule), another method, or check the labels")
CHOSEN_STEP = ("--lr auto chose this rate on val200 already: try more epochs (a longer schedule), another method, "
               "or check the labels")


@contextlib.contextmanager
def _one_run(label: str, step: str) -> Iterator[None]:
    """Inside one of `--lr auto`'s runs: its epoch lines start with `label`, a "not learning" warning says `step`."""
    token = NOT_LEARNING_STEP.set(step)
    try:
        with labelled(label):
            yield
    finally:
        NOT_LEARNING_STEP.reset(token)


def one_se_choice(tried: dict[float, float], center: float, n: int) -> float:
    """The candidate rule of docs/learning-rates.md's next measurement (not `--lr auto`'s rule yet): the rate with
    the best validation accuracy in `tried` ({rate: accuracy in [0, 1]}) when it beats the recommended rate
    `center` by more than the standard error of a difference of two accuracies on `n` images; else `center`."""
    if center not in tried:
        raise ValueError(f"the recommended rate {center:g} is not among the rates tried ({sorted(tried)})")
    best = max(tried, key=lambda lr: (tried[lr], lr == center))  # a tie keeps the recommended rate
    return best if tried[best] - tried[center] > difference_se(tried[best], tried[center], n) else center


def difference_se(p1: float, p2: float, n: int) -> float:
    """The standard error of the difference of two accuracies `p1`, `p2` on `n` images."""
    return ((p1 * (1 - p1) + p2 * (1 - p2)) / n) ** 0.5


def _within_noise(spec: RunSpec, tuning: list[dict[str, Any]], key: str, best: float,
                  center: float) -> dict[str, Any]:
    """Whether the chosen rate beat the recommended one by less than the validation split's noise (the one-SE
    rule of `one_se_choice`), for accuracy on a classification split whose size can be read; {} otherwise."""
    if key != "val_acc" or best == center:
        return {}
    scores = {t["lr"]: t[key] for t in tuning}
    if center not in scores or None in scores.values():
        return {}
    try:
        n = len(load_split(spec.data, "val200"))
    except (DataError, InputError):
        return {}
    if n < 1:
        return {}
    se = difference_se(scores[best], scores[center], n)
    return {"val_images": n, "margin_points": round(100 * (scores[best] - scores[center]), 2),
            "se_points": round(100 * se, 2), "within_noise": one_se_choice(scores, center, n) != best}


def _center(spec: RunSpec) -> tuple[float, str]:
    """The recommended rate of the run's method on its backbone (a throwaway build tells the family)."""
    model = create_model(spec.model, num_classes=0, img_size=spec.img_size, weights=spec.weights,
                         pretrained=spec.pretrained)
    return recommended_lr(spec.method, backbone_family(model))


def _check(spec: RunSpec, run_dir: Path | None) -> None:
    if run_dir is None:
        raise InputError("--lr auto needs a run folder (--out): its tuning runs are kept there")
    if spec.train.lr is not None:
        raise InputError(f"--lr auto chooses the learning rate; it cannot also be {spec.train.lr!r}")
    if "val200" in spec.eval_splits or spec.train_split != "train800val200":
        raise InputError(f"--lr auto tunes on train800 -> val200, so the run must train on train800val200 and not "
                         f"evaluate on val200 (this one trains on {spec.train_split} and evaluates on "
                         f"{', '.join(spec.eval_splits)}); use --protocol final")


def run_auto_lr(spec: RunSpec, run_dir: str | Path | None, *, resume: bool = False, overwrite: bool = False,
                extend: int = EXTEND) -> dict[str, Any]:
    """Tune `spec`'s learning rate on val200, then run it with the chosen rate in `run_dir`; the final summary."""
    run_dir = Path(run_dir) if run_dir is not None else None
    _check(spec, run_dir)
    if not resume and not overwrite and run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} is not empty; pass --resume to continue an --lr auto run there, --overwrite "
                              "to replace it, or choose another folder")
    if resume:  # before any tuning run writes into the folder
        search, started = run_dir / SEARCH_DIR, (run_dir / "config.json").is_file()
        if not started and not search.is_dir():
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no config.json, no {SEARCH_DIR}/); start the run "
                                    "without --resume")
        if started and not search.is_dir():
            raise InputError(f"{run_dir}: --resume --lr auto, but this run was started without --lr auto (no "
                             f"{SEARCH_DIR}/); resume it with the options it was started with, or start a new run "
                             "folder")
    center, source = _center(spec)
    tuning: list[dict[str, Any]] = []

    def tune(lr: float) -> None:
        tune_spec = dataclasses.replace(spec, train_split="train800", eval_splits=("val200",),
                                        train=dataclasses.replace(spec.train, lr=lr))
        folder = run_dir / SEARCH_DIR / f"lr={lr:g}"
        started = (folder / "config.json").is_file()
        if spec.train.progress is not False and distributed.is_main():  # as the epoch lines are shown
            print(f"[sparseft] --lr auto: lr {lr:g} on train800 -> val200 ({folder})", file=sys.stderr)
        with _one_run(f"[--lr auto: lr {lr:g}]", TUNING_STEP.format(lr=lr)):
            s = run(tune_spec, folder, resume=started and not overwrite, overwrite=overwrite or not started)
        metric = s.get("metric", "acc")
        tuning.append({"lr": lr, f"val_{metric}": s["final"].get(f"val_{metric}"),
                       "folder": str(folder.relative_to(run_dir))})

    for lr in search_grid(center):
        tune(lr)
    key = next(k for k in tuning[0] if k.startswith("val_"))
    for _ in range(extend):
        best = max(tuning, key=lambda t: t[key] if t[key] is not None else -1.0)
        tried = sorted(t["lr"] for t in tuning)
        if best["lr"] not in (tried[0], tried[-1]):
            break
        tune(ladder(best["lr"], -1 if best["lr"] == tried[0] else 1))
    best = max(tuning, key=lambda t: t[key] if t[key] is not None else -1.0)
    edge = best["lr"] in (min(t["lr"] for t in tuning), max(t["lr"] for t in tuning))
    rule = (f"best val200 score at the last epoch of a train800 run; the recommended rate and its two ladder "
            f"neighbours, extended past an edge up to {extend} times")
    noise = _within_noise(spec, tuning, key, best["lr"], center)
    choice = {"chosen_lr": best["lr"], "center": center, "center_source": source, "score": key, "tried": tuning,
              "on_edge": edge, "rule": rule, **noise}
    if noise.get("within_noise") and distributed.is_main():
        warnings.warn(f"--lr auto chose lr {best['lr']:g} over the recommended {center:g} by "
                      f"{noise['margin_points']:.1f} points on {noise['val_images']} validation images, within the "
                      f"split's noise (one standard error: {noise['se_points']:.1f} points); the recommended rate may "
                      "do as well (docs/learning-rates.md)", TrainingWarning, stacklevel=2)
    if distributed.is_main():
        write_text_atomic(run_dir / SEARCH_DIR / "choice.json", json.dumps(choice, indent=1))
    if spec.train.progress is not False and distributed.is_main():
        scores = ", ".join(f"{t['lr']:g}: {t[key]}" for t in tuning)
        print(f"[sparseft] --lr auto chose lr {best['lr']:g} ({key} {scores})"
              + ("; it is on the edge of the rates tried" if edge else ""), file=sys.stderr)
    final = dataclasses.replace(spec, train=dataclasses.replace(spec.train, lr=best["lr"]))
    started = (run_dir / "config.json").is_file()
    with _one_run(f"[--lr auto: chosen lr {best['lr']:g}]", CHOSEN_STEP):
        summary = run(final, run_dir, resume=resume and started, overwrite=overwrite)
    summary.update(lr_search=choice, lr_source="--lr auto (lr-search/choice.json)")
    if distributed.is_main():
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary
