"""Benchmark harness on a tiny synthetic suite: both protocols, resume, report."""

import json

import pytest
import yaml
from helpers import make_vtab

from sparseft.bench import SuiteError, load_suite, run_suite, shipped_suites, write_report
from sparseft.bench.report import claims, load_records

pytestmark = pytest.mark.slow  # end-to-end runs


def write_suite(tmp_path, tasks, protocol="honest", methods=None, epochs=1):
    suite = {
        "name": "tiny", "protocol": protocol,
        "tasks": {"natural": [str(tasks[0])], "structured": [str(tasks[1])]},
        "backbones": [{"name": "test_vit", "img_size": 32}],
        "train": {"epochs": epochs, "batch_size": 4, "warmup_epochs": 0},
        "grid": {"lr": [1e-3, 3e-3]}, "extend_edges": 0,  # grid extension: tests/test_fair_protocol.py
        "methods": methods or [{"label": "gps", "method": "gps", "options": {"k": 1}},
                               {"label": "gps-net", "method": "gps", "options": {"level": "net"}},
                               {"label": "linear", "method": "linear", "grid": {"lr": [1e-2]}}],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return [make_vtab(root / name, n_train=12, n_val=4, n_test=6, classes=2) for name in ("a", "b")]


def test_honest_protocol_tunes_on_val_and_reports_last_epoch(tmp_path, tasks):
    suite = load_suite(write_suite(tmp_path, tasks))
    out = tmp_path / "res"
    records = run_suite(suite, out, progress=False)
    assert len(records) == 6
    gps = next(r for r in records if r["label"] == "gps" and r["task"] == "a")
    assert len(gps["tuning"]) == 2 and gps["chosen"]["lr"] in (1e-3, 3e-3)
    best_val = max(t["val_acc"] for t in gps["tuning"])
    assert next(t for t in gps["tuning"] if t["point"] == gps["chosen"])["val_acc"] == best_val
    assert gps["test_acc"] == gps["last_test_acc"]
    linear = next(r for r in records if r["label"] == "linear")
    assert linear["tuning"] == []  # one grid point: nothing to tune
    final = out / gps["final_dir"]
    assert json.loads((final / "config.json").read_text())["spec"]["train_split"] == "train800val200"
    tune_dirs = list((final.parent / "tune").iterdir())
    assert all(json.loads((d / "config.json").read_text())["spec"]["eval_splits"] == ["val200"] for d in tune_dirs)
    # the selection pass ran once per (task, split, options): the lr grid reused it
    assert len(list((out / "selections").iterdir())) == 2 * 2 * 2  # tasks x labels x splits

    report = write_report(out)
    text = report.read_text()
    assert "Protocol: honest" in text and "last-epoch" in text
    assert "| gps |" in text and "mean (groups)" in text
    assert "### Verdicts by rule v2" in text and "| gps vs linear | 2 |" in text  # 2 tasks: too few to judge
    assert "**inconclusive**" in text.split("### Verdicts by rule v2")[1]
    for fig in ("acc_vs_params.png", "gps_distribution.png", "gps_levels.png"):
        assert (out / fig).stat().st_size > 1000
    assert (out / "results.csv").read_text().count("\n") == 7


def test_screen_protocol_runs_the_grid_on_val_only_and_keeps_tasks_by_the_rule(tmp_path, tasks):
    methods = [{"label": "full", "method": "full"}, {"label": "linear", "method": "linear"}]
    suite = load_suite(write_suite(tmp_path, tasks, protocol="screen", methods=methods))
    suite.seeds = [0, 1, 2]  # a screen runs the first seed only
    out = tmp_path / "res"
    records = run_suite(suite, out, progress=False)
    assert len(records) == 4 and {r["seed"] for r in records} == {0}
    for r in records:
        assert r["test_acc"] is None and len(r["tuning"]) == 2
        assert r["val_acc"] == max(t["val_acc"] for t in r["tuning"])
        cell = out / "test_vit@32" / r["task"] / r["label"] / "seed0"
        assert not (cell / "final" / "summary.json").exists()  # no final run, no test split
        for d in (cell / "tune").iterdir():
            assert json.loads((d / "config.json").read_text())["spec"]["eval_splits"] == ["val200"]
    assert run_suite(suite, out, progress=False) == records  # finished cells are not run again
    text = write_report(out).read_text()
    assert "# Screen: tiny" in text and "| full | linear | kept | why |" in text


def test_screen_rule_keeps_tasks_below_the_ceiling_with_a_weaker_probe():
    from sparseft.bench.screen import screen_tasks

    def rec(task, label, val):
        return {"backbone": "b", "task": task, "label": label, "val_acc": val}

    records = [rec("easy", "full", 0.99), rec("easy", "linear", 0.90),   # at the ceiling
               rec("flat", "full", 0.80), rec("flat", "linear", 0.785),  # probe as good as fine-tuning
               rec("good", "full", 0.80), rec("good", "linear", 0.70),
               rec("edge", "full", 0.97), rec("edge", "linear", 0.94),   # exactly at both limits: kept
               rec("gone", "full", 0.80), rec("gone", "linear", None)]
    kept = {t["task"]: t for t in screen_tasks(records)}
    assert [t for t, v in kept.items() if v["keep"]] == ["edge", "good"]
    assert "ceiling" in kept["easy"]["why"] and "within 1.5 points" in kept["flat"]["why"]
    assert "incomplete" in kept["gone"]["why"]


def test_a_suite_can_take_its_choices_from_another_finished_suite(tmp_path, tasks, capsys):
    methods = [{"label": "linear", "method": "linear"}]
    short = yaml.safe_load(write_suite(tmp_path, tasks, methods=methods).read_text())
    long = {**short, "name": "tiny-long", "train": {**short["train"], "epochs": 2}, "choices_from": "tiny"}
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(long))
    long_suite = load_suite(tmp_path / "long.yaml")
    assert run_suite(long_suite, tmp_path / "res" / "tiny-long", progress=True) == []  # nothing chosen yet: waits
    assert "does not exist yet; run that suite first" in capsys.readouterr().out
    chosen = {r["task"]: r["chosen"] for r in run_suite(load_suite(tmp_path / "suite.yaml"), tmp_path / "res" / "tiny",
                                                           progress=False)}
    records = run_suite(long_suite, tmp_path / "res" / "tiny-long", progress=False)
    assert len(records) == 2 and all(r["tuning"] == [] and r["choice_from"] == "tiny" for r in records)
    assert {r["task"]: r["chosen"] for r in records} == chosen
    assert all(r["test_acc"] is not None for r in records)
    assert not list((tmp_path / "res" / "tiny-long").glob("**/tune"))  # no grid runs here


