# seqrec: `make demo` and `make test` work on a fresh clone with only Python 3.11 installed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
DATA ?= synthetic
DEMO_TRAIN_ARGS ?= trainer.max_epochs=8
PYTEST_ARGS ?=
BENCH_ARGS ?=
SERVE_ARGS ?=

.PHONY: setup demo test test-fast lint format bench bench-quick bench-train docs serve clean

# Install once: the stamp file is newer than pyproject.toml until the dependencies change.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned in the same pip call: a bare `torch` would resolve to a multi-GB CUDA build.
	$(PY) -m pip install --quiet --no-compile torch==$(TORCH_VERSION) -e '.[dev,serve,sweep]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/prepare_data.py data=$(DATA)
	$(PY) scripts/train.py data=$(DATA) $(DEMO_TRAIN_ARGS)
	$(PY) scripts/evaluate.py data=$(DATA)
	$(PY) scripts/export_onnx.py data=$(DATA)
	$(PY) scripts/show_recommendations.py artifacts/export/$(DATA) data/processed/$(DATA) --num 3 --k 10
	@echo; echo "Test metrics again, as a summary (artifacts/reports/$(DATA)/test_metrics.md):"; \
		cat artifacts/reports/$(DATA)/test_metrics.md

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not real_data" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: setup
	$(VENV)/bin/ruff check --fix src tests scripts
	$(VENV)/bin/ruff format src tests scripts

# Latency benchmark (predictor vs eager vs memory floor, HTTP load): artifacts/reports/latency/.
bench: setup
	$(PY) scripts/bench_latency.py $(BENCH_ARGS)

bench-quick: setup
	$(PY) scripts/bench_latency.py --quick $(BENCH_ARGS)

# Training throughput before / after the speed work (sequences/s, one run) on $(DATA).
bench-train: setup
	$(PY) scripts/bench_train.py data=$(DATA) $(BENCH_TRAIN_ARGS)

# Rewrite the generated blocks of README.md / PROPOSAL.md from docs/results/ (COLLECT=1: copy the
# latest artifacts/reports first).
docs: setup
	$(PY) scripts/render_docs.py $(if $(COLLECT),--collect,)

# HTTP service + demo widget (http://127.0.0.1:8000/widget/) over the export of `make demo`.
serve: setup
	$(VENV)/bin/seqrec-serve artifacts/export/$(DATA) $(SERVE_ARGS)

clean:
	rm -rf logs artifacts data/processed .pytest_cache
