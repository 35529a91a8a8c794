#!/usr/bin/env python3
"""Block volumes: a sov volume (3 replicas, AES-256-GCM per 4 KiB sector, exported over NBD by
vhost-blk from a cluster started by `sov up`) next to a raw file exported over NBD by
qemu-storage-daemon (one copy, no encryption, page cache on) and, with --ceph, an RBD image of
a single-host Ceph (3 bluestore OSDs, pool size 3, benchmarks/ceph/ceph.sh), all on this
machine and in the same folder, driven by the same fio jobs in the same run.

  python3 benchmarks/block/block_bench.py [--sov-bin target/release] [--ceph [CEPH_SH]]
                                          [--rbd-cache off|default] [--quick] [--rounds N]
                                          [--runtime S] [--work DIR] [--results FILE]
                                          [--json-out FILE] [--keep]

Each target's region is written once with 1 MiB sequential writes (the fill, also reported),
so every read hits written data. Then, for each of N rounds, every workload runs once on every
target, one target after the other (the order rotates from one workload and round to the
next): 4k randread and randwrite at iodepth 1, 4, 16 and 64 (--quick: 1 and 16), 1M
sequential read and write at iodepth 8. The figures are the medians over the rounds. sov and
qemu-storage-daemon are reached with fio's nbd engine, RBD with fio's rbd engine (librbd in
fio's process, its cache off unless --rbd-cache default). Needs fio (nbd and rbd engines)
and qemu-storage-daemon; --ceph needs the Ceph packages (see ceph.sh). Exits non-zero on any
failure; on SIGTERM, SIGHUP or Ctrl-C it stops everything it started."""

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

DAEMONS = ("sov", "metad", "storaged", "gateway-s3", "vhost-blk")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CEPH_SH = os.path.normpath(os.path.join(HERE, "..", "ceph", "ceph.sh"))

# Display names: short (table columns) and long (plot series, headline).
SHORT = {"sov": "sov", "qsd": "qsd", "rbd": "rbd"}
LONG = {"sov": "sov", "qsd": "qemu-storage-daemon", "rbd": "Ceph RBD"}


def workloads(quick):
    """(name, fio rw, block size, iodepth, kind); kind groups the rows of a plot."""
    qds = (1, 16) if quick else (1, 4, 16, 64)
    out = []
    for rw in ("randread", "randwrite"):
        out += [(f"4k {rw} qd{qd}", rw, "4k", qd, rw) for qd in qds]
    out += [("1M seqread qd8", "read", "1M", 8, "seq"), ("1M seqwrite qd8", "write", "1M", 8, "seq")]
    return out


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# Ports handed out by free_ports in this run, so that two callers never get the same one
# before their servers bind them.
RESERVED = set()


def free_ports(n, consecutive=False, taken=()):
    """n free loopback ports, distinct from `taken` and from earlier answers (consecutive if
    asked)."""
    for _ in range(500):
        if consecutive:
            base = random.randint(20000, 60000 - n)
            cand = list(range(base, base + n))
        else:
            cand = [random.randint(20000, 60000) for _ in range(n)]
        if len(set(cand)) != n or set(cand) & (set(taken) | RESERVED):
            continue
        socks = []
        try:
            for p in cand:
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            RESERVED.update(cand)
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
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd)} did not finish in {timeout} s")
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p.stdout


