#!/usr/bin/env python3
"""Block volumes over NBD: a sov volume (3 replicas, AES-256-GCM per 4 KiB sector, exported
by vhost-blk from a cluster started by `sov up`) next to a raw file exported by
qemu-storage-daemon (one copy, no encryption, page cache on), both on loopback NBD on this
machine and in the same folder, driven by the same fio jobs (nbd engine) in the same run, and
the ratio sov / baseline.

  python3 benchmarks/block/block_bench.py [--sov-bin target/release] [--quick] [--work DIR]
                                          [--json-out FILE] [--keep]

Each target's region is written once with 1 MiB sequential writes (the fill, also reported),
so every read hits written data; then, per workload, sov and the baseline run one after the
other (which one goes first alternates): 4k randread and randwrite at iodepth 1 and 32, 1M
sequential read and write at iodepth 8. Needs fio (with its nbd engine) and
qemu-storage-daemon. Exits non-zero on any failure."""

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

DAEMONS = ("sov", "metad", "storaged", "gateway-s3", "vhost-blk")

# (name, fio rw, block size, iodepth)
WORKLOADS = [
    ("4k randread qd1", "randread", "4k", 1),
    ("4k randread qd32", "randread", "4k", 32),
    ("4k randwrite qd1", "randwrite", "4k", 1),
    ("4k randwrite qd32", "randwrite", "4k", 32),
    ("1M seqread qd8", "read", "1M", 8),
    ("1M seqwrite qd8", "write", "1M", 8),
]


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_ports(n, consecutive=False, taken=()):
    """n free loopback ports, distinct from `taken` (consecutive if asked)."""
    for _ in range(500):
        if consecutive:
            base = random.randint(20000, 60000 - n)
            cand = list(range(base, base + n))
        else:
            cand = [random.randint(20000, 60000) for _ in range(n)]
        if len(set(cand)) != n or set(cand) & set(taken):
            continue
        socks = []
        try:
            for p in cand:
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return cand
        except OSError:
            pass
        finally:
            for s in socks:
                s.close()
    raise BenchError("no free ports")


def wait_port(port, proc, logfile, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise BenchError(f"exited ({proc.returncode}) before listening on {port}: "
                             + tail(logfile))
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"port {port} never opened: " + tail(logfile))


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            text = "".join(f.readlines()[-n:])
        return "\n" + re.sub(r"\x1b\[[0-9;]*m", "", text)
    except OSError:
        return f"(no {path})"


