# make demo / make test: create or reuse .venv, install what is needed, then run.
# torch comes first and pinned (TORCH_SPEC): on this project's machines the pair below lies on local disk and is
# the only one with which timm (torchvision) imports. Override for your own CUDA, e.g.
#   make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu121"
# RecBole 1.2.1 needs ray<=2.6.3, which exists for Python <= 3.11: PYTHON must be 3.9 - 3.11.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)

.PHONY: install test demo bench clean-venv

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] <= (3, 11) else "recbole_mm needs Python 3.9-3.11 (RecBole 1.2.1 -> ray<=2.6.3); got " + sys.version.split()[0] + ". Run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py Makefile | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,ray]"
	$(PY) -c "import torch, torchvision, timm, transformers, peft, recbole, recbole_mm; print('recbole_mm', recbole_mm.__version__, 'torch', torch.__version__)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m recbole_mm.demo

bench: install
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_morec.py
	$(PY) benchmarks/bench_convert.py --update-docs

clean-venv:
	rm -rf $(VENV)
