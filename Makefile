# laneguard: the entry points a user types.
#
#   make run     bootstrap, build, start the demo gateway (scripts/run-demo.sh)
#   make test    bootstrap, build, run every test (CI runs this: .ci/run)
#   make test-prometheus   a real Prometheus (Debian's package) scraping the demo's Envoy
#   make lint    rustfmt, clippy (host and wasm32-wasip1), envoy --mode validate on envoy/
#   make build   the Wasm filter (release) and the service and upstream binaries
#   make bench   laneguard vs Envoy's native filters: docs/benchmarks.md, bench/results/
#   make bench-accuracy   2 Envoys x 2 workers past a binding limit (docs/accuracy.md), then a
#                 fleet on Redis Cluster (4 Envoys, 3 services, kills; docs/benchmarks.md)
#   make bench-rtt   open-loop load with a delayed link to the service: bench/results/rtt.json
#   make bench-replay   laneguard-replay on a million-line trace: bench/results/replay.json
#   make chaos   the Redis fault suite with longer faults and windows (docs/reliability.md)
#   make demo-chaos   the demo on Redis, service and Redis killed on a schedule, outcomes per second
#   make fuzz    every fuzz target for FUZZ_SECONDS each (default 60): docs/fuzzing.md
#   make soak    10 minutes of mixed traffic with a service restart; memory at start and end
#   make soak-tenants   1,000,000 random tenants: VM memory and shared-data keys stay bounded
#   make clean   remove build output and demo logs; `make distclean` also removes .venv
#
# ENVOY is the Envoy command. It defaults to the pinned Envoy that scripts/bootstrap.sh
# installs into .venv, and may be several words: ENVOY="func-e run" make run.

ENVOY_DEFAULT := $(CURDIR)/.venv/bin/envoy
ENVOY ?= $(ENVOY_DEFAULT)
export ENVOY

CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/laneguard_wasm.wasm

# Envoy configurations to validate: every YAML under envoy/ except the rate-limit
# service's own configs, which are named *.service.yaml, and the TLS examples, named
# *.tls.yaml, which name certificate files (tests/tests/tls.rs validates them with its own).
ENVOY_CONFIGS := $(filter-out %.service.yaml %.tls.yaml,$(shell find envoy -name '*.yaml' | sort))

# With a custom ENVOY there is no need to install the pinned one into .venv.
ifeq ($(ENVOY),$(ENVOY_DEFAULT))
BOOTSTRAP_FLAGS ?=
else
BOOTSTRAP_FLAGS ?= --without-envoy
endif

.DEFAULT_GOAL := help
.PHONY: help bootstrap build build-wasm run test test-prometheus lint bench bench-ai bench-build bench-accuracy bench-rtt bench-replay chaos demo-chaos fuzz soak soak-tenants clean distclean

help:
	@sed -n '3,17p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

bootstrap:
	@scripts/bootstrap.sh $(BOOTSTRAP_FLAGS)

build-wasm: bootstrap
	$(CARGO) build --release --target $(WASM_TARGET) -p laneguard-wasm

build: build-wasm
	$(CARGO) build -p laneguard-service -p laneguard-upstream -p laneguard-replay

# REDIS=redis://127.0.0.1:6379 (or redis-cluster://h:p,h:p,...) keeps the service's buckets
# in Redis instead of the embedded in-memory store.
run: build
	REDIS="$(REDIS)" scripts/run-demo.sh

# The integration tests start Envoy with $ENVOY (exported above), and the store tests start
# their own redis-server, which bootstrap installs when it is missing (and h2load, for the
# audit flood test).
test: build
	@scripts/bootstrap.sh $(BOOTSTRAP_FLAGS) --with-redis --with-load
	@CARGO=$(CARGO) scripts/cargo-test-summary.sh

# Not in `make test`: it installs Debian's prometheus package (apt) and runs the one test
# that needs it (tests/tests/prometheus.rs, #[ignore]d otherwise).
test-prometheus: build
	@scripts/bootstrap.sh $(BOOTSTRAP_FLAGS) --with-prometheus
	$(CARGO) test -p laneguard-tests --test prometheus -- --ignored

