# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
# Both create the virtual environment if it is missing and install the project into it.

VENV   ?= .venv
PYTHON ?= python3.11
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
FMNIST  = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PRESET  ?=
RUN_DIR ?= runs/demo$(if $(PRESET),-$(PRESET))

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

# make demo                 the full demo (26.5 minutes measured on a 2-core CPU: teacher, round 1, distilled ShuffleNet V2, export)
# make demo PRESET=quick    a 10,000-image pool and short training, every stage (4 minutes here)
demo: install data-package
	$(VENV)/bin/selftrain run configs/fashion_mnist.yaml --run-dir $(RUN_DIR) $(if $(PRESET),--preset $(PRESET))
	@echo "report: $(RUN_DIR)/report/report.md   metrics: $(RUN_DIR)/<stage>/metrics.json"

test: install data-package
	$(PY) -m pytest -q --durations=15

bench: install data-package
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_augment.py --quick
