#!/usr/bin/env python3
"""S3 throughput and latency of sov (a cluster started by `sov up`) next to s3s-fs (a
single-node S3 server on a local directory, no replication, no encryption) in the same run,
with the same boto3 client workload, and the ratio.

  python3 benchmarks/s3/s3_bench.py --sov-bin target/release/sov --s3s-fs ~/.cargo/bin/s3s-fs [--quick]

Workloads, each at concurrency 1 and 32: PUT then GET of 64 MiB objects (MiB/s), PUT then GET
of 4 KiB objects (ops/s, p50 and p99 latency). Every GET is checked against what was PUT."""

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import boto3
from botocore.client import Config


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def free_range(n):
    import random
    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            pass
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def wait_port(port, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def client(endpoint, ak, sk, pool):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ak, aws_secret_access_key=sk,
                        region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, max_pool_connections=pool,
                                      retries={"max_attempts": 1}))


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def run_case(s3, bucket, size, conc, count, tag):
    body = os.urandom(size)
    want = hashlib.md5(body).hexdigest()
    keys = [f"{tag}/{size}/{conc}/{i}" for i in range(count)]

    def put(k):
        t = time.perf_counter()
        s3.put_object(Bucket=bucket, Key=k, Body=body)
        return time.perf_counter() - t

    def get(k):
        t = time.perf_counter()
        data = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
        d = time.perf_counter() - t
        if hashlib.md5(data).hexdigest() != want:
            raise RuntimeError(f"{k}: wrong bytes")
        return d

    out = {}
    for op, fn in (("put", put), ("get", get)):
        with cf.ThreadPoolExecutor(conc) as ex:
            t = time.perf_counter()
            lat = list(ex.map(fn, keys))
            total = time.perf_counter() - t
        out[op] = {"mib_s": count * size / total / 2**20, "ops_s": count / total,
                   "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000}
    return out


def workload(s3, bucket, quick, tag):
    big = (8 if quick else 64) * 2**20
    res = {}
    for conc in (1, 32):
        n_big = (2 if quick else 4) if conc == 1 else (4 if quick else 32)
        n_small = (50 if quick else 400) if conc == 1 else (200 if quick else 3200)
        res[("64MiB" if not quick else "8MiB", conc)] = run_case(s3, bucket, big, conc, n_big, tag)
        res[("4KiB", conc)] = run_case(s3, bucket, 4096, conc, n_small, tag)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sov-bin", required=True)
    ap.add_argument("--s3s-fs", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sov-bench", help="sov-bench binary; with --list-keys, measures listing")
    ap.add_argument("--list-keys", type=int, default=0, help="keys in the listing benchmark")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sov-s3-bench-")
    procs = []
    try:
        s3port, fsport = free_port(), free_port()
        up = [args.sov_bin, "up", "--data", f"{work}/sov", "--s3-port", str(s3port),
              "--gateway-metrics-port", str(free_port()), "--metad-port", str(free_port()),
              "--metad-metrics-port", str(free_port()), "--storaged-base-port", str(free_range(3)),
              "--metrics-base-port", str(free_range(3)), "--nbd-port", str(free_port()),
              "--vhost-blk-metrics-port", str(free_port())]
        procs.append(subprocess.Popen(up, stdout=open(f"{work}/up.log", "w"), stderr=subprocess.STDOUT))
        cj = f"{work}/sov/cluster.json"
        end = time.time() + 120
        while not os.path.exists(cj):
            if time.time() > end or procs[0].poll() is not None:
                raise RuntimeError("sov up did not start: " + open(f"{work}/up.log").read())
            time.sleep(0.2)
        c = json.load(open(cj))
        os.makedirs(f"{work}/fs")
        fs = [args.s3s_fs, "--host", "127.0.0.1", "--port", str(fsport), "--access-key", "bench",
              "--secret-key", "benchsecret", f"{work}/fs"]
        procs.append(subprocess.Popen(fs, stdout=open(f"{work}/fs.log", "w"), stderr=subprocess.STDOUT))
        wait_port(fsport)
        targets = {
            "sov": client(c["s3_endpoint"], c["access_key"], c["secret_key"], 64),
            "s3s-fs": client(f"http://127.0.0.1:{fsport}", "bench", "benchsecret", 64),
        }
        results = {}
        for name, s3 in targets.items():
            s3.create_bucket(Bucket="bench")
            print(f"running against {name} ...", file=sys.stderr, flush=True)
            results[name] = workload(s3, "bench", args.quick, name)
        if args.list_keys and args.sov_bench:
            s3 = targets["sov"]
            s3.create_bucket(Bucket="listing")
            subprocess.run([args.sov_bench, "fill-index", "--metad", c["metad_endpoints"][0],
                            "--bucket", "listing", "--keys", str(args.list_keys)], check=True)
            t = time.perf_counter()
            n, token = 0, None
            while True:
                kw = {"Bucket": "listing", "MaxKeys": 1000}
                if token:
                    kw["ContinuationToken"] = token
                p = s3.list_objects_v2(**kw)
                n += p.get("KeyCount", 0)
                if not p["IsTruncated"]:
                    break
                token = p["NextContinuationToken"]
            secs = time.perf_counter() - t
            if n != args.list_keys:
                raise RuntimeError(f"listed {n} keys, filled {args.list_keys}")
            print(f"listing: {n} keys in {secs:.1f} s through ListObjectsV2 (1000 per page): "
                  f"{n / secs:.0f} objects/s")
        print("| object | conc | op | sov | s3s-fs | sov / s3s-fs | sov p50 / p99 ms | s3s-fs p50 / p99 ms |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for (obj, conc), r in results["sov"].items():
            f = results["s3s-fs"][(obj, conc)]
            for op in ("put", "get"):
                key = "ops_s" if obj == "4KiB" else "mib_s"
                unit = "ops/s" if key == "ops_s" else "MiB/s"
                a, b = r[op][key], f[op][key]
                print(f"| {obj} | {conc} | {op.upper()} | {a:.1f} {unit} | {b:.1f} {unit} | {a / b:.2f} | "
                      f"{r[op]['p50_ms']:.1f} / {r[op]['p99_ms']:.1f} | {f[op]['p50_ms']:.1f} / {f[op]['p99_ms']:.1f} |")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
