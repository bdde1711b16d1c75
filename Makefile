# Pico developer entry points. Every target creates .venv and installs into it when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit bench fuzz install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pico dev demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench fuzz examples
	$(BIN)/ruff format --check src tests bench fuzz examples
	$(BIN)/mypy src

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test: $(STAMP) lint
	$(BIN)/pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Each fuzz target for FUZZ_SECONDS (default 120), keeping what it learns in fuzz/corpus/.
FUZZ_SECONDS ?= 120
fuzz: $(STAMP)
	for t in mux websocket gossip http config; do \
		mkdir -p fuzz/corpus/$$t && \
		$(BIN)/python -m fuzz.run $$t -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz/corpus/$$t \
			|| exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
