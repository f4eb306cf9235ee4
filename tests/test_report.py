"""The benchmark report on synthetic records: verdict rule, edge marks, incomplete rows, budget matching."""

import csv
import json
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseft.bench.report import (
    VERDICT_RULE,
    budget_matched,
    build_tables,
    claims,
    edge_marks,
    interpolate,
    pareto_frontier,
    verdict,
    write_report,
)

GRID = {"lr": [1e-3, 3e-3, 1e-2]}
ADAM = {"optimizer": "adam", "weight_decay": 0.0, "epochs": 3}
ADAMW = {"optimizer": "adamw", "weight_decay": 1e-4, "epochs": 3}


def rec(label, task, seed, acc, *, params=1000, lr=3e-3, grid=GRID, train=ADAMW, backbone="vit", **extra):
    r = {"suite": "s", "protocol": "honest", "backbone": backbone, "task": task, "data": f"d/{task}",
         "group": "natural", "label": label, "method": label.split("-")[0], "options": {}, "seed": seed,
         "chosen": {"lr": lr}, "tuning": [], "grid": grid, "train": train, "tuned_on_seed": 0,
         "test_acc": acc, "trainable_backbone": params, "backbone_percent": params / 1e4, "trainable_head": 10,
         "task_file_bytes": 2048, "train_time_s": 1.0, "run_time_s": 2.0, "diverged": None,
         "final_dir": f"{backbone}/{task}/{label}/seed{seed}/final"}
    return {k: v for k, v in {**r, **extra}.items() if v is not _DROP}  # _DROP: a key older records lack


_DROP = object()


def write(root, records, suite=None):
    for r in records:
        folder = root / r["final_dir"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "record.json").write_text(json.dumps(r))
    if suite is not None:
        (root / "suite.json").write_text(json.dumps(suite))
    return root


def row_of(tab, label):
    return next(r for r in tab["rows"] if r["label"] == label)


def table_line(text, label):
    return next(line for line in text.splitlines() if line.startswith(f"| {label}"))


# ---------------------------------------------------------------- verdict rule


def test_verdict_supported_not_supported_inconclusive():
    up = verdict([1.0, 2.0, 3.0])
    assert up["verdict"] == "supported" and up["n"] == 3 and up["mean"] == 2.0
    assert up["se"] == pytest.approx(1 / math.sqrt(3))
    assert verdict([-1.0, -2.0, -3.0])["verdict"] == "not supported"
    assert verdict([1.0, -1.0, 2.0, -2.0])["verdict"] == "inconclusive"
    assert verdict([0.5, 0.5, 0.5])["verdict"] == "supported"  # no spread, positive mean


def test_verdict_boundary_is_inconclusive():
    # d = [3, 3, 3, -1]: mean 2, sd 2, se 1, so mean == 2·se exactly
    at = verdict([3.0, 3.0, 3.0, -1.0])
    assert (at["mean"], at["se"]) == (2.0, 1.0) and at["verdict"] == "inconclusive"
    assert verdict([-3.0, -3.0, -3.0, 1.0])["verdict"] == "inconclusive"
    assert verdict([3.0, 3.0, 3.0, -0.9])["verdict"] == "supported"  # just past the boundary
    assert verdict([-3.0, -3.0, -3.0, 0.9])["verdict"] == "not supported"


def test_verdict_needs_three_pairs_and_two_seeds():
    two = verdict([5.0, 6.0])
    assert two["verdict"] == "inconclusive" and two["note"] == "too little data"
    assert verdict([5.0, 6.0, 7.0], n_seeds=1)["verdict"] == "inconclusive"
    assert verdict([5.0, 6.0, 7.0], n_seeds=2)["verdict"] == "supported"
    assert verdict([])["n"] == 0 and verdict([])["verdict"] == "inconclusive"


