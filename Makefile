# Two entry points on a fresh machine: `make demo` (the main job on the embedded default)
# and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
ARCH   := $(shell uname -m)
ifeq ($(shell uname -s)-$(ARCH),Darwin-x86_64)
ifeq ($(shell sysctl -n sysctl.proc_translated 2>/dev/null),1)
$(error this shell runs under Rosetta (x86_64 on an Apple-silicon Mac): run `arch -arm64 make ...` with an arm64 Python (PYTHON=...))
endif
$(error an Intel Mac cannot install this project: Ray 2.60 and torch >= 2.9 publish no macOS x86_64 wheels; use an Apple-silicon Mac or Linux)
endif
# CPU machines here serve these torch/torchvision pairs from local disk; any other pair
# downloads gigabytes or fails to import (torchvision::nms).
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: venv demo teacher test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "make: $(PYTHON) is $$($(PYTHON) -V 2>&1), this project needs 3.11 or newer: PYTHON=python3.11 make $(MAKECMDGOALS)"; exit 1; }
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)  # (a venv cut short has no pip: made again)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: venv
	$(PY) pipelines/distill.py

# The pre-trained demo teacher (models/embedded_teacher) of the embedded default (configs/embedded.yaml):
# trained on videos of its own (configs/embedded_teacher.yaml), then published with its accuracy
# on that config's test split recorded in the folder (docs/embedded-default.md).
teacher: venv
	$(PY) pipelines/train_teacher.py --config configs/embedded_teacher.yaml \
		--publish models/embedded_teacher --test-config configs/embedded.yaml

# Two test processes (pytest-xdist), whole files each: module fixtures are built once.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# One benchmark per stage; each writes benchmarks/results/<name>.json and prints a table. Tune's cost
# is measured on the demo's real clips and shipped teacher (README): the demo runs first if it has not.
bench: venv
	$(PY) benchmarks/model_efficiency.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/teacher_cache.py
	$(PY) benchmarks/distill_cost.py
	$(PY) benchmarks/evaluate_speed.py
	test -f runs/embedded/results.json || $(PY) pipelines/distill.py
	$(PY) benchmarks/tune_cost.py --from-run runs/embedded --samples 3 --epochs 2
	$(PY) benchmarks/kd_pair_cost.py
	$(PY) benchmarks/dataset_shapes.py
	$(PY) benchmarks/scaling_plan.py --write-doc docs/scaling.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
