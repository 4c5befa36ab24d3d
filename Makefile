# Quickstart: `make demo` (install + run the demo flow end to end), `make test` (install + the fast tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_BASE := .qlora/demo-base
MLFLOW_URI ?= sqlite:///mlflow.db

# Team mode (server + deployments + worker), see prefect.yaml. Data of both servers under SERVER_DIR.
SERVER_DIR     ?= .server
PREFECT_PORT   ?= 4200
MLFLOW_PORT    ?= 5000
POOL           ?= qlora-process
QLORA_TIMEZONE ?= UTC
# Only for these targets: `make demo` / `make test` keep ephemeral Prefect and the local sqlite store.
deploy worker: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
deploy worker: export MLFLOW_TRACKING_URI ?= http://127.0.0.1:$(MLFLOW_PORT)
deploy worker: export QLORA_REPO_DIR ?= $(CURDIR)
deploy: export QLORA_TIMEZONE := $(QLORA_TIMEZONE)
# What the champion-triggered deployments (batch-predict, serving-bundle) read and write; {name}/{version} are filled by the flows.
QLORA_BATCH_INPUT  ?= $(CURDIR)/data/demo/batch_prompts.jsonl
QLORA_BATCH_OUTPUT ?= $(CURDIR)/.qlora/predictions/{name}-v{version}.jsonl
QLORA_BUNDLE_DIR   ?= $(CURDIR)/.qlora/bundles/{name}-v{version}
deploy: export QLORA_BATCH_INPUT := $(QLORA_BATCH_INPUT)
deploy: export QLORA_BATCH_OUTPUT := $(QLORA_BATCH_OUTPUT)
deploy: export QLORA_BUNDLE_DIR := $(QLORA_BUNDLE_DIR)
# `make team` points the notification automations (`qlora notifications setup`: failed flow runs, champion moves) at this
# Prefect notification block, TYPE/NAME (e.g. slack-webhook/ml-team); unset, it makes none. The block holds the URL or
# token on the server (data under SERVER_DIR): create it once in the UI's Blocks page.
QLORA_NOTIFY_BLOCK ?=
# NO_INSTALL=1 uses BIN as it is (tests run the targets from an existing environment).
INSTALL := $(if $(NO_INSTALL),,install)

.PHONY: team install lock demo test test-slow test-all test-gpu bench bench-packing bench-quality bench-gpu chaos clean mlflow-ui prefect-ui server deploy worker

# Every package pinned: what CI tested is what a clone installs next month (pyproject.toml keeps the
# ranges, for people who install the package into their own environment). `make lock` regenerates it.
LOCK  := requirements.lock
TORCH := torch==2.13.0
PIP   := pip==26.3
comma := ,

# Which torch build: unset, pip's own configuration decides (the package index's torch==2.13.0 is the
# CUDA 13 build on Linux, ~20 nvidia-*/cuda-*/triton packages, several GB; this machine's pip config
# finds a local CPU wheel). A CPU-only machine sets TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (or a mirror of it) and gets the ~200 MB CPU build. Either build passes `make test`: the lock leaves
# torch's own dependencies to torch's pin (registry/lineage.py: lock_differences).
TORCH_INDEX_URL ?=
TORCH_INSTALL := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL) )$(TORCH)

# The project's extras: dev (pytest, psycopg2 for the PostgreSQL test), bench (trl, the peer `make bench`
# measures against), sweep (optuna, for `qlora sweep --sampler tpe`). All three by default, as a checkout is
# for developing; a worker that only runs flows needs none: `make install EXTRAS=` (EXTRAS=sweep if it runs
# TPE sweeps). Its stamp differs, so changing EXTRAS installs again.
EXTRAS ?= dev,bench,sweep
STAMP  := $(VENV)/.installed$(if $(filter dev$(comma)bench$(comma)sweep,$(EXTRAS)),,-$(or $(subst $(comma),-,$(EXTRAS)),core))

install: $(STAMP)

# torch first, pinned: the build TORCH_INDEX_URL (or pip's configuration) gives. The project's own range
# admits it, so the second pip call never swaps it for another build; the lock constrains everything else.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP)
	$(BIN)/python -m pip install -q $(TORCH_INSTALL)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $(STAMP)

# pip's own resolver, in a throwaway venv, then `pip freeze` of what it installed. Not pip-compile or
# uv: neither sees the local CPU torch wheel (uv ignores pip's find-links; both resolve PyPI's torch and
# lock its CUDA dependencies), while a freeze records exactly the set CI installs. What only one torch
# build brings (the CUDA build's nvidia-*, cuda-*, triton) stays out, so the lock holds on either build.
lock:
	rm -rf .lock-venv build
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q $(PIP)
	.lock-venv/bin/python -m pip install -q $(TORCH_INSTALL)
	.lock-venv/bin/python -m pip install -q ".[dev,bench,sweep]"
	{ echo "# make lock: every package \`make install\` installs, from pyproject.toml's ranges on $$(date -u +%F)."; \
	  echo "# $(TORCH) is installed first by its own pin; it and what only its build needs are not constrained here."; \
	  .lock-venv/bin/python -m pip freeze --exclude qlora-pipeline --exclude torch $$(.lock-venv/bin/python -c \
	    'from registry.lineage import installed_environment as env, torch_closure; print(*(f"--exclude {n}" for n in sorted(torch_closure(env(), build_only=True))))'); \
	} > $(LOCK)
	rm -rf .lock-venv build