def test_finished_runs_are_skipped_and_interrupted_ones_resume(tmp_path, tasks, capsys):
    suite = load_suite(write_suite(tmp_path, tasks, methods=[{"label": "linear", "method": "linear"}], epochs=2))
    out = tmp_path / "res"
    first = run_suite(suite, out, progress=True)
    capsys.readouterr()
    again = run_suite(suite, out, progress=True)
    assert "6 runs already done" in capsys.readouterr().out
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in first]
    # simulate a crash after epoch 1 of one tuning run: drop its summary and record
    run_dir = out / first[0]["final_dir"]
    tune = sorted((run_dir.parent / "tune").iterdir())[0]
    (tune / "summary.json").unlink()
    (run_dir / "record.json").unlink()
    again = run_suite(suite, out, progress=False)
    assert json.loads((tune / "summary.json").read_text())["final"]["epoch"] == 2
    assert again[0]["test_acc"] == first[0]["test_acc"]
    assert json.loads((run_dir / "summary.json").read_text())["task_file"] == "delta.safetensors"  # movable


def test_paper_protocol_reports_best_test_over_epochs(tmp_path, tasks):
    suite = load_suite(write_suite(tmp_path, tasks, methods=[{"label": "linear", "method": "linear"}], epochs=2),
                       protocol="paper")
    records = run_suite(suite, tmp_path / "res", progress=False)
    for r in records:
        assert r["tuning"] == [] and r["chosen"] == {"lr": 1e-3}
        assert r["test_acc"] == r["best_test_acc"] >= r["last_test_acc"]
    assert "Protocol: paper" in write_report(tmp_path / "res").read_text()


