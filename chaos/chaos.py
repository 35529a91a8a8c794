#!/usr/bin/env python3
"""Chaos scenarios against a cluster of real sov processes on network-namespace hosts.

    python3 chaos/chaos.py --bin target/debug                 # every scenario, writes chaos/REPORT.md
    python3 chaos/chaos.py --bin target/debug --short storaged-kill9,zone-partition

For each scenario: a fresh cluster (3 zones x (metad + 2 storaged), gateway, vhost-blk, fault
proxy), the verifying load (S3 + block) for a warm-up, the fault for its hold time, its repair,
more load, then every key and sector ever written is read back and checked, and the cluster is
waited on until every placement group is clean again. Exit status 1 when any scenario lost an
acknowledged write, returned a wrong byte, or did not come back.
"""

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import Cluster  # noqa: E402
from load import BlockWorker, Results, S3Worker  # noqa: E402

ALL_LINKS = "all"


class Scenario:
    def __init__(self, name, what, inject, heal, hold=15, loop_disk=None):
        self.name, self.what, self.inject, self.heal, self.hold = name, what, inject, heal, hold
        self.loop_disk = loop_disk


# ---- faults ---------------------------------------------------------------------------------
def kill9(names):
    def inject(c, ctx):
        ctx["killed"] = names(c) if callable(names) else names
        for n in ctx["killed"]:
            c.procs[n].kill9()
        return f"kill -9 {', '.join(ctx['killed'])}"

    def heal(c, ctx):
        for n in ctx["killed"]:
            c.procs[n].start()
        for n in ctx["killed"]:
            c.procs[n].wait_ready()

    return inject, heal


def leader(c):
    for _ in range(50):
        lead = c.metad_leader()
        if lead:
            return [lead]
        time.sleep(0.2)
    raise RuntimeError("no metad leader")


def sigstop(names):
    def inject(c, ctx):
        ctx["paused"] = names(c)
        for n in ctx["paused"]:
            c.procs[n].signal(signal.SIGSTOP)
        return f"SIGSTOP {', '.join(ctx['paused'])}"

    def heal(c, ctx):
        for n in ctx["paused"]:
            c.procs[n].signal(signal.SIGCONT)

    return inject, heal


def cut(hosts):
    def inject(c, ctx):
        ctx["hosts"] = hosts(c) if callable(hosts) else hosts
        for h in ctx["hosts"]:
            c.net.cut(h)
        return f"links down: {', '.join(ctx['hosts'])}"

    def heal(c, ctx):
        for h in ctx["hosts"]:
            c.net.heal(h)

    return inject, heal


def leader_host(c):
    return [c.procs[leader(c)[0]].host]


def proxy(fault, which=ALL_LINKS):
    def inject(c, ctx):
        links = c.storaged_links.values() if which == ALL_LINKS else [c.storaged_links[which]]
        c.set_faults({link: fault for link in links})
        ctx["before"] = c.proxy_stats()
        return f"proxy {json.dumps(fault)} on {'every storaged link' if which == ALL_LINKS else which}"

    def heal(c, ctx):
        c.set_faults({})
        time.sleep(1.2)
        ctx["proxy"] = c.proxy_stats()

    return inject, heal