def test_claims_combine_comparisons_and_count_pairs():
    def row(label, accs):  # 2 tasks x 3 seeds
        return {"label": label, "cells": {(t, s): a for (t, s), a in zip([(t, s) for t in "ab" for s in range(3)],
                                                                           accs)}}
    ref = row("gps-ref", [80, 81, 79, 70, 71, 72])
    tab = {"tasks": ["a", "b"], "rows": [
        ref, row("gps", [0] * 6),  # REF is gps-ref when present
        row("gps-random", [70, 71, 69, 60, 61, 62]),  # 10 points below on every pair
        row("gps-random-net", [80, 82, 78, 72, 69, 72]),  # mixed: inconclusive
        row("gps-magnitude", [90, 91, 89, 80, 81, 82])]}  # 10 points above
    (gradient,) = [c for c in claims(tab) if c["claim"].startswith("gradient")]
    by_b = {c["b"]: c for c in gradient["comparisons"]}
    assert {c["a"] for c in gradient["comparisons"]} == {"gps-ref"}
    assert by_b["gps-random"]["verdict"] == "supported" and by_b["gps-random"]["n"] == 6
    assert by_b["gps-random"]["a_wins"] == 6 and by_b["gps-random"]["mean_diff"] == pytest.approx(10.0)
    assert by_b["gps-random-net"]["verdict"] == "inconclusive"
    assert by_b["gps-magnitude"]["verdict"] == "not supported"
    assert gradient["verdict"] == "not supported"
    del tab["rows"][-1]
    (gradient,) = [c for c in claims(tab) if c["claim"].startswith("gradient")]
    assert gradient["verdict"] == "inconclusive"  # one supported + one inconclusive
    assert gradient["missing"] == ["gps-ref vs gps-magnitude"]
    del tab["rows"][-1]  # only the supported comparison is left: a claim's missing part cannot count as won
    (gradient,) = [c for c in claims(tab) if c["claim"].startswith("gradient")]
    assert [c["verdict"] for c in gradient["comparisons"]] == ["supported"]
    assert gradient["verdict"] == "inconclusive" and len(gradient["missing"]) == 2


# ---------------------------------------------------------------- edge marks


@pytest.mark.parametrize(("lr", "mark"), [(1e-3, {"lr": "lo"}), (1e-2, {"lr": "hi"}), (3e-3, {})])
def test_edge_marks_lowest_highest_interior(lr, mark):
    assert edge_marks(rec("gps", "a", 0, 0.5, lr=lr)) == mark


def test_one_point_grid_is_never_on_an_edge():
    assert edge_marks(rec("linear", "a", 0, 0.5, lr=1e-3, grid={"lr": [1e-3]})) == {}
    assert edge_marks(rec("linear", "a", 0, 0.5, lr=1e-3, grid={})) == {}


def test_edge_marks_from_tuning_points_when_grid_is_missing():
    tuning = [{"point": {"lr": v}, "val_acc": 0.5} for v in (1e-3, 3e-3, 1e-2)]
    assert edge_marks(rec("gps", "a", 0, 0.5, lr=1e-2, grid=_DROP, tuning=tuning)) == {"lr": "hi"}
    assert edge_marks(rec("gps", "a", 1, 0.5, lr=1e-2, grid=_DROP)) == {}  # no grid, no tuning: unknown


def test_edge_cells_and_column(tmp_path):
    records = [rec("gps", t, s, 0.5, lr=lr) for t, lr in (("a", 1e-2), ("b", 3e-3)) for s in (0, 1)]
    records += [rec("full", t, s, 0.5, lr=lr if s == 0 else 3e-3) for t, lr in (("a", 1e-3), ("b", 1e-3))
                for s in (0, 1)]  # only seed 0 on the edge: still marked
    text = write_report(write(tmp_path, records)).read_text()
    gps, full = table_line(text, "gps"), table_line(text, "full")
    assert "50.0 ±0.0↑" in gps and "| 1/2 |" in gps
    assert gps.count("↑") == 1 and "↓" not in gps
    assert full.count("↓") == 2 and "| 2/2 |" in full
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["edge"] for r in rows if r["label"] == "gps"} == {"lr:hi", ""}


# ---------------------------------------------------------------- incomplete rows, means over seeds


ACC = {("a", 0): 0.80, ("a", 1): 0.84, ("a", 2): 0.78, ("b", 0): 0.60, ("b", 1): 0.70, ("b", 2): 0.62}


