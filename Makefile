# Pico developer entry points. Every target creates .venv and installs into it when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-compiled compiled lint unit bench fuzz install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77'
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pico dev demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench fuzz examples setup.py
	$(BIN)/ruff format --check src tests bench fuzz examples setup.py
	$(BIN)/mypy src

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# The suite runs twice: on the sources as they are, then unit and integration tests again on
# the hot modules compiled with mypyc (pico.native lists them; see setup.py), on uvloop as
# `pico` runs (the first run is on asyncio's loop).
test: $(STAMP) lint
	$(BIN)/pytest -q tests
	$(MAKE) test-compiled

# A copy of the sources with the modules of pico.native compiled beside them, rebuilt when a
# source changes. Put $(COMPILED)/src first on PYTHONPATH to run it.
COMPILED := build/compiled
SOURCES := $(shell find src -name '*.py') setup.py pyproject.toml
$(COMPILED)/.built: $(STAMP) $(SOURCES)
	rm -rf $(COMPILED) && mkdir -p $(COMPILED)
	cp -r src setup.py pyproject.toml README.md $(COMPILED)/
	cd $(COMPILED) && PICO_COMPILE=1 $(abspath $(BIN))/python setup.py -q build_ext --inplace
	touch $@

compiled: $(COMPILED)/.built

test-compiled: compiled
	PICO_EXPECT_COMPILED=1 PICO_TEST_LOOP=uvloop PYTHONPATH=$(abspath $(COMPILED))/src \
		$(BIN)/pytest -q tests/unit tests/integration

# Measures the compiled build (what `PICO_COMPILE=1 pip install .` and the image run);
# `make bench BENCH_PURE=1` measures the plain sources.
bench: compiled
	$(if $(BENCH_PURE),,PYTHONPATH=$(abspath $(COMPILED))/src) $(BIN)/python -m bench.run

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
