# cdfast: set-up, the main job, tests and benchmarks. Every target sets up what it needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cdfast-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)
# The compiled ops build with their CUDA kernels whenever a toolkit is there (no GPU needed).
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: help setup data train test test-interpret bench gpu-check clean

help:
	@echo "make train   set up, then train the default group on real Fashion-MNIST (cdfast/presets/fashion_mnist.yaml)"
	@echo "make test    set up, then run the test suite (CPU; CUDA tests skip without a GPU)"
	@echo "make test-interpret   only the Triton kernel tests, under Triton's CPU interpreter"
	@echo "make bench   set up, then run the pytest-benchmark suites in bench/"
	@echo "make gpu-check OUT=dir   on the GPU machine (its own python, no venv): build, CUDA tests, benchmarks,"
	@echo "             sanitizer, dir/summary.md with every target; a dry run without a GPU"
	@echo "make setup   only create/refresh the virtualenv $(VENV)"
	@echo "make data    only install Debian's dataset-fashion-mnist (as root) or say how"

# The virtualenv: pinned torch/torchvision (CUDA 13 builds; they run on the CPU too), then cdfast
# itself, which compiles cdfast._C (csrc/: CPU kernels, and CUDA kernels when CUDA_HOME is set).
$(STAMP): pyproject.toml setup.py $(CSRC)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "setuptools>=64" wheel ninja pybind11
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,viz,dali]"
	@$(PY) -c "from cdfast.ops import competitive_ce as _ops; print('cdfast: compiled ops', 'built (CPU' + (' + CUDA' if _ops.WITH_CUDA else '') + ' kernels)' if _ops.HAS_EXTENSION else 'missing: using the PyTorch reference')"
	@touch $(STAMP)

setup: $(STAMP)

data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Fashion-MNIST missing: installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FMNIST_DIR). Install it as root with:"; \
		echo "    apt-get update && apt-get install -y dataset-fashion-mnist"; \
		echo "or pass --data-dir to cdfast train (tests that need it will be skipped)"; \
	fi

train: setup data
	$(PY) -m cdfast train --config fashion_mnist $(ARGS)

test: setup data
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The Triton kernels on CPU tensors (Triton's interpreter); part of `make test` on machines without a GPU.
test-interpret: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_student_loss_kernels.py $(PYTEST_ARGS)

bench: setup data
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=mean,median,stddev,rounds \
		--benchmark-json=bench/results/$$($(PY) -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')")-$$(date +%Y%m%d).json $(PYTEST_ARGS)

# The one prepared command for a lent GPU machine: no venv, no downloads, a hard deadline (bench/gpu_check.sh).
GPU_PYTHON ?= python3
OUT ?= bench/results/gpu-check-$(shell date +%Y%m%d-%H%M%S)
gpu-check:
	PYTHON=$(GPU_PYTHON) MAX_JOBS=16 bash bench/gpu_check.sh $(OUT) $(GPU_DEADLINE)

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
