# The README's commands. Each target installs the pinned environment first (once).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
ARGS   ?=
# make test's pytest-xdist workers: one a core, at most 4 (each builds its own trained-run
# fixtures, and a container's CPU quota can be below nproc); WORKERS=0: one process
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

.PHONY: help install train test test-fast bench clean
.DEFAULT_GOAL := help

help:            ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv with the pinned dependencies (constraints.txt)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,serve,sweep,track]'
	touch $@

train: install   ## the original notebook's experiment: its CNN, 10 epochs, batch 32 (ARGS="..." adds options)
	$(BIN)/fmnist train $(ARGS)

test: install    ## the import layers, then the whole suite (needs the data: FMNIST_DATA, the cache, or a download)
	$(BIN)/lint-imports
	$(BIN)/pytest -q -n $(WORKERS) --dist loadfile $(ARGS)

test-fast: install  ## the import layers and the quick tier: no data, no training, no new process (under 30 s)
	$(BIN)/lint-imports
	$(BIN)/pytest -q -n $(WORKERS) -m "not slow" $(ARGS)

bench: install   ## speed benchmark: fmnist against the textbook loop and the machine's GEMM rate
	$(BIN)/fmnist bench $(ARGS)

clean:           ## remove .venv and build leftovers
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
