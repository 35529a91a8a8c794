"""A fault-injecting TCP proxy, placed by the chaos harness between processes.

The kernel here has no `netem` qdisc, so latency, loss, stalls and resets are made in userspace:

    python3 proxy.py --control FILE LISTEN=UPSTREAM [LISTEN=UPSTREAM ...]

Each LISTEN (host:port) forwards to its UPSTREAM. FILE is JSON, re-read when it changes:
    {"links": {"LISTEN": {"latency_ms": 50, "jitter_ms": 10, "loss": 0.05,
                          "stall": false, "reset_per_s": 0.2}}}
A link absent from FILE passes bytes unchanged. What each fault does to the bytes:
- latency: every chunk is delivered latency (+ uniform jitter) after it arrived, in order;
- loss: a chunk is "lost" with that probability and delivered one retransmission timeout
  (200 ms, Linux's minimum RTO) late, holding back everything behind it, as TCP would;
- stall: nothing is delivered while it holds (connections stay open, new ones are accepted);
- reset_per_s: each connection is reset (RST, SO_LINGER 0) at that rate.
Counters (connections, bytes, resets, losses) are written to FILE.stats every second.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import struct
import sys
import time

RTO = 0.2


class Link:
    def __init__(self, listen, upstream):
        self.listen = listen
        self.upstream = upstream
        self.cfg = {}
        self.conns = set()
        self.stats = {"connections": 0, "bytes": 0, "resets": 0, "losses": 0, "upstream_failures": 0}


class Conn:
    def __init__(self, writers):
        self.writers = writers
        self.done = 0


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def reset(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def pump(link, reader, writer, conn):
    """Copies reader to writer through a delivery queue that applies the link's faults."""
    queue = asyncio.Queue()
    last_due = 0.0

    async def deliver():
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            while True:
                now = time.monotonic()
                if link.cfg.get("stall"):
                    await asyncio.sleep(0.05)
                    continue
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                break
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                # The far side is gone: end both directions.
                for w in conn.writers:
                    w.transport.abort()
                break
            link.stats["bytes"] += len(data)

    task = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            cfg = link.cfg
            delay = (cfg.get("latency_ms", 0) + random.uniform(0, cfg.get("jitter_ms", 0))) / 1000.0
            if cfg.get("loss", 0) and random.random() < cfg["loss"]:
                delay += RTO
                link.stats["losses"] += 1
            last_due = max(last_due, time.monotonic() + delay)
            queue.put_nowait((last_due, data))
            # Back pressure: hold reading while much is queued, unless delivery ended.
            while queue.qsize() > 64 and not task.done():
                await asyncio.sleep(0.005)
            if task.done():
                break
        queue.put_nowait(None)
        await task
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, asyncio.CancelledError):
        task.cancel()
    finally:
        conn.done += 1
        if conn.done == 2:
            for w in conn.writers:
                try:
                    w.close()
                except Exception:
                    pass


async def handle(link, creader, cwriter):
    link.stats["connections"] += 1
    try:
        host, port = split(link.upstream)
        ureader, uwriter = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, asyncio.TimeoutError):
        link.stats["upstream_failures"] += 1
        reset(cwriter)
        return
    conn = Conn((cwriter, uwriter))
    link.conns.add(conn)
    try:
        await asyncio.gather(pump(link, creader, uwriter, conn), pump(link, ureader, cwriter, conn))
    finally:
        link.conns.discard(conn)


async def resetter(link):
    while True:
        await asyncio.sleep(0.1)
        rate = link.cfg.get("reset_per_s", 0)
        if not rate:
            continue
        for conn in list(link.conns):
            if random.random() < rate * 0.1:
                link.stats["resets"] += 1
                for w in conn.writers:
                    reset(w)
                link.conns.discard(conn)


async def control(path, links):
    mtime = None
    last_stats = 0.0
    while True:
        try:
            m = os.stat(path).st_mtime_ns
            if m != mtime:
                mtime = m
                with open(path) as f:
                    cfg = json.load(f).get("links", {})
                for l in links:
                    l.cfg = cfg.get(l.listen, {})
        except (OSError, ValueError):
            pass
        if time.monotonic() - last_stats > 1.0:
            last_stats = time.monotonic()
            tmp = path + ".stats.tmp"
            with open(tmp, "w") as f:
                json.dump({l.listen: l.stats for l in links}, f)
            os.replace(tmp, path + ".stats")
        await asyncio.sleep(0.1)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--control", required=True)
    ap.add_argument("--ready-file")
    ap.add_argument("maps", nargs="+")
    a = ap.parse_args()
    links = []
    for m in a.maps:
        listen, upstream = m.split("=")
        link = Link(listen, upstream)
        host, port = split(listen)
        await asyncio.start_server(lambda r, w, link=link: handle(link, r, w), host, port, reuse_address=True)
        links.append(link)
        asyncio.ensure_future(resetter(link))
    if a.ready_file:
        with open(a.ready_file, "w") as f:
            json.dump({"pid": os.getpid()}, f)
    await control(a.control, links)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
