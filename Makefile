# Everything a fresh machine needs: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparseft-installed

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sparseft demo

# the real-data tests need a small offline task and every offline backbone (pretrained-weight checks);
# fetching is cached and idempotent
test: $(STAMP)
	$(PY) -m sparseft data fetch mini-vtab --tasks fashion_mnist --quiet
	$(PY) -m sparseft weights fetch all --keep-source
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check sparseft tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py

clean-venv:
	rm -rf $(VENV)
