# One command each: `make demo` sets up and runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast setup-vllm bench

$(PY):
	bash scripts/setup.sh

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/harness-merge demo

test: setup
	bash scripts/test.sh

setup-vllm:
	bash scripts/setup_vllm.sh

bench: setup
	$(PY) scripts/bench_merge.py
