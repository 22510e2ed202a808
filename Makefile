# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create the virtual environment (.venv) and install the project into it first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo_workspace
SHARED := $(abspath ../shared/data)

.PHONY: demo test install clean-demo bench

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wsi-pipeline make-demo --out $(DEMO)/slides --slides 24 --seed 0
	$(VENV)/bin/wsi-pipeline run --config configs/demo.yaml

test: $(STAMP)
	@if [ -z "$$WSI_TEST_DATA" ] && [ -d "$(SHARED)/slides" ]; then export WSI_TEST_DATA="$(SHARED)"; fi; \
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/segment_bench.py
	$(PY) benchmarks/read_bench.py
	$(PY) benchmarks/extract_bench.py
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/runner_bench.py
	$(PY) benchmarks/cache_bench.py

clean-demo:
	rm -rf $(DEMO)
