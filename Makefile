# Quickstart: `make demo` (install + run the demo flow end to end), `make test` (install + pytest).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_BASE := .qlora/demo-base
MLFLOW_URI ?= sqlite:///mlflow.db

.PHONY: install demo test bench clean mlflow-ui prefect-ui

install: $(STAMP)

# torch first, pinned: that wheel is the CPU build here (CUDA on a GPU machine). The project's own
# range admits it, so the second pip call never swaps it for a multi-GB CUDA download.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(DEMO_BASE)/config.json: qlora/demo.py data/demo/reverse_words.jsonl | $(STAMP)
	$(BIN)/qlora build-demo --out $(DEMO_BASE)

demo: install $(DEMO_BASE)/config.json
	$(BIN)/qlora run configs/demo.yaml

test: install
	$(BIN)/python -m pytest -q

bench: install $(DEMO_BASE)/config.json
	$(BIN)/python -m bench.run

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port 5000

prefect-ui: install
	$(BIN)/prefect server start --host 127.0.0.1

clean:
	rm -rf .qlora mlflow.db mlartifacts
