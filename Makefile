# make demo / make test: create or reuse .venv, install what is needed, then run.
# torch comes first and pinned (TORCH_SPEC): on this project's machines the pair below lies on local disk and is
# the only one with which timm (torchvision) imports. Override for your own CUDA, e.g.
#   make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu121"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.recbole_mm-installed

.PHONY: install test demo bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py Makefile | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,ray]"
	$(PY) -c "import torch, torchvision, timm, transformers, peft, recbole, recbole_mm; print('recbole_mm', recbole_mm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m recbole_mm.demo

bench: install
	$(PY) benchmarks/bench_extract.py

clean-venv:
	rm -rf $(VENV)
