#!/usr/bin/env bash
# Evidence plan v2's suites, resumably, as one single-thread worker; start it twice (on 2 cores) and the
# two workers share the cells of each suite (a cell is locked while it runs; a cell skipped because the
# other worker held it is picked up by the second pass).
#   bash benchmarks/run_frontier.sh RESULTS_DIR SUITE [SUITE ...]
# e.g. bash benchmarks/run_frontier.sh results frontier-screen-dev frontier-dev
# Between machines, keep the records (not the weights) with benchmarks/archive_runs.py and copy them back
# before resuming: a cell or tuning point with a record is never run again.
set -u
out=${1:?results folder}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
py=${PYTHON:-python}
for pass in 1 2; do
  for suite in "$@"; do
    "$py" -m sparseft bench "$suite" --out "$out/$suite" || echo "suite $suite: exit $? (pass $pass)"
  done
done
