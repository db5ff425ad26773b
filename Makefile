# Two commands a new user needs: `make demo` and `make test`. Everything they need is installed
# into .venv by the rules below.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

## make test: the whole suite
test: $(VENV)/.installed
	$(PY) -m pytest

## make test-fast: without the real-vLLM tests
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not vllm"

## make demo: two ranks under the supervisor, asked a question each, then stopped
demo: $(VENV)/.installed
	$(PY) demo/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
