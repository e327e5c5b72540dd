# icm_lab: `make run` for a result, `make test` for the suite. Both install first if needed.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
MODEL ?= tiny_sd15

.PHONY: install test run bench lint layers clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest tests

run: $(INSTALLED)
	$(PY) -m icm_lab

bench: $(INSTALLED)
	$(PY) -m icm_lab.bench

lint: $(INSTALLED)
	$(PY) -m ruff check icm_lab tests

layers: $(INSTALLED)
	$(PY) -m icm_lab layers model=$(MODEL)

clean:
	rm -rf outputs/runs outputs/multirun outputs/artefacts .pytest_cache