$(DEMO_BASE)/config.json: demo/build.py data/demo/reverse_words.jsonl | $(STAMP)
	$(BIN)/qlora build-demo --out $(DEMO_BASE)

demo: install $(DEMO_BASE)/config.json
	$(BIN)/qlora run configs/demo.yaml

# `make test`: everything but the slow tier (2-4 min on 2 cores: 139-203 s wall on a Xeon with AMX, 229-236 s on an
# AVX2-only EPYC with two workers, see docs/development.md), the loop to run while you work.
# `make test-slow`: tests/system and the tests marked slow (11-17 min on 2 cores): real Prefect/MLflow/PostgreSQL servers, workers,
# killed processes, sweeps, torchrun. CI (.ci/run) runs both; `make test-all` runs the whole suite in one pytest session.
# XDIST: the test targets run pytest-xdist workers, whole files to one worker (module fixtures are built once); the
# session fixtures' tiny base and prepared data are built once for all (tests/conftest.py). XDIST= (XDIST_FAST= for
# `make test`) runs in one process. The slow tier waits on servers and subprocesses for much of its time: two workers
# took it from 1,602 s to 983 s. `make test` runs three: two left a quarter of both cores idle (workers waiting on
# a subprocess, a sleep or the other's session fixture), and three took it from 186-203 s to 175-179 s (Xeon, same hour).
XDIST      ?= -n 2 --dist loadfile
XDIST_FAST ?= -n 3 --dist loadfile
test: install
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST_FAST) --durations=10

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(XDIST) --durations=15

test-all: install
	$(BIN)/python -m pytest -q $(XDIST) --durations=15

bench: install $(DEMO_BASE)/config.json
	$(BIN)/python -m bench.run

# One epoch of Code Alpaca rows per batching choice (padded, grouped, packing: true, packing: bfd), ~10 min.
bench-packing: install $(DEMO_BASE)/config.json
	$(BIN)/python -m bench.batching

# The demo recipe's quality grid: seeds x {bf16, float32, auto under AVX2-only dispatch}: nine runs of <= 650 steps, ~16 min on 2 idle cores.
bench-quality: install $(DEMO_BASE)/config.json
	$(BIN)/python -m bench.quality

# Team mode under a seeded fault schedule (bench/chaos.py): PostgreSQL + MLflow server, Prefect server, worker,
# CHAOS_RUNS tiny flow runs, CHAOS_FAULTS kills (flow-run stages, worker, both servers) with restarts and re-runs,
# then the checks -> bench/results-chaos.json. Needs PostgreSQL's initdb (tests/postgres.py installs it as root).
CHAOS_SEED   ?= 1
CHAOS_RUNS   ?= 24
CHAOS_FAULTS ?= 36
chaos: install
	$(BIN)/python -m bench.chaos --seed $(CHAOS_SEED) --runs $(CHAOS_RUNS) --faults $(CHAOS_FAULTS)

# On a CUDA machine: the GPU-only tests (demo recipe on the GPU, FSDP + QLoRA) and the 7B-shape benchmark.
test-gpu: install
	$(BIN)/python -m pytest -v -m gpu tests/system/test_gpu.py

bench-gpu: install
	$(BIN)/python -m bench.gpu
	$(BIN)/python -m bench.gpu --diagnose

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port 5000

prefect-ui: install
	$(BIN)/prefect server start --host 127.0.0.1

# Foreground Prefect server; the MLflow server runs beside it and stops with it (Ctrl-C stops both).
# Slot leases on disk under its PREFECT_HOME (qlora/locks.py: SERVER_LEASE_STORAGE): with Prefect's default, in memory,
# a restart while a run trains leaves the training slot taken for good and every later training waits.
PREFECT_LEASE_STORAGE := prefect.server.concurrency.lease_storage.filesystem
server: $(INSTALL)
	mkdir -p $(SERVER_DIR)/prefect $(SERVER_DIR)/mlartifacts
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(abspath $(SERVER_DIR))/mlflow.db \
	  --artifacts-destination $(abspath $(SERVER_DIR))/mlartifacts & MLFLOW_PID=$$!; \
	trap 'kill $$MLFLOW_PID' EXIT INT TERM; \
	PREFECT_HOME=$(abspath $(SERVER_DIR))/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \
	  PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=$(PREFECT_LEASE_STORAGE) \
	  $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# `make team`: everything on 127.0.0.1 in one terminal (Ctrl-C stops it all): MLflow server (sqlite store, webhooks on
