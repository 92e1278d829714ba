# Nimbus: `make up` to run it, `make test` to test it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: up test lint bench clean

$(STAMP): pyproject.toml requirements.lock
	@# The sandbox's seccomp filter is built with libseccomp (Debian: libseccomp2).
	@# The sandbox needs libseccomp (seccomp filter), iproute2 and iptables (egress networking),
	@# and debootstrap (its base root filesystem, a minimal Debian built once per machine).
	@missing=""; ldconfig -p | grep -q 'libseccomp.so.2 ' || missing="$$missing libseccomp2"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: missing Debian packages:$$missing (the sandbox needs them)"; fi; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

## make up: install into .venv, start Nimbus on $(HOST):$(PORT), deploy examples/
## (UP_ARGS=--insecure-no-sandbox where Nimbus cannot run as root)
up: $(STAMP)
	$(BIN)/nimbus up --host $(HOST) --port $(PORT) $(UP_ARGS) $(foreach d,$(wildcard examples/*/nimbus.yaml),--deploy $(dir $(d)))

## make test: the whole suite (unit, in-process, end to end)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

## make bench: warm and cold invoke vs peers, async enqueue and throughput, message
## triggers (NATS, Redis), the base root, a FastAPI init, the API key check; see docs/benchmarks.md
bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[bench]'
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/async_bench.py
	$(BIN)/python bench/trigger_bench.py
	$(BIN)/python bench/environment_bench.py
	$(BIN)/python bench/auth_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
