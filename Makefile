# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing
# and are safe to run again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test docs bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xai-audit run configs/demo.yaml --results results
	@echo "query the tables with: $(VENV)/bin/xai-audit query --results results \"select count(*) from saliency\""

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

docs: $(STAMP)
	$(PY) -m flows.docs README.md

clean-venv:
	rm -rf $(VENV)
