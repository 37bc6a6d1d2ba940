# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ADDRESS ?= 127.0.0.1:50051
DATA_DIR ?= ./var

.PHONY: serve test install proto bench-serving bench-fewshot bench-tenants clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/headserve serve --address $(ADDRESS) --data-dir $(DATA_DIR)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# Property-based fuzzing through a real server (tests/test_fuzz.py): 20x the examples `make test` runs, with
# fresh randomness each run (a failure prints how to reproduce it); FUZZ_SCALE=N multiplies them again.
FUZZ_SCALE ?= 1
.PHONY: fuzz
fuzz: $(VENV)/.installed
	HEADSERVE_FUZZ=long HEADSERVE_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q tests/test_fuzz.py

proto: $(VENV)/.installed
	$(BIN)/python scripts/gen_proto.py

# Serving benchmark: service vs raw pipeline, text + image backbones, 10,000-task scale mode; writes
# bench/results/serving.{json,png,md}. BENCH_ARGS=--docs also rewrites the Serving results in docs/benchmarks.md.
bench-serving: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/serving.py $(BENCH_ARGS)

# Few-shot accuracy through the service on the shared sets, next to scikit-learn on the same draws.
bench-fewshot: $(VENV)/.installed
	$(BIN)/python bench/fewshot.py $(BENCH_ARGS)

# Tenants: Predict p50 with API keys against without auth (interleaved, same run), and tenant B's p99 while
# tenant A floods, with and without a quota on A (~5 min); writes bench/results/tenants.{json,md}.
# BENCH_ARGS=--quick for a short run (< 2 min); --docs also rewrites the Tenants results in docs/benchmarks.md.
bench-tenants: $(VENV)/.installed
	$(BIN)/python bench/tenants.py $(BENCH_ARGS)

# Replicas: SQLite vs PostgreSQL on Predict and create->READY, one vs two replicas behind client-side round
# robin, serving p99 during a FINE_TUNE job (training in a thread vs a worker process), memory per replica and
# per head (~10 min; needs PostgreSQL's server binaries, as tests/postgres.py finds them); writes
# bench/results/replicas.{json,md}. BENCH_ARGS=--quick for a short run; --docs rewrites the Replicas results.
.PHONY: bench-replicas
bench-replicas: $(VENV)/.installed
	$(BIN)/python bench/replicas.py $(BENCH_ARGS)

# Peers: the same fused ONNX model (minilm-l6 + head, MobileNetV2 + head) served by headserve and by LitServe,
# Ray Serve and Triton (nvidia-pytriton), each installed from PyPI into its own virtualenv under
# bench/.peers-venv/ (not .venv), at concurrency 1/4/16/64; writes bench/results/peers.{json,md}.
# PEERS_ARGS=--quick for one short round; --peers/--backbones/--concurrency to narrow it.
PEERS_VENV := bench/.peers-venv
.PHONY: bench-peers
$(PEERS_VENV)/%/.installed: bench/peers/requirements-%.txt bench/peers/requirements-common.txt
	mkdir -p $(PEERS_VENV) && echo '*' > $(PEERS_VENV)/.gitignore
	$(PYTHON) -m venv $(PEERS_VENV)/$*
	$(PEERS_VENV)/$*/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/$*/bin/python -m pip install -q -r bench/peers/requirements-$*.txt
	touch $@

bench-peers: $(VENV)/.installed $(foreach p,litserve rayserve pytriton client,$(PEERS_VENV)/$(p)/.installed)
	$(BIN)/python bench/peers.py $(PEERS_ARGS)

# Soak: a real server (API keys) under 16 clients' mix of Predict, PredictStream, task churn, training and
# ExportTask over 200 tasks for SOAK_MINUTES (default 20), watched for unexpected errors, RSS growth, open fds,
# threads and the SQLite WAL; writes bench/results/soak.json. SOAK_ARGS for more flags (bench/README.md).
SOAK_MINUTES ?= 20
.PHONY: soak
soak: $(VENV)/.installed
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
