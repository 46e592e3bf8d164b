# Two commands on a fresh machine with Python 3.10+:  `make demo`  and  `make test`.
# Both create (once) and reuse a virtual environment in .venv with the pinned requirements.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hwdiff-installed
DEMO   ?= demo

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): requirements/pinned.txt requirements/real-nodeps.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/pinned.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/real-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hwdiff.demo --out $(DEMO)

# the guardrails: one formatting, the linter, the type check of the torch-free core, the import layers
lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) tools/check_layers.py

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache *.egg-info
