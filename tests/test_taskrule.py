"""Rule v2: per-task differences, the paired t-test, Holm and TOST (checked against scipy by hand)."""

import math

import pytest
from scipy import stats

from sparseft.bench.taskrule import compare_family, holm, t_test, task_differences


def cells(per_task: dict[str, list[float]]) -> dict[tuple[str, int], float]:
    return {(t, s): v for t, values in per_task.items() for s, v in enumerate(values)}


def test_task_differences_average_seeds_first_and_name_what_is_missing():
    a = cells({"x": [80, 82, 84], "y": [50, 50, 50]})
    b = cells({"x": [79, 79, 79], "y": [51, 51]})
    diffs, missing = task_differences(a, b, seeds=[0, 1, 2])
    assert diffs == {"x": pytest.approx(3.0)} and missing == ["y/seed2"]


def test_t_test_matches_scipy_and_tost_uses_the_margin():
    d = {"a": 0.5, "b": 0.1, "c": 0.3, "d": -0.1}
    r = t_test(d, margin=1.0)
    res = stats.ttest_1samp(list(d.values()), 0.0, alternative="greater")
    assert r["t"] == pytest.approx(res.statistic) and r["p_better"] == pytest.approx(res.pvalue)
    lower = stats.ttest_1samp(list(d.values()), -1.0, alternative="greater").pvalue
    upper = stats.ttest_1samp(list(d.values()), 1.0, alternative="less").pvalue
    assert r["p_level"] == pytest.approx(max(lower, upper))
    assert t_test({"a": 1.0, "b": 2.0})["p_better"] is None  # fewer than 3 tasks
    assert t_test({"a": 1.0, "b": 1.0, "c": 1.0})["p_better"] is None  # no spread: no test


def test_holm_steps_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm([0.5]) == [0.5]


def test_a_family_gives_better_worse_level_and_inconclusive():
    tasks = [f"t{i}" for i in range(6)]
    rows = {
        "base": cells({t: [70.0, 70.0, 70.0] for t in tasks}),
        "up": cells({t: [75.0 + i * 0.1, 75.2, 74.9] for i, t in enumerate(tasks)}),
        "down": cells({t: [60.0 - i * 0.2, 60.0, 60.1] for i, t in enumerate(tasks)}),
        "same": cells({t: [70.0 + (0.1 if i % 2 else -0.1), 70.0, 70.0] for i, t in enumerate(tasks)}),
        "noisy": cells({t: [70.0 + (8 if i % 2 else -7), 70, 70] for i, t in enumerate(tasks)}),
    }
    fam = {f"{c['a']}": c for c in compare_family(rows, [("up", "base"), ("down", "base"), ("same", "base"),
                                                          ("noisy", "base"), ("up", "missing-row")])}
    assert [fam[k]["verdict"] for k in ("up", "down", "same", "noisy")] == ["better", "worse", "level", "inconclusive"]
    assert len(fam) == 4  # a pair with a row that does not exist is left out
    assert all(math.isclose(c["p_better_holm"], min(1, c["p_better"] * 4)) or c["p_better_holm"] >= c["p_better"]
               for c in fam.values())


def test_the_variant_choice_takes_the_two_best_complete_variants():
    from sparseft.bench.taskrule import choose_variants
    from sparseft.errors import InputError

    tasks, seeds = ["a", "b"], [0, 1, 2]
    rows = {"gps-col": cells({"a": [70, 71, 72], "b": [60, 60, 60]}),   # 65.5
            "rosa": cells({"a": [75, 75, 75], "b": [58, 58, 58]}),      # 66.5
            "spiel": cells({"a": [80, 80, 80], "b": [50, 50, 50]}),     # 65.0
            "gps-row": cells({"a": [99, 99], "b": [99, 99, 99]}),       # best, but seed 2 of task a is missing
            "gps": cells({"a": [90, 90, 90], "b": [90, 90, 90]})}       # not a variant
    assert choose_variants(rows, tasks, seeds) == [("rosa", 66.5), ("gps-col", 65.5)]
    with pytest.raises(InputError, match="gps-row: a/seed2"):
        choose_variants(rows, tasks, seeds, variants=["gps-row", "rosa"])


def _regime(gaps: dict[str, float], tasks=("t1", "t2", "t3", "t4", "t5"), seeds=3):
    """Rows whose per-(task, seed) accuracy is lora-qkv-r5's plus `gaps[label]` with a little spread by task."""
    base = {(t, s): 70.0 + i + 0.1 * s for i, t in enumerate(tasks) for s in range(seeds)}
    jitter = dict(zip(tasks, (-0.3, 0.2, -0.1, 0.3, -0.1)))  # mean 0: a row at gap 0 is level, not better
    return {label: {(t, s): v + gap + jitter[t] * (label != "lora-qkv-r5") for (t, s), v in base.items()}
            for label, gap in gaps.items()}


def test_confirmation_families_and_the_product_outcome():
    from sparseft.bench.taskrule import confirmation_families, product_outcome

    rows = {"lora-qkv-r5": 0.0, "gps": -1.5, "full": 0.2, "gps-col": 2.0, "rosa": 0.01}
    regimes = {"S56": _regime(rows), "L56": _regime({**rows, "gps-col": 0.03})}
    families = confirmation_families(regimes, ["gps-col", "rosa"], seeds=[0, 1, 2])
    primary = {(c["a"], c["b"]): c["verdict"] for c in families["primary"]}
    assert primary == {("gps-col@S56", "lora-qkv-r5@S56"): "better", ("gps-col@L56", "lora-qkv-r5@L56"): "level",
                       ("rosa@S56", "lora-qkv-r5@S56"): "level", ("rosa@L56", "lora-qkv-r5@L56"): "level"}
    assert len(families["secondary"]) == 2 * (2 + 2 + 2)
    assert product_outcome(families["primary"], ["gps-col", "rosa"])[0] == "gps-col"
    worse = confirmation_families({"S56": _regime(rows), "L56": _regime({**rows, "gps-col": -2.0})},
                                  ["gps-col", "rosa"], seeds=[0, 1, 2])
    best, why = product_outcome(worse["primary"], ["gps-col", "rosa"])
    assert best is None and "no sparse method here beat LoRA" in why
    partial = confirmation_families({"S56": _regime(rows)}, ["gps-col", "rosa"], seeds=[0, 1, 2])
    assert product_outcome(partial["primary"], ["gps-col", "rosa"]) == (None, "not decided yet: the primary family "
                                                                         "is incomplete")
