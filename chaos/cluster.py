"""The chaos cluster: hosts made of network namespaces on one bridge, and real sov processes on them.

Layout (subnet 10.88.0.0/24 by default, bridge `sovch0` in the root namespace at .1):
    zone zN (N = 1..3): host zN-m (metad-N), hosts zN-a and zN-b (one storaged each)
    host front: the S3 gateway and vhost-blk
    root namespace: the harness, its clients and the fault proxy
The bridge has no uplink and nothing routes beyond it, so no packet leaves the machine.

Every storaged advertises an address of the fault proxy (root namespace), which forwards to the
node; so all traffic to a storage node (gateway, vhost-blk, other nodes' recovery) crosses the
proxy, where latency, loss, stalls and resets are injected.
"""

import json
import ssl
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def sh(*args, check=True):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


class Net:
    """A bridge in the root namespace and one namespace per host, each on a veth pair."""

    def __init__(self, tag, subnet="10.88.0"):
        self.tag = tag
        self.subnet = subnet
        self.bridge = f"{tag}br"
        self.hosts = {}  # name -> (netns, ip, root-side veth)
        self.cleanup()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{subnet}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        self.gateway_ip = f"{subnet}.1"

    def add_host(self, name, octet):
        ns = f"{self.tag}-{name}"
        veth = f"{self.tag}{octet}"
        ip = f"{self.subnet}.{octet}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = (ns, ip, veth)
        return ip

    def ns(self, host):
        return self.hosts[host][0]

    def ip(self, host):
        return self.hosts[host][1]

    def cut(self, host):
        """Cuts a host off: its link to the bridge goes down."""
        sh("ip", "link", "set", self.hosts[host][2], "down")

    def heal(self, host):
        sh("ip", "link", "set", self.hosts[host][2], "up")

    def cleanup(self):
        """Removes this tag's namespaces and bridge, also those of an earlier run that died."""
        out = sh("ip", "netns", "list", check=False).stdout
        for line in out.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{self.tag}-"):
                for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                sh("ip", "netns", "del", name, check=False)
        sh("ip", "link", "del", f"{self.tag}br", check=False)


