# Two commands do all the set-up on a fresh machine (they create .venv from python3 on first use):
#   make bench   -> the cross-framework benchmark report (CPU by default), benchmarks/results/cpu/
#   make test    -> the whole test suite
# TORCH_SPEC pins the CPU build of torch that lies on this machine's disk; override it elsewhere,
# e.g. `make test TORCH_SPEC=torch` on a machine with a CUDA build you want.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
BENCH_ARGS ?=
TEST_ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_SPEC)" -e ".[torch,dev,bench,notebooks]"
	touch $@

.PHONY: install bench test lint gpu-check
install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(PY) -m benchmarks $(BENCH_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist worksteal -q $(TEST_ARGS)

# Lint, format and types of the three packages (ruff and mypy; settings in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check
	$(VENV)/bin/ruff format --check
	$(VENV)/bin/mypy

# The longer CPU runs behind the figures quoted in docs/ (about 9 minutes on a 2-core CPU); the
# default `make bench` already covers every variant at n = 4096 and 8192.
FIG := benchmarks/results/cpu
.PHONY: figures
figures: $(VENV)/.installed
	$(PY) -m benchmarks --variants improved --seq-lens 8192,32768 --no-seed-comparison --out $(FIG)/scaling
	$(PY) -m benchmarks --variants block_sparse,improved --segment-lengths 16384 --dilation-rates 1 \
		--seq-lens 16384 --timeout 300 --no-seed-comparison --out $(FIG)/block_sparse_vs_dense
	$(PY) -m benchmarks --variants block_sparse --seq-lens 16384,65536 --timeout 300 --no-seed-comparison \
		--out $(FIG)/block_sparse_memory
	$(PY) -m benchmarks.ring_scaling

# The one-shot check of a lent GPU machine (at most ~8 minutes): versions, kernel probes, exactness of
# every variant, kernel TFLOP/s, improved vs torch, the longest n, the GPU report -> benchmarks/results/gpu/.
# The lent machines have everything installed, so this target uses their python3 directly, no venv.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_ARGS)