def bitrot(node, flips=64):
    """Flips bytes in the node's segment files (object chunks) and extent files (volumes)."""

    def inject(c, ctx):
        disk = os.path.join(c.work, node, "disk")
        files = [f for f in glob.glob(os.path.join(disk, "**", "*"), recursive=True)
                 if os.path.isfile(f) and os.path.getsize(f) > 4096
                 and (f.endswith(".dat") or "seg" in os.path.basename(f))]
        rng = random.Random(11)
        done = 0
        hit = set()
        for _ in range(flips):
            if not files:
                break
            f = rng.choice(files)
            size = os.path.getsize(f)
            with open(f, "r+b") as fh:
                for _ in range(20):
                    off = rng.randrange(0, size)
                    fh.seek(off)
                    b = fh.read(1)
                    if b and b != b"\0":
                        fh.seek(off)
                        fh.write(bytes([b[0] ^ 0xFF]))
                        done += 1
                        hit.add(os.path.basename(f))
                        break
                fh.flush()
                os.fsync(fh.fileno())
        ctx["flipped"] = done
        return f"{done} bytes flipped in {len(hit)} of {len(files)} segment/extent files of {node}"

    def heal(c, ctx):
        # Scrub (every 3 s here) and reads must find what was flipped in chunks (recovery then
        # heals them, which clears the node's corrupt marks, so count what the node found).
        deadline = time.time() + 60
        found = 0
        while time.time() < deadline:
            found = c.metric(node, "storaged_corrupt_chunks_found_total")
            if found:
                break
            time.sleep(1)
        ctx["note"] = f"{node} found {found:.0f} corrupt chunks (scrub and reads)"
        ctx["must"] = found > 0

    return inject, heal


def disk_full(node):
    def inject(c, ctx):
        disk = os.path.join(c.work, node, "disk")
        filler = os.path.join(disk, "chaos-filler")
        ctx["filler"] = filler
        with open(filler, "wb") as f:
            block = b"\xa5" * (1 << 20)
            try:
                while True:
                    f.write(block)
                    f.flush()
            except OSError:
                pass
        st = os.statvfs(disk)
        return f"{node}'s disk filled ({st.f_bavail * st.f_frsize // 1024} KiB left)"

    def heal(c, ctx):
        os.remove(ctx["filler"])

    return inject, heal


def rolling(c, ctx):
    order = c.storaged() + ["metad-1", "metad-2", "metad-3", "gateway", "vhost-blk"]
    for n in order:
        c.restart(n)
        if n.startswith("storaged"):
            c.wait_nodes_up([n], 60)
        time.sleep(1.0)
    return f"SIGTERM and restart, one at a time: {', '.join(order)}"


SCENARIOS = [
    Scenario("storaged-kill9", "kill -9 of one storage node, restarted 10 s later",
             *kill9(["storaged-z2a"]), hold=10),
    Scenario("zone-kill9", "kill -9 of a whole zone (its metad and both storage nodes)",
             *kill9(lambda c: c.zone_procs("z3")), hold=15),
    Scenario("metad-leader-kill9", "kill -9 of the metad leader",
             *kill9(leader), hold=10),
    Scenario("sigstop", "SIGSTOP of a storage node and of the metad leader, SIGCONT 10 s later",
             *sigstop(lambda c: ["storaged-z1a"] + leader(c)), hold=10),
    Scenario("zone-partition", "a zone cut off (links of its three hosts down)",
             *cut(["z2-m", "z2-a", "z2-b"]), hold=15),
    Scenario("metad-minority-partition", "the metad leader's host cut off (a minority of one)",
             *cut(leader_host), hold=12),
    Scenario("latency", "40 ms + up to 20 ms jitter on every storaged link",
             *proxy({"latency_ms": 40, "jitter_ms": 20}), hold=15),
    Scenario("loss", "5% of segments lost (delivered one 200 ms RTO late) on every storaged link",
             *proxy({"loss": 0.05}), hold=15),
    Scenario("stall", "one storage node's link stalls: connections open, no bytes, for 12 s",
             *proxy({"stall": True}, "storaged-z1b"), hold=12),
    Scenario("reset", "connections to storage nodes reset (RST) at 0.5/s each",
             *proxy({"reset_per_s": 0.5}), hold=15),
    Scenario("bitrot", "bytes flipped in segment and extent files of one storage node",
             *bitrot("storaged-z3a"), hold=10),
    Scenario("disk-full", "one storage node's disk (a 384 MiB ext4) filled up",
             *disk_full("storaged-z2b"), hold=15, loop_disk="storaged-z2b"),
    Scenario("rolling-restart", "every process restarted (SIGTERM) one after another",
             rolling, lambda c, ctx: None, hold=0),
]


