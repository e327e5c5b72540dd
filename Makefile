# icm_lab: `make run` for a result, `make test` for the suite. Both install first if needed.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
MODEL ?= toy

.PHONY: install test test-fast run bench lint layers tables sweep toy-model toy-quality clean \
	gpu-kit gpu-rehearsal gpu-smoke

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest tests

# The unit tests only (no end-to-end pipeline runs): under 2 minutes on 2 cores.
test-fast: $(INSTALLED)
	$(PY) -m pytest tests -m "not slow"

run: $(INSTALLED)
	$(PY) -m icm_lab

bench: $(INSTALLED)
	$(PY) -m icm_lab.tools.bench

lint: $(INSTALLED)
	$(PY) -m ruff check icm_lab tests

# Paper-style tables from outputs/: first the runs they need (the method comparison and an alpha
# sweep) for MODEL and CONCEPT, or for EXPERIMENT (e.g. paper_sd15_gender, which sets both),
# unless that sweep is already complete on disk; then the tables of every run under outputs/.
#   make tables                              the toy world (model toy, its default concept)
#   make tables MODEL=sd15 CONCEPT=gender    make tables EXPERIMENT=paper_sd15_gender
CONCEPT ?=
EXPERIMENT ?=
TABLE_SET := $(if $(EXPERIMENT),experiment=$(EXPERIMENT),model=$(MODEL)$(if $(CONCEPT), concept=$(CONCEPT)))
TABLE_RUNS := outputs/multirun/tables-$(if $(EXPERIMENT),$(EXPERIMENT),$(MODEL)-$(or $(CONCEPT),default))
tables: $(INSTALLED)
	@test -f $(TABLE_RUNS)/methods/.done || ($(PY) -m icm_lab -m $(TABLE_SET) +sweep=methods \
		hydra.sweep.dir=$(TABLE_RUNS)/methods && touch $(TABLE_RUNS)/methods/.done)
	@test -f $(TABLE_RUNS)/alpha/.done || ($(PY) -m icm_lab -m $(TABLE_SET) method=icm \
		steer.alpha=0,8,16,32 hydra.sweep.dir=$(TABLE_RUNS)/alpha && touch $(TABLE_RUNS)/alpha/.done)
	$(PY) -m icm_lab.report.tables

# A ready-made sweep from sweeps/: make sweep NAME=layers_alpha ARGS="model=sd15 hydra/launcher=slurm"
sweep: $(INSTALLED)
	@test -n "$(NAME)" || (echo "usage: make sweep NAME=<one of: $(basename $(notdir $(wildcard sweeps/*.yaml)))> [ARGS=...]" && exit 2)
	$(PY) -m icm_lab -m +sweep=$(NAME) $(ARGS)

# Retrain the toy world (pipeline + CLIP) from its seed into icm_lab/toy/weights, then measure it.
toy-model: $(INSTALLED)
	$(PY) -m icm_lab.tools.toy_train
	$(PY) -m icm_lab.tools.toy_quality

toy-quality: $(INSTALLED)
	$(PY) -m icm_lab.tools.toy_quality

layers: $(INSTALLED)
	$(PY) -m icm_lab layers model=$(MODEL)

# The GPU rehearsal (docs/gpu.md). gpu-kit: the wheels the GPU machine lacks, into .whl/ (git-
# ignored; carry it). gpu-rehearsal, on that machine: SD1.5, SDXL and Sana at full size into OUT.
# gpu-smoke: the same script on the tiny twins, on this CPU.
OUT ?= outputs/rehearsal
gpu-kit: $(INSTALLED)
	rm -rf .whl
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir .whl -r icm_lab/tools/gpu_kit.txt
	@du -sh .whl

gpu-rehearsal:
	bash icm_lab/tools/gpu_rehearsal.sh $(OUT)

gpu-smoke: $(INSTALLED)
	$(PY) -m icm_lab.tools.rehearsal $(OUT)-smoke --smoke

clean:
	rm -rf outputs/runs outputs/multirun outputs/artefacts .pytest_cache
