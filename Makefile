# The two entry points: `make up` and `make test`. See README.md.
SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: up build test deps test-deps fmt clippy unit metrics-check bench-smoke bench bench-metad bench-quick bench-s3 bench-block fuzz clean

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

bench-smoke:
	$(TARGET_DIR)/debug/sov-bench storaged --quick
	$(TARGET_DIR)/debug/sov-bench metad --quick --clients 1,16
	$(TARGET_DIR)/debug/sov-bench codec --quick
	$(TARGET_DIR)/debug/sov-bench datapath --quick
	$(TARGET_DIR)/debug/sov-bench recovery --quick
	python3 benchmarks/s3/s3_bench.py --quick --sov-bin $(TARGET_DIR)/debug/sov \
	  --s3s-fs $$(command -v s3s-fs || echo $$HOME/.cargo/bin/s3s-fs) \
	  --sov-bench $(TARGET_DIR)/debug/sov-bench --list-keys 2000
	$(TARGET_DIR)/debug/sov-bench sector-crypto --quick
	python3 benchmarks/block/block_bench.py --quick --sov-bin $(TARGET_DIR)/debug

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

## Storage node benchmark against the raw disk (release build).
bench: deps
	./scripts/install-deps.sh --bench
	$(CARGO) build --release -p storaged -p metad -p sov-bench
	$(TARGET_DIR)/release/sov-bench storaged
	$(TARGET_DIR)/release/sov-bench metad
	$(TARGET_DIR)/release/sov-bench codec
	$(TARGET_DIR)/release/sov-bench datapath
	$(TARGET_DIR)/release/sov-bench recovery
	$(MAKE) bench-s3
	$(MAKE) bench-block

## The S3 endpoint against s3s-fs (64 MiB and 4 KiB objects, concurrency 1 and 32) and the
## listing rate of a bucket of a million keys.
bench-s3:
	./scripts/install-deps.sh --test
	$(CARGO) build --release --workspace --bins
	python3 benchmarks/s3/s3_bench.py --sov-bin $(TARGET_DIR)/release/sov \
	  --s3s-fs $$(command -v s3s-fs || echo $$HOME/.cargo/bin/s3s-fs) \
	  --sov-bench $(TARGET_DIR)/release/sov-bench --list-keys 1000000

## Block volumes (3 replicas, encrypted) against qemu-storage-daemon exporting a raw file, both
## over NBD with fio; and 4 KiB sector sealing, AES-GCM against XTS + blake3.
bench-block:
	./scripts/install-deps.sh --bench
	$(CARGO) build --release --workspace --bins
	$(TARGET_DIR)/release/sov-bench sector-crypto
	python3 benchmarks/block/block_bench.py --sov-bin $(TARGET_DIR)/release

## metad against etcd (three members each, loopback).
bench-metad:
	./scripts/install-deps.sh --bench
	$(CARGO) build --release -p metad -p sov-bench
	$(TARGET_DIR)/release/sov-bench metad

bench-quick: deps
	$(CARGO) build --release -p storaged -p sov-bench
	$(TARGET_DIR)/release/sov-bench storaged --quick

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