class Proc:
    """One daemon: started in a host's namespace, with its log and ready file in its folder."""

    def __init__(self, name, host, ns, argv, folder, ready=True):
        self.name, self.host, self.ns, self.argv, self.folder = name, host, ns, argv, folder
        self.wants_ready = ready
        self.popen = None
        self.starts = 0

    @property
    def ready_file(self):
        return os.path.join(self.folder, "ready.json")

    def start(self):
        os.makedirs(self.folder, exist_ok=True)
        if os.path.exists(self.ready_file):
            os.remove(self.ready_file)
        log = open(os.path.join(self.folder, f"{self.name}.log"), "ab")
        cmd = ["ip", "netns", "exec", self.ns] + self.argv if self.ns else self.argv
        if self.wants_ready:
            cmd += ["--ready-file", self.ready_file]
        self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.starts += 1
        log.close()

    def wait_ready(self, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(self.ready_file):
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}): {self.tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout}s: {self.tail()}")

    def tail(self, n=3000):
        try:
            with open(os.path.join(self.folder, f"{self.name}.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig):
        if self.alive():
            os.kill(self.popen.pid, sig)

    def kill9(self):
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def stop(self, timeout=30):
        if not self.alive():
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()


class Cluster:
    ZONES = ("z1", "z2", "z3")

    def __init__(self, bin_dir, work, tag="sovch", subnet="10.88.0", loop_disk=None):
        self.bin = os.path.abspath(bin_dir)
        self.work = work
        self.tag = tag
        self.net = Net(tag, subnet)
        self.procs = {}
        self.loop_disk = loop_disk  # storaged whose disk is a small ext4 on a loop device
        self.mounts = []
        os.makedirs(work, exist_ok=True)

    # ---- topology -----------------------------------------------------------------------
    def build(self):
        for zi, z in enumerate(self.ZONES, start=1):
            self.net.add_host(f"{z}-m", zi * 10)
            self.net.add_host(f"{z}-a", zi * 10 + 1)
            self.net.add_host(f"{z}-b", zi * 10 + 2)
        self.net.add_host("front", 40)
        key = os.path.join(self.work, "master.key")
        with open(key, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        os.chmod(key, 0o600)
        # The cluster CA and a certificate per process: every connection between daemons is
        # mutual TLS, S3 is HTTPS, and this script's `sov` calls use an operator certificate.
        self.pki = os.path.join(self.work, "pki")
        if not os.path.exists(os.path.join(self.pki, "ca.key")):
            self.cert("init", "--ca", self.pki)
        self.admin_tls = os.path.join(self.work, "admin-tls")
        self.issue("admin", "chaos", None, self.admin_tls)
        self.ca_bundle = os.path.join(self.pki, "ca.pem")
        self.metad_addrs = [f"{self.net.ip(z + '-m')}:7400" for z in self.ZONES]
        self.metad_list = ",".join(self.metad_addrs)
        peers = ",".join(f"{i}={a}" for i, a in enumerate(self.metad_addrs, start=1))
        for i, z in enumerate(self.ZONES, start=1):
            host = f"{z}-m"
            ip = self.net.ip(host)
            folder = os.path.join(self.work, f"metad-{i}")
            tls = self.issue("metad", f"metad-{i}", z, os.path.join(folder, "tls"))
            self.procs[f"metad-{i}"] = Proc(f"metad-{i}", host, self.net.ns(host), [
                f"{self.bin}/metad", "--id", str(i), "--listen", f"{ip}:7400", "--advertise", f"{ip}:7400",
                "--metrics-listen", f"{ip}:9400", "--data-dir", os.path.join(folder, "data"),
                "--peers", peers, "--master-key-file", key, "--tls-dir", tls,
                "--node-heartbeat-interval", "250ms", "--down-after", "3s", "--out-after", "120s",
                "--delete-grace", "2s"], folder)
        # The proxy: one listening port per storage node, in the root namespace.
        self.proxy_control = os.path.join(self.work, "proxy.json")
        with open(self.proxy_control, "w") as f:
            json.dump({"links": {}}, f)
        maps = []
        self.storaged_links = {}
        for zi, z in enumerate(self.ZONES):
            for si, s in enumerate(("a", "b")):
                host = f"{z}-{s}"
                ip = self.net.ip(host)
                name = f"storaged-{z}{s}"
                proxied = f"{self.net.gateway_ip}:{7100 + zi * 2 + si}"
                maps.append(f"{proxied}={ip}:7100")
                self.storaged_links[name] = proxied
                folder = os.path.join(self.work, name)
                disk = os.path.join(folder, "disk")
                os.makedirs(disk, exist_ok=True)
                if name == self.loop_disk:
                    self.mount_loop(disk, 384)
                tls = self.issue("storaged", name, z, os.path.join(folder, "tls"))
                self.procs[name] = Proc(name, host, self.net.ns(host), [
                    f"{self.bin}/storaged", "--listen", f"{ip}:7100", "--advertise", proxied,
                    "--metrics-listen", f"{ip}:9100", "--disk", disk, "--node-id", name, "--zone", z,
                    "--metad", self.metad_list, "--tls-dir", tls, "--recovery-interval", "2s", "--recovery-rate", "0",
                    "--scrub-interval", "3s", "--scrub-rate", "0", "--segment-size", "32MiB"], folder)
        self.procs["proxy"] = Proc("proxy", None, None, [
            sys.executable, os.path.join(HERE, "proxy.py"), "--control", self.proxy_control] + maps,
            os.path.join(self.work, "proxy"))
        fip = self.net.ip("front")
        self.s3_endpoint = f"https://{fip}:9000"
        gw_tls = self.issue("gateway", "gateway", None, os.path.join(self.work, "gateway", "tls"), dns=fip)
        self.procs["gateway"] = Proc("gateway", "front", self.net.ns("front"), [
            f"{self.bin}/gateway-s3", "--listen", f"{fip}:9000", "--metrics-listen", f"{fip}:9300",
            "--metad", self.metad_list, "--tls-dir", gw_tls,
            "--https-cert", os.path.join(gw_tls, "cert.pem"), "--https-key", os.path.join(gw_tls, "key.pem")],
            os.path.join(self.work, "gateway"))
        self.nbd_addr = (fip, 10809)
        vb = os.path.join(self.work, "vhost-blk")
        vb_tls = self.issue("vhost-blk", "vhost-blk-1", None, os.path.join(vb, "tls"), dns=fip)
        # NBD off loopback is TLS only: the block load presents the operator's certificate.
        self.nbd_tls = ssl.create_default_context(cafile=self.ca_bundle)
        self.nbd_tls.load_cert_chain(os.path.join(self.admin_tls, "cert.pem"),
                                     os.path.join(self.admin_tls, "key.pem"))
        self.procs["vhost-blk"] = Proc("vhost-blk", "front", self.net.ns("front"), [
            f"{self.bin}/vhost-blk", "--listen", f"{fip}:10809", "--metrics-listen", f"{fip}:9500",
            "--metad", self.metad_list, "--id", "vhost-blk-1", "--data", vb, "--lease-ttl-ms", "4000",
            "--tls-dir", vb_tls], vb)

    def cert(self, *args):
        r = subprocess.run([f"{self.bin}/sov", "cert"] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"sov cert {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")

    def issue(self, role, name, zone, out, dns=None):
        """A certificate from the cluster CA into the TLS folder `out` (returned)."""
        args = ["issue", "--ca", self.pki, "--role", role, "--name", name, "--out", out]
        if zone:
            args += ["--zone", zone]
        if dns:
            args += ["--dns", dns]
        self.cert(*args)
        return out

    def env(self):
        return dict(os.environ, SOV_TLS_DIR=self.admin_tls)

    def mount_loop(self, path, mib):
        img = path.rstrip("/") + ".img"
        sh("truncate", "-s", f"{mib}M", img)
        sh("mkfs.ext4", "-q", "-F", img)
        sh("mount", "-o", "loop", img, path)
        self.mounts.append(path)

    def storaged(self):
        return [n for n in self.procs if n.startswith("storaged-")]

    def zone_procs(self, z):
        return [n for n, p in self.procs.items() if p.host and p.host.startswith(z + "-")]

    # ---- life cycle ---------------------------------------------------------------------
    def start(self):
        self.build()
        self.procs["proxy"].start()
        self.procs["proxy"].wait_ready()
        for i in range(1, 4):
            self.procs[f"metad-{i}"].start()
        for i in range(1, 4):
            self.procs[f"metad-{i}"].wait_ready()
        for n in self.storaged():
            self.procs[n].start()
        for n in self.storaged():
            self.procs[n].wait_ready()
        self.wait_nodes_up(self.storaged(), 60)
        self.sov("pool", "create", "standard", "--redundancy", "replicated:3", "--tier", "performance")
        self.sov("pool", "create", "standard-ia", "--redundancy", "ec:4+2", "--tier", "standard")
        self.sov("pool", "create", "archive", "--redundancy", "ec:4+2", "--tier", "archive")
        self.sov("pool", "create", "vols", "--redundancy", "replicated:3", "--tier", "performance")
        k = self.sov("key", "create", "--name", "chaos", "--admin")
        self.access_key, self.secret_key = k["access_key"], k["secret_key"]
        for n in ("gateway", "vhost-blk"):
            self.procs[n].start()
        for n in ("gateway", "vhost-blk"):
            self.procs[n].wait_ready()

    def stop(self):
        order = ["vhost-blk", "gateway"] + self.storaged() + ["metad-3", "metad-2", "metad-1", "proxy"]
        for n in order:
            if n in self.procs:
                self.procs[n].stop()
        for m in reversed(self.mounts):
            sh("umount", "-l", m, check=False)
        self.mounts = []
        self.net.cleanup()

    def restart(self, name):
        p = self.procs[name]
        if p.alive():
            p.stop()
        p.start()
        p.wait_ready()

    # ---- queries ------------------------------------------------------------------------
    def sov(self, *args, check=True, timeout=60):
        cmd = [f"{self.bin}/sov", "--output", "json"] + list(args) + ["--metad", self.metad_list]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                           env=self.env())
        if r.returncode != 0:
            if check:
                raise RuntimeError(f"sov {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
            return None
        out = r.stdout.strip()
        return json.loads(out) if out else {}

    def sov_plain(self, *args, timeout=30):
        """A `sov` command that takes no --metad (debug commands); None when it fails."""
        r = subprocess.run([f"{self.bin}/sov", "--output", "json"] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout, env=self.env())
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None

    def metric(self, name, metric):
        """The sum of a metric's samples on one daemon's /metrics (0 when unreachable)."""
        import urllib.request
        host = self.procs[name].host
        port = next(p for pre, p in (("storaged", 9100), ("metad", 9400), ("gateway", 9300), ("vhost-blk", 9500))
                    if name.startswith(pre))
        try:
            text = urllib.request.urlopen(f"http://{self.net.ip(host)}:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return 0
        total = 0.0
        for line in text.splitlines():
            if line.startswith(metric + "{") or line.startswith(metric + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def node_states(self):
        m = self.sov("node", "list", check=False, timeout=20)
        if not m:
            return {}
        return {n["id"]: n["state"] for n in m.get("nodes", [])}

    def wait_nodes_up(self, names, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.node_states()
            if all(st.get(n) == "up" for n in names):
                return
            time.sleep(0.3)
        raise RuntimeError(f"storage nodes not up within {timeout}s: {self.node_states()}")

    def metad_leader(self):
        m = self.sov("metad", "members", check=False, timeout=20)
        for mem in (m or {}).get("members", []):
            if mem.get("leader"):
                return f"metad-{mem['id']}"
        return None

    def redundancy_clean(self):
        r = self.sov("repair", "status", "--deep", check=False, timeout=120)
        return bool(r and r.get("deep") and r["deep"].get("clean")), r

    def set_faults(self, links):
        tmp = self.proxy_control + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"links": links}, f)
        os.replace(tmp, self.proxy_control)

    def proxy_stats(self):
        try:
            with open(self.proxy_control + ".stats") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def remove_work(self):
        shutil.rmtree(self.work, ignore_errors=True)
