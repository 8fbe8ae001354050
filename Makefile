# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
# Both create the virtual environment if it is missing and install the project into it.

VENV   ?= .venv
PYTHON ?= python3.11
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
FMNIST  = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PRESET  ?=
RUN_DIR ?= runs/demo$(if $(PRESET),-$(PRESET))

.PHONY: demo test install data-package bench

install: $(STAMP)

# torch==2.14.1 on x86_64 is a CUDA build: the venv is about 6 GB. Checked before anything is made, so a
# full disk is a one-line message instead of pip's ENOSPC halfway through (skipped once torch is installed).
MIN_FREE_GB ?= 8
DISK_CHECK = import shutil, sys; from pathlib import Path; where = next(p for p in Path(sys.argv[1]).absolute().parents if p.exists()); \
	free = shutil.disk_usage(where).free / 2**30; need = float(sys.argv[2]); \
	sys.exit(0 if free >= need else f"make install: {free:.1f} GB free on the disk holding {where}, the venv needs about {need:g} GB (torch==2.14.1 with its CUDA libraries); free some space, or set MIN_FREE_GB")

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (torch==2.14.1 wheels are for Python 3.11)"; exit 1; }
	@{ test -x $(PY) && $(PY) -c 'import torch' 2>/dev/null; } || $(PYTHON) -c '$(DISK_CHECK)' $(VENV) $(MIN_FREE_GB)
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

# make demo                 the full demo (16.5-26.5 minutes measured on 2-core AVX-512 CPUs, 29-35 on an AVX2-only one by the VM's day: teacher, round 1, distilled ShuffleNet V2, export)
# make demo PRESET=quick    a 10,000-image pool and short training, every stage (4-7 minutes measured)
demo: install data-package
	$(VENV)/bin/selftrain run configs/fashion_mnist.yaml --run-dir $(RUN_DIR) $(if $(PRESET),--preset $(PRESET))
	@echo "report: $(RUN_DIR)/report/report.md   metrics: $(RUN_DIR)/<stage>/metrics.json"

# Two pytest-xdist workers, one test file each at a time (module fixtures built once; the torchrun tests'
# ports differ by file), one torch thread each (tests/conftest.py). On 2 cores the serial suite keeps about
# one core busy (user time ~ wall time): 17 min 28 s serial against 13 min 53 s with -n 2 on 2026-12-01 (AVX2
# EPYC); 672 tests in 7 min 38 s with -n 2 on the AMD AVX-512 EPYC on 2026-12-04.
# TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: install data-package
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) --durations=15

bench: install data-package
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_augment.py --quick
