# make serve: set up .venv and start the server on $(PORT). make test: set up and run every test.
# make lint: ruff's rules and formatting over the tree, mypy over the product code (pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8005
# torch is pinned so a fresh setup takes the CPU wheel where one is provided locally; on a CUDA
# host PyPI's build of the same version runs on the GPU.
TORCH_VERSION ?= 2.13.0
# vLLM, the preferred engine: the CUDA build on a GPU host, the CPU build on other Linux x86_64
# machines (scripts/install-vllm.sh). VLLM=no leaves it out: every model then runs on transformers.
VLLM ?= yes

.PHONY: install install-test postgres compiler serve lint test bench bento clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.txt scripts/install-vllm.sh
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e .
	if [ "$(VLLM)" != no ]; then scripts/install-vllm.sh $(VENV); fi
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/bentoml serve service:AIServer --port $(PORT)

# The replica tests run a real PostgreSQL server (tests/support/postgres.py): Debian's package,
# installed when missing (as root, or with sudo).
postgres:
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	fi

# The transformers engine's C++ kernels (runners/native_kernels.py) are built with the machine's
# C++ compiler; their tests need one: Debian's g++, installed when missing.
compiler:
	@if ! command -v c++ >/dev/null; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq g++ >/dev/null; \
	fi

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install-test postgres compiler
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m bench $(BENCH_ARGS)

# The Bento (image defined in service.py), and its Containerfile + locked requirements in build/bento/.
bento: install
	$(BIN)/python scripts/build_bento.py build/bento

clean:
	rm -rf $(VENV) .pytest_cache
