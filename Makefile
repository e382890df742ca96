# tandem — set-up, main job, tests. Every target creates .venv and installs on a fresh machine.
#
#   make setup   create .venv and install tandem (+ pinned deps)
#   make smoke   the main job on one machine (CPU or one GPU)
#   make test    the test suite (CPU; GPU tests run when CUDA is present)
#
# TORCH_SPEC picks the torch build installed *before* tandem. The default is the CPU wheel this
# project is developed against; on a GPU machine use e.g.
#   make setup TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.tandem-installed
PYTEST_ARGS ?=

.PHONY: setup smoke test clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# --no-build-isolation: deepspeed builds from source and must see the torch installed above,
	# not pull its own (a multi-GB CUDA build) into an isolated build environment.
	$(PY) -m pip install --quiet setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation -c requirements/constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

# The smoke run lives in runs/smoke/ and is started afresh each time.
smoke: setup
	rm -rf runs/smoke
	$(VENV)/bin/tandem -cn smoke

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
