# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
# Both create the virtual environment if it is missing and install the project into it.

VENV   ?= .venv
PYTHON ?= python3.11
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
FMNIST  = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN_DIR ?= runs/demo

.PHONY: demo test install data-package clean-demo bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (torch==2.14.1 wheels are for Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tensorboard]'
	touch $(STAMP)

# Debian's dataset-fashion-mnist package, when the data is absent and apt is available.
data-package:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; \
	fi

demo: install data-package
	$(VENV)/bin/selftrain run configs/fashion_mnist.yaml --run-dir $(RUN_DIR)
	@echo "metrics: $(RUN_DIR)/teacher/metrics.json   checkpoint: $(RUN_DIR)/teacher/checkpoint/"

test: install data-package
	$(PY) -m pytest -q

bench: install data-package
	$(PY) bench/bench_channels_last.py
