# One Makefile for everything; `make help` lists the targets. Every target works on a fresh
# clone: `test`, `demo` and `bench` set up the virtualenv and build the extension themselves.

.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The PATH make was started with: where tools/find-python looks for interpreters, and the base
# of the PATH each .venv-pyXY runs its tests with.
HOST_PATH := $(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# The CPython versions `make test` runs the Python suite on, each in its own .venv-pyXY (3.12:
# .venv-py312) with the wheel installed. An interpreter is the newest pyenv-installed X.Y.N,
# else pythonX.Y on PATH; a version not found fails `make test` before anything runs. To run
# fewer on purpose: `make test PYTHONS="3.11 3.13"`.
PYTHONS ?= 3.11 3.12 3.13
# The abi3 wheel (every CPython from 3.11), linked by zig for manylinux2014 (glibc 2.17).
WHEEL_DIR := dist
WHEEL_FLAGS ?= --zig --compatibility manylinux2014
WHEEL_STAMP := $(VENV)/.wheel-tools

.PHONY: help setup build wheel test test-rust test-python test-pythons check-pythons miri lint bench bench-peers bench-instructions bench-quick bench-http demo soak clean \
	example-aiohttp example-fastapi example-aiohttp-shared example-fastapi-shared example-axum example-http \
	example-streaming example-streaming-fastapi example-streaming-http

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

$(WHEEL_STAMP): requirements-wheel.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-wheel.txt
	touch $@

wheel: $(WHEEL_STAMP) ## Build the abi3 wheel into dist/: CPython 3.11+, manylinux2014 (glibc 2.17), no docker
	rm -f $(WHEEL_DIR)/aqueduct_rs-*.whl
	$(VENV)/bin/maturin build --release $(WHEEL_FLAGS) --out $(WHEEL_DIR)

test: check-pythons test-rust miri test-pythons ## Build and run every test: Rust, Miri, and the Python suite on each of PYTHONS

test-rust: ## cargo tests (unit, property, multi-process)
	cargo test --workspace --quiet

miri: ## The shared-memory code (rings, arena, events) under Miri, over heap memory
	@rustup +nightly component add miri rust-src >/dev/null 2>&1 || { echo "miri: cannot install the nightly miri component"; exit 1; }
	PROPTEST_CASES=4 MIRIFLAGS=-Zmiri-disable-isolation cargo +nightly miri test --quiet -p aqueduct-core --lib

# aqueduct 1.15's source distribution: tests/test_surface_115.py reads 1.15's public surface from it.
REFERENCE := $(VENV)/reference/aqueduct-1.15.0.tar.gz
$(REFERENCE): | $(STAMP)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: --dest $(VENV)/reference aqueduct==1.15.0

test-python: build $(REFERENCE) ## pytest in .venv, on the extension `build` made (each test has a timeout)
	$(PY) -m pytest -q

check-pythons: ## Check an interpreter of each of PYTHONS is there (make test does it first)
	@PATH='$(HOST_PATH)' tools/find-python $(PYTHONS) >/dev/null

test-pythons: check-pythons $(addprefix test-,$(PYTHONS)) ## The Python suite on each of PYTHONS, against the wheel (one: make test-3.12)

# .venv-py312: CPython 3.12 with the pinned dev/test dependencies (kept between runs).
.PRECIOUS: .venv-py3%/.installed
.venv-py3%/.installed: requirements-dev.txt
	@py=$$(PATH='$(HOST_PATH)' tools/find-python 3.$*) && echo "CPython 3.$*: $$py" && \
		rm -rf .venv-py3$* && $$py -m venv .venv-py3$*
	.venv-py3$*/bin/python -m pip install --quiet --upgrade pip
	.venv-py3$*/bin/python -m pip install --quiet -r requirements-dev.txt
	touch $@

# test-3.12: the wheel (built once, for every version) into .venv-py312, then pytest there;
# tests/test_wheel.py also installs it into a fresh virtualenv with no Rust toolchain on PATH.
test-3.%: wheel .venv-py3%/.installed $(REFERENCE)
	.venv-py3$*/bin/python -m pip install --quiet --no-index --no-deps --force-reinstall $(WHEEL_DIR)/aqueduct_rs-*.whl
	AQUEDUCT_WHEEL="$$(ls $(WHEEL_DIR)/aqueduct_rs-*.whl)" VIRTUAL_ENV=$(CURDIR)/.venv-py3$* \
		PATH=$(CURDIR)/.venv-py3$*/bin:$(HOST_PATH) .venv-py3$*/bin/python -m pytest -q

lint: build ## rustfmt, clippy -D warnings, ruff, mypy over the package, and the _core stubs checked against the extension
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests bench examples
	$(PY) -m mypy
	$(PY) -m mypy.stubtest aqueduct._core

bench: build ## Benchmarks: the Rust engine (criterion, transport table), the Rust API, and the suite against aqueduct 1.15
	cargo bench -p aqueduct-core --bench transport_compare
	cargo bench -p aqueduct --bench flow
	$(PY) bench/transport_mpqueue.py
	$(PY) bench/http_compare.py
	$(PY) bench/run.py
	$(PY) bench/instructions.py

bench-peers: build ## The same model (and an echo handler) over HTTP: ours and each peer framework, loaded with wrk
	$(PY) bench/peers/setup.py
	$(PY) bench/peers/run.py

bench-instructions: build ## Main-process instructions per task (callgrind), ours against aqueduct 1.15
	$(PY) bench/instructions.py

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

example-streaming: build ## Tokens streamed as Server-Sent Events by an aiohttp service on 127.0.0.1:8084
	$(PY) examples/streaming/app.py --port 8084

example-streaming-fastapi: build ## The same with FastAPI (uvicorn) on 127.0.0.1:8085
	$(PY) -m uvicorn fastapi_app:app --app-dir examples/streaming --port 8085

example-streaming-http: build ## The same on the engine's own HTTP front (Rust writes the events), on 127.0.0.1:8086
	cd examples/streaming && $(CURDIR)/$(PY) -m aqueduct serve front:build_flow --http 127.0.0.1:8086 --route /generate=0 --timeout 60

example-aiohttp: build ## The aiohttp image-classification service on 127.0.0.1:8080
	$(PY) examples/aiohttp/app.py --port 8080

example-fastapi: build ## The FastAPI image-classification service (uvicorn) on 127.0.0.1:8081
	$(PY) -m uvicorn app:app --app-dir examples/fastapi --port 8081

example-aiohttp-shared: build ## The aiohttp service, 2 gunicorn workers sharing one flow, on 127.0.0.1:8080
	$(PY) -m gunicorn shared:app --chdir examples/aiohttp --preload --workers 2 \
		--worker-class aiohttp.GunicornWebWorker --bind 127.0.0.1:8080

example-http: build ## The image service on the engine's own HTTP front (Rust threads), on 127.0.0.1:8083
	cd examples/http && $(CURDIR)/$(PY) -m aqueduct serve service:build_flow --http 127.0.0.1:8083 --route /classify=0

example-axum: ## The Rust API: an axum service through a flow, on 127.0.0.1:8082 (add ARGS=--processes)
	cargo run --release -p aqueduct-axum-example -- --port 8082 $(ARGS)

example-fastapi-shared: build ## The FastAPI service, 2 gunicorn/uvicorn workers sharing one flow, on 127.0.0.1:8081
	$(PY) -m gunicorn shared:app --chdir examples/fastapi --preload --workers 2 \
		--worker-class uvicorn.workers.UvicornWorker --bind 127.0.0.1:8081

clean: ## Remove build outputs and the virtualenvs
	cargo clean
	rm -rf $(VENV) .venv-py3* $(WHEEL_DIR) python/aqueduct/*.so
