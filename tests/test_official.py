"""The official settings: tables against the values parsed from the official scripts, the paper suites
generated from them, and every run of those suites against the parsed values."""

import copy
import json
import re
from pathlib import Path

import pytest

from sparseft.bench import check_suite, load_suite
from sparseft.bench.cells import plan, run_spec
from sparseft.bench.official import TABLES, compare
from sparseft.bench.official.published import PUBLISHED, mean_tolerance, recomputed_means
from sparseft.bench.official.suites import SUITES, TARGETS, paper_labels, render, suite_path
from sparseft.bench.suite import task_name

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_row_equals_the_parsed_official_values(name):
    assert compare(TABLES[name], fixture(name)) == []
    assert len(TABLES[name].rows) == len(fixture(name)["rows"])


@pytest.mark.parametrize("name,task,key,value", [
    ("gps-vtab", "dtd", "lr", 0.02), ("gps-vtab", "patch_camelyon", "k", 1), ("gps-fgvc", "nabirds", "ema_decay", 0.99),
    ("gps-fgvc", "CUB_200_2011", "mixup", 0.0), ("spt-vtab", "dtd", "batch_size", 32),
    ("sct-vtab", "svhn", "weight_decay", 0.3)])
def test_a_changed_official_value_fails(name, task, key, value):
    changed = copy.deepcopy(fixture(name))
    row = next(r for r in changed["rows"] if r["task"] == task)
    assert row["values"][key] != value
    row["values"][key] = value
    problems = compare(TABLES[name], changed)
    assert len(problems) == 1 and task in problems[0] and key in problems[0]


def test_a_missing_or_unparsed_row_fails():
    fewer = copy.deepcopy(fixture("gps-vtab"))
    fewer["rows"] = fewer["rows"][1:]
    assert any("no parsed official values" in p for p in compare(TABLES["gps-vtab"], fewer))
    other = copy.deepcopy(fixture("gps-fgvc"))
    other["commit"] = "0" * 40
    assert any("commit" in p for p in compare(TABLES["gps-fgvc"], other))


@pytest.mark.parametrize("name", sorted(SUITES))
def test_committed_paper_suites_are_the_generated_ones(name):
    assert suite_path(name).read_text() == render(name), (
        f"{suite_path(name)} differs from its table: run `python -m sparseft.bench.official.suites`")


def _runs(name, monkeypatch):
    monkeypatch.setenv("VTAB_ROOT", "/vtab")
    monkeypatch.setenv("FGVC_ROOT", "/fgvc")
    suite = load_suite(name)
    check_suite(suite, files=False)
    return [(cell, run_spec(suite, cell, cell.entry.paper_point(suite.grid), "paper", False)) for cell in plan(suite)]


# the official values each run of a paper suite must carry: fixture key -> (where in the RunSpec, mapping)
TRAIN = {"lr": "lr", "optimizer": "optimizer", "weight_decay": "weight_decay", "epochs": "epochs",
         "warmup_epochs": "warmup_epochs", "warmup_lr": "warmup_lr", "min_lr": "min_lr", "drop_path": "drop_path",
         "ema_decay": "ema_decay", "mixup": "mixup", "cutmix": "cutmix", "smoothing": "label_smoothing",
         "drop_last": "drop_last", "amp": "bf16"}


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_paper_suite_run_carries_the_official_values(name, monkeypatch):
    table = TABLES[SUITES[name]]
    parsed = fixture(table.name)
    runs = [(c, s) for c, s in _runs(name, monkeypatch) if c.entry.label in paper_labels(name)]
    checked = 0
    for row in parsed["rows"]:
        mine = [(c, s) for c, s in runs if task_name(c.task) == row["task"]
                and (not row.get("method") or s.method == row["method"])]
        assert mine, f"{name}: no run for {row['task']}"
        for _cell, spec in mine:
            v = row["values"]
            for key, attr in TRAIN.items():
                if key in v:
                    assert getattr(spec.train, attr) == v[key], (name, row["task"], key)
            assert spec.batch_size == v["batch_size"]
            assert spec.preprocessing == ("fgvc" if v["augmentation"] == "simple-aug" else "vtab")
            assert spec.pretrained and spec.model == table.backbone
            if "k" in v:
                assert spec.options["k"] == v["k"] and spec.options["view_scale"] == v["selection_crop_scale"][0]
            if "channels" in v:
                assert spec.options["channels"] == v["channels"]
            if "budgets" in v:
                assert spec.options["budget"] in v["budgets"] and spec.options["rank"] == v["rank"]
            checked += 1
    assert checked >= len(parsed["rows"])


