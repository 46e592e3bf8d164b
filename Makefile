# Two commands on a fresh machine with Python 3.10+:  `make demo`  and  `make test`.
# Both create (once) and reuse a virtual environment in .venv with the pinned requirements.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hwdiff-installed
DEMO   ?= demo

.PHONY: demo test venv clean

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

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache *.egg-info
