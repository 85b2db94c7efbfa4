# The README's commands. Each target installs the pinned environment first (once).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: install train test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

train: install   ## the original notebook's experiment: seed CNN, 10 epochs, batch 32
	$(BIN)/fmnist train $(ARGS)

test: install    ## the whole suite (needs the data: FMNIST_DATA, the cache, or a download)
	$(BIN)/pytest -q $(ARGS)

bench: install   ## speed benchmark
	$(BIN)/fmnist bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