def test_incomplete_rows_are_flagged_and_get_no_mean(tmp_path):
    records = [rec("gps", t, s, a) for (t, s), a in ACC.items()]
    records += [rec("full", t, s, a) for (t, s), a in ACC.items() if (t, s) != ("b", 2)]
    records += [rec("lora", t, s, None if (t, s) == ("a", 1) else a) for (t, s), a in ACC.items()]
    records += [rec("ssf", t, s, a, diverged="nan loss" if (t, s) == ("a", 0) else None) for (t, s), a in ACC.items()]
    text = write_report(write(tmp_path, records, {"name": "s", "seeds": [0, 1, 2]})).read_text()
    per_seed = [100 * (ACC[("a", s)] + ACC[("b", s)]) / 2 for s in range(3)]  # 70, 77, 70
    mean, std = statistics.mean(per_seed), statistics.stdev(per_seed)
    assert (round(mean, 1), round(std, 1)) == (72.3, 4.0)
    gps = table_line(text, "gps |")
    assert f"| {mean:.1f} ±{std:.1f} |" in gps
    assert "| 80.7 ±3.1 |" in gps  # task a over seeds: mean 80.67, sd 3.06
    for label, n in (("full", 5), ("lora", 5), ("ssf", 5)):
        line = table_line(text, f"{label} (incomplete {n}/6)")
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[-5:-3] == ["–", "–"]  # mean (tasks), mean (groups)
        assert cells[-6] == "–"  # natural mean
    full = [c.strip() for c in table_line(text, "full").split("|")[1:-1]]
    assert full[5] == "65.0 ±7.1 (n=2)"  # task b: what exists is still shown
    tab = build_tables([rec("gps", t, s, a) for (t, s), a in ACC.items()], seeds=[0, 1, 2])["vit"]
    row = row_of(tab, "gps")
    assert row["complete"] and row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std)
    assert row["per_task"]["b"] == pytest.approx(64.0)


def test_expected_seeds_come_from_suite_json_else_from_the_records(tmp_path):
    records = [rec("gps", t, s, a) for (t, s), a in ACC.items() if s < 2]
    assert row_of(build_tables(records)["vit"], "gps")["complete"]
    assert not row_of(build_tables(records, seeds=[0, 1, 2])["vit"], "gps")["complete"]
    text = write_report(write(tmp_path, records, {"name": "s", "seeds": [0, 1, 2]})).read_text()
    assert "gps (incomplete 4/6)" in text
    assert "Tuning: every seed tuned its own grid." in text  # a suite.json from before `tuning`
    (tmp_path / "suite.json").unlink()
    text = write_report(tmp_path).read_text()
    assert "| gps |" in text and "Seeds: [0, 1] (no suite.json" in text


def test_claims_use_only_pairs_both_rows_finished():
    records = [rec("gps", t, s, a + 0.05) for (t, s), a in ACC.items()]
    records += [rec("full", t, s, a) for (t, s), a in ACC.items() if (t, s) != ("b", 2)]
    (claim,) = [c for c in claims(build_tables(records, seeds=[0, 1, 2])["vit"]) if c["claim"].startswith("GPS ≥")]
    (cmp,) = claim["comparisons"]
    assert cmp["n"] == 5 and cmp["a_wins"] == 5 and cmp["mean_diff"] == pytest.approx(5.0)
    # the missing run would be left out of the pairs: an incomplete row makes the comparison inconclusive
    assert claim["verdict"] == "inconclusive" and "full incomplete" in cmp["note"]
    assert cmp["tasks"] == 2 and cmp["tasks_won"] == 2
    complete = [r for r in records if r["label"] == "gps"] + [rec("full", t, s, a) for (t, s), a in ACC.items()]
    (claim,) = [c for c in claims(build_tables(complete, seeds=[0, 1, 2])["vit"]) if c["claim"].startswith("GPS ≥")]
    assert claim["verdict"] == "supported"


def test_expected_cells_follow_the_suite_not_the_records():
    records = [rec("gps", t, s, a) for (t, s), a in ACC.items()] + [rec("gps", "a", 7, 10.0)]  # seed 7: not planned
    tab = build_tables(records, seeds=[0, 1, 2])["vit"]
    (row,) = tab["rows"]
    assert row["complete"] and ("a", 7) not in row["cells"]
    planned = {"natural": ["mini-vtab/a", "mini-vtab/b", "mini-vtab/c"]}  # task c never ran
    (row,) = build_tables(records, seeds=[0, 1, 2], tasks=planned)["vit"]["rows"]
    assert not row["complete"] and row["mean"] is None and "incomplete 6/9" in row["display"]


def test_paper_protocol_and_untuned_cells_get_no_edge_marks():
    paper = {"grid": {"lr": [1e-3, 1e-2]}, "chosen": {"lr": 1e-3}, "tuning": [], "tuned_on_seed": None}
    assert edge_marks(paper) == {}
    reused = {**paper, "tuned_on_seed": 0}  # a later seed reusing seed 0's choice
    assert edge_marks(reused) == {"lr": "lo"}