# ---- one scenario ---------------------------------------------------------------------------
def window(ops, client, t0, t1):
    sel = [o for o in ops if o[0] == client and o[2] >= t0 and o[2] < t1]
    if not sel:
        return None
    return sum(1 for o in sel if o[4]) / len(sel)


def slowest(ops, client, t0, t1):
    """The longest request that overlapped the fault, in seconds."""
    sel = [o[3] - o[2] for o in ops if o[0] == client and o[3] >= t0 and o[2] < t1]
    return max(sel) if sel else None


def back_after(ops, client, t_fault):
    """Seconds from the fault until requests succeeded again for good (0: none failed)."""
    sel = sorted((o for o in ops if o[0] == client and o[3] >= t_fault), key=lambda o: o[3])
    fails = [o for o in sel if not o[4]]
    if not fails:
        return 0.0
    last_fail = fails[-1][3]
    later = [o for o in sel if o[4] and o[3] > last_fail]
    if not later:
        return None
    return later[0][3] - t_fault


def run_scenario(sc, a, work):
    print(f"=== {sc.name}: {sc.what}", flush=True)
    c = Cluster(a.bin, work, tag=a.tag, loop_disk=sc.loop_disk)
    res = Results()
    row = {"name": sc.name, "what": sc.what}
    stop = threading.Event()
    workers = []
    try:
        c.start()
        import boto3  # noqa: F401  (fail early with a clear message)
        S3Worker(0, c, "chaos", res, stop).s3.create_bucket(Bucket="chaos")
        c.sov("volume", "create", "cv", "--size", f"{a.volume_mib}MiB", "--pool", "vols")
        c.sov("volume", "attach", "cv", "--protocol", "nbd")
        workers = [S3Worker(i, c, "chaos", res, stop) for i in range(a.s3_workers)]
        workers.append(BlockWorker(c, "cv", res, stop))
        for w in workers:
            w.start()
        time.sleep(a.warmup)
        ctx = {}
        t_fault = time.time()
        row["fault"] = sc.inject(c, ctx)
        ctx["row"] = row
        print(f"  fault: {row['fault']}", flush=True)
        time.sleep(sc.hold * a.scale)
        sc.heal(c, ctx)
        t_heal = time.time()
        print(f"  healed after {t_heal - t_fault:.1f}s", flush=True)
        time.sleep(a.after)
        stop.set()
        for w in workers:
            w.join(120)
        ops = list(res.ops)
        row["errors"] = sorted(((n, k) for k, n in res.errors.items()), reverse=True)[:6]
        for n, k in row["errors"]:
            print(f"  {n} x {k}", flush=True)
        row["slow"] = sorted(res.slow, reverse=True)[:5]
        for sl in row["slow"]:
            print(f"  slow: {sl}", flush=True)
        row["ops"] = len(ops)
        for client in ("s3", "block"):
            row[f"{client}_during"] = window(ops, client, t_fault, t_heal)
            row[f"{client}_back"] = back_after(ops, client, t_fault)
            row[f"{client}_slowest"] = slowest(ops, client, t_fault, t_heal)
        if "proxy" in ctx:
            row["proxy"] = {k: {s: v[s] - ctx["before"].get(k, {}).get(s, 0) for s in v}
                            for k, v in ctx["proxy"].items()}
        # Full redundancy again: every placement group clean and every volume extent the
        # same on its members (a deep audit of every node). Audits run once the load stopped:
        # writes in flight would show as missing copies.
        t_stopped = time.time()
        clean, last, audits = False, None, []
        while time.time() - t_stopped < a.redundancy_timeout:
            t_a = time.time()
            clean, last = c.redundancy_clean()
            audits.append(time.time() - t_a)
            if clean:
                break
            time.sleep(1)
        row["redundancy_s"] = (time.time() - t_heal) if clean else None
        row["audit_s"] = sum(audits) / len(audits) if audits else None
        row["load_stop_s"] = t_stopped - t_heal
        if ctx.get("note"):
            row["note"] = ctx["note"]
            print(f"  {ctx['note']}", flush=True)
        if last:
            row["healed"] = sum(n.get("healed", 0) for n in last.get("nodes", []))
            row["copied"] = sum(n.get("copied", 0) for n in last.get("nodes", []))
        if not clean:
            row["redundancy_detail"] = last
            print(f"  not clean: {json.dumps((last or {}).get('deep'))[:1500]}", flush=True)
        deadline = time.time() + 180
        complete = all(w.verify_all(deadline) for w in workers)
        row["verified_all"] = complete
        row["checked"] = res.checked
        row["lost"] = len(res.lost)
        row["wrong"] = len(res.wrong)
        row["lost_examples"] = res.lost[:5]
        row["wrong_examples"] = res.wrong[:5]
        dead = [n for n, p in c.procs.items() if not p.alive()]
        row["dead"] = dead
        row["passed"] = (row["lost"] == 0 and row["wrong"] == 0 and complete and clean and not dead
                         and ctx.get("must", True)
                         and row["s3_back"] is not None and row["block_back"] is not None)
    except Exception as e:
        row["passed"] = False
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        stop.set()
        if not row.get("passed") or a.keep:
            keep = f"{work}-kept"
            subprocess.run(["rm", "-rf", keep])
            subprocess.run(["cp", "-a", work, keep])
            row["logs"] = keep
            for n, p in c.procs.items():
                if not p.alive() and p.popen is not None:
                    print(f"  {n} is not running; its log ends:\n{p.tail(1500)}", flush=True)
        c.stop()
        c.remove_work()
    print(f"  {'PASS' if row['passed'] else 'FAIL'}: {summary(row)}", flush=True)
    return row


