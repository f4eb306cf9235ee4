"""Benchmark harness: suites of methods × tasks × backbones, an honest protocol, reports."""

from sparseft.bench.cells import plan, select_cells
from sparseft.bench.check import check_suite
from sparseft.bench.report import load_records, write_report
from sparseft.bench.runner import run_suite
from sparseft.bench.suite import Suite, SuiteError, load_suite, shipped_suites

__all__ = ["Suite", "SuiteError", "check_suite", "load_records", "load_suite", "plan", "run_suite", "select_cells",
           "shipped_suites", "write_report"]