# for loopback), Prefect server, the deployments, the bridge, the webhook of MODEL_NAME, a worker. Moving `champion`
# then starts the batch-predict and serving-bundle flow runs. With QLORA_NOTIFY_BLOCK, failed flow runs and champion
# moves are sent to that block (a block not made yet is said, and the team comes up without them). The webhook secret
# and MLflow's key for stored webhook secrets are made once under SERVER_DIR (a server without a fixed key cannot read
# its webhooks after a restart).
# `python -m flows.cli`, not `qlora`: the checkout's code, installed or not (as the job variables' PYTHONPATH).
BRIDGE_PORT ?= 8765
MODEL_NAME  ?= qlora-demo
WAIT_HTTP = $(BIN)/python -c 'import sys,time,urllib.request as u; t=time.time()+180;\
	exec("while True:\n try: u.urlopen(sys.argv[1], timeout=2); break\n except OSError:\n  assert time.time() < t, sys.argv[1]; time.sleep(1)")'
team: export PREFECT_API_URL := http://127.0.0.1:$(PREFECT_PORT)/api
team: export MLFLOW_TRACKING_URI := http://127.0.0.1:$(MLFLOW_PORT)
team: export QLORA_REPO_DIR ?= $(CURDIR)
team: export PREFECT_HOME := $(abspath $(SERVER_DIR))/prefect
team: export PREFECT_SERVER_ANALYTICS_ENABLED := false
team: $(INSTALL)
	mkdir -p $(SERVER_DIR)/prefect $(SERVER_DIR)/mlartifacts $(SERVER_DIR)/logs
	test -s $(SERVER_DIR)/webhook-secret || $(BIN)/python -c 'import secrets; print(secrets.token_hex(32))' > $(SERVER_DIR)/webhook-secret
	test -s $(SERVER_DIR)/mlflow-webhook.key || $(BIN)/python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())' > $(SERVER_DIR)/mlflow-webhook.key
	chmod 600 $(SERVER_DIR)/webhook-secret $(SERVER_DIR)/mlflow-webhook.key
	@export QLORA_WEBHOOK_SECRET=$$(cat $(SERVER_DIR)/webhook-secret); pids=; \
	stop_team() { trap '' INT TERM; kill $$pids 2>/dev/null; n=0; while [ $$n -lt 20 ]; do live=; \
	  for p in $$pids; do kill -0 $$p 2>/dev/null && live="$$live $$p"; done; [ -z "$$live" ] && break; n=$$((n+1)); sleep 0.5; done; \
	  [ -z "$$live" ] || kill -9 $$live 2>/dev/null; }; \
	trap stop_team EXIT; trap 'exit 130' INT; trap 'exit 143' TERM; \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=$$(cat $(SERVER_DIR)/mlflow-webhook.key) \
	  MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true \
	  $(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --backend-store-uri sqlite:///$(abspath $(SERVER_DIR))/mlflow.db \
	  --artifacts-destination $(abspath $(SERVER_DIR))/mlartifacts > $(SERVER_DIR)/logs/mlflow.log 2>&1 & pids="$$!"; \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) > $(SERVER_DIR)/logs/prefect.log 2>&1 & pids="$$! $$pids"; \
	$(WAIT_HTTP) $$MLFLOW_TRACKING_URI/health && $(WAIT_HTTP) $$PREFECT_API_URL/health && \
	$(MAKE) --no-print-directory deploy NO_INSTALL=1 BIN=$(BIN) > $(SERVER_DIR)/logs/deploy.log 2>&1 && \
	{ test -z "$(QLORA_NOTIFY_BLOCK)" || $(BIN)/python -m flows.cli notifications setup --block "$(QLORA_NOTIFY_BLOCK)" || \
	  echo "notifications not set up (see above); once the block exists: PREFECT_API_URL=$$PREFECT_API_URL" \
	    "$(BIN)/python -m flows.cli notifications setup --block $(QLORA_NOTIFY_BLOCK)"; } && \
	{ $(BIN)/python -m flows.cli events serve --port $(BRIDGE_PORT) --state-dir $(SERVER_DIR)/events > $(SERVER_DIR)/logs/bridge.log 2>&1 & pids="$$! $$pids"; } && \
	$(WAIT_HTTP) http://127.0.0.1:$(BRIDGE_PORT)/health && \
	$(BIN)/python -m flows.cli events register $(MODEL_NAME) --bridge-url http://127.0.0.1:$(BRIDGE_PORT) && \
	{ $(BIN)/prefect worker start --pool $(POOL) --type process > $(SERVER_DIR)/logs/worker.log 2>&1 & pids="$$! $$pids"; } && \
	echo "team up: Prefect http://127.0.0.1:$(PREFECT_PORT), MLflow $$MLFLOW_TRACKING_URI, bridge http://127.0.0.1:$(BRIDGE_PORT); logs in $(SERVER_DIR)/logs" && \
	wait

deploy: $(INSTALL)
	$(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || $(BIN)/prefect work-pool create $(POOL) --type process
	$(BIN)/prefect --no-prompt deploy --all

worker: $(INSTALL)
	$(BIN)/prefect worker start --pool $(POOL) --type process

clean:
	rm -rf .qlora mlflow.db mlartifacts
