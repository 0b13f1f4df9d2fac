# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing
# and are safe to run again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test lint docs bench bench-gpu clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,examples]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xai-audit run configs/demo.yaml --results results

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff's lint rules and formatting (pyproject.toml, [tool.ruff]); `ruff format .` fixes the latter.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Side-by-side benchmarks against the stock tools (README, "Benchmarks").
bench: $(STAMP)
	$(PY) -m benchmarks --size cpu --markdown benchmarks/RESULTS.md

bench-gpu: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu.sh

docs: $(STAMP)
	$(PY) -m xai_audit.flows.docs README.md

clean-venv:
	rm -rf $(VENV)