def run(cmd, timeout=300):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p.stdout


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Sov:
    """A `sov up` cluster in its own process group."""

    def __init__(self, sov_bin, work):
        self.sov = os.path.join(sov_bin, "sov")
        self.data = os.path.join(work, "sov-data")
        self.log = os.path.join(work, "sov-up.log")
        self.proc = None
        self.cluster = None
        self.attached = None

    def start(self, timeout):
        stor = free_ports(3, consecutive=True)
        met = free_ports(3, consecutive=True, taken=stor)
        single = free_ports(7, taken=stor + met)
        self.nbd_port = single[5]
        cmd = [self.sov, "up", "--data", self.data, "--storage-nodes", "3", "--zones", "3",
               "--storaged-base-port", str(stor[0]), "--metrics-base-port", str(met[0]),
               "--metad-port", str(single[0]), "--metad-metrics-port", str(single[1]),
               "--s3-port", str(single[2]), "--gateway-metrics-port", str(single[3]),
               "--vhost-blk-metrics-port", str(single[4]), "--nbd-port", str(single[5])]
        os.makedirs(self.data, exist_ok=True)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        cj = os.path.join(self.data, "cluster.json")
        end = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"sov up exited ({self.proc.returncode}):" + tail(self.log))
            if os.path.exists(cj):
                try:
                    with open(cj) as f:
                        self.cluster = json.load(f)
                    break
                except ValueError:
                    pass  # being written
            if time.time() > end:
                raise BenchError(f"sov up not ready after {timeout} s:" + tail(self.log))
            time.sleep(0.2)
        self.metad = ",".join(self.cluster["metad_endpoints"])

    def cli(self, *args):
        return run([self.sov, *args, "--metad", self.metad])

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError(f"sov up exited ({self.proc.returncode}):" + tail(self.log))
        for p in self.cluster["processes"]:
            if not alive(p["pid"]):
                raise BenchError(f"{p['name']} (pid {p['pid']}) died; its log: "
                                 + tail(os.path.join(self.data, p["name"], p["name"] + ".log")))

    def logs(self):
        return [os.path.join(self.data, p["name"], p["name"] + ".log")
                for p in (self.cluster or {}).get("processes", [])]

    def detach(self, name):
        """Best effort: `sov up` stops metad together with vhost-blk, and a vhost-blk still
        holding a volume then retries closing it against a gone metad for ~15 s."""
        try:
            subprocess.run([self.sov, "volume", "detach", name, "--timeout", "10",
                            "--metad", self.metad], capture_output=True, timeout=30)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.attached:
                self.detach(self.attached)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)  # sov up gives its daemons 30 s
            except subprocess.TimeoutExpired:
                log("sov up did not stop in 60 s; killing its process group")
        # Anything of the group still there (sov up killed, or a daemon that outlived it).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for p in (self.cluster or {}).get("processes", []):
            if alive(p["pid"]):
                try:
                    os.kill(p["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Qsd:
    """qemu-storage-daemon exporting a raw file over NBD."""

    def __init__(self, work, size):
        self.img = os.path.join(work, "raw.img")
        self.log = os.path.join(work, "qsd.log")
        self.size = size
        self.proc = None

    def start(self):
        run(["truncate", "-s", str(self.size), self.img])
        (self.port,) = free_ports(1)
        self.cmd = ["qemu-storage-daemon",
                    "--blockdev", f"driver=file,node-name=f,filename={self.img},cache.direct=off",
                    "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}",
                    "--export", "type=nbd,id=e,node-name=f,name=raw,writable=on"]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, self.proc, self.log)
        self.uri = f"nbd://127.0.0.1:{self.port}/raw"

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError(f"qemu-storage-daemon exited ({self.proc.returncode}):" + tail(self.log))

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fio(uri, name, rw, bs, iodepth, size, runtime, time_based):
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", f"--size={size}", "--direct=0", "--group_reporting",
           "--output-format=json"]
    if time_based:
        cmd += ["--time_based", f"--runtime={runtime}"]
    limit = (runtime + 120) if time_based else 1800
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {name} against {uri} did not finish in {limit} s")
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    i = p.stdout.find("\n{")
    text = p.stdout if p.stdout.startswith("{") else p.stdout[i + 1:] if i >= 0 else ""
    try:
        out = json.loads(text)
    except ValueError:
        raise BenchError(f"fio {name} against {uri}: exit {p.returncode}, no JSON:\n"
                         f"{p.stdout[-2000:]}{p.stderr[-2000:]}")
    if p.returncode != 0:
        raise BenchError(f"fio {name} against {uri} exited {p.returncode}:\n{p.stderr[-2000:]}")
    jobs = out.get("jobs", [])
    if len(jobs) != 1:
        raise BenchError(f"fio {name}: expected 1 job (group_reporting), got {len(jobs)}")
    job = jobs[0]
    if job.get("error", 1) != 0:
        raise BenchError(f"fio {name} against {uri}: job error {job.get('error')}:\n"
                         f"{p.stderr[-2000:]}")
    d = job["read" if "read" in rw else "write"]
    if d["total_ios"] <= 0:
        raise BenchError(f"fio {name} against {uri}: no I/O completed")
    pct = d["clat_ns"].get("percentile", {})
    return {"iops": d["iops"], "mib_s": d["bw_bytes"] / 2**20,
            "p50_ms": pct.get("50.000000", 0) / 1e6, "p99_ms": pct.get("99.000000", 0) / 1e6,
            "ios": d["total_ios"], "seconds": job["job_runtime"] / 1000}


def fmt_size(n):
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n % f == 0:
            return f"{n // f}{unit}"
    return str(n)


def num(x):
    """Three significant digits at least, no exponent: 0.0042, 2.41, 13571."""
    if x != x:
        return "n/a"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.2f}" if x < 10 else f"{x:.1f}"
    return f"{x:.3g}" if x >= 0.001 else f"{x:.2e}"


