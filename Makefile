# The two entry points: `make up` and `make test`. See README.md.
SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: up build test deps test-deps fmt clippy unit metrics-check bench-smoke bench bench-quick bench-one chaos chaos-short fuzz clean

deps:
	./scripts/install-deps.sh

test-deps:
	./scripts/install-deps.sh --test

build: deps
	$(CARGO) build --release --workspace --bins

## Builds in release and runs a local cluster (Ctrl-C stops it).
up: build
	$(TARGET_DIR)/release/sov up --data sov-data

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --no-fail-fast

metrics-check:
	BIN_DIR=$(TARGET_DIR)/debug ./scripts/check-metrics.sh

## Every benchmark program in its quick form, on the debug build, through the same suite
## `make bench` runs, then the report with its plots: checks that they run, not their speed.
BENCH_SMOKE := $(TARGET_DIR)/bench-smoke
bench-smoke:
	rm -rf $(BENCH_SMOKE)
	$(TARGET_DIR)/debug/sov-bench suite --quick --bin $(TARGET_DIR)/debug --made-by "make bench-smoke" \
	  --results $(BENCH_SMOKE)/results --out $(BENCH_SMOKE)/REPORT.md
	test -s $(BENCH_SMOKE)/REPORT.md
	test $$(ls $(BENCH_SMOKE)/plots/*.png | wc -l) -ge 10

## Two chaos scenarios, short: no acknowledged write lost, no wrong read, service back.
chaos-short:
	python3 chaos/chaos.py --bin $(TARGET_DIR)/debug --short storaged-kill9,zone-partition

## Installs what the tests need, then every gate: fmt, clippy, tests, promtool, bench smoke,
## two short chaos scenarios.
test: test-deps fmt clippy unit metrics-check bench-smoke chaos-short

## Every chaos scenario (about 30 minutes); writes chaos/REPORT.md.
chaos: test-deps
	$(CARGO) build --workspace --bins
	python3 chaos/chaos.py --bin $(TARGET_DIR)/debug --report chaos/REPORT.md

## The whole benchmark suite on this machine (release build, about an hour): storaged against
## the raw disk, metad against etcd, S3 against s3s-fs and Ceph RGW, volumes against
## qemu-storage-daemon and Ceph RBD, scaling, codec, repair; writes benchmarks/REPORT.md, its
## plots and benchmarks/results/. COMPARE=http://host:port adds an S3 endpoint of your own
## (keys in SOV_BENCH_COMPARE_ACCESS_KEY / SOV_BENCH_COMPARE_SECRET_KEY).
SUITE_FLAGS = $(if $(COMPARE),--compare $(COMPARE))
bench: deps
	./scripts/install-deps.sh --bench
	$(CARGO) build --release --workspace --bins
	$(TARGET_DIR)/release/sov-bench suite --bin $(TARGET_DIR)/release $(SUITE_FLAGS)

## The same suite, small (a few minutes after the build); the report goes to
## $(TARGET_DIR)/bench-quick/REPORT.md.
bench-quick: deps
	./scripts/install-deps.sh --bench
	$(CARGO) build --release --workspace --bins
	$(TARGET_DIR)/release/sov-bench suite --quick --bin $(TARGET_DIR)/release $(SUITE_FLAGS) \
	  --results $(TARGET_DIR)/bench-quick/results --out $(TARGET_DIR)/bench-quick/REPORT.md

## One part of the suite (then the report again from every results file):
## make bench-one STEP=s3 (steps: sov-bench suite --list).
bench-one: deps
	$(if $(STEP),,$(error STEP=<step> is needed; the steps: sov-bench suite --list))
	./scripts/install-deps.sh --bench
	$(CARGO) build --release --workspace --bins
	$(TARGET_DIR)/release/sov-bench suite --bin $(TARGET_DIR)/release --only $(STEP) $(SUITE_FLAGS)

## Fuzzes every target of fuzz/ for FUZZ_SECONDS seconds each with cargo-fuzz (libFuzzer, on
## the stable toolchain: no sanitizer, so `-s none`; panics, hangs, leaks of memory past the RSS
## limit and broken assertions are what is caught), then replays the corpus. New inputs go to
## fuzz/target/corpus/<target> (not committed); crashes to fuzz/artifacts/<target>. See
## docs/fuzzing.md.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= nbd_session nbd_transmission vhost_user_messages virtio_descriptors \
  chunk_record segment_recovery extent_meta config_files s3_request s3_http
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/corpus/$$t && \
	  $(CARGO) fuzz run -s none $$t target/corpus/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=60 -print_final_stats=1 || exit 1; \
	done
	$(CARGO) nextest run -p sov-fuzz-targets

clean:
	$(CARGO) clean
