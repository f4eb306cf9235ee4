"""Evidence plan v2, the verdicts: the confirmation families and the product outcome, from the suites' records.

    python benchmarks/frontier_verdicts.py results [--variants gps-col,rosa] > verdicts.md

Reads RESULTS/frontier-confirm-short (S56), RESULTS/frontier-confirm-long (L56) and, where present,
RESULTS/frontier-dev (D28, descriptive: its tasks chose the variants). The chosen variants default to the
plan's variants found in frontier-confirm-short. Prints markdown: the primary family (each variant vs
lora-qkv-r5 in S56 and L56, one Holm family), the secondary family, the development family, and the product
outcome by the rule fixed in docs/evidence-plan.md ("Product outcome").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparseft.bench import load_records
from sparseft.bench.taskrule import (
    RULE_V2,
    VARIANTS,
    compare_family,
    confirmation_families,
    markdown,
    plan_pairs,
    product_outcome,
    rows_of,
)

REGIMES = {"S56": "frontier-confirm-short", "L56": "frontier-confirm-long"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--variants", default="", help="the chosen variants (default: those in frontier-confirm-short)")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    regimes = {regime: rows_of(load_records(args.results / suite)) for regime, suite in REGIMES.items()
               if (args.results / suite).is_dir()}
    variants = ([v for v in args.variants.split(",") if v] or
                [v for v in VARIANTS if v in regimes.get("S56", {})])
    print(RULE_V2, "\n")
    families = confirmation_families(regimes, variants, seeds)
    print("\n".join(markdown(families["primary"], "Primary: chosen variants vs LoRA at GPS's budget")))
    print("\n".join(markdown(families["secondary"], "Secondary (confirmation tasks)")))
    dev = args.results / "frontier-dev"
    if dev.is_dir():
        rows = rows_of(load_records(dev))
        print("\n".join(markdown(compare_family(rows, plan_pairs(rows), seeds),
                                 "Development (D28; descriptive: these tasks chose the variants)")))
    best, why = product_outcome(families["primary"], variants)
    print(f"**Product outcome**: {why}.")


if __name__ == "__main__":
    main()
