# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs pausejax, trains the tiny pause-token model on CPU
#   make test   creates .venv, installs pausejax with test extras, runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
# Both sets run on this many pytest-xdist workers (one per core here); a file's tests stay
# on one worker, so module fixtures (trained runs) are built once. Each set ends with its
# slowest tests, so a slower suite shows where the time went.
TEST_WORKERS ?= 2
DURATIONS := --durations=15

.PHONY: demo test test-all test-slow test-hf bench clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test,tpu]'
	touch $@

demo: venv
	$(PY) -m pausejax.train --config=configs/tiny.py --workdir=$(DEMO_DIR) \
	    --config.tfds_data_dir=$(CURDIR)/runs/tensorflow_datasets

# Fast set by default; `make test-all` adds the slow tests.
test: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "not slow and not hf" -n $(TEST_WORKERS) --dist loadfile \
	    $(DURATIONS) $(PYTEST_ARGS)

test-slow: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "slow and not hf" -n $(TEST_WORKERS) --dist loadfile \
	    $(DURATIONS) $(PYTEST_ARGS)

# transformers loads `pausejax.export`'s output (marker hf). torch (the CPU build) and
# transformers, about 1 GB, go into the venv here only; constraints.txt pins them and their deps.
test-hf: venv
	$(PIP_INSTALL) torch==2.13.0 transformers==5.18.0
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m hf $(PYTEST_ARGS) tests/test_export_hf.py

test-all: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) -m pausejax.bench --config=configs/tiny.py \
	    --config.tfds_data_dir=$(CURDIR)/runs/tensorflow_datasets

clean:
	rm -rf $(VENV) runs .pytest_cache
