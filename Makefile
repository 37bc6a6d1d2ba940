# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ADDRESS ?= 127.0.0.1:50051
DATA_DIR ?= ./var

.PHONY: serve test install proto bench-serving bench-fewshot clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/headserve serve --address $(ADDRESS) --data-dir $(DATA_DIR)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

proto: $(VENV)/.installed
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) var .pytest_cache