def test_gps_suites_keep_their_baselines_and_targets_name_their_rows():
    assert [m for m in paper_labels("vtab-1k-paper")] == ["gps"]
    assert len(paper_labels("spt-vtab-paper")) == 10
    assert set(TARGETS.values()) == set(SUITES)
    labels = [m.label for m in load_suite("fgvc-paper").methods]
    assert labels == ["full", "linear", "lora", "gps"]


def _methods(name):
    return {r.method or TABLES[name].paper for r in TABLES[name].rows}


def test_published_numbers_name_their_source():
    for name, published in PUBLISHED.items():
        assert name in TABLES and published.source
        assert set(published.per_task) <= set(TABLES[name].tasks())  # every task name is the official table's
        assert (published.mean is None and not published.method_means) or published.mean_source
        assert published.mean_of in ("", "tasks", "groups")
        for method, numbers in published.per_method.items():
            assert method in _methods(name)
            assert set(numbers) <= set(TABLES[name].tasks())
        assert set(published.method_means) <= _methods(name)
        if published.per_task or published.per_method:  # a recorded number names the table it was read from
            assert re.search(r"\btable\b", published.source, re.IGNORECASE), name
            assert "row" in published.source, name
        if "secondary" not in published.source:  # a number not from the paper itself says so
            assert not published.per_task and not published.per_method, name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_means_agree_with_the_published_per_task_numbers(name):
    """A recorded mean is recomputed from the per-task numbers recorded with it, as the average it says it is.

    Rule (`mean_tolerance`): the per-task numbers are printed to 0.1, so any mean of them (over the tasks, or of
    VTAB's three group means) is within 0.05 of the mean of the unrounded numbers, and the printed mean is within
    half a unit of its last digit of that; a larger gap means a number was misread (or the wrong average named).
    """
    published = PUBLISHED[name]
    tasks = TABLES[name].tasks()
    methods = list(published.per_method) or ([""] if published.per_task else [])
    for method in methods:
        mean = published.mean_for(method)
        numbers = published.numbers(method)
        if mean is None or len(numbers) < len(tasks):
            continue
        assert published.mean_of in ("tasks", "groups"), f"{name}: which average {mean} is must be recorded"
        again = recomputed_means(numbers, tasks)[published.mean_of]
        assert again is not None, name
        assert abs(again - mean) <= mean_tolerance(mean), (name, method, again, mean)
        other = recomputed_means(numbers, tasks)["groups" if published.mean_of == "tasks" else "tasks"]
        assert other is None or abs(other - mean) > mean_tolerance(mean)  # the numbers tell which average it is


def test_mean_tolerance_follows_the_printed_digits():
    assert mean_tolerance(91.78) == pytest.approx(0.055)
    assert mean_tolerance(76.4) == pytest.approx(0.1)
    numbers = {t: 50.0 for t in TABLES["gps-vtab"].tasks()} | {"cifar": 69.0}
    means = recomputed_means(numbers, TABLES["gps-vtab"].tasks())
    assert means["tasks"] == pytest.approx(51.0) and means["groups"] == pytest.approx(50.0 + 19 / 7 / 3)
    assert recomputed_means({"dtd": 1.0}, TABLES["gps-vtab"].tasks()) == {"tasks": None, "groups": None}
    fgvc = recomputed_means({t: 90.0 for t in TABLES["gps-fgvc"].tasks()}, TABLES["gps-fgvc"].tasks())
    assert fgvc == {"tasks": pytest.approx(90.0), "groups": None}


@pytest.mark.parametrize("name, task, misread", [("gps-vtab", "dsprites_ori", 58.4), ("gps-vtab", "dtd", 57.8),
                                                  ("gps-fgvc", "nabirds", 87.6), ("sct-vtab", "sun397", 50.0)])
def test_a_misread_number_fails_the_mean_check(name, task, misread):
    """What the mean check catches: one number misread by more than about 2 points among VTAB's 19 tasks (0.105 x
    19), or 0.3 among FGVC's 5. It cannot catch two numbers swapped between columns (the mean is unchanged)."""
    published = PUBLISHED[name]
    wrong = published.per_task | {task: misread}
    again = recomputed_means(wrong, TABLES[name].tasks())[published.mean_of]
    assert abs(again - published.mean) > mean_tolerance(published.mean)