def alive(pid):
    """Running (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


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
        # The cluster speaks mutual TLS; every `sov` this script runs uses its operator certificate.
        os.environ["SOV_TLS_DIR"] = self.cluster["tls_dir"]

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


class Ceph:
    """A single-host Ceph started with `ceph.sh up` (in the background, so that it comes up
    while the sov cluster does) and always removed with `ceph.sh down`."""

    def __init__(self, script, work, size, rbd_cache):
        self.script = script
        self.rbd_cache = rbd_cache
        self.dir = os.path.join(work, "ceph-block")
        self.log = os.path.join(work, "ceph-up.log")
        self.size = size
        self.proc = None
        self.info = None
        self.started = None

    def begin(self):
        mon, rgw = free_ports(2)
        osd_gib = max(4, 2 * -(-self.size // 2**30) + 2)
        self.cmd = ["bash", self.script, "up", self.dir, "--mon-port", str(mon),
                    "--rgw-port", str(rgw), "--osds", "3", "--osd-size-gib", str(osd_gib),
                    "--rbd-image-mib", str(self.size // 2**20)]
        if self.rbd_cache == "off":
            self.cmd += ["--rbd-cache", "false"]
        self.started = time.time()
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.out,
                                     stdin=subprocess.DEVNULL, text=True,
                                     start_new_session=True)

    def finish(self, timeout):
        left = max(1, timeout - (time.time() - self.started))
        try:
            stdout, _ = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            raise BenchError(f"ceph.sh up not done after {timeout} s:" + tail(self.log))
        if self.proc.returncode != 0:
            raise BenchError(f"ceph.sh up exited {self.proc.returncode}:" + tail(self.log))
        for line in reversed(stdout.splitlines()):
            try:
                self.info = json.loads(line)
                break
            except ValueError:
                pass
        if not self.info or "conf" not in self.info:
            raise BenchError(f"ceph.sh up printed no JSON line: {stdout!r}")
        self.conf = self.info["conf"]
        self.env = dict(os.environ, CEPH_CONF=self.conf)
        return time.time() - self.started

    def check_alive(self):
        pids = os.path.join(self.dir, "pids")
        for f in sorted(os.listdir(pids)) if os.path.isdir(pids) else []:
            try:
                with open(os.path.join(pids, f)) as fh:
                    pid = int(fh.read().strip())
            except (OSError, ValueError):
                continue
            if not alive(pid):
                name = f[:-4]
                raise BenchError(f"Ceph's {name} (pid {pid}) died; its log:"
                                 + tail(os.path.join(self.dir, "log", name + ".log"), 15))

    def stop(self, keep_logs=None):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # ceph.sh up stops the daemons it started on SIGTERM.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                log("ceph.sh up did not stop in 120 s; killing it")
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.out.close()
        if keep_logs and os.path.isdir(os.path.join(self.dir, "log")):
            shutil.copytree(os.path.join(self.dir, "log"), keep_logs, dirs_exist_ok=True)
        try:
            p = subprocess.run(["bash", self.script, "down", self.dir], capture_output=True,
                               text=True, timeout=300)
            if p.returncode != 0:
                log(f"ceph.sh down {self.dir} exited {p.returncode}: {p.stderr[-2000:]}")
        except subprocess.TimeoutExpired:
            log(f"ceph.sh down {self.dir} did not finish in 300 s")


class Target:
    """One side of the comparison: how fio reaches it, and how to tell it is still alive."""

    def __init__(self, key, engine, env, check_alive):
        self.key = key
        self.engine = engine  # fio options naming the engine and the device
        self.env = env  # None: ours; else the full environment for fio
        self.check_alive = check_alive

    def fio_cmd(self, name, rw, bs, iodepth, size, runtime, time_based):
        cmd = ["fio", f"--name={name}", *self.engine, f"--rw={rw}", f"--bs={bs}",
               f"--iodepth={iodepth}", f"--size={size}", "--group_reporting",
               "--output-format=json"]
        if time_based:
            cmd += ["--time_based", f"--runtime={runtime}"]
        return cmd

    def shown(self, cmd):
        """The command as one would type it (with CEPH_CONF for RBD)."""
        prefix = f"CEPH_CONF={self.env['CEPH_CONF']} " if self.env else ""
        return prefix + shlex.join(cmd)


def fio(target, name, rw, bs, iodepth, size, runtime, time_based):
    cmd = target.fio_cmd(name, rw, bs, iodepth, size, runtime, time_based)
    limit = (runtime + 120) if time_based else 1800
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=target.env,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{target.shown(cmd)} did not finish in {limit} s")
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    i = p.stdout.find("\n{")
    text = p.stdout if p.stdout.startswith("{") else p.stdout[i + 1:] if i >= 0 else ""
    try:
        out = json.loads(text)
    except ValueError:
        raise BenchError(f"{target.shown(cmd)}: exit {p.returncode}, no JSON:\n"
                         f"{p.stdout[-2000:]}{p.stderr[-2000:]}")
    if p.returncode != 0:
        raise BenchError(f"{target.shown(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    jobs = out.get("jobs", [])
    if len(jobs) != 1:
        raise BenchError(f"fio {name}: expected 1 job (group_reporting), got {len(jobs)}")
    job = jobs[0]
    if job.get("error", 1) != 0:
        raise BenchError(f"{target.shown(cmd)}: job error {job.get('error')}:\n"
                         f"{p.stdout[:1000]}{p.stderr[-2000:]}")
    d = job["read" if "read" in rw else "write"]
    if d["total_ios"] <= 0:
        raise BenchError(f"{target.shown(cmd)}: no I/O completed")
    pct = d["clat_ns"].get("percentile", {})
    return {"iops": d["iops"], "mib_s": d["bw_bytes"] / 2**20,
            "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3,
            "ios": d["total_ios"], "seconds": job["job_runtime"] / 1000,
            "command": target.shown(cmd)}


def fmt_size(n):
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n % f == 0:
            return f"{n // f}{unit}"
    return str(n)


def num(x):
    """Three significant digits at least, no exponent: 0.0042, 2.41, 13571."""
    if x is None or x != x:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.2f}" if x < 10 else f"{x:.1f}"
    return f"{x:.3g}" if x >= 0.001 else f"{x:.2e}"


def ratio_cell(r):
    return f"{r:.2f}" if r == r and r is not None else "-"


def human(x, unit):
    """3.1K IOPS, 412 IOPS, 1.2M IOPS."""
    if x >= 1e6:
        return f"{x / 1e6:.1f}M {unit}"
    if x >= 1e4:
        return f"{x / 1e3:.0f}K {unit}"
    if x >= 1e3:
        return f"{x / 1e3:.1f}K {unit}"
    return f"{x:.0f} {unit}" if x >= 10 else f"{x:.1f} {unit}"


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


def medians(runs):
    """Per metric, the median of a target's rounds."""
    return {k: statistics.median(r[k] for r in runs)
            for k in ("iops", "mib_s", "p50_us", "p99_us")}


