# One entry point for people and CI. Each target sets up its own virtual environment.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint bench clean image lock

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The demo needs only the gateway and its three dependencies (about 10 s on a fresh
# machine), not the test toolchain.
$(BIN)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $@

demo: $(BIN)/.runtime
	$(BIN)/isales-gateway demo $(DEMO_ARGS)

# The image, labelled with the version (gateway/__init__.py, its one source) and the commit.
image:
	docker build \
	  --build-arg VERSION=$$($(PYTHON) -c 'import re; print(re.search(r"__version__ = \"(.+)\"", open("gateway/__init__.py").read())[1])') \
	  --build-arg GIT_REVISION=$$(git rev-parse HEAD) \
	  -t isales-gateway .

# requirements.lock: the runtime dependencies pinned with hashes, which the image installs.
lock:
	$(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install -q pip-tools
	.lock-venv/bin/pip-compile -q --generate-hashes --strip-extras --no-emit-index-url \
	  --no-emit-find-links --no-header --output-file requirements.lock pyproject.toml
	rm -rf .lock-venv

lint: $(BIN)/.installed
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

# Two workers, whole files each (a file's tests share set-ups and some run in order): the
# suite mostly waits on timers and subprocesses, so this halves the wall time on 2 cores.
PYTEST_PARALLEL ?= -n 2 --dist loadfile --durations=15

test: lint
	$(BIN)/pytest $(PYTEST_PARALLEL)

# The inner loop: everything but the load and fault tests (marked slow), a few minutes less.
test-fast: lint
	$(BIN)/pytest -m "not slow" $(PYTEST_PARALLEL)

# README "Performance": a few minutes; needs wrk and redis-server on PATH. BENCH_ARGS=--quick
# for a smoke run.
bench: $(BIN)/.installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
