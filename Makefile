# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   # the main job (see README); DEMO_FLAGS='--data_config=tiny ...' for a quick one
#   make test   # the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo
DEMO_FLAGS ?=
STUDY ?= studies/mini_table3.gin
STUDY_FLAGS ?=

.PHONY: demo study test install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the package metadata changes. torch is pinned to the CPU build
# that ships with the image when it is there, so pip does not pull CUDA wheels.
$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

demo: $(STAMP)
	$(PY) -m omni_smola.demo --run_dir=$(RUN_DIR) $(DEMO_FLAGS)

# A study: arms x seeds from one gin file (README, "Studies"); STUDY_FLAGS=--quick for 1 seed.
study: $(STAMP)
	$(PY) -m omni_smola.study --gin_file=$(STUDY) $(STUDY_FLAGS)

bench: $(STAMP)
	$(PY) benchmarks/adapter_layer.py

clean:
	rm -rf $(VENV) .pytest_cache