def test_equal_budgets_in_a_family_are_averaged():
    assert interpolate([10, 10, 100], [60.0, 50.0, 70.0], 10) == pytest.approx(55.0)
    assert interpolate([10, 10, 100], [60.0, 50.0, 70.0], 10 ** 1.5) == pytest.approx(62.5)


# ---------------------------------------------------------------- budget matching, Pareto


def test_interpolation_is_linear_in_log_params():
    assert interpolate([100, 1000], [50.0, 70.0], 10 ** 2.5) == pytest.approx(60.0)
    assert interpolate([10000, 100, 1000], [60.0, 50.0, 70.0], 10 ** 3.5) == pytest.approx(65.0)  # unsorted input
    assert interpolate([100, 1000], [50.0, 70.0], 1000) == pytest.approx(70.0)
    assert interpolate([100, 1000], [50.0, 70.0], 99) is None
    assert interpolate([100, 1000], [50.0, 70.0], 1001) is None
    assert interpolate([100, 1000], [50.0, 70.0], None) is None
    assert interpolate([100], [50.0], 100) == 50.0 and interpolate([100], [50.0], 101) is None  # one point


@given(st.floats(1, 1e6), st.floats(1.01, 1e3), st.floats(0, 100), st.floats(0, 100), st.floats(0, 1), st.floats(0, 1))
def test_interpolation_is_monotone_between_two_points(x0, ratio, y0, y1, u, v):
    x1 = x0 * ratio
    lo, hi = sorted((u, v))
    a, b = (interpolate([x0, x1], [y0, y1], x0 * ratio ** w) for w in (lo, hi))
    assert min(y0, y1) - 1e-9 <= a <= max(y0, y1) + 1e-9
    assert (b - a) * (y1 - y0) >= -1e-9  # moves towards y1


def budget_records(gps_offset):
    records = []
    for (t, s), a in ACC.items():
        records += [rec(f"lora-qkv-r{r}", t, s, a + 0.02 * r, params=1000 * r) for r in (1, 2, 4)]
        records += [rec("gps-k2", t, s, a + gps_offset, params=2500, train=ADAM)]
        records += [rec("gps", t, s, a + gps_offset, params=50000, train=ADAM)]  # beyond lora's range
    return records


def test_budget_matched_gps_above_the_curve_is_supported():
    tab = build_tables(budget_records(0.10), seeds=[0, 1, 2])["vit"]
    assert tab["families"] == {"lora-qkv": ["lora-qkv-r1", "lora-qkv-r2", "lora-qkv-r4"], "gps": ["gps-k2"]}
    by_gps = {m["gps"]: m for m in budget_matched(tab)}
    assert set(by_gps) == {"gps", "gps-k2"}  # lora-qkv is the only other family
    k2 = by_gps["gps-k2"]
    # at 2500 params: between r2 (+4) and r4 (+8) at log fraction log(1.25)/log(2)
    expected = 10 - (4 + 4 * math.log10(1.25) / math.log10(2))
    assert k2["n"] == 6 and k2["mean"] == pytest.approx(expected) and k2["verdict"] == "supported"
    assert by_gps["gps"]["n"] == 0 and by_gps["gps"]["verdict"] == "inconclusive"  # no extrapolation
    below = {m["gps"]: m for m in budget_matched(build_tables(budget_records(0.0), seeds=[0, 1, 2])["vit"])}
    assert below["gps-k2"]["verdict"] == "not supported"


def test_pareto_frontier_small_case():
    points = {"a": (10, 50.0), "b": (100, 60.0), "c": (100, 55.0), "d": (1000, 58.0), "e": (5, 50.0),
              "f": (2000, 61.0)}
    assert pareto_frontier(points) == ["e", "b", "f"]
    assert pareto_frontier({"x": (1, 1.0), "y": (1, 1.0)}) == ["x", "y"]  # equal points dominate neither


# ---------------------------------------------------------------- the whole report