def test_claims_compare_per_task_and_seed():
    gps = {("a", 0): 80.0, ("a", 1): 82.0, ("a", 2): 81.0, ("b", 0): 60.0, ("b", 1): 61.0, ("b", 2): 62.0}
    full = {("a", 0): 70.0, ("a", 1): 71.0, ("a", 2): 72.0, ("b", 0): 65.0, ("b", 1): 66.0}  # (b, 2) missing
    tab = {"tasks": ["a", "b"], "rows": [{"label": "gps", "cells": gps}, {"label": "full", "cells": full}]}
    (claim,) = claims(tab)
    (cmp,) = claim["comparisons"]
    assert cmp["n"] == 5 and cmp["a_wins"] == 3 and cmp["mean_diff"] == pytest.approx(4.0)
    assert cmp["verdict"] == claim["verdict"] == "inconclusive"  # the tasks disagree: d = 10, 11, 9, -5, -5


def test_bad_suites_are_refused_with_the_key(tmp_path, tasks):
    path = write_suite(tmp_path, tasks, methods=[{"label": "x", "method": "nope"}])
    with pytest.raises(SuiteError, match="unknown method 'nope'"):
        load_suite(path)
    path.write_text("tasks: [1, 2]\n")
    with pytest.raises(SuiteError, match="'tasks' must be"):
        load_suite(path)
    with pytest.raises(SuiteError, match="no such suite"):
        load_suite(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path)


def test_shipped_suites_load():
    names = shipped_suites()
    assert {"mini-vtab-quick", "mini-vtab-cpu", "vtab-1k", "fgvc"} <= set(names)
    for name in names:
        suite = load_suite(name)
        assert suite.methods and suite.backbones and suite.tasks


def test_a_diverging_setting_is_recorded_and_skipped(tmp_path, tasks):
    methods = [{"label": "full", "method": "full", "grid": {"lr": [1e-3, 1e30]}}]
    suite = load_suite(write_suite(tmp_path, tasks, methods=methods))
    records = run_suite(suite, tmp_path / "res", progress=False)
    for r in records:
        diverged = [t for t in r["tuning"] if "diverged" in t]
        assert len(diverged) == 1 and diverged[0]["point"] == {"lr": 1e30}
        assert r["chosen"] == {"lr": 1e-3} and r["test_acc"] is not None
    write_report(tmp_path / "res")


def test_shipped_suites_name_every_runs_optimizer_and_keep_the_one_they_ran_with(monkeypatch):
    """A suite's runs name their optimiser (so records and run folders compare with earlier ones), and no
    shipped suite's run changed when `--method gps` took the paper's optimiser: a row that sets none is of a
    method without defaults of its own, whose runs keep sparseft's (AdamW, as before)."""
    from sparseft.bench.cells import plan, run_spec
    from sparseft.bench.suite import shipped_suites
    from sparseft.methods import METHODS

    monkeypatch.setenv("VTAB_ROOT", "/vtab")
    monkeypatch.setenv("FGVC_ROOT", "/fgvc")
    for name in shipped_suites():
        suite = load_suite(name)
        for cell in plan(suite):
            spec = run_spec(suite, cell, cell.entry.paper_point(suite.grid), "final", False)
            assert spec.train.optimizer in ("adam", "adamw") and spec.train.weight_decay is not None
            settings = {**suite.train, **cell.backbone.train, **cell.entry.train}
            if "optimizer" not in settings:
                assert not METHODS[spec.method].train_defaults, (name, cell.entry.label)
                assert spec.train.optimizer == "adamw"
