"""Benchmark harness: suites of methods × tasks × backbones, an honest protocol, reports."""

from sparseft.bench.report import load_records, write_report
from sparseft.bench.runner import plan, run_suite
from sparseft.bench.suite import Suite, SuiteError, load_suite, shipped_suites

__all__ = ["Suite", "SuiteError", "load_records", "load_suite", "plan", "run_suite", "shipped_suites",
           "write_report"]
