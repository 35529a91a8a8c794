"""The verifying load: S3 clients (boto3) and a block client (NBD) that record every operation.

Each S3 worker owns its own keys and keeps, per key, a model of what the cluster may hold:
    acked     the state of the last acknowledged write (None: no object)
    possible  the states a read may return: the acked one, plus every write whose outcome is
              unknown (an error or a timeout: it may have landed, even later)
    history   every state ever written, to tell a lost write from a wrong read
A read outside `possible` is a lost acknowledged write when it matches an older state (or an
absent object where one was acknowledged), and a wrong read otherwise. The block worker does
the same per 4 KiB sector of a volume.
"""

import hashlib
import random
import threading
import time

import boto3
from botocore.config import Config

from nbd import NbdClient, NbdError

MIB = 1 << 20
SECTOR = 4096


def content(seed, size):
    return random.Random(seed).randbytes(size)


def digest(b):
    return hashlib.blake2b(b, digest_size=16).hexdigest()


class Results:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = []  # (client, kind, t0, t1, ok)
        self.checked = 0
        self.lost = []
        self.wrong = []
        self.errors = {}  # (client, kind, message) -> count
        self.slow = []  # requests over 5 s: (seconds, client, kind, start, outcome)

    def op(self, client, kind, t0, ok, err=None):
        with self.lock:
            t1 = time.time()
            self.ops.append((client, kind, t0, t1, ok))
            if t1 - t0 > 5:
                self.slow.append((round(t1 - t0, 1), client, kind, time.strftime("%H:%M:%S", time.gmtime(t0)),
                                  str(err)[:120] if err else "ok"))
            if err is not None:
                k = (client, kind, str(err)[:160])
                self.errors[k] = self.errors.get(k, 0) + 1

    def check(self, what, observed, model, history):
        """Counts one verified read; returns True when it is allowed."""
        with self.lock:
            self.checked += 1
            if observed in model:
                return True
            if observed is None or observed in history:
                self.lost.append(what)
            else:
                self.wrong.append(what)
            return False


class KeyModel:
    def __init__(self):
        self.acked = None
        self.unknowns = set()
        self.history = {None}

    @property
    def possible(self):
        return {self.acked} | self.unknowns

    def attempt(self, state):
        self.history.add(state)

    def ack(self, state):
        self.acked = state

    def unknown(self, state):
        # An unknown outcome may land at any time, even after later acknowledged writes.
        self.unknowns.add(state)


class S3Worker(threading.Thread):
    SIZES = [0, 1, 1000, 4096, 64 * 1024, 300 * 1024, 1 * MIB, 3 * MIB]

    def __init__(self, wid, cluster, bucket, results, stop, keys=16, pace=0.02):
        super().__init__(daemon=True)
        self.wid, self.bucket, self.results, self.stop = wid, bucket, results, stop
        self.prefix = f"w{wid}/"
        self.keys = [f"{self.prefix}k{j:03d}" for j in range(keys)]
        self.models = {k: KeyModel() for k in self.keys}
        self.rng = random.Random(1000 + wid)
        self.pace = pace
        self.version = 0
        cfg = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                     s3={"addressing_style": "path"})
        self.s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, aws_access_key_id=cluster.access_key,
                               aws_secret_access_key=cluster.secret_key, region_name="us-east-1", config=cfg,
                               verify=cluster.ca_bundle)

    def new_state(self, key, size):
        self.version += 1
        seed = f"{key}#{self.version}"
        data = content(seed, size)
        return (digest(data), size), data

    def write(self, key, kind, state, fn):
        m = self.models[key]
        m.attempt(state)
        t0 = time.time()
        try:
            fn()
        except Exception as e:
            m.unknown(state)
            self.results.op("s3", kind, t0, False, e)
            return
        m.ack(state)
        self.results.op("s3", kind, t0, True)

    def put(self, key):
        size = self.rng.choice(self.SIZES)
        state, data = self.new_state(key, size)
        self.write(key, "put", state, lambda: self.s3.put_object(Bucket=self.bucket, Key=key, Body=data))

    def multipart(self, key):
        parts = [5 * MIB, self.rng.choice([1, 70 * 1024, 1 * MIB])]
        self.version += 1
        chunks = [content(f"{key}#{self.version}.{i}", n) for i, n in enumerate(parts)]
        data = b"".join(chunks)
        state = (digest(data), len(data))

        def go():
            u = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
            done = []
            for i, c in enumerate(chunks, start=1):
                r = self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=u, PartNumber=i, Body=c)
                done.append({"ETag": r["ETag"], "PartNumber": i})
            self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=u,
                                              MultipartUpload={"Parts": done})

        self.write(key, "multipart", state, go)

    def delete(self, key):
        self.write(key, "delete", None, lambda: self.s3.delete_object(Bucket=self.bucket, Key=key))

    def read_state(self, key):
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=key)
            body = r["Body"].read()
            return (digest(body), len(body))
        except self.s3.exceptions.NoSuchKey:
            return None

    def get(self, key):
        m = self.models[key]
        t0 = time.time()
        try:
            observed = self.read_state(key)
        except Exception as e:
            self.results.op("s3", "get", t0, False, e)
            return
        self.results.op("s3", "get", t0, True)
        self.results.check(f"s3 {key}", observed, m.possible, m.history)

    def listed(self):
        keys, token = set(), None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kw["ContinuationToken"] = token
            r = self.s3.list_objects_v2(**kw)
            keys |= {o["Key"] for o in r.get("Contents", [])}
            if not r.get("IsTruncated"):
                return keys
            token = r["NextContinuationToken"]

    def list_check(self):
        t0 = time.time()
        try:
            keys = self.listed()
        except Exception as e:
            self.results.op("s3", "list", t0, False, e)
            return
        self.results.op("s3", "list", t0, True)
        for k, m in self.models.items():
            present = k in keys
            may_absent = None in m.possible
            may_present = any(s is not None for s in m.possible)
            ok = (present and may_present) or (not present and may_absent)
            with self.results.lock:
                self.results.checked += 1
                if not ok:
                    self.results.lost.append(f"list {k}: {'present' if present else 'absent'}")

    def run(self):
        while not self.stop.is_set():
            key = self.rng.choice(self.keys)
            r = self.rng.random()
            if r < 0.40:
                self.put(key)
            elif r < 0.45:
                self.multipart(key)
            elif r < 0.55:
                self.delete(key)
            elif r < 0.95:
                self.get(key)
            else:
                self.list_check()
            time.sleep(self.pace)

    def verify_all(self, deadline):
        """After the run: every key read back and the listing compared; retried until deadline."""
        pending = list(self.keys)
        while pending and time.time() < deadline:
            key = pending[0]
            try:
                observed = self.read_state(key)
            except Exception:
                time.sleep(0.5)
                continue
            m = self.models[key]
            self.results.check(f"s3 final {key}", observed, m.possible, m.history)
            pending.pop(0)
        while time.time() < deadline:
            try:
                self.listed()
                break
            except Exception:
                time.sleep(0.5)
        self.list_check()
        return not pending


