"""Recommended learning rates per method and backbone family, and the ladder `--lr auto` searches.

The rates are not guesses: `benchmarks/recommended_lr.py` derives them from the learning rates
the honest benchmark suites chose on validation splits (docs/results-figures/*/results.csv, the
suites named in `EVIDENCE`), by a rule fixed before the values were read: per (method, family),
the median of log10 of every first-seed choice of the method's default row, snapped to the
1-3-10 ladder (a tie between two rungs: the lower). `tests/test_autolr.py` recomputes the table
from the committed results, so it cannot drift from its evidence. A method with no evidence on
a family takes the transformer value; docs/learning-rates.md marks those cells.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from torch import nn

FAMILIES = ("transformer", "cnn")

#: suites whose choices the table is derived from, and the backbone family of each backbone in them
EVIDENCE = {
    "mini-vtab-cpu": {"dinov2_vits14_offline": "transformer", "mobilenetv2_100_offline": "cnn"},
    "mini-vtab-long": {"dinov2_vits14_offline": "transformer"},
    "frontier-dev": {"dinov2_vits14_offline": "transformer"},
}

#: method -> family -> peak learning rate (the schedule is every run's: cosine with linear warm-up)
RECOMMENDED_LR: dict[str, dict[str, float]] = {
    "adapter": {"transformer": 0.003},
    "bitfit": {"transformer": 0.003},
    "full": {"transformer": 3e-05, "cnn": 0.001},
    "gps": {"transformer": 0.003, "cnn": 0.01},
    "linear": {"transformer": 0.03, "cnn": 0.01},
    "lora": {"transformer": 0.001, "cnn": 0.003},
    "rosa": {"transformer": 0.001},
    "sct": {"transformer": 0.003},
    "spiel": {"transformer": 0.003},
    "spt-adapter": {"transformer": 0.003},
    "spt-lora": {"transformer": 0.003},
    "ssf": {"transformer": 0.003},
    "vpt-deep": {"transformer": 0.003},
    "vpt-shallow": {"transformer": 0.01},
}

#: the rate a method without any evidence gets (no built-in method is in this case; a plug-in may be)
FALLBACK_LR = 1e-3


def backbone_family(model: nn.Module) -> str:
    """'cnn' for BatchNorm networks (ResNet, MobileNet, EfficientNet), else 'transformer' (ViT, Swin, ConvNeXt).

    The split follows what the rates depend on: BatchNorm nets train well at rates about ten
    times those of LayerNorm nets in full fine-tuning.
    """
    return "cnn" if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else "transformer"


def recommended_lr(method: str, family: str) -> tuple[float, str]:
    """The recommended peak learning rate of `method` on a `family` backbone, and where it comes from."""
    rates = RECOMMENDED_LR.get(method, {})
    if family in rates:
        return rates[family], f"recommended for {method} on {family} backbones (docs/learning-rates.md)"
    if "transformer" in rates:
        return rates["transformer"], (f"recommended for {method} on transformer backbones; no {family} evidence "
                                      "(docs/learning-rates.md)")
    return FALLBACK_LR, f"no recommended rate for {method}: sparseft's fallback {FALLBACK_LR:g}"


def snap(lr: float) -> float:
    """The rung of the 1-3-10 ladder nearest to `lr` in log scale (a tie: the lower rung)."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive number, not {lr!r}")
    decade = math.floor(math.log10(lr))
    rungs = [m * 10.0 ** e for e in (decade - 1, decade, decade + 1) for m in (1, 3)]
    best = min(rungs, key=lambda r: (round(abs(math.log10(r) - math.log10(lr)), 9), r))
    return float(f"{best:.0e}")


def ladder(lr: float, steps: int) -> float:
    """`steps` rungs up (positive) or down (negative) the 1-3-10 ladder from `lr` (itself snapped)."""
    exponent = round(math.log10(snap(lr)) * 2)  # 1e-3 -> -6, 3e-3 -> -5 (log10 3 ~ 0.5)
    e = exponent + steps
    return float(f"{(1 if e % 2 == 0 else 3) * 10.0 ** (e // 2):.0e}")


def search_grid(center: float) -> list[float]:
    """The three rungs `--lr auto` tries first: one below `center`, `center`, one above."""
    return [ladder(center, -1), snap(center), ladder(center, 1)]


def evidence(results: Path) -> dict[tuple[str, str], list[float]]:
    """(method, family) -> every first-seed learning-rate choice of the method's default row in the `EVIDENCE`
    suites, one per (suite, backbone, task), read from `results/<suite>/results.csv` (or, for a suite still
    running, its `choices.csv`: the same columns, first seed only)."""
    chosen: dict[tuple[str, str], list[float]] = {}
    for suite, families in EVIDENCE.items():
        path = Path(results) / suite / "results.csv"
        path = path if path.is_file() else path.with_name("choices.csv")
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                family = families.get(row["backbone"].split("@")[0])
                if family is None or row["label"] != row["method"] or int(row["seed"]) != 0:
                    continue
                lr = json.loads(row["chosen"] or "{}").get("lr")
                if lr is not None:
                    chosen.setdefault((row["method"], family), []).append(float(lr))
    return chosen


def derive_rates(results: Path) -> dict[str, dict[str, float]]:
    """The table the rule above gives: per (method, family), the median of log10 of `evidence`, snapped."""
    table: dict[str, dict[str, float]] = {}
    for (method, family), values in sorted(evidence(results).items()):
        table.setdefault(method, {})[family] = snap(10 ** statistics.median(math.log10(v) for v in values))
    return table