# The Wasm is built first: validating envoy/demo/envoy.yaml loads it.
lint: build-wasm
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p laneguard-wasm -p laneguard-core --target $(WASM_TARGET) -- -D warnings
	python3 envoy/demo/mint-tokens.py --check
	@set -e; for f in $(ENVOY_CONFIGS); do \
	  echo "$(ENVOY) --mode validate -c $$f"; \
	  out=$$($(ENVOY) --mode validate -c $$f 2>&1) || { echo "$$out" | grep -v "\]\[info\]" | tail -n 20; echo "invalid Envoy config: $$f" >&2; exit 1; }; \
	done

# Benchmarks run release builds only: both Wasm filters (laneguard and the no-op floor),
# the service, the upstream and the service's load client. wrk, h2load and redis-server
# are installed if missing. Settings are environment variables (docs/benchmarks.md).
bench-build: bootstrap
	@scripts/bootstrap.sh $(BOOTSTRAP_FLAGS) --with-load --with-redis
	$(CARGO) build --release --target $(WASM_TARGET) -p laneguard-wasm -p laneguard-bench-noop
	$(CARGO) build --release -p laneguard-service -p laneguard-upstream -p laneguard-rls-load -p laneguard-netbench -p laneguard-replay -p laneguard-redis-harness

# BENCH_ONLY picks parts (comma-separated): main, tenants, service, micro (bench/run.py),
# rtt, replay, ai (one script each). Unset: all of them.
bench_part = case ",$(BENCH_ONLY)," in ,,|*,$(1),*) true ;; *) false ;; esac

bench: bench-build
	python3 bench/run.py
	@if $(call bench_part,rtt); then python3 bench/rtt.py; fi
	@if $(call bench_part,replay); then python3 bench/replay.py; fi
	@if $(call bench_part,ai); then python3 bench/ai.py; fi

# Only the AI part of make bench (bench/ai.py: token overshoot vs the bound under
# concurrency, tokens charged vs used, RPCs with settlement, body inspection CPU per request;
# settings in docs/benchmarks.md).
bench-ai: bench-build
	python3 bench/ai.py

# Only the network part of make bench (bench/rtt.py; settings in docs/benchmarks.md).
bench-rtt: bench-build
	python3 bench/rtt.py

# laneguard-replay (release) on a million-line generated trace (docs/rollout.md).
bench-replay: bootstrap
	$(CARGO) build --release -p laneguard-replay
	python3 bench/replay.py

bench-accuracy: bench-build
	python3 bench/accuracy.py

# tests/tests/soak.rs (ignored by make test): SOAK_SECONDS of mixed traffic on the Redis store.
SOAK_SECONDS ?= 600
soak: build
	@scripts/bootstrap.sh $(BOOTSTRAP_FLAGS) --with-redis
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test -p laneguard-tests --test soak soak_mixed -- --ignored --nocapture

# The other ignored test of tests/tests/soak.rs: TENANTS distinct random tenants, half with
# the service up, half with it down (docs/reliability.md).
TENANTS ?= 1000000
soak-tenants: build
	TENANTS=$(TENANTS) $(CARGO) test -p laneguard-tests --test soak a_million_tenants -- --ignored --nocapture

# The demo (scripts/run-demo.sh) on a Redis of its own while scripts/demo-chaos.sh kills and
# restarts the service and Redis on a schedule (CHAOS_DEMO_SECONDS, default 90).
demo-chaos: build
	@scripts/bootstrap.sh $(BOOTSTRAP_FLAGS) --with-redis
	scripts/demo-chaos.sh

# The fault suite of make test (tests/tests/redis_faults.rs) with each fault held
# CHAOS_HOLD_S seconds and drift measured over CHAOS_WINDOW_S seconds after recovery.
CHAOS_HOLD_S ?= 20
CHAOS_WINDOW_S ?= 30
chaos: build
	@scripts/bootstrap.sh $(BOOTSTRAP_FLAGS) --with-redis
	CHAOS_HOLD_S=$(CHAOS_HOLD_S) CHAOS_WINDOW_S=$(CHAOS_WINDOW_S) $(CARGO) test -p laneguard-tests --test redis_faults -- --nocapture --test-threads 1

# Outside `make test` (which runs each target briefly): FUZZ_SECONDS=N per target.
fuzz: bootstrap
	@CARGO=$(CARGO) scripts/fuzz.sh

clean:
	$(CARGO) clean
	rm -rf .run

distclean: clean
	rm -rf .venv
