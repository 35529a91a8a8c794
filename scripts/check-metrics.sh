#!/usr/bin/env bash
# Starts a storaged (from BIN_DIR, default target/debug), does a few chunk operations with the
# sov CLI, and runs `promtool check metrics` on its /metrics. Fails on any lint problem.
set -euo pipefail

BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}
work=$(mktemp -d /tmp/sov-metrics-XXXXXX)
pid=""
cleanup() {
  if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$BIN_DIR/storaged" --disk "$work/disk" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --ready-file "$work/ready.json" >"$work/storaged.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
  [[ -s "$work/ready.json" ]] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/storaged.log"; echo "storaged exited" >&2; exit 1; }
  sleep 0.1
done
[[ -s "$work/ready.json" ]] || { cat "$work/storaged.log"; echo "storaged not ready" >&2; exit 1; }
listen=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listen"])' "$work/ready.json")
metrics=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics_listen"])' "$work/ready.json")

id=$(head -c 100000 /dev/urandom | "$BIN_DIR/sov" debug chunk put --storaged "$listen")
"$BIN_DIR/sov" debug chunk get --storaged "$listen" "$id" >/dev/null
"$BIN_DIR/sov" debug chunk get --storaged "$listen" missing-chunk >/dev/null 2>&1 || true
sleep 1.2   # let the gauges refresh once

curl -fsS "http://$metrics/metrics" >"$work/metrics.txt"
echo "storaged /metrics: $(grep -vc '^#' "$work/metrics.txt") samples"
promtool check metrics <"$work/metrics.txt"
echo "promtool check metrics: storaged OK"