def build_results(args, keys, wl, med, fill, setup, notes):
    """The results file (the format of benchmarks/src/results.rs)."""
    peers = [k for k in keys if k != "sov"]
    n = args.rounds
    rounds = f"median{'s' if n > 1 else ''} of {n} round{'s' if n > 1 else ''}"

    t1_cols = (["workload"] + [f"{SHORT[k]} IOPS" for k in keys]
               + [f"sov / {SHORT[p]}" for p in peers]
               + [f"{SHORT[k]} p50 us" for k in keys] + [f"{SHORT[k]} p99 us" for k in keys])
    t1 = {"title": f"4 KiB random, IOPS and completion latency, {rounds}", "columns": t1_cols,
          "rows": []}
    t2_cols = (["workload"] + [f"{SHORT[k]} MiB/s" for k in keys]
               + [f"sov / {SHORT[p]}" for p in peers]
               + [f"{SHORT[k]} p50 ms" for k in keys] + [f"{SHORT[k]} p99 ms" for k in keys])
    t2 = {"title": f"1 MiB sequential, MiB/s and completion latency, {rounds} (the fill: "
                   f"once, before the rounds)", "columns": t2_cols, "rows": []}

    def us(x):
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}"

    for name, rw, bs, qd, kind in wl:
        m = med[name]
        if kind == "seq":
            row = ([name] + [num(m[k]["mib_s"]) for k in keys]
                   + [ratio_cell(ratio(m["sov"]["mib_s"], m[p]["mib_s"])) for p in peers]
                   + [f"{m[k]['p50_us'] / 1e3:.1f}" for k in keys]
                   + [f"{m[k]['p99_us'] / 1e3:.1f}" for k in keys])
            t2["rows"].append(row)
        else:
            row = ([name] + [f"{m[k]['iops']:.0f}" for k in keys]
                   + [ratio_cell(ratio(m["sov"]["iops"], m[p]["iops"])) for p in peers]
                   + [us(m[k]["p50_us"]) for k in keys] + [us(m[k]["p99_us"]) for k in keys])
            t1["rows"].append(row)
    t2["rows"].append(["fill 1M seqwrite qd8 (first write)"]
                      + [num(fill[k]["mib_s"]) for k in keys]
                      + [ratio_cell(ratio(fill["sov"]["mib_s"], fill[p]["mib_s"])) for p in peers]
                      + [f"{fill[k]['p50_us'] / 1e3:.1f}" for k in keys]
                      + [f"{fill[k]['p99_us'] / 1e3:.1f}" for k in keys])

    plots = []
    for kind, what in (("randread", "4 KiB random read"), ("randwrite", "4 KiB random write")):
        rows = [w for w in wl if w[4] == kind]
        plots.append({
            "name": f"block-{kind}", "title": f"{what}, IOPS ({rounds})",
            "x_label": "queue depth", "y_label": "IOPS", "log_x": True, "log_y": False,
            "series": [{"name": LONG[k], "points": [[float(w[3]), round(med[w[0]][k]["iops"], 1)]
                                                    for w in rows]} for k in keys]})
        plots.append({
            "name": f"block-{kind}-p99", "title": f"{what}, 99th percentile latency ({rounds})",
            "x_label": "queue depth", "y_label": "p99 completion latency (us)", "log_x": True,
            "log_y": True,
            "series": [{"name": LONG[k], "points": [[float(w[3]), round(med[w[0]][k]["p99_us"], 1)]
                                                    for w in rows]} for k in keys]})

    def head(what, wname, metric, unit, peer):
        a, b = med[wname]["sov"][metric], med[wname][peer][metric]
        r = ratio(a, b)
        return {"what": what, "sov": human(a, unit), "peer_name": LONG[peer],
                "peer": human(b, unit), "ratio": round(r, 3) if r == r else None}

    qd = 16
    headline = []
    main_peer = "rbd" if "rbd" in keys else "qsd"
    headline.append(head(f"4 KiB random write IOPS, QD {qd}", f"4k randwrite qd{qd}", "iops",
                         "IOPS", main_peer))
    headline.append(head(f"4 KiB random read IOPS, QD {qd}", f"4k randread qd{qd}", "iops",
                         "IOPS", main_peer))
    headline.append(head("1 MiB sequential write, QD 8", "1M seqwrite qd8", "mib_s", "MiB/s",
                         main_peer))
    if main_peer != "qsd":
        headline.append(head(f"4 KiB random write IOPS, QD {qd}", f"4k randwrite qd{qd}", "iops",
                             "IOPS", "qsd"))

    title = ("Block volumes: sov against qemu-storage-daemon and Ceph RBD" if "rbd" in keys
             else "Block volumes: sov against qemu-storage-daemon")
    command = shlex.join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]))]
                         + sys.argv[1:])
    return {"bench": "block", "title": title, "command": command, "setup": setup,
            "tables": [t1, t2], "plots": plots, "headline": headline, "notes": notes}


