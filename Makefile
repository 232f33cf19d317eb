# procube: two commands set everything up on a fresh machine.
#   make demo   - generate Verilog for the default designs, co-simulate against the golden models
#   make test   - the full test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench lint venv clean

venv: $(STAMP)

# The CPU wheel of torch must be installed before anything else pulls in a
# (multi-GB) CUDA build; pyproject's loose range is then already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/procube demo

# One pytest worker per core; worksteal keeps the long simulations from piling up on
# one worker. The simulation builds are locked per design (sim/runner.py). The golden
# numba kernels are compiled once first (golden/warm.py: minutes on a fresh clone, in two
# processes), so the workers load them from the disk cache instead of each compiling
# them inside a test's time limit. The 15 slowest tests are listed at the end.
TEST_JOBS ?= auto
test: $(STAMP)
	$(PY) -m golden.warm
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Every benchmark once (each also writes its report under out/bench/ or prints it).
bench: $(STAMP)
	$(VENV)/bin/procube bench cubist-golden
	$(VENV)/bin/procube bench dropback
	$(VENV)/bin/procube bench cubist
	$(VENV)/bin/procube bench procrustes

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build out .pytest_cache
