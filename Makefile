# The two commands of the README: `make demo` and `make test`. Both create ./.venv on first use
# (CPU build of torch first, so pip never pulls the multi-GB CUDA wheels), then reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Two pytest-xdist workers, one per core of the 2-core CI box; --dist loadfile keeps each test file on one worker,
# so a module-scoped fixture (the DDP/FSDP2 runs, the phase calibration) runs once.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test docs clean

$(VENV)/.installed-%: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$*]"
	@touch $@

demo: $(VENV)/.installed-examples
	OMP_NUM_THREADS=1 $(PY) examples/quickstart.py

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

# The documentation site (Sphinx + MyST) into docs/_build/html; warnings are errors.
docs: $(VENV)/.installed-test
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) lightning_logs htsr_runs docs/_build
