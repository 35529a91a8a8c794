#!/usr/bin/env bash
# Starts each daemon (from BIN_DIR, default target/debug): a metad, and a storaged registered
# with it; does a few operations with the sov CLI, and runs `promtool check metrics` on each
# daemon's /metrics. Fails on any lint problem.
set -euo pipefail

BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}
work=$(mktemp -d /tmp/sov-metrics-XXXXXX)
pid=""
mpid=""
gpid=""
vpid=""
cleanup() {
  if [[ -n "$vpid" ]]; then kill "$vpid" 2>/dev/null || true; wait "$vpid" 2>/dev/null || true; fi
  if [[ -n "$gpid" ]]; then kill "$gpid" 2>/dev/null || true; wait "$gpid" 2>/dev/null || true; fi
  if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [[ -n "$mpid" ]]; then kill "$mpid" 2>/dev/null || true; wait "$mpid" 2>/dev/null || true; fi
  [[ -n "${KEEP:-}" ]] || rm -rf "$work"
}
trap cleanup EXIT

# wait_ready NAME PID READY_FILE LOG: waits up to 60 s for the ready file while PID lives.
wait_ready() {
  for _ in $(seq 1 600); do
    [[ -s "$3" ]] && return 0
    kill -0 "$2" 2>/dev/null || { cat "$4"; echo "$1 exited" >&2; exit 1; }
    sleep 0.1
  done
  cat "$4"; echo "$1 not ready" >&2; exit 1
}

json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# The daemons talk mutual TLS: a cluster CA, a certificate for each, one for this script's sov.
"$BIN_DIR/sov" cert init --ca "$work/pki" >/dev/null
issue() { "$BIN_DIR/sov" cert issue --ca "$work/pki" --role "$1" --name "$2" --out "$work/tls-$2" "${@:3}" >/dev/null; }
issue metad metad-1
issue storaged node-1
issue gateway gateway --dns 127.0.0.1
issue vhost-blk vhost-blk-1
issue admin ops
export SOV_TLS_DIR="$work/tls-ops"

"$BIN_DIR/metad" --id 1 --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir "$work/metad" \
  --tls-dir "$work/tls-metad-1" \
  --ready-file "$work/metad-ready.json" >"$work/metad.log" 2>&1 &
mpid=$!
wait_ready metad "$mpid" "$work/metad-ready.json" "$work/metad.log"
metad_addr=$(json_field "$work/metad-ready.json" listen)
metad_metrics=$(json_field "$work/metad-ready.json" metrics_listen)

"$BIN_DIR/storaged" --disk "$work/disk" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --metad "$metad_addr" --tls-dir "$work/tls-node-1" \
  --ready-file "$work/ready.json" >"$work/storaged.log" 2>&1 &
pid=$!
wait_ready storaged "$pid" "$work/ready.json" "$work/storaged.log"
listen=$(json_field "$work/ready.json" listen)
metrics=$(json_field "$work/ready.json" metrics_listen)

id=$(head -c 100000 /dev/urandom | "$BIN_DIR/sov" debug chunk put --storaged "$listen")
"$BIN_DIR/sov" debug chunk get --storaged "$listen" "$id" >/dev/null
"$BIN_DIR/sov" debug chunk get --storaged "$listen" missing-chunk >/dev/null 2>&1 || true
sleep 1.2   # let the gauges refresh once

curl -fsS "http://$metrics/metrics" >"$work/metrics.txt"
echo "storaged /metrics: $(grep -vc '^#' "$work/metrics.txt") samples"
promtool check metrics <"$work/metrics.txt"
echo "promtool check metrics: storaged OK"

"$BIN_DIR/sov" cluster status --metad "$metad_addr" >/dev/null
"$BIN_DIR/sov" node list --metad "$metad_addr" >/dev/null
"$BIN_DIR/sov" pool create p1 --redundancy replicated:1 --metad "$metad_addr" >/dev/null
"$BIN_DIR/sov" pool list --metad "$metad_addr" >/dev/null
sleep 0.5
curl -fsS "http://$metad_metrics/metrics" >"$work/metad-metrics.txt"
echo "metad /metrics: $(grep -vc '^#' "$work/metad-metrics.txt") samples"
grep -q '^metad_storage_nodes{state="up"} 1' "$work/metad-metrics.txt" \
  || { cat "$work/metad-metrics.txt"; echo "storaged did not register with metad" >&2; exit 1; }
promtool check metrics <"$work/metad-metrics.txt"
echo "promtool check metrics: metad OK"

"$BIN_DIR/gateway-s3" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --metad "$metad_addr" \
  --tls-dir "$work/tls-gateway" --https-cert "$work/tls-gateway/cert.pem" --https-key "$work/tls-gateway/key.pem" \
  --ready-file "$work/gateway-ready.json" >"$work/gateway.log" 2>&1 &
gpid=$!
wait_ready gateway-s3 "$gpid" "$work/gateway-ready.json" "$work/gateway.log"
s3=$(json_field "$work/gateway-ready.json" listen)
gmetrics=$(json_field "$work/gateway-ready.json" metrics_listen)
curl -s -o /dev/null --cacert "$work/pki/ca.pem" "https://$s3/" || true          # anonymous: AccessDenied
curl -s -o /dev/null --cacert "$work/pki/ca.pem" "https://$s3/no-such/key" || true
curl -fsS "http://$gmetrics/metrics" >"$work/gateway-metrics.txt"
echo "gateway-s3 /metrics: $(grep -vc '^#' "$work/gateway-metrics.txt") samples"
grep -q 'gateway_requests_total' "$work/gateway-metrics.txt" \
  || { cat "$work/gateway-metrics.txt"; echo "gateway recorded no request" >&2; exit 1; }
promtool check metrics <"$work/gateway-metrics.txt"
echo "promtool check metrics: gateway-s3 OK"

"$BIN_DIR/vhost-blk" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --metad "$metad_addr" \
  --data "$work/vhost-blk" --id vhost-blk-1 --tls-dir "$work/tls-vhost-blk-1" --ready-file "$work/vhost-blk-ready.json" >"$work/vhost-blk.log" 2>&1 &
vpid=$!
wait_ready vhost-blk "$vpid" "$work/vhost-blk-ready.json" "$work/vhost-blk.log"
nbd=$(json_field "$work/vhost-blk-ready.json" listen)
vmetrics=$(json_field "$work/vhost-blk-ready.json" metrics_listen)
nbdinfo "nbd://$nbd/no-such-volume" >/dev/null 2>&1 || true   # refused export
curl -fsS "http://$vmetrics/metrics" >"$work/vhost-blk-metrics.txt"
echo "vhost-blk /metrics: $(grep -vc '^#' "$work/vhost-blk-metrics.txt") samples"
grep -q 'vhost_blk_exports 0' "$work/vhost-blk-metrics.txt" \
  || { cat "$work/vhost-blk-metrics.txt"; echo "vhost-blk metrics missing" >&2; exit 1; }
promtool check metrics <"$work/vhost-blk-metrics.txt"
echo "promtool check metrics: vhost-blk OK"