def fmt_share(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def fmt_s(x):
    return "never" if x is None else f"{x:.1f} s"


def summary(r):
    return (f"ops {r.get('ops', 0)}, checked {r.get('checked', 0)}, lost {r.get('lost', '-')}, "
            f"wrong {r.get('wrong', '-')}, during S3 {fmt_share(r.get('s3_during'))} block "
            f"{fmt_share(r.get('block_during'))}, back S3 {fmt_s(r.get('s3_back'))} block "
            f"{fmt_s(r.get('block_back'))}, slowest S3 {fmt_s(r.get('s3_slowest'))} block "
            f"{fmt_s(r.get('block_slowest'))}, redundancy {fmt_s(r.get('redundancy_s'))}"
            + (f", error {r['error']}" if r.get("error") else "")
            + (f", lost e.g. {r['lost_examples']}" if r.get("lost_examples") else "")
            + (f", wrong e.g. {r['wrong_examples']}" if r.get("wrong_examples") else "")
            + (f", dead {r['dead']}" if r.get("dead") else ""))


def report(rows, a, path):
    lines = [
        "# Chaos report",
        "",
        f"Generated by `{' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Each scenario starts a fresh cluster of real processes on network-namespace hosts (3 zones,",
        "each with a metad and two storaged; a gateway and a vhost-blk on a front host; a fault proxy",
        f"in front of every storaged), runs the verifying load ({a.s3_workers} boto3 S3 workers and an",
        f"NBD block writer on a {a.volume_mib} MiB 3-replica volume) for {a.warmup:.0f} s, injects the",
        f"fault, heals it, loads {a.after:.0f} s more, waits until every placement group is clean,",
        "then reads back every key and sector ever written.",
        "",
        "- **checked**: reads compared with the model (during the run, and every key and sector at the end)",
        "- **lost**: a read returned an older state, or nothing, where a write had been acknowledged",
        "- **wrong**: a read returned bytes that were never written there",
        "- **during**: share of requests that succeeded while the fault held",
        "- **back after**: from the fault's start until requests succeeded again for good",
        "- **slowest**: the longest request that overlapped the fault (a request waits at most one",
        "  storage-node call deadline, 10 s plus transfer time, for a node that does not answer)",
        "- **redundancy**: from the heal until `sov repair status --deep` found every placement group",
        f"  clean and every volume extent the same on its members; audits start when the load stops,",
        f"  {a.after:.0f} s after the heal, so no figure is below that",
        "",
        "| scenario | fault | ops | checked | lost | wrong | S3 ok during | block ok during | S3 back after | block back after | slowest S3 / block | redundancy | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r.get('fault', r['what'])} | {r.get('ops', '-')} | {r.get('checked', '-')} | "
            f"{r.get('lost', '-')} | {r.get('wrong', '-')} | {fmt_share(r.get('s3_during'))} | "
            f"{fmt_share(r.get('block_during'))} | {fmt_s(r.get('s3_back'))} | {fmt_s(r.get('block_back'))} | "
            f"{fmt_s(r.get('s3_slowest'))} / {fmt_s(r.get('block_slowest'))} | "
            f"{fmt_s(r.get('redundancy_s'))} | {'pass' if r['passed'] else 'FAIL'} |")
    lines.append("")
    for r in rows:
        extra = []
        if r.get("proxy"):
            tot = {}
            for v in r["proxy"].values():
                for k, n in v.items():
                    tot[k] = tot.get(k, 0) + n
            extra.append(f"proxy counters during the fault: {json.dumps(tot)}")
        if r.get("note"):
            extra.append(r["note"])
        if r.get("errors"):
            extra.append("failed requests: " + "; ".join(f"{n} x {k[0]} {k[1]} ({k[2][:90]})" for n, k in r["errors"][:4]))
        if r.get("copied") or r.get("healed"):
            extra.append(f"recovery copied {r.get('copied', 0)} and healed {r.get('healed', 0)} chunks")
        if r.get("error"):
            extra.append(f"error: {r['error']}")
        for k in ("lost_examples", "wrong_examples", "dead"):
            if r.get(k):
                extra.append(f"{k}: {r[k]}")
        if extra:
            lines.append(f"- **{r['name']}**: " + "; ".join(extra))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/debug", help="folder with metad, storaged, gateway-s3, vhost-blk, sov")
    ap.add_argument("--report", help="write the Markdown report here")
    ap.add_argument("--short", action="store_true", help="shorter warm-up, holds and tail (for make test)")
    ap.add_argument("--tag", default="sovch", help="name prefix of namespaces and links")
    ap.add_argument("--s3-workers", type=int, default=3)
    ap.add_argument("--volume-mib", type=int, default=32)
    ap.add_argument("--redundancy-timeout", type=float, default=240)
    ap.add_argument("--list", action="store_true", help="list the scenarios")
    ap.add_argument("--keep", action="store_true", help="keep every scenario's logs (failed ones are always kept)")
    ap.add_argument("scenarios", nargs="?", help="comma-separated names (default: all)")
    a = ap.parse_args()
    if a.list:
        for s in SCENARIOS:
            print(f"{s.name:26} {s.what}")
        return 0
    if os.geteuid() != 0:
        print("chaos needs root (network namespaces, veth links, loop mounts)", file=sys.stderr)
        return 2
    a.warmup, a.after, a.scale = (5.0, 6.0, 0.7) if a.short else (10.0, 12.0, 1.0)
    names = a.scenarios.split(",") if a.scenarios else [s.name for s in SCENARIOS]
    known = {s.name: s for s in SCENARIOS}
    bad = [n for n in names if n not in known]
    if bad:
        print(f"unknown scenario(s): {', '.join(bad)}; --list shows them", file=sys.stderr)
        return 2
    rows = []
    base = tempfile.mkdtemp(prefix="sov-chaos-")
    for n in names:
        rows.append(run_scenario(known[n], a, os.path.join(base, n)))
        if a.report:
            report(rows, a, a.report)
    os.rmdir(base) if not os.listdir(base) else None
    failed = [r["name"] for r in rows if not r["passed"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} scenarios passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
