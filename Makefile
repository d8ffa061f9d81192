# The two commands a newcomer runs: `make train` and `make test`. Each sets itself up
# idempotently: a venv in .venv, the CPU build of torch first (override with TORCH_SPEC=...),
# then this package with its dev extras. Re-running skips set-up unless pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= -q
BIN := $(VENV)/bin
STAMP := $(VENV)/.skyrl_fn-installed
PYTEST_ARGS ?=

.PHONY: setup train test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/python -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev]'
	touch $(STAMP)

train: setup
	$(BIN)/python launch/train.py $(ARGS)

# The suite CI runs: the import contracts ([tool.importlinter] in pyproject.toml), then every test
# except runs marked slow (a short end-to-end run is not slow).
test: setup
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .import_linter_cache