class BlockWorker(threading.Thread):
    """Writes, flushes and reads back one volume over NBD, checking every 4 KiB sector."""

    def __init__(self, cluster, export, results, stop, pace=0.01):
        super().__init__(daemon=True)
        self.addr = cluster.nbd_addr
        self.tls = cluster.nbd_tls
        self.export = export
        self.results, self.stop = results, stop
        self.rng = random.Random(7)
        self.pace = pace
        self.client = None
        self.size = None
        self.sectors = {}  # index -> KeyModel over per-sector digests
        self.version = 0

    def connect(self):
        if self.client is None:
            self.client = NbdClient(*self.addr, self.export, timeout=20, tls=self.tls)
            self.size = self.client.size
        return self.client

    def drop(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    def do(self, kind, fn):
        t0 = time.time()
        try:
            out = fn(self.connect())
        except NbdError as e:
            self.drop()
            self.results.op("block", kind, t0, False, e)
            return False, None
        self.results.op("block", kind, t0, True)
        return True, out

    def write(self):
        nsec = self.size // SECTOR
        count = self.rng.choice([1, 1, 2, 4, 16])
        first = self.rng.randrange(0, nsec - count)
        self.version += 1
        data = content(f"blk#{self.version}", count * SECTOR)
        states = [digest(data[i * SECTOR:(i + 1) * SECTOR]) for i in range(count)]
        for i, s in enumerate(states):
            m = self.sectors.setdefault(first + i, KeyModel())
            m.attempt(s)
        ok, _ = self.do("write", lambda c: c.write(first * SECTOR, data))
        for i, s in enumerate(states):
            m = self.sectors[first + i]
            if ok:
                m.ack(s)
            else:
                m.unknown(s)

    def read_check(self, first, count, final=False):
        ok, data = self.do("read", lambda c: c.read(first * SECTOR, count * SECTOR))
        if not ok:
            return False
        for i in range(count):
            m = self.sectors.get(first + i)
            if m is None:
                continue
            observed = digest(data[i * SECTOR:(i + 1) * SECTOR])
            # A never-acknowledged sector may read as zeroes.
            allowed = {s if s is not None else ZERO for s in m.possible}
            hist = {s if s is not None else ZERO for s in m.history}
            self.results.check(f"block{' final' if final else ''} sector {first + i}", observed, allowed, hist)
        return True

    def run(self):
        while not self.stop.is_set():
            try:
                self.connect()
            except (NbdError, OSError) as e:
                self.results.op("block", "connect", time.time(), False, e)
                time.sleep(0.2)
                continue
            r = self.rng.random()
            if r < 0.6:
                self.write()
            elif r < 0.7:
                self.do("flush", lambda c: c.flush())
            elif self.sectors:
                first = self.rng.choice(list(self.sectors))
                self.read_check(first, min(8, self.size // SECTOR - first))
            time.sleep(self.pace)

    def verify_all(self, deadline):
        """After the run: every sector ever written read back, in runs of up to 256 sectors."""
        idx = sorted(self.sectors)
        runs, i = [], 0
        while i < len(idx):
            j = i
            while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1 and idx[j + 1] - idx[i] < 256:
                j += 1
            runs.append((idx[i], idx[j] - idx[i] + 1))
            i = j + 1
        pos = 0
        while pos < len(runs) and time.time() < deadline:
            try:
                self.connect()
            except (NbdError, OSError):
                time.sleep(0.5)
                continue
            if self.read_check(*runs[pos], final=True):
                pos += 1
            else:
                time.sleep(0.5)
        self.drop()
        return pos == len(runs)


ZERO = digest(bytes(SECTOR))
