# Set-up is part of every target: a fresh machine needs only Python 3.11 and these two commands.
#   make demo   tiny model through every stage on the shipped/generated demo data (CPU when there is no GPU)
#   make test   the test suite (what .ci/run runs); installs requirements-test.txt (transformers, the reference)
#   make bench-peer  zerostage vs TRL on this CPU: SFTTrainer packed (SFT), GRPOTrainer (GRPO), DPOTrainer (DPO)
#                    (bench/peer.py; flags in PEER_FLAGS, e.g. PEER_FLAGS="--threads 8 --only sft,grpo"); installs
#                    requirements-bench.txt, which make test never needs
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.installed-bench
TEST_INSTALLED := $(VENV)/.installed-test
DEMO_DATA := dataset/.complete

.PHONY: demo test setup data clean bench-peer gpu-check
.DEFAULT_GOAL := demo

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	# DeepSpeed's CPU ranks load a shared-memory collective op that is compiled on first use (about 3 minutes on
	# 2 cores); building it here keeps that out of the first run. A CUDA machine does not use it.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DS_ACCELERATOR=cpu $(PY) -c "import torch; from deepspeed.comm.torch import \
	  build_shm_op; torch.cuda.is_available() or build_shm_op()"
	touch $@

setup: $(INSTALLED)

# The peer benchmark's packages on top of the project's; torch is pinned in the file too, so it stays as it is.
$(BENCH_INSTALLED): $(INSTALLED) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $@

# The test suite's reference packages (transformers) on top of the project's.
$(TEST_INSTALLED): $(INSTALLED) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

$(DEMO_DATA): $(INSTALLED) scripts/make_demo_data.py
	$(PY) scripts/make_demo_data.py --out_dir dataset
	touch $@

data: $(DEMO_DATA)

demo: $(DEMO_DATA)
	bash launch/run_pipeline.sh

# One worker per core, a test file to a worker (its module fixtures run once): most of a launcher run's time is
# one process importing or starting up while the other core waits. Files go out in tests/conftest.py's order (the
# launcher-heavy ones first), not pytest-xdist's default of the files with the most tests first.
test: $(DEMO_DATA) $(TEST_INSTALLED)
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

gpu-check: $(DEMO_DATA)
	$(PY) -m bench.gpu_check $(GPU_CHECK_FLAGS)

bench-peer: $(BENCH_INSTALLED) $(DEMO_DATA)
	$(PY) bench/peer.py $(PEER_FLAGS)

clean:
	rm -rf out .cache dataset
