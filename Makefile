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

# docs/performance.md's figures (hours on a 2-core CPU; BENCH_DEVICE=cuda runs the step and switch figures on a GPU)
BENCH_DEVICE ?= cpu
bench: $(STAMP)
	$(PY) benchmarks/step_cost.py --device $(BENCH_DEVICE) --bf16 --selection
	$(PY) benchmarks/step_cost.py --device $(BENCH_DEVICE) --model dinov2_vits14_offline --img 224
	$(PY) benchmarks/step_cost.py --device $(BENCH_DEVICE) --rss --model vit_base_patch16_224 --batch 8 --no-fp32 --rss-repeats 1
	$(PY) benchmarks/step_cost.py --device $(BENCH_DEVICE) --model resnet50 --img 128 --batch 32
	$(PY) benchmarks/step_cost.py --device $(BENCH_DEVICE) --model mobilenetv2_100 --img 128 --batch 32
	$(PY) benchmarks/conv_kernel_cost.py
	$(PY) benchmarks/switch_cost.py --device $(BENCH_DEVICE)
	$(PY) benchmarks/switch_cost.py --device $(BENCH_DEVICE) --model vit_small_patch16_224 --mixed 1,4,16,64 --batch 64 --repeats 3

clean-venv:
	rm -rf $(VENV)
