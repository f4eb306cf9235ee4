"""`sparseft reproduce`: the data and weights checks, the dry run's plan, and one tiny task end to end."""

import csv
import dataclasses

import pytest
from helpers import make_fgvc, make_vtab

from sparseft.bench import reproduce as reproduction
from sparseft.bench.official import TABLES
from sparseft.cli import main
from sparseft.data import DataError
from sparseft.errors import InputError


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    """Every VTAB-1k task of the GPS table as a tiny folder in the NOAH layout."""
    root = tmp_path_factory.mktemp("vtab-1k")
    for task in TABLES["gps-vtab"].tasks():
        make_vtab(root / task, n_train=8, n_val=4, n_test=4, classes=2)
    return root


def test_dry_run_prints_the_per_task_plan_and_writes_nothing(vtab_root, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["reproduce", "gps-vtab", "--data", str(vtab_root), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PAPER PROTOCOL" in text and "weights:" in text and "vit_base_patch16_224.augreg_in21k" in text
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("paper | ")}
    assert set(lines) == set(TABLES["gps-vtab"].tasks())  # one line per task
    assert "lr 0.002; batch 16; adam wd 0" in lines["dtd"] and "k 2" in lines["patch_camelyon"]
    assert "drop-path 0.2" in lines["smallnorb_ele"] and "drop-last; bf16" in lines["dtd"]
    assert " | 100 | 1 | 12 / 4 | 100 | " in lines["dtd"]  # epochs, runs, train/test images, evaluations
    assert "total: 19 training run(s), about" in text and "ESTIMATE, not a measurement" in text
    assert "ASSUMED" in text
    assert not out.exists()


def test_dry_run_of_fgvc_shows_ema_and_mixup(tmp_path, capsys):
    root = tmp_path / "fgvc"
    for task in TABLES["gps-fgvc"].tasks():
        make_fgvc(root / task, image_dir="images")
    assert main(["reproduce", "gps-fgvc", "--data", str(root), "--dry-run", "--protocol", "both",
                 "--tasks", "CUB_200_2011", "OxfordFlower"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith(("paper | ", "honest | "))]
    assert len(rows) == 4 and "HONEST" in text
    cub = next(r for r in rows if r.startswith("paper | CUB_200_2011"))
    assert "EMA 0.9998" in cub and "mixup 0.8 / cutmix 1" in cub and "smoothing 0.1" in cub and "k 2" in cub
    assert " | 9 / 3 | 100 | " in cub  # train + val -> test
    assert "EMA 0.99;" in next(r for r in rows if r.startswith("paper | OxfordFlower"))
    assert next(r for r in rows if r.startswith("honest | CUB")).split(" | ")[6] == "1"  # evaluated once


def test_missing_tasks_and_files_are_one_line_naming_each(vtab_root, tmp_path, capsys):
    root = tmp_path / "vtab"
    for task in TABLES["gps-vtab"].tasks():
        if task != "cifar":
            make_vtab(root / task, n_train=2, n_val=1, n_test=1, classes=2)
    (root / "dtd" / "test.txt").unlink()
    (root / "kitti" / "val200.txt").unlink()
    assert main(["reproduce", "gps-vtab", "--data", str(root), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cifar/ (no folder)" in err and "dtd/ (missing test.txt)" in err and "kitti/ (missing val200.txt)" in err
    assert "NOAH" in err and "docs/data.md" in err
    with pytest.raises(DataError, match="not a folder"):
        reproduction.prepare("gps-vtab", tmp_path / "nowhere")
    with pytest.raises(InputError, match="not a task of gps-vtab"):
        reproduction.prepare("gps-vtab", vtab_root, tasks=["imagenet"])


def test_missing_weights_name_the_tag_and_the_official_file(vtab_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduction, "_cached_pretrained", lambda tag: None)
    assert main(["reproduce", "gps-vtab", "--data", str(vtab_root), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "vit_base_patch16_224.augreg_in21k" in err and "B_16-i21k-300ep" in err and "--weights" in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(InputError, match="no such file"):
        reproduction.prepare("gps-vtab", vtab_root, weights=str(tmp_path / "missing.safetensors"))
    weights = tmp_path / "vit.safetensors"
    weights.write_bytes(b"x")
    rep = reproduction.prepare("gps-vtab", vtab_root, weights=str(weights), tasks=["dtd"])
    backbone = rep.suites["paper"].backbones[0]
    assert backbone.weights == str(weights.resolve()) and not backbone.pretrained
    monkeypatch.setattr(reproduction, "_cached_pretrained", lambda tag: "/cache/model.safetensors")
    assert "cached at /cache/model.safetensors" in reproduction.prepare("gps-vtab", vtab_root).weights_note


def test_one_tiny_task_end_to_end_writes_the_report_with_the_papers_column(vtab_root, tmp_path):
    rep = reproduction.prepare("gps-vtab", vtab_root, tasks=["dtd"], protocol="both", model="test_vit", img_size=32,
                               train={"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "bf16": False})
    spec_train = rep.suites["paper"].methods[0]
    assert spec_train.options["k"] == 1 and spec_train.train["lr"] == 0.002  # the official dtd settings stay
    rep.published = dataclasses.replace(rep.published, per_task={"dtd": 50.0})  # a number to compare with
    md = reproduction.reproduce(rep, tmp_path / "out", progress=False)
    text = md.read_text()
    assert "PAPER PROTOCOL" in text and "HONEST" in text and "Not the paper's backbone" in text
    assert "| group | task | method | paper (published) | ours, paper (best over epochs) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| natural | dtd | gps |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, diff = float(cells[4]), float(cells[5])
    assert cells[3] == "50.00" and diff == pytest.approx(ours - 50.0, abs=0.01)
    assert all((tmp_path / "out" / p / "report.md").is_file() for p in ("paper", "honest"))
    with open(tmp_path / "out" / "reproduce.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["task"] == "dtd" and float(rows[0]["paper"]) == 50.0 and rows[0]["ours_honest"] != ""
    rep.published = dataclasses.replace(rep.published, per_task={})
    text = reproduction.write_reproduce_report(rep, tmp_path / "out").read_text()
    assert "| natural | dtd | gps | not recorded |" in text  # never an invented number
    assert "not compared (a subset of the tasks ran)" in text


@pytest.mark.parametrize("target, against", [("gps-vtab", "tasks"), ("gps-fgvc", "tasks"), ("sct-vtab", "tasks"),
                                             ("spt-vtab", "groups")])
def test_the_papers_mean_is_compared_as_the_average_it_is(vtab_root, tmp_path, monkeypatch, target, against):
    """Each paper's mean is differenced against our average of the same kind: over the tasks (GPS, SCT; FGVC has no
    groups) or of VTAB's three group means (SPT, one mean per variant)."""
    root = vtab_root
    if target == "gps-fgvc":
        root = tmp_path / "fgvc"
        for task in TABLES[target].tasks():
            make_fgvc(root / task)
    rep = reproduction.prepare(target, root, model="test_vit", img_size=32)
    methods = list(dict.fromkeys(m.method for s in rep.suites.values() for m in s.methods))
    scores = {(task, m): (80.0 + i, m) for i, task in enumerate(rep.tasks) for m in methods}
    monkeypatch.setattr(reproduction, "_scores", lambda folder: scores)
    text = reproduction.write_reproduce_report(rep, tmp_path / "out").read_text()
    by_group = {}
    for i, task in enumerate(rep.tasks):
        by_group.setdefault(rep.groups[task], []).append(80.0 + i)
    ours = {"tasks": sum(80.0 + i for i in range(len(rep.tasks))) / len(rep.tasks),
            "groups": sum(sum(v) / len(v) for v in by_group.values()) / len(by_group)}
    for method in methods:
        paper = rep.published.mean_for(method)
        line = next(line for line in text.splitlines() if line.startswith(f"- {method}, paper:"))
        assert f"mean over tasks {ours['tasks']:.2f}" in line and f"the paper's mean {paper:.2f}" in line
        label = "mean over tasks" if against == "tasks" else "mean of the group means"
        assert f"difference {ours[against] - paper:+.2f} (against our {label})" in line
    for task in rep.tasks:  # the published per-task numbers are in the paper's column
        paper = rep.published.number(methods[0], task)
        row = next(line for line in text.splitlines() if f"| {task} | {methods[0]} |" in line)
        assert (f"| {paper:.2f} |" if paper is not None else "| not recorded |") in row
    assert all(f"- Published numbers, note: {note}." in text for note in rep.published.notes)


@pytest.mark.parametrize("target, rows", [("spt-vtab", 10), ("sct-vtab", 1)])
def test_spt_and_sct_dry_runs_list_their_rows(vtab_root, capsys, target, rows):
    assert main(["reproduce", target, "--data", str(vtab_root), "--dry-run", "--tasks", "dtd"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("paper | dtd | ")]
    assert len(lines) == rows and "vit_base_patch16_224.orig_in21k" in text
    assert ("budget 200000" in text) if target == "spt-vtab" else ("channels 96" in text and "wd 0.04" in text)
