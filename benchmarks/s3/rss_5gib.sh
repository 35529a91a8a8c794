#!/usr/bin/env bash
# The gateway's memory with a 5 GiB body: one PutObject and one GetObject of 5 GiB through
# `sov up` (release build), then the gateway's peak RSS (VmHWM). Needs ~8 GiB free disk.
set -euo pipefail
B=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}
D=$(mktemp -d /tmp/sov-rss-XXXXXX)
$B/sov up --data $D/c --metad-port 17400 --metad-metrics-port 17401 --storaged-base-port 17100 \
  --metrics-base-port 17200 --s3-port 19000 --gateway-metrics-port 19300 \
  --nbd-port 19809 --vhost-blk-metrics-port 19500 > $D/up.log 2>&1 &
UP=$!
trap 'kill -TERM $UP; wait $UP; rm -rf $D' EXIT
for _ in $(seq 1 600); do [[ -s $D/c/cluster.json ]] && break; sleep 0.2; done
export AWS_ACCESS_KEY_ID=$(python3 -c "import json;print(json.load(open('$D/c/cluster.json'))['access_key'])")
export AWS_SECRET_ACCESS_KEY=$(python3 -c "import json;print(json.load(open('$D/c/cluster.json'))['secret_key'])")
export AWS_DEFAULT_REGION=us-east-1
GW=$(pgrep -f "gateway-s3 --listen 127.0.0.1:19000")
truncate -s 5G $D/five.bin
E="--endpoint-url http://127.0.0.1:19000"
python3 -m awscli $E s3 mb s3://rss >/dev/null
t=$(date +%s)
python3 -m awscli $E s3api put-object --bucket rss --key five --body $D/five.bin --storage-class STANDARD_IA > /dev/null
echo "PUT 5 GiB (one request) in $(( $(date +%s) - t )) s; gateway VmHWM $(grep VmHWM /proc/$GW/status)"
t=$(date +%s)
python3 -m awscli $E s3api get-object --bucket rss --key five $D/five.out > /dev/null
echo "GET 5 GiB in $(( $(date +%s) - t )) s; gateway VmHWM $(grep VmHWM /proc/$GW/status)"
cmp $D/five.bin $D/five.out && echo "5 GiB round trip identical"
