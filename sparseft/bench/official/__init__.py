"""The papers' official settings as data: one row per (paper, task), each citing the file it was read from.

    from sparseft.bench.official import TABLES
    TABLES["gps-vtab"].row("dtd").values["lr"]        # 0.002 (train_scripts/vit/vtab/dtd/train_gps.sh)

A `Table` holds what one official repository runs for one benchmark: every setting that changes a
result (lr, batch, epochs, warm-up, K or its equivalent, drop-path, augmentation, EMA, mixup/cutmix,
smoothing, amp, backbone and its pretrained weights), with the repository, its commit and each
row's source file. Values the scripts leave to their argparse defaults are those defaults.

The paper suites (`sparseft/bench/suites/*-paper.yaml`) are generated from these tables
(`sparseft.bench.official.suites`), and the tests hold every row against the values parsed from the
official scripts (tests/fixtures/official/*.json) with `compare`.
"""

from __future__ import annotations

from sparseft.bench.official import gps, sct, spt
from sparseft.bench.official.table import KEYS, Row, Table, compare

__all__ = ["KEYS", "TABLES", "Row", "Table", "compare"]

TABLES: dict[str, Table] = {t.name: t for t in (gps.VTAB, gps.FGVC, spt.VTAB, sct.VTAB)}
