"""How far a user's learning rate lands from the best one: the recommended default and `--lr auto`
against the best rate of a full grid, per task and method, over seeds (issue 26's measurement).

For every (task, method, seed), resumably under OUT:
  grid/lr=<x>/   `sparseft train` at each of the 5 ladder rungs around the recommended rate
                 (two below, it, two above), train800val200 -> test, last epoch
  auto/          `sparseft train --lr auto` (tunes on train800 -> val200 with the same seed, then trains)
A rate `--lr auto` chose outside the grid is added to the grid. Per (task, method): the grid's
best rate is the one with the highest test accuracy averaged over seeds (an oracle: it reads test);
the verdict rule, fixed before the runs: `--lr auto` passes when its mean is within 1 point of the
oracle's, the default when within 3 points.

    python benchmarks/lr_check.py OUT [--tasks mini-vtab/wesnoth_units,...] [--methods gps,lora,full]
    python benchmarks/lr_check.py OUT --report        # table (markdown) and lr_check.json from what ran
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sparseft.autolr import one_se_choice, run_auto_lr
from sparseft.methods.rates import backbone_family, ladder, recommended_lr
from sparseft.models import create_model
from sparseft.run import RunSpec, run
from sparseft.train import TrainConfig

TASKS = "mini-vtab/wesnoth_units,mini-vtab/civ_flags,mini-vtab/noto_emoji"
METHODS = "gps,lora,full"
AUTO_MARGIN, DEFAULT_MARGIN = 1.0, 3.0  # points


def _spec(args: argparse.Namespace, task: str, method: str, seed: int, lr: float | None) -> RunSpec:
    train = TrainConfig(epochs=args.epochs, lr=lr, warmup_epochs=args.warmup_epochs, seed=seed, progress=False,
                        eval_every=args.epochs)
    return RunSpec(model=args.model, data=task, method=method, img_size=args.img_size, batch_size=32, train=train)


def _finished_or_run(fn, spec: RunSpec, folder: Path) -> dict:
    summary = folder / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    started = (folder / "config.json").is_file() or (folder / "lr-search").is_dir()
    print(f"[lr_check] {folder}", flush=True)
    return fn(spec, folder, resume=started)


def run_all(args: argparse.Namespace) -> None:
    family = backbone_family(create_model(args.model, num_classes=0, img_size=args.img_size))
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            center, _ = recommended_lr(method, family)
            for seed in args.seeds:
                cell = args.out / task.split("/")[-1] / method / f"seed{seed}"
                auto = _finished_or_run(run_auto_lr, _spec(args, task, method, seed, None), cell / "auto")
                rates = {ladder(center, s) for s in (-2, -1, 0, 1, 2)} | {auto["lr"]}
                for lr in sorted(rates):
                    _finished_or_run(run, _spec(args, task, method, seed, lr), cell / "grid" / f"lr={lr:g}")


VAL_IMAGES = 200  # val200


def _one_se_accuracies(cell: Path, seeds: list[int], center: float) -> tuple[list[float], list[float]] | None:
    """Per seed, the rate `autolr.one_se_choice` picks from `--lr auto`'s recorded validation scores, and that
    seed's grid test accuracy at it (None while a seed's choice or grid run is missing)."""
    lrs, accs = [], []
    for seed in seeds:
        choice = cell / f"seed{seed}" / "auto" / "lr-search" / "choice.json"
        if not choice.is_file():
            return None
        c = json.loads(choice.read_text())
        lr = one_se_choice({t["lr"]: t[c["score"]] for t in c["tried"]}, center, VAL_IMAGES)
        summary = cell / f"seed{seed}" / "grid" / f"lr={lr:g}" / "summary.json"
        if not summary.is_file():
            return None
        lrs.append(lr)
        accs.append(100 * json.loads(summary.read_text())["final"]["test_acc"])
    return lrs, accs


def report(args: argparse.Namespace) -> dict:
    family = backbone_family(create_model(args.model, num_classes=0, img_size=args.img_size))
    rows = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            name = task.split("/")[-1]
            center, _ = recommended_lr(method, family)
            grid: dict[float, list[float]] = {}
            auto, chosen = [], []
            for seed in args.seeds:
                cell = args.out / name / method / f"seed{seed}"
                for path in sorted((cell / "grid").glob("lr=*/summary.json")):
                    s = json.loads(path.read_text())
                    grid.setdefault(s["lr"], []).append(100 * s["final"]["test_acc"])
                if (cell / "auto" / "summary.json").is_file():
                    s = json.loads((cell / "auto" / "summary.json").read_text())
                    auto.append(100 * s["final"]["test_acc"])
                    chosen.append(s["lr"])
            complete = {lr: v for lr, v in grid.items() if len(v) == len(args.seeds)}
            if len(auto) < len(args.seeds) or center not in complete:
                rows.append({"task": name, "method": method, "complete": False})
                continue
            candidate = _one_se_accuracies(args.out / name / method, args.seeds, center)
            means = {lr: statistics.mean(v) for lr, v in complete.items()}
            best = max(means, key=means.get)
            row = {"task": name, "method": method, "complete": True, "best_lr": best, "best": means[best],
                   "default_lr": center, "default": means[center], "auto": statistics.mean(auto),
                   "auto_lrs": chosen, "grid": {f"{lr:g}": round(m, 2) for lr, m in sorted(means.items())}}
            row["auto_gap"], row["default_gap"] = row["best"] - row["auto"], row["best"] - row["default"]
            row["auto_pass"], row["default_pass"] = row["auto_gap"] <= AUTO_MARGIN, row["default_gap"] <= DEFAULT_MARGIN
            if candidate is not None:  # the next measurement's candidate rule, replayed on the same tuning runs
                row["one_se"], row["one_se_lrs"] = statistics.mean(candidate[1]), candidate[0]
                row["one_se_gap"] = row["best"] - row["one_se"]
                row["one_se_pass"] = row["one_se_gap"] <= AUTO_MARGIN
            rows.append(row)
    lines = ["| task | method | best rate (grid, oracle) | default | `--lr auto` (rates chosen) | one-SE candidate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r["complete"]:
            lines.append(f"| {r['task']} | {r['method']} | incomplete | | | |")
            continue
        lines.append(f"| {r['task']} | {r['method']} | {r['best']:.1f} ({r['best_lr']:g}) | {r['default']:.1f} "
                     f"({r['default_lr']:g}; {-r['default_gap']:+.1f}{'' if r['default_pass'] else ' FAIL'}) | "
                     f"{r['auto']:.1f} ({', '.join(f'{x:g}' for x in r['auto_lrs'])}; {-r['auto_gap']:+.1f}"
                     f"{'' if r['auto_pass'] else ' FAIL'}) | {_candidate_cell(r)} |")
    table = "\n".join(lines)
    print(table)
    result = {"rows": rows, "table": table, "settings": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "lr_check.json").write_text(json.dumps(result, indent=1))
    return result


def _candidate_cell(r: dict) -> str:
    if "one_se" not in r:
        return ""
    return (f"{r['one_se']:.1f} ({', '.join(f'{x:g}' for x in r['one_se_lrs'])}; {-r['one_se_gap']:+.1f}"
            f"{'' if r['one_se_pass'] else ' FAIL'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    p.add_argument("--model", default="dinov2_vits14_offline")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--report", action="store_true", help="only summarise what ran")
    args = p.parse_args()
    if not args.report:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
