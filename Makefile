# Every target is self-contained on a fresh machine: it creates .venv, installs torch first (pinned; a CPU
# wheel on local disk here, the registry elsewhere), then the package with the extras it needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: test demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]" $(TORCH)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/sailvl demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_llm.py
	$(BIN)/python benchmarks/bench_moe.py
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_packing.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_step.py
	$(BIN)/python benchmarks/bench_serve.py --threads 1

clean:
	rm -rf $(VENV) runs .pytest_cache