def markdown(table):
    lines = [table["title"], "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(table["columns"]) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table["rows"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sov-bin", default="target/release",
                    help="folder with sov and its sibling daemons (default: target/release)")
    ap.add_argument("--ceph", nargs="?", const=DEFAULT_CEPH_SH, metavar="CEPH_SH",
                    help="also run every workload against an RBD image of a single-host Ceph "
                         "started with this ceph.sh (default: benchmarks/ceph/ceph.sh)")
    ap.add_argument("--rbd-cache", choices=("off", "default"), default="off",
                    help="librbd's cache for the RBD target: off (default; a write completes "
                         "once the 3 OSDs have committed it) or librbd's default (writearound: "
                         "a write completes before any OSD has it)")
    ap.add_argument("--quick", action="store_true",
                    help="64 MiB region, 2 s per job, queue depths 1 and 16, one round")
    ap.add_argument("--rounds", type=int, help="rounds; medians are reported (default 3, "
                                               "--quick 1)")
    ap.add_argument("--runtime", type=int, help="seconds per job (default 10, --quick 2)")
    ap.add_argument("--work", help="folder for the clusters' data and the raw file "
                                   "(default: a new folder under /var/tmp)")
    ap.add_argument("--results", help="write the results (benchmarks/src/results.rs format) "
                                      "to this file")
    ap.add_argument("--json-out", help="also write every figure of every round as JSON")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work folder (Ceph's data is removed all the same; its logs "
                         "are copied to ceph-logs/)")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    runtime = args.runtime or (2 if args.quick else 10)
    if args.rounds < 1 or runtime < 1:
        sys.exit("block_bench: --rounds and --runtime must be at least 1")

    size = (64 if args.quick else 1024) * 2**20
    wl = workloads(args.quick)
    sov_bin = os.path.abspath(args.sov_bin)
    for b in DAEMONS:
        if not os.access(os.path.join(sov_bin, b), os.X_OK):
            sys.exit(f"block_bench: {os.path.join(sov_bin, b)} missing; build the workspace")
    for tool in ("fio", "qemu-storage-daemon", "truncate"):
        if not shutil.which(tool):
            sys.exit(f"block_bench: {tool} not found (./scripts/install-deps.sh)")
    engines = ["nbd"] + (["rbd"] if args.ceph else [])
    for e in engines:
        if subprocess.run(["fio", f"--enghelp={e}"], capture_output=True).returncode != 0:
            sys.exit(f"block_bench: this fio has no {e} engine")
    if args.ceph:
        args.ceph = os.path.abspath(args.ceph)
        if not os.path.isfile(args.ceph):
            sys.exit(f"block_bench: {args.ceph} not found")
        for tool in ("ceph", "ceph-mon", "ceph-osd", "ceph-mgr", "radosgw", "rbd", "bash"):
            if not shutil.which(tool):
                sys.exit(f"block_bench: {tool} not found (apt-get install ceph-mon ceph-osd "
                         f"ceph-mgr radosgw ceph-common)")

    if args.work:
        work = os.path.abspath(args.work)
        os.makedirs(work, exist_ok=True)
        made = [os.path.join(work, x) for x in ("sov-data", "raw.img", "sov-up.log", "qsd.log",
                                                 "ceph-up.log")]
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
    ceph = Ceph(args.ceph, work, size, args.rbd_cache) if args.ceph else None
    started = time.time()
    failed = True
    try:
        if ceph:
            log(f"starting Ceph in {ceph.dir} (log {ceph.log}) ...")
            ceph.begin()
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
        targets = [Target("sov", ["--ioengine=nbd", f"--uri={sov_uri}"], None, sov.check_alive),
                   Target("qsd", ["--ioengine=nbd", f"--uri={qsd.uri}"], None, qsd.check_alive)]
        ceph_version = None
        if ceph:
            secs = ceph.finish(timeout=600)
            ceph_version = ceph.info.get("ceph_version") or "16.2"
            log(f"Ceph {ceph_version} up in {secs:.0f} s (conf {ceph.conf})")
            targets.append(Target("rbd", ["--ioengine=rbd", "--clientname=admin", "--pool=rbd",
                                          "--rbdname=img"], ceph.env, ceph.check_alive))
        keys = [t.key for t in targets]

        log(f"# {'quick' if args.quick else 'full'} mode: region {fmt_size(size)}, {runtime} s "
            f"per job, {args.rounds} round(s), targets {', '.join(LONG[k] for k in keys)}")
        fill = {}
        for t in targets:
            log(f"fill {LONG[t.key]}: {fmt_size(size)} of 1M writes ...")
            fill[t.key] = fio(t, "fill", "write", "1M", 8, size, runtime, time_based=False)
            t.check_alive()

        runs = {w[0]: {k: [] for k in keys} for w in wl}
        job = 0
        for rnd in range(args.rounds):
            for i, (wname, rw, bs, qd, _kind) in enumerate(wl):
                k = (rnd + i) % len(targets)
                for t in targets[k:] + targets[:k]:
                    log(f"round {rnd + 1}/{args.rounds}: {wname}: {LONG[t.key]} ...")
                    r = fio(t, wname.replace(" ", "-"), rw, bs, qd, size, runtime, True)
                    r["round"] = rnd + 1
                    r["order"] = job
                    job += 1
                    runs[wname][t.key].append(r)
                    t.check_alive()
                    log(f"  {r['iops']:.0f} IOPS, {r['mib_s']:.1f} MiB/s, p99 {r['p99_us']:.0f} us")
        med = {w: {k: medians(runs[w][k]) for k in keys} for w in runs}

        # Detach (flushes and releases the lease) while the cluster is whole.
        sov.cli("volume", "detach", "bench")
        sov.attached = None
        elapsed = time.time() - started

        setup = (
            f"All targets run on this machine ({os.cpu_count()} CPUs), keep their data in the "
            f"same folder on the same disk and are driven by the same fio {fio_version()} jobs "
            f"over a {fmt_size(size)} region that was first written once with 1 MiB writes. "
            f"**sov**: `sov up` with metad, 3 storaged in 3 zones, the S3 gateway and "
            f"vhost-blk; volume `bench` in pool `{pool}` ({redundancy or 'replicated:3'}: 3 "
            f"copies, one per zone), every 4 KiB sector sealed with AES-256-GCM, tier "
            f"performance with QoS set out of the way; exported by vhost-blk over NBD on "
            f"loopback, fio's nbd engine. **qemu-storage-daemon**: a raw file (`truncate`), "
            f"`driver=file,cache.direct=off` (host page cache on), exported over NBD on "
            f"loopback, fio's nbd engine: one copy, no encryption. sov answers a write once "
            f"at least min_size (2) of the 3 storaged have it, durable there only with FUA or "
            f"after a FLUSH (fio sends neither); qemu-storage-daemon once it is in the page "
            f"cache.")
        if ceph:
            setup += (
                f" **Ceph RBD**: Ceph {ceph_version} from Debian (`benchmarks/ceph/ceph.sh`): "
                f"one mon, one mgr, 3 bluestore OSDs on sparse files in the same folder "
                f"(`osd memory target` 1 GiB each), pool `rbd` with size 3 / min_size 2 (3 "
                f"copies, one per OSD), no encryption, no authentication (cephx off), "
                f"messenger v1 over loopback; image `rbd/img` of {fmt_size(size)} with the "
                f"default features, reached by fio's rbd engine (librbd inside fio's process, "
                f"no NBD hop), "
                + ("librbd's cache off (`rbd cache = false`): a write completes once all 3 OSDs "
                   "have committed it. (librbd's default cache, policy `writearound`, would "
                   "complete a write before any OSD has it: `--rbd-cache default`.)"
                   if args.rbd_cache == "off" else
                   "librbd's default cache (`rbd cache = true`, policy `writearound`): a write "
                   "completes as soon as librbd has queued it, before any OSD has it, up to "
                   "24 MiB in flight."))
        notes = [
            f"{'Quick' if args.quick else 'Full'} mode: {runtime} s per job (time based), "
            f"{args.rounds} round{'s' if args.rounds > 1 else ''}; in each round every workload "
            f"runs on every target once, the target order rotating from one workload and round "
            f"to the next; the tables and plots give the median of the rounds.",
            "Ratios are sov / peer: above 1 sov is faster. Latency is fio's completion latency "
            "(clat) percentile.",
            "The idle targets keep running while another one is measured (the Ceph daemons, the "
            "sov cluster): all share the same CPUs and disk.",
        ]
        wname = wl[0][0]
        for t in targets:
            notes.append(f"{LONG[t.key]} rows: `{runs[wname][t.key][0]['command']}`; the other "
                         f"rows change only `--name`, `--rw`, `--bs` and `--iodepth` as the "
                         f"workload column says; the fill: `{fill[t.key]['command']}`.")
        notes.append(f"Total time of the run: {elapsed:.0f} s.")
        res = build_results(args, keys, wl, med, fill, setup, notes)

        print(f"# {res['title']}\n\n{setup}\n")
        for tb in res["tables"]:
            print(markdown(tb) + "\n")
        for h in res["headline"]:
            print(f"- {h['what']}: sov {h['sov']}, {h['peer_name']} {h['peer']}, ratio "
                  f"{num(h['ratio'])}")
        print()
        for n_ in notes:
            print(f"- {n_}")

        if args.results:
            with open(args.results, "w") as f:
                json.dump(no_nan(res), f, indent=1)
                f.write("\n")
            log(f"results written to {args.results}")
        if args.json_out:
            doc = {"bench": "block", "mode": "quick" if args.quick else "full",
                   "size_bytes": size, "runtime_s": runtime, "rounds": args.rounds,
                   "sov_bin": sov_bin, "sov_pool": pool, "sov_redundancy": redundancy,
                   "sov_uri": sov_uri, "baseline_uri": qsd.uri, "baseline_cmd": qsd.cmd,
                   "ceph_up": ceph.cmd if ceph else None, "ceph_version": ceph_version,
                   "elapsed_s": elapsed, "fill": fill,
                   "workloads": [{"workload": w[0], "rw": w[1], "bs": w[2], "iodepth": w[3],
                                  "median": med[w[0]], "runs": runs[w[0]]} for w in wl]}
            with open(args.json_out, "w") as f:
                json.dump(no_nan(doc), f, indent=2)
                f.write("\n")
        failed = False
    except BenchError as e:
        log(f"block_bench: error: {e}")
        vb = [p for p in sov.logs() if "vhost-blk" in p]
        for p in [sov.log, *vb] + ([ceph.log] if ceph else []):
            if os.path.exists(p):
                log(f"--- last lines of {p}:" + tail(p, 15))
        if not args.keep:
            log("(rerun with --keep to keep every log and the data)")
    finally:
        qsd.stop()
        sov.stop()
        if ceph:
            log(f"stopping Ceph and removing {ceph.dir} ...")
            ceph.stop(keep_logs=os.path.join(work, "ceph-logs") if args.keep else None)
        if args.keep:
            log(f"kept {work}")
        else:
            for p in made:
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.exists(p):
                    os.remove(p)
    sys.exit(1 if failed else 0)


def fio_version():
    try:
        return subprocess.run(["fio", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip().removeprefix("fio-")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


if __name__ == "__main__":
    main()
