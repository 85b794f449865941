# hwgen: `make demo` and `make test` work on a fresh machine; each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hwgen-installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
DEMO_DIR := build/demo

.PHONY: setup data demo test verify-all fuzz bench clean

setup: $(STAMP)

# torch goes in first and pinned: any other spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist where apt is available;
# without it the demo falls back to scikit-learn's bundled digits.
data:
	@if [ ! -d $(FASHION_DIR) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: could not install dataset-fashion-mnist; the demo will use sklearn digits"; \
	fi

demo: setup data
	$(BIN)/hwgen demo --out $(DEMO_DIR)

# make test leaves the tests marked slow (more random networks, every reference network's and
# imported model's worst-case accumulators) to make verify-all, which runs everything.
test: setup
	$(BIN)/python -m pytest -n 2 -q -m "not slow" --durations=20 tests

verify-all: setup
	$(BIN)/python -m pytest -n 2 -q tests

# Property-based RTL fuzz (tests/test_fuzz.py) with FUZZ_EXAMPLES random networks per family;
# the last line counts the configurations and images that ran.
FUZZ_EXAMPLES ?= 40
fuzz: setup
	mkdir -p build/fuzz && rm -f build/fuzz/log.jsonl
	HWGEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) HWGEN_FUZZ_LOG=$(CURDIR)/build/fuzz/log.jsonl \
		$(BIN)/python -m pytest -n 2 -q -p no:cacheprovider tests/test_fuzz.py

bench: setup data
	$(BIN)/python -m bench.run $(if $(filter 0,$(PNR)),--no-pnr)

clean:
	rm -rf build .pytest_cache .hypothesis sim_build
