#!/usr/bin/env bash
# Runs ceph/s3-tests (a checkout named by $S3TESTS, never committed here) against `sov up`;
# results in $D/results.xml and $D/pytest.log. Needs: pip install -r $S3TESTS/requirements.txt pytest-timeout.
set -euo pipefail
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}
S3TESTS=${S3TESTS:?set S3TESTS to a checkout of github.com/ceph/s3-tests}
D=$(mktemp -d /tmp/sov-s3tests-XXXXXX)

$BIN/sov up --data $D/cluster --s3-port 8000 --gateway-metrics-port 9399 > $D/up.log 2>&1 &
UP=$!
trap 'kill -TERM $UP; wait $UP' EXIT
for _ in $(seq 1 600); do [[ -s $D/cluster/cluster.json ]] && break; sleep 0.2; done
key() { $BIN/sov --output json key create --name "$1" --metad 127.0.0.1:7400; }
M=$(key main); A=$(key alt); T=$(key tenant)
f() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
cat > $D/s3tests.conf <<CONF
[DEFAULT]
host = 127.0.0.1
port = 8000
is_secure = False
ssl_verify = False
[fixtures]
bucket prefix = sov-{random}-
iam name prefix = s3-tests-
iam path prefix = /s3-tests/
[s3 main]
display_name = main
user_id = $(f "$M" access_key)
email = main@example.com
api_name = default
access_key = $(f "$M" access_key)
secret_key = $(f "$M" secret_key)
[s3 alt]
display_name = alt
email = alt@example.com
user_id = $(f "$A" access_key)
access_key = $(f "$A" access_key)
secret_key = $(f "$A" secret_key)
[s3 tenant]
display_name = tenant
user_id = $(f "$T" access_key)
access_key = $(f "$T" access_key)
secret_key = $(f "$T" secret_key)
email = tenant@example.com
tenant = testx
[iam]
email = s3@example.com
user_id = $(f "$M" access_key)
access_key = $(f "$M" access_key)
secret_key = $(f "$M" secret_key)
display_name = iam
[iam root]
access_key = $(f "$M" access_key)
secret_key = $(f "$M" secret_key)
user_id = $(f "$M" access_key)
email = root@example.com
[iam alt root]
access_key = $(f "$A" access_key)
secret_key = $(f "$A" secret_key)
user_id = $(f "$A" access_key)
email = altroot@example.com
CONF
cd "$S3TESTS"
S3TEST_CONF=$D/s3tests.conf timeout 3000 python3 -m pytest s3tests/functional/test_s3.py -q -p no:cacheprovider \
  --timeout 60 --junitxml=$D/results.xml -o junit_family=xunit1 ${PYTEST_ARGS:-} > $D/pytest.log 2>&1 || true
tail -3 $D/pytest.log
