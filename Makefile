# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test matrix dist-check wine-test docs clean-demo

$(BIN)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

demo: $(BIN)/.installed  ## break sample_project like a two-GPU rc5 run, show evaluate_network fail, fix, show it work
	$(BIN)/python scripts/demo.py sample_project

test: $(BIN)/.installed  ## lint, then every test, including the ones that run the real DeepLabCut
	@echo "=== main cell: $$($(BIN)/pip freeze | grep -iE '^(deeplabcut|torch|torchvision|numpy)==' | tr '\n' ' ')$$($(BIN)/python --version)"
	$(BIN)/ruff check .
	for platform in linux win32 darwin; do $(BIN)/mypy --platform $$platform || exit 1; done
	$(BIN)/python -m pytest

matrix:  ## the other environments docs/promises.md promises, each its own venv (CI runs it after `make test`)
	bash scripts/matrix.sh

DOCS_VENV ?= .venv-docs
$(DOCS_VENV)/.installed: docs/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install --quiet -r docs/requirements.txt
	$(DOCS_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

docs: $(DOCS_VENV)/.installed  ## the documentation site in docs/_build/html (Sphinx; any warning fails it; CI runs it)
	$(DOCS_VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

dist-check:  ## build the sdist and wheel, twine check them, install the wheel into a fresh torch-only venv, run it
	bash scripts/check_dist.sh

wine-test: $(BIN)/.installed  ## the torch-only suite under python.org's Windows CPython and torch's Windows wheel, in Wine; DeepLabCut's end-to-end tests there; the same commands on a DeepLabCut-made project there and here, compared (CI runs it)
	bash scripts/wine.sh test
	bash scripts/wine.sh dlc-test
	bash scripts/wine.sh parity

clean-demo:
	rm -rf sample_project/.dlc-snapshot-fix sample_project/evaluation-results-pytorch
	find sample_project -name '*.pt' -delete
