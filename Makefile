# `make demo` and `make test` set everything up on a fresh machine: .venv, torch (CPU wheel), the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU wheel on these machines' disk (an unpinned torch would pull a CUDA build).
$(INSTALLED): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,onnx]"
	touch $(INSTALLED)

# The main job on the built-in demo teacher: prune to about half, distil, export, bench, report.
demo: $(INSTALLED)
	$(BIN)/graphprune apply specs/demo.json --force

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
