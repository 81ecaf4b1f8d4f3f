# Laneway: `make run` starts the whole stack, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROTO_FILES := $(wildcard protos/laneway/v1/*.proto protos/laneway/internal/v1/*.proto)
PROTOC := $(BIN)/python -m grpc_tools.protoc -I protos --python_out=clients --grpc_python_out=clients \
	--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	--mypy_out=clients --mypy_grpc_out=clients

.PHONY: help venv run test lint format typecheck buf-lint buf-breaking proto-release proto proto-check pytest bench bench-gateway scenarios soak soak-cluster fuzz node-deps clean

help:
	@echo "make run    - create .venv, install, start nats + broker + workers (laneway up)"
	@echo "make test   - lint, import contracts, type-check, buf lint, generated-code drift check, pytest"
	@echo "make bench  - throughput and latency against raw nats-py and grpc.aio baselines"
	@echo "make bench-gateway - webhook delivery lag and 60 s outage recovery, SSE/WebSocket added latency, 2,000-SSE memory (~5 min)"
	@echo "make scenarios - limiter and routing scenarios against their targets (~26 min)"
	@echo "make soak   - 20,000 jobs while workers and the broker are killed, then nodes of a 3-node NATS cluster; prints the chaos counts (~9 min)"
	@echo "make soak-cluster - the cluster part alone: 3 rounds of a node and the jobs stream's leader killed under load (~3 min)"
	@echo "make fuzz   - 10,000 generated gRPC requests against a live broker and worker (~3 min)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,dev]'
	@touch $(STAMP)

venv: $(STAMP)

# CONFIG=path runs another config (e.g. examples/pipelines/laneway.yaml).
run: venv
	$(BIN)/laneway up $(if $(CONFIG),--config $(CONFIG))

test: venv lint typecheck buf-lint buf-breaking proto-check node-deps pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv
	$(BIN)/mypy -p laneway -p bench

buf-lint: venv
	$(BIN)/buf lint

# v1 only grows compatibly: the protos are checked against the last released contract.
RELEASED_CONTRACT := protos/released/laneway-v1.json
buf-breaking: venv
	$(BIN)/buf breaking --against $(RELEASED_CONTRACT)

# At a release: record its contract as the one later changes must stay compatible with.
proto-release: venv
	$(BIN)/buf build --exclude-source-info -o -#format=json | $(BIN)/python -m json.tool --indent 1 > $(RELEASED_CONTRACT)

proto: venv
	$(PROTOC) $(PROTO_FILES)

# Generated code is committed (so `pip install` needs no protoc); this fails when it drifts from protos/.
proto-check: venv
	@rm -rf build/proto-check && mkdir -p build/proto-check
	@$(BIN)/python -m grpc_tools.protoc -I protos --python_out=build/proto-check --grpc_python_out=build/proto-check \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--mypy_out=build/proto-check --mypy_grpc_out=build/proto-check $(PROTO_FILES) 2>&1 | grep -v "^Writing mypy" || true
	@for d in v1 internal/v1; do diff -r -x __init__.py -x py.typed -x '*.pyc' -x __pycache__ \
		build/proto-check/laneway/$$d clients/laneway/$$d || exit 1; done \
		|| (echo "generated code is stale: run 'make proto' and commit"; exit 1)
	@echo "generated code matches protos/"

# The TypeScript client (clients/typescript) is built and tested when node and npm are present.
# Installs and builds the TypeScript client (tests that drive it from Python need dist/).
node-deps:
	@if command -v npm >/dev/null 2>&1; then cd clients/typescript && \
		{ [ -d node_modules ] || npm ci --no-audit --no-fund --silent; } && npm run --silent build \
		|| echo "npm ci or the build failed: TypeScript client tests will skip"; fi

pytest: venv
	$(BIN)/pytest

bench: venv
	$(BIN)/python -m bench

# Not in `make bench` (about 4-6 minutes, a 60 s receiver outage): webhook delivery lag and
# recovery, then SSE and WebSocket added latency and 2,000-SSE memory (bench/README.md).
bench-gateway: venv
	$(BIN)/python -m bench.webhook_bench
	$(BIN)/python -m bench.gateway_bench

# Each scenario alone: .venv/bin/python -m bench.scenarios goodput [--duration S] [--output F]
scenarios: venv
	$(BIN)/python -m bench.scenarios all --output bench/results/scenarios.json

# Not in CI: the chaos tests' faults (tests/chaos/) for longer, with the same counts.
soak: venv
	$(BIN)/python -m tests.chaos.soak
	$(BIN)/python -m tests.chaos.node_loss

# The cluster part of `make soak` alone: 3-node cluster, nodes and the jobs stream's leader killed under load.
soak-cluster: venv
	$(BIN)/python -m tests.chaos.node_loss

# Not in CI (make test runs a short version, tests/test_fuzz.py): the gRPC fuzzer for longer.
FUZZ_REQUESTS ?= 10000
FUZZ_SEED ?= 0
fuzz: venv
	$(BIN)/python -m tests.fuzz --requests $(FUZZ_REQUESTS) --seed $(FUZZ_SEED)

clean:
	rm -rf build .laneway .pytest_cache .mypy_cache .ruff_cache clients/typescript/dist
