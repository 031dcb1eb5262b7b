# One Makefile for everything; `make help` lists the targets. Every target works on a fresh
# clone: `test`, `demo` and `bench` set up the virtualenv and build the extension themselves.

.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help setup build test test-rust test-python miri lint bench bench-quick bench-http demo soak clean \
	example-aiohttp example-fastapi example-aiohttp-shared example-fastapi-shared example-axum

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-24s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv with maturin and the pinned dev/test dependencies
$(STAMP): requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: setup ## Build the release extension into .venv
	$(VENV)/bin/maturin develop --release --quiet

test: test-rust miri test-python ## Build and run every test, Rust and Python

test-rust: ## cargo tests (unit, property, multi-process)
	cargo test --workspace --quiet

miri: ## The shared-memory code (rings, arena, events) under Miri, over heap memory
	@rustup +nightly component add miri rust-src >/dev/null 2>&1 || { echo "miri: cannot install the nightly miri component"; exit 1; }
	PROPTEST_CASES=4 MIRIFLAGS=-Zmiri-disable-isolation cargo +nightly miri test --quiet -p aqueduct-core --lib

test-python: build ## pytest (each test has a timeout)
	$(PY) -m pytest -q

lint: build ## rustfmt, clippy -D warnings, ruff, and the _core stubs checked against the extension
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests bench examples
	$(PY) -m mypy.stubtest aqueduct._core

bench: build ## Benchmarks: the Rust engine (criterion, transport table), the Rust API, and the suite against aqueduct 1.15
	cargo bench -p aqueduct-core --bench transport_compare
	cargo bench -p aqueduct --bench flow
	$(PY) bench/transport_mpqueue.py
	$(PY) bench/http_compare.py
	$(PY) bench/run.py

bench-quick: build ## A short run of the suite against aqueduct 1.15
	$(PY) bench/http_compare.py --quick
	$(PY) bench/run.py --quick

bench-http: build ## The example aiohttp service under load, against aqueduct 1.15
	$(PY) bench/http_compare.py
	$(PY) bench/run.py --report-only

soak: build ## Soaks: 100k tasks with handler failures and worker kills; 10k tasks of 16 MiB
	$(PY) bench/soak_faults.py
	$(PY) bench/soak_payload.py

demo: build ## Build and run the example pipeline end to end
	$(PY) examples/quickstart.py

example-aiohttp: build ## The aiohttp image-classification service on 127.0.0.1:8080
	$(PY) examples/aiohttp/app.py --port 8080

example-fastapi: build ## The FastAPI image-classification service (uvicorn) on 127.0.0.1:8081
	$(PY) -m uvicorn app:app --app-dir examples/fastapi --port 8081

example-aiohttp-shared: build ## The aiohttp service, 2 gunicorn workers sharing one flow, on 127.0.0.1:8080
	$(PY) -m gunicorn shared:app --chdir examples/aiohttp --preload --workers 2 \
		--worker-class aiohttp.GunicornWebWorker --bind 127.0.0.1:8080

example-axum: ## The Rust API: an axum service through a flow, on 127.0.0.1:8082 (add ARGS=--processes)
	cargo run --release -p aqueduct-axum-example -- --port 8082 $(ARGS)

example-fastapi-shared: build ## The FastAPI service, 2 gunicorn/uvicorn workers sharing one flow, on 127.0.0.1:8081
	$(PY) -m gunicorn shared:app --chdir examples/fastapi --preload --workers 2 \
		--worker-class uvicorn.workers.UvicornWorker --bind 127.0.0.1:8081

clean: ## Remove build outputs and the virtualenv
	cargo clean
	rm -rf $(VENV) python/aqueduct/*.so