def no_nan(v):
    """NaN is not JSON: null instead."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: no_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [no_nan(x) for x in v]
    return v


def ratio(a, b):
    return a / b if b else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sov-bin", default="target/release",
                    help="folder with sov and its sibling daemons (default: target/release)")
    ap.add_argument("--quick", action="store_true", help="64 MiB region, 2 s per job")
    ap.add_argument("--work", help="folder for the cluster's data and the raw file "
                                   "(default: a new folder under /var/tmp)")
    ap.add_argument("--json-out", help="also write the results as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    size = (64 if args.quick else 1024) * 2**20
    runtime = 2 if args.quick else 20
    sov_bin = os.path.abspath(args.sov_bin)
    for b in DAEMONS:
        if not os.access(os.path.join(sov_bin, b), os.X_OK):
            sys.exit(f"block_bench: {os.path.join(sov_bin, b)} missing; build the workspace")
    for tool in ("fio", "qemu-storage-daemon", "truncate"):
        if not shutil.which(tool):
            sys.exit(f"block_bench: {tool} not found (./scripts/install-deps.sh)")

    if args.work:
        work = os.path.abspath(args.work)
        os.makedirs(work, exist_ok=True)
        made = [os.path.join(work, x) for x in ("sov-data", "raw.img", "sov-up.log", "qsd.log")]
    else:
        work = tempfile.mkdtemp(prefix="sov-block-bench-", dir="/var/tmp")
        made = [work]

    # SIGTERM (and SIGHUP) unwind through the finally below like Ctrl-C does.
    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    sov = Sov(sov_bin, work)
    qsd = Qsd(work, size)
    started = time.time()
    failed = True
    try:
        log(f"starting the sov cluster in {sov.data} ...")
        sov.start(timeout=180)
        log(f"cluster up in {time.time() - started:.1f} s; creating and attaching the volume")
        sov.cli("volume", "create", "bench", "--size", fmt_size(size), "--tier", "performance",
                "--iops", "100000000", "--bandwidth", "100GiB")
        att = json.loads(sov.cli("--output", "json", "volume", "attach", "bench",
                                 "--protocol", "nbd"))
        sov_uri = att["uri"]
        sov.attached = "bench"
        pool = att.get("pool") or "standard"
        pools = json.loads(sov.cli("--output", "json", "pool", "list")).get("pools", [])
        redundancy = next((p.get("redundancy") for p in pools if p.get("name") == pool), None)
        qsd.start()
        targets = [("sov", sov_uri, sov), ("baseline", qsd.uri, qsd)]

        header = [
            f"# sov block volume vs local raw file, both over NBD on loopback "
            f"({'quick' if args.quick else 'full'} mode)",
            f"# sov:      {sov_uri}  volume 'bench' {fmt_size(size)}, pool {pool} "
            f"({redundancy or '?'}, 3 storaged in 3 zones), AES-256-GCM per 4 KiB sector, "
            f"tier performance with --iops 100000000 --bandwidth 100GiB, exported by vhost-blk; "
            f"binaries {sov_bin}",
            f"# baseline: {qsd.uri}  qemu-storage-daemon, driver=file cache.direct=off on "
            f"{qsd.img} ({fmt_size(size)}, truncate), one copy, no encryption",
            f"# data of both under {work}",
            f"# fio --ioengine=nbd --direct=0 --group_reporting --size={fmt_size(size)} "
            f"--time_based --runtime={runtime}; region filled first with "
            f"--rw=write --bs=1M --iodepth=8 (once per target, not time based)",
            f"# p99 = completion latency (clat) 99th percentile, ms; ratio = sov / baseline",
        ]
        for line in header:
            log(line)

        results = []
        fill = {}
        for name, uri, t in targets:
            log(f"fill {name}: {fmt_size(size)} of 1M writes ...")
            fill[name] = fio(uri, "fill", "write", "1M", 8, size, runtime, time_based=False)
            t.check_alive()
        results.append({"workload": "fill 1M seqwrite qd8 (first write)", "rw": "write",
                        "bs": "1M", "iodepth": 8, **fill})

        for i, (wname, rw, bs, qd) in enumerate(WORKLOADS):
            r = {"workload": wname, "rw": rw, "bs": bs, "iodepth": qd}
            order = targets if i % 2 == 0 else targets[::-1]
            for name, uri, t in order:
                log(f"{wname}: {name} ...")
                r[name] = fio(uri, wname.replace(" ", "-"), rw, bs, qd, size, runtime, True)
                t.check_alive()
            results.append(r)

        # Detach (flushes and releases the lease) while the cluster is whole.
        sov.cli("volume", "detach", "bench")
        sov.attached = None

        rows = ["| workload | sov IOPS | sov MiB/s | sov p99 ms | baseline IOPS | baseline MiB/s "
                "| baseline p99 ms | IOPS ratio | MiB/s ratio | p99 ratio |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            s, b = r["sov"], r["baseline"]
            r["ratio"] = {"iops": ratio(s["iops"], b["iops"]),
                          "mib_s": ratio(s["mib_s"], b["mib_s"]),
                          "p99": ratio(s["p99_ms"], b["p99_ms"])}
            rows.append(f"| {r['workload']} | {num(s['iops'])} | {s['mib_s']:.1f} | "
                        f"{s['p99_ms']:.2f} | {num(b['iops'])} | {b['mib_s']:.1f} | "
                        f"{b['p99_ms']:.2f} | {num(r['ratio']['iops'])} | "
                        f"{num(r['ratio']['mib_s'])} | {num(r['ratio']['p99'])} |")
        elapsed = time.time() - started
        print("\n".join(header))
        print()
        print("\n".join(rows))
        print()
        print(f"# total time {elapsed:.0f} s")

        if args.json_out:
            doc = {"bench": "block", "mode": "quick" if args.quick else "full",
                   "size_bytes": size, "runtime_s": runtime, "sov_bin": sov_bin,
                   "sov_pool": pool, "sov_redundancy": redundancy,
                   "sov_uri": sov_uri, "baseline_uri": qsd.uri,
                   "baseline_cmd": qsd.cmd, "elapsed_s": elapsed, "results": results}
            with open(args.json_out, "w") as f:
                json.dump(no_nan(doc), f, indent=2)
                f.write("\n")
        failed = False
    except BenchError as e:
        log(f"block_bench: error: {e}")
        vb = [p for p in sov.logs() if "vhost-blk" in p]
        for p in [sov.log, *vb]:
            if os.path.exists(p):
                log(f"--- last lines of {p}:" + tail(p, 15))
        if not args.keep:
            log("(rerun with --keep to keep every log and the data)")
    finally:
        qsd.stop()
        sov.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            for p in made:
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.exists(p):
                    os.remove(p)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
