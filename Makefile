# The two commands: `make demo` (train and evaluate s2 on Omniglot on the CPU) and `make test`.
# Both create .venv and install the package (editable, with the dev extra) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Data: ../shared/data beside the checkout unless ANIL_FAST_DATA says otherwise.
export ANIL_FAST_DATA ?= $(abspath ../shared/data)

.PHONY: demo test docs bench gpu-check gpu-acceptance kernel-report install clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) -m anil_fast train --scenario s2 --image-size 28 --inner-lr 0.4 --meta-batch 8 \
		--queries 15 --meta-steps 200 --test-tasks 200 --out runs/demo

test: install
	$(PY) -m pytest -q tests benches --smoke --benchmark-disable --durations=15

# The documentation site (MkDocs, Material theme; API reference from the docstrings, the CLI
# reference from the parser) into site/; make test builds it with --strict too (tests/test_docs.py).
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: install
	$(PY) -m pytest -q benches --benchmark-only

kernel-report: install
	$(PY) -m anil_fast.kernels.report --json kernel-report.json

# On a GPU machine's own Python (torch and triton there, no package index): an offline
# editable install of the checkout, then the check.
gpu-check:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) benches/gpu_check.py --json gpu-check.json

# Every number the project owes from one lent GPU, in priority order, each step under its own
# time limit (benches/gpu_acceptance.py): results in docs/results/<date>-<gpu>/.
gpu-acceptance:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) benches/gpu_acceptance.py --out docs/results

clean:
	rm -rf runs build site *.egg-info