def test_write_report_on_a_small_folder(tmp_path):
    rows = {"gps": (0.08, 92928, ADAM), "full": (0.0, 21e6, ADAMW), "gps-k2": (0.06, 185856, ADAM),
            "lora-qkv-r1": (0.01, 18432, ADAMW), "lora-qkv-r2": (0.03, 36864, ADAMW)}
    records = [rec(label, t, s, a + off, params=p, train=train, lr=1e-2 if label == "full" else 3e-3)
               for label, (off, p, train) in rows.items() for (t, s), a in ACC.items()]
    for r in records:  # an older record: no "train", settings in the final run's config.json
        if r["label"] == "lora-qkv-r1":
            del r["train"]
    write(tmp_path, records, {"name": "tiny", "protocol": "honest", "seeds": [0, 1, 2], "tuning": "first_seed",
                              "batchnorm": "frozen", "train": {"epochs": 3}, "grid": GRID})
    for r in records:
        if r["label"] == "lora-qkv-r1":
            (tmp_path / r["final_dir"] / "config.json").write_text(json.dumps({"train": ADAMW, "world_size": 1}))
    text = write_report(tmp_path).read_text()
    assert VERDICT_RULE in text and text.index(VERDICT_RULE) < text.index("| method |")
    assert "Tuning: the grid ran with seed 0 only; every seed retrains that choice." in text
    assert "BatchNorm statistics: frozen for every method" in text and "Seeds: [0, 1, 2]" in text
    head = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert "| setting |" in head and "| edge |" in head and "| mean (groups) |" in head
    assert "| adam wd0 |" in table_line(text, "gps |") and "| adamw wd1e-4 |" in table_line(text, "lora-qkv-r1")
    assert "| 2/2 |" in table_line(text, "full") and "| 0/2 |" in table_line(text, "gps |")
    assert "GPS ≥ full fine-tuning (low-data tasks)**: supported" in text
    assert ("n = 6 pairs, gps better on 6/6 pairs and on 2/2 tasks' means → **supported** "
            "(per task: a +8.00, b +8.00)") in text
    assert "### Budget-matched comparisons" in text
    assert "- gps (92,928 params) vs lora-qkv at the same budget: outside its range" in text
    assert "Pareto frontier" in text
    assert (tmp_path / "acc_vs_params.png").stat().st_size > 1000
    csv_rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(csv_rows) == 30
    full = next(r for r in csv_rows if r["label"] == "full")
    assert (full["optimizer"], full["weight_decay"], full["edge"]) == ("adamw", "0.0001", "lr:hi")
    assert json.loads(full["grid"]) == GRID


def test_levels_figure_uses_the_fixed_setting_reference(tmp_path, monkeypatch):
    from sparseft.bench import figures

    titles = []
    monkeypatch.setattr(figures, "selection_distribution", lambda f: {"0": {"qkv": 3}})
    monkeypatch.setattr(figures, "_plot_distribution", lambda ax, dist, title: titles.append(title))
    labels = ["gps", "gps-ref", "gps-net"]
    records = [rec(label, t, s, a) for label in labels for (t, s), a in ACC.items()]
    write(tmp_path, records)
    for r in records:
        (tmp_path / r["final_dir"] / "selection.safetensors").write_bytes(b"")
    written = figures.write_figures(records, build_tables(records), tmp_path)
    assert "gps_levels.png" in written
    assert titles[-2:] == ["gps-ref (vit)", "gps-net (vit)"]  # not the tuned gps
    titles.clear()
    records = [r for r in records if r["label"] != "gps-ref"]
    figures.write_figures(records, build_tables(records), tmp_path)
    assert titles[-2:] == ["gps (vit)", "gps-net (vit)"]


def test_learning_rate_curves_come_from_the_tuning_runs(tmp_path):
    from sparseft.bench.figures import lr_curves, write_figures

    def tuning(*pairs):
        return [{"point": {"lr": lr}, "val_acc": acc} for lr, acc in pairs]

    records = [rec("gps", "a", 1, 0.5, tuning=tuning((1e-3, 0.4), (3e-3, 0.6))),  # a later seed: ignored
               rec("gps", "a", 0, 0.5, tuning=tuning((3e-3, 0.5), (1e-3, 0.3), (1e-2, None))),
               rec("full", "a", 0, 0.5, tuning=tuning((1e-4, 0.7))),  # one point: no curve
               rec("gps", "b", 0, 0.5, tuning=[{"point": {"lr": 1e-3, "k": 1}, "val_acc": 0.2},
                                               {"point": {"lr": 3e-3, "k": 1}, "val_acc": 0.3}])]  # not an lr grid
    assert lr_curves(records) == {("vit", "a"): {"gps": [(1e-3, 30.0), (3e-3, 50.0)]}}
    write(tmp_path, records)
    assert "lr_sensitivity.png" in write_figures(records, build_tables(records), tmp_path)
    assert (tmp_path / "lr_sensitivity.png").stat().st_size > 1000
