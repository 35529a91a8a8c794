//! `sov-bench s3` and `sov-bench scaling`: S3 load from one Rust client (many requests in
//! flight, every GET checked byte for byte) against sov's gateway and, in the same run, one
//! after the other, against the peers: `s3s-fs` (one process writing plain files), Ceph RGW
//! (a single-host Ceph with three OSDs, `benchmarks/ceph/ceph.sh`) and any endpoint given with
//! `--compare URL` (MinIO, Garage, an existing RGW).
//!
//! - By object size: 4 KiB to 256 MiB with a few requests in flight (MiB/s).
//! - By concurrency: 1 to 128 requests in flight on 64 KiB objects (ops/s).
//! - Scaling: the same workload through `sov up` clusters of 1, 3 and 6 storaged.
//!
//! Each round runs every target once per case, the order of targets rotating between rounds;
//! each figure is the median over rounds, and the ratios are sov over the peer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::report::{median, size_label};
use crate::results::{
    BenchResult, Headline, Plot, Series, Table, num, ratio, ratio_cell, this_command,
};
use crate::s3client::S3;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

#[derive(Debug, Parser)]
pub struct Args {
    /// A short run: sizes up to 16 MiB, concurrency 1, 16 and 128, fewer objects, one round.
    #[arg(long)]
    pub quick: bool,
    /// Rounds; medians are reported [default: 3, 1 with --quick].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Object sizes of the size sweep, e.g. 4KiB,1MiB,256MiB [default: 4KiB,64KiB,1MiB,16MiB,256MiB].
    #[arg(long, value_delimiter = ',')]
    pub sizes: Option<Vec<String>>,
    /// Requests in flight in the size sweep.
    #[arg(long, default_value_t = 4)]
    pub size_concurrency: usize,
    /// Concurrency levels of the concurrency sweep [default: 1,4,16,64,128].
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Option<Vec<usize>>,
    /// Object size of the concurrency sweep.
    #[arg(long, default_value = "64KiB")]
    pub concurrency_size: String,
    /// Data written per size case and round, in MiB (the object count is this over the size,
    /// at least the concurrency, at most --max-objects) [default: 256, 24 with --quick].
    #[arg(long)]
    pub budget_mib: Option<u64>,
    /// Most objects in one case [default: 1000, 100 with --quick].
    #[arg(long)]
    pub max_objects: Option<usize>,
    /// Folder of sov's binaries (sov, metad, storaged, gateway-s3, vhost-blk): a cluster is
    /// started with `sov up` (metad, 3 storaged in 3 zones, replicated{3}, encrypted).
    #[arg(long)]
    pub sov_bin: Option<PathBuf>,
    /// Measure this running sov S3 endpoint instead of starting one (with --sov-access-key
    /// and --sov-secret-key).
    #[arg(long)]
    pub sov_endpoint: Option<String>,
    /// Access key for --sov-endpoint.
    #[arg(long, env = "SOV_BENCH_SOV_ACCESS_KEY", hide_env_values = true)]
    pub sov_access_key: Option<String>,
    /// Secret key for --sov-endpoint (shown as *** in the results).
    #[arg(long, env = "SOV_BENCH_SOV_SECRET_KEY", hide_env_values = true)]
    pub sov_secret_key: Option<String>,
    /// The s3s-fs binary: the single-node baseline (one copy, no encryption, no fsync).
    #[arg(long)]
    pub s3s_fs: Option<PathBuf>,
    /// benchmarks/ceph/ceph.sh: a single-host Ceph (3 OSDs, size 3) with RGW is started and
    /// measured as the peer users would pick instead.
    #[arg(long)]
    pub ceph: Option<PathBuf>,
    /// Any S3 endpoint (http://host:port) to measure with the same workload, e.g. a MinIO,
    /// Garage or Ceph RGW already running; keys from --compare-access-key/--compare-secret-key.
    #[arg(long)]
    pub compare: Option<String>,
    /// Name of the --compare endpoint in the tables [default: its host:port].
    #[arg(long)]
    pub compare_name: Option<String>,
    /// Access key for --compare.
    #[arg(long, env = "SOV_BENCH_COMPARE_ACCESS_KEY", hide_env_values = true)]
    pub compare_access_key: Option<String>,
    /// Secret key for --compare (shown as *** in the results).
    #[arg(long, env = "SOV_BENCH_COMPARE_SECRET_KEY", hide_env_values = true)]
    pub compare_secret_key: Option<String>,
    /// SigV4 region for --compare.
    #[arg(long, default_value = "us-east-1")]
    pub compare_region: String,
    /// Bucket to use on the --compare endpoint (created if missing; only the benchmark's own
    /// keys are written and deleted).
    #[arg(long, default_value = "sov-bench")]
    pub compare_bucket: String,
    /// Also list a bucket of this many keys on sov (filled straight into metad's index with
    /// `sov-bench fill-index`), 1000 keys per ListObjectsV2 page. Needs --sov-bin.
    #[arg(long, default_value_t = 0)]
    pub list_keys: usize,
    /// Where the started servers keep their data.
    #[arg(long, default_value = "/var/tmp")]
    pub work: PathBuf,
    /// Write the results (tables, plots, headline) to this JSON file for `sov-bench report`.
    #[arg(long)]
    pub results: Option<PathBuf>,
}

#[derive(Debug, Parser)]
pub struct ScalingArgs {
    /// A short run: 1 and 3 storaged, fewer objects.
    #[arg(long)]
    pub quick: bool,
    /// Storage node counts [default: 1,3,6; 1,3 with --quick].
    #[arg(long, value_delimiter = ',')]
    pub nodes: Option<Vec<usize>>,
    /// Object size.
    #[arg(long, default_value = "1MiB")]
    pub size: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Objects per round [default: 384, 64 with --quick].
    #[arg(long)]
    pub objects: Option<usize>,
    /// Rounds per cluster; medians [default: 3, 1 with --quick].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Folder of sov's binaries.
    #[arg(long, default_value = "target/release")]
    pub sov_bin: PathBuf,
    /// Where the clusters keep their data.
    #[arg(long, default_value = "/var/tmp")]
    pub work: PathBuf,
    /// Write the results (table, plot, headline) to this JSON file for `sov-bench report`.
    #[arg(long)]
    pub results: Option<PathBuf>,
}

/// `4KiB`, `16MiB`, `1GiB`, `512` → bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{s}: not a size like 4KiB"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => KIB,
        "m" | "mib" | "mb" => MIB,
        "g" | "gib" | "gb" => 1 << 30,
        u => bail!("{s}: unknown unit {u:?} (use KiB, MiB or GiB)"),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .with_context(|| format!("{s}: size out of range"))
}

/// How to stop a server this run started.
#[derive(Debug, Clone)]
enum Stop {
    /// A process started in its own process group: SIGTERM to it, SIGKILL to the group after
    /// a minute.
    Group { name: String, pgid: i32 },
    /// `ceph.sh down DIR`.
    Ceph { script: PathBuf, dir: PathBuf },
}

impl Stop {
    /// Stops the server; `child` is waited for when there is one.
    fn run(&self, child: Option<&mut Child>) {
        match self {
            Stop::Group { name, pgid } => {
                // SIGTERM lets `sov up` stop its daemons; the group is killed after a minute.
                unsafe { libc::kill(*pgid, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut child = child;
                while Instant::now() < deadline {
                    let gone = match child.as_deref_mut() {
                        Some(c) => matches!(c.try_wait(), Ok(Some(_))),
                        None => (unsafe { libc::kill(*pgid, 0) }) != 0,
                    };
                    if gone {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                eprintln!("{name} did not stop in 60 s; killing its process group");
                unsafe { libc::kill(-*pgid, libc::SIGKILL) };
                if let Some(c) = child {
                    let _ = c.wait();
                }
            }
            Stop::Ceph { script, dir } => {
                let out = Command::new(script).arg("down").arg(dir).output();
                if !out.as_ref().is_ok_and(|o| o.status.success()) {
                    eprintln!("{} down {}: {out:?}", script.display(), dir.display());
                }
            }
        }
    }
}

/// Servers running now, stopped by the interrupt handler if the run is cut short.
static RUNNING: std::sync::Mutex<Vec<(u64, Stop)>> = std::sync::Mutex::new(Vec::new());

/// On Ctrl-C or SIGTERM: stop every server in [`RUNNING`], then exit 130. Servers run in
/// their own process groups, so a terminal's Ctrl-C reaches only this process.
fn stop_servers_on_interrupt() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::thread::spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(mut term) = signal(SignalKind::terminate()) else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                eprintln!("interrupted: stopping the servers this run started");
                let stops: Vec<Stop> = RUNNING
                    .lock()
                    .map(|mut v| v.drain(..).map(|(_, s)| s).collect())
                    .unwrap_or_default();
                for s in stops {
                    s.run(None);
                }
                std::process::exit(130);
            });
        });
    });
}

/// A server this run started; stopped when dropped.
struct Server {
    id: u64,
    stop: Stop,
    child: Option<Child>,
}

impl Server {
    fn new(stop: Stop, child: Option<Child>) -> Server {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        stop_servers_on_interrupt();
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut v) = RUNNING.lock() {
            v.push((id, stop.clone()));
        }
        Server { id, stop, child }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("a process server has its child")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(mut v) = RUNNING.lock() {
            v.retain(|(id, _)| *id != self.id);
        }
        self.stop.run(self.child.as_mut());
    }
}

/// Starts `cmd` in its own process group and registers it to be stopped.
fn spawn_server(name: &str, cmd: &mut Command) -> anyhow::Result<Server> {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let pgid = child.id() as i32;
    Ok(Server::new(
        Stop::Group {
            name: name.into(),
            pgid,
        },
        Some(child),
    ))
}

/// One S3 endpoint under test.
pub struct Target {
    pub name: String,
    pub s3: S3,
    pub bucket: String,
    /// Delete the bucket at the end (not for --compare's bucket, which may hold other data).
    owns_bucket: bool,
    /// What it is, for the report.
    about: String,
    _server: Option<Server>,
}

fn wait_port(addr: &str, what: &str, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "{what} exited ({st}) before listening; its log {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{what} not listening on {addr} after 120 s; log {}",
        log.display()
    )
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn port() -> u16 {
    sov_testkit::free_port()
}

/// `n` distinct free loopback ports (all held at once while picked, so no two are the same).
fn ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .filter_map(|_| std::net::TcpListener::bind("127.0.0.1:0").ok())
        .collect();
    held.iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .collect()
}

/// The ports of a `sov up` with `nodes` storaged: six single ports and two runs of `nodes`
/// consecutive ones, all distinct.
fn sov_ports(nodes: usize) -> anyhow::Result<(Vec<u16>, u16, u16)> {
    let n = nodes as u16;
    for _ in 0..50 {
        let singles = ports(6);
        let (a, b) = (
            sov_testkit::free_port_range(n),
            sov_testkit::free_port_range(n),
        );
        let overlaps = |base: u16, p: u16| (base..base + n).contains(&p);
        let clash = singles.len() < 6
            || (a < b + n && b < a + n)
            || singles.iter().any(|&p| overlaps(a, p) || overlaps(b, p));
        if !clash {
            return Ok((singles, a, b));
        }
    }
    bail!("no set of free loopback ports for sov up")
}

/// Starts `sov up` with `nodes` storaged (zones: up to 3) under `dir`; returns the target.
pub fn start_sov(bin: &Path, dir: &Path, name: &str, nodes: usize) -> anyhow::Result<Target> {
    let sov = bin.join("sov");
    ensure!(
        sov.exists(),
        "{} not found (build the workspace first)",
        sov.display()
    );
    std::fs::create_dir_all(dir)?;
    let data = dir.join("data");
    let cj = data.join("cluster.json");
    // A folder used before must not hand over an old cluster's ports.
    let _ = std::fs::remove_file(&cj);
    let (p, storaged_base, metrics_base) = sov_ports(nodes)?;
    let mut server = spawn_server(
        "sov up",
        Command::new(&sov)
            .arg("up")
            .arg("--data")
            .arg(&data)
            // The peers (s3s-fs, RGW) serve plain HTTP here, so sov's S3 does too; between
            // sov's own daemons it is mutual TLS.
            .arg("--insecure-http")
            .args(["--storage-nodes", &nodes.to_string()])
            .args(["--zones", &nodes.min(3).to_string()])
            .args(["--s3-port", &p[0].to_string()])
            .args(["--gateway-metrics-port", &p[1].to_string()])
            .args(["--metad-port", &p[2].to_string()])
            .args(["--metad-metrics-port", &p[3].to_string()])
            .args(["--storaged-base-port", &storaged_base.to_string()])
            .args(["--metrics-base-port", &metrics_base.to_string()])
            .args(["--nbd-port", &p[4].to_string()])
            .args(["--vhost-blk-metrics-port", &p[5].to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("up.log"))?)
            .stderr(std::fs::File::create(dir.join("up.err"))?),
    )?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let c: serde_json::Value = loop {
        if let Ok(bytes) = std::fs::read(&cj)
            && let Ok(v) = serde_json::from_slice(&bytes)
        {
            break v;
        }
        if let Ok(Some(st)) = server.child().try_wait() {
            bail!("sov up exited ({st}):\n{}", tail(&dir.join("up.err")));
        }
        // Dropping `server` on the way out stops what did start.
        ensure!(
            Instant::now() < deadline,
            "sov up did not write {} in 180 s",
            cj.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let field = |k: &str| {
        c[k].as_str()
            .map(str::to_string)
            .with_context(|| format!("{}: no {k}", cj.display()))
    };
    let s3 = S3::new(
        &field("s3_endpoint")?,
        &field("access_key")?,
        &field("secret_key")?,
        "us-east-1",
    )?;
    Ok(Target {
        name: name.into(),
        s3,
        bucket: "bench".into(),
        owns_bucket: true,
        about: format!(
            "`sov up` (metad, {nodes} storaged in {} zone(s), the gateway), STANDARD = \
             replicated{{{}}}, every object sealed with AES-256-GCM and fsynced on every copy",
            nodes.min(3),
            nodes.min(3)
        ),
        _server: Some(server),
    })
}

fn start_s3s_fs(bin: &Path, dir: &Path) -> anyhow::Result<Target> {
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    let p = port();
    let log = dir.join("s3s-fs.log");
    let (ak, sk) = ("bench", "bench-secret-key");
    let mut server = spawn_server(
        "s3s-fs",
        Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &p.to_string()])
            .args(["--access-key", ak, "--secret-key", sk])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log)?,
            )),
    )?;
    wait_port(&format!("127.0.0.1:{p}"), "s3s-fs", server.child(), &log)?;
    Ok(Target {
        name: "s3s-fs".into(),
        s3: S3::new(&format!("http://127.0.0.1:{p}"), ak, sk, "us-east-1")?,
        bucket: "bench".into(),
        owns_bucket: true,
        about: "s3s-fs 0.14: one process writing plain files (one copy, no encryption, no \
                fsync)"
            .into(),
        _server: Some(server),
    })
}

fn start_ceph(script: &Path, work: &Path) -> anyhow::Result<Target> {
    let (ak, sk) = (
        "SOVBENCHCEPHKEY00001",
        "sov-bench-ceph-secret-key-0000000000001",
    );
    let dir = work.join("ceph");
    let server = Server::new(
        Stop::Ceph {
            script: script.to_path_buf(),
            dir: dir.clone(),
        },
        None,
    );
    eprintln!(
        "starting Ceph (mon, mgr, 3 OSDs, RGW) under {} ...",
        dir.display()
    );
    let p = ports(2);
    ensure!(p.len() == 2, "no free loopback ports for Ceph");
    let out = Command::new(script)
        .arg("up")
        .arg(&dir)
        .args(["--rgw-port", &p[0].to_string()])
        .args(["--mon-port", &p[1].to_string()])
        .args(["--access-key", ak, "--secret-key", sk])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        // `ceph.sh down` removes the folder: keep the logs for the post-mortem first.
        let keep = std::env::temp_dir().join(format!("sov-bench-ceph-logs-{}", std::process::id()));
        let _ = Command::new("cp")
            .arg("-r")
            .arg(dir.join("log"))
            .arg(&keep)
            .status();
        bail!(
            "{} up failed ({}); Ceph's logs copied to {}",
            script.display(),
            out.status,
            keep.display()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let info: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("{} up printed no JSON line: {text}", script.display()))?;
    let endpoint = info["s3_endpoint"]
        .as_str()
        .context("ceph.sh: no s3_endpoint")?;
    Ok(Target {
        name: "Ceph RGW".into(),
        s3: S3::new(endpoint, ak, sk, "us-east-1")?,
        bucket: "bench".into(),
        owns_bucket: true,
        about: format!(
            "Ceph {} from Debian: one mon, one mgr, 3 bluestore OSDs on files of this disk, \
             pool size 3, RGW (beast)",
            info["ceph_version"].as_str().unwrap_or("16.2")
        ),
        _server: Some(server),
    })
}

/// A case: `ops` objects of `size` bytes, `conc` in flight.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub size: u64,
    pub conc: usize,
    pub ops: usize,
}

/// Medians of one (target, case, op).
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub ops_s: f64,
    pub mib_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

fn figures(lat: &mut [f64], secs: f64, case: Case) -> Figures {
    lat.sort_by(f64::total_cmp);
    let ops_s = case.ops as f64 / secs.max(1e-9);
    Figures {
        ops_s,
        mib_s: ops_s * case.size as f64 / MIB as f64,
        p50_ms: pct(lat, 50.0) * 1000.0,
        p99_ms: pct(lat, 99.0) * 1000.0,
    }
}

/// Runs `ops` calls of `f(i)` with `conc` in flight; returns (seconds, latencies).
async fn drive<F, Fut>(
    ops: usize,
    conc: usize,
    bar: &ProgressBar,
    f: F,
) -> anyhow::Result<(f64, Vec<f64>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    // A JoinSet aborts what is left when dropped, so an early return leaves no task behind.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conc.min(ops).max(1) {
        let (f, next, bar) = (f.clone(), next.clone(), bar.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ops {
                    return anyhow::Ok(lat);
                }
                let t = Instant::now();
                if let Err(e) = f(i).await {
                    // The other workers stop at their next request.
                    next.store(ops, Ordering::Relaxed);
                    return Err(e);
                }
                lat.push(t.elapsed().as_secs_f64());
                bar.inc(1);
            }
        });
    }
    let mut all = Vec::with_capacity(ops);
    while let Some(r) = tasks.join_next().await {
        all.extend(r.context("a request task panicked")??);
    }
    Ok((start.elapsed().as_secs_f64(), all))
}

/// Bytes between the starts of two objects' bodies in a case's shared buffer.
const STRIDE: usize = 64;

/// One buffer for a whole case: object `i` is `buf[i * STRIDE..][..size]`, so every object's
/// bytes differ (a GET answered with another key's object fails the check) without a copy
/// per object.
fn case_buffer(case: Case, seed: u64) -> Bytes {
    payload(case.size + (STRIDE * case.ops) as u64, seed)
}

fn object(buf: &Bytes, case: Case, i: usize) -> Bytes {
    buf.slice(i * STRIDE..i * STRIDE + case.size as usize)
}

/// PUT then GET (checked) then DELETE (not timed) of one case on one target.
async fn run_case(
    t: &Target,
    case: Case,
    tag: &str,
    buf: Bytes,
    bar: &ProgressBar,
) -> anyhow::Result<(Figures, Figures)> {
    let keys: Arc<Vec<String>> = Arc::new(
        (0..case.ops)
            .map(|i| format!("{tag}/{}/{}/{i}", case.size, case.conc))
            .collect(),
    );
    let measured = async {
        let put = {
            let (s3, bucket, keys, buf) =
                (t.s3.clone(), t.bucket.clone(), keys.clone(), buf.clone());
            move |i: usize| {
                let (s3, bucket, keys) = (s3.clone(), bucket.clone(), keys.clone());
                let body = object(&buf, case, i);
                async move { s3.put(&bucket, &keys[i], body).await }
            }
        };
        let (secs, mut lat) = drive(case.ops, case.conc, bar, put)
            .await
            .with_context(|| format!("{}: PUT", t.name))?;
        let put_fig = figures(&mut lat, secs, case);
        let get = {
            let (s3, bucket, keys, buf) =
                (t.s3.clone(), t.bucket.clone(), keys.clone(), buf.clone());
            move |i: usize| {
                let (s3, bucket, keys) = (s3.clone(), bucket.clone(), keys.clone());
                let want = object(&buf, case, i);
                async move { s3.get_check(&bucket, &keys[i], &want).await }
            }
        };
        let (secs, mut lat) = drive(case.ops, case.conc, bar, get)
            .await
            .with_context(|| format!("{}: GET", t.name))?;
        anyhow::Ok((put_fig, figures(&mut lat, secs, case)))
    }
    .await;
    // Delete the case's keys (untimed), also after a failure, so that nothing of ours stays
    // in a --compare bucket.
    let del = {
        let (s3, bucket, keys) = (t.s3.clone(), t.bucket.clone(), keys.clone());
        move |i: usize| {
            let (s3, bucket, keys) = (s3.clone(), bucket.clone(), keys.clone());
            async move { s3.delete(&bucket, &keys[i]).await }
        }
    };
    let deleted = drive(case.ops, case.conc.max(16), &ProgressBar::hidden(), del)
        .await
        .with_context(|| format!("{}: DELETE", t.name));
    let figs = measured?;
    deleted?;
    Ok(figs)
}

fn payload(size: u64, seed: u64) -> Bytes {
    let mut out = vec![0u8; size as usize];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .update(&size.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    Bytes::from(out)
}

/// Per target, per case: the (PUT, GET) samples of every round.
type Samples = Vec<Vec<Vec<(Figures, Figures)>>>;

fn med(samples: &[(Figures, Figures)], get: bool, f: fn(&Figures) -> f64) -> f64 {
    median(
        samples
            .iter()
            .map(|(p, g)| f(if get { g } else { p }))
            .collect(),
    )
}

/// Runs every case on every target for `rounds` rounds, rotating the target order.
async fn measure(
    targets: &[Target],
    cases: &[Case],
    rounds: usize,
    bar: &ProgressBar,
) -> anyhow::Result<Samples> {
    let mut samples: Samples = vec![vec![Vec::new(); cases.len()]; targets.len()];
    for round in 0..rounds {
        for (ci, case) in cases.iter().enumerate() {
            let buf = case_buffer(*case, (round * 1000 + ci) as u64);
            for k in 0..targets.len() {
                let ti = (k + round + ci) % targets.len();
                let t = &targets[ti];
                bar.set_message(format!(
                    "round {}/{rounds}: {} x {} ({} in flight) on {}",
                    round + 1,
                    case.ops,
                    size_label(case.size),
                    case.conc,
                    t.name
                ));
                let r = run_case(t, *case, &format!("r{round}"), buf.clone(), bar)
                    .await
                    .with_context(|| {
                        format!(
                            "{} objects of {} with {} in flight on {}",
                            case.ops,
                            size_label(case.size),
                            case.conc,
                            t.name
                        )
                    })?;
                samples[ti][ci].push(r);
            }
        }
    }
    Ok(samples)
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} requests, eta {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

fn total_requests(cases: &[Case], targets: usize, rounds: usize) -> u64 {
    cases.iter().map(|c| 2 * c.ops as u64).sum::<u64>() * (targets * rounds) as u64
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let quick = args.quick;
    let rounds = args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let sizes: Vec<u64> = match &args.sizes {
        Some(v) => v
            .iter()
            .map(|s| parse_size(s))
            .collect::<anyhow::Result<_>>()?,
        None if quick => vec![4 * KIB, 64 * KIB, MIB, 16 * MIB],
        None => vec![4 * KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB],
    };
    let concs = args.concurrency.clone().unwrap_or(if quick {
        vec![1, 16, 128]
    } else {
        vec![1, 4, 16, 64, 128]
    });
    ensure!(
        concs.iter().all(|&c| c > 0),
        "--concurrency: levels must be above 0"
    );
    let conc_size = parse_size(&args.concurrency_size)?;
    let budget = args.budget_mib.unwrap_or(if quick { 24 } else { 256 }) * MIB;
    let max_objects = args
        .max_objects
        .unwrap_or(if quick { 100 } else { 1000 })
        .max(1);
    let sc = args.size_concurrency.max(1);
    let size_cases: Vec<Case> = sizes
        .iter()
        .map(|&size| Case {
            size,
            conc: sc,
            ops: ((budget / size) as usize).clamp(sc, max_objects.max(sc)),
        })
        .collect();
    let conc_cases: Vec<Case> = concs
        .iter()
        .map(|&conc| Case {
            size: conc_size,
            conc,
            ops: (if quick { 64 } else { 400 }).max(conc * if quick { 2 } else { 4 }),
        })
        .collect();

    ensure!(
        args.list_keys == 0 || (args.sov_bin.is_some() && args.sov_endpoint.is_none()),
        "--list-keys needs a cluster this run starts (--sov-bin, not --sov-endpoint): the keys \
         are written straight into its metad"
    );
    std::fs::create_dir_all(&args.work)?;
    let work = tempfile::Builder::new()
        .prefix("sov-bench-s3-")
        .tempdir_in(&args.work)
        .with_context(|| format!("a work folder in {}", args.work.display()))?;
    let mut targets = Vec::new();
    match (&args.sov_endpoint, &args.sov_bin) {
        (Some(ep), _) => targets.push(Target {
            name: "sov".into(),
            s3: S3::new(
                ep,
                args.sov_access_key
                    .as_deref()
                    .context("--sov-access-key is needed with --sov-endpoint")?,
                args.sov_secret_key
                    .as_deref()
                    .context("--sov-secret-key is needed with --sov-endpoint")?,
                "us-east-1",
            )?,
            bucket: "sov-bench".into(),
            owns_bucket: false,
            about: format!("a running sov at {ep}"),
            _server: None,
        }),
        (None, Some(bin)) => {
            eprintln!("starting sov (sov up: metad, 3 storaged, gateway) ...");
            targets.push(start_sov(bin, &work.path().join("sov"), "sov", 3)?)
        }
        (None, None) => bail!("give --sov-bin DIR (a cluster is started) or --sov-endpoint URL"),
    }
    if let Some(bin) = &args.s3s_fs {
        targets.push(start_s3s_fs(bin, &work.path().join("s3s-fs"))?);
    }
    if let Some(script) = &args.ceph {
        targets.push(start_ceph(script, work.path())?);
    }
    if let Some(url) = &args.compare {
        let name = args.compare_name.clone().unwrap_or_else(|| {
            url.trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string()
        });
        let s3 = S3::new(
            url,
            args.compare_access_key.as_deref().context(
                "--compare needs --compare-access-key (or SOV_BENCH_COMPARE_ACCESS_KEY)",
            )?,
            args.compare_secret_key.as_deref().context(
                "--compare needs --compare-secret-key (or SOV_BENCH_COMPARE_SECRET_KEY)",
            )?,
            &args.compare_region,
        )?;
        targets.push(Target {
            about: format!("the endpoint given with --compare ({url})"),
            name,
            s3,
            bucket: args.compare_bucket.clone(),
            owns_bucket: false,
            _server: None,
        });
    }
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        for t in &targets {
            t.s3.create_bucket(&t.bucket)
                .await
                .with_context(|| format!("{}: creating bucket {}", t.name, t.bucket))?;
        }
        let all: Vec<Case> = size_cases.iter().chain(&conc_cases).copied().collect();
        let bar = progress(total_requests(&all, targets.len(), rounds));
        let samples = measure(&targets, &all, rounds, &bar).await?;
        bar.finish_and_clear();
        let listing = if args.list_keys > 0 {
            Some(listing(&targets[0], args.list_keys, work.path()).await?)
        } else {
            None
        };
        for t in &targets {
            if t.owns_bucket {
                t.s3.delete_bucket(&t.bucket).await.ok();
            }
        }
        anyhow::Ok((samples, listing))
    });
    let (samples, listing) = result?;
    let res = s3_result(
        &targets,
        &size_cases,
        &conc_cases,
        &samples,
        rounds,
        listing,
        sc,
    );
    print_result(&res);
    res.write_to(args.results.as_deref())?;
    drop(targets);
    Ok(())
}

/// Lists a bucket of `keys` keys on sov; returns (keys, seconds, fill seconds).
async fn listing(sov: &Target, keys: usize, work: &Path) -> anyhow::Result<(usize, f64, f64)> {
    let cj = work.join("sov/data/cluster.json");
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&cj)?)?;
    let metad = c["metad_endpoints"][0]
        .as_str()
        .context("cluster.json: no metad_endpoints")?;
    sov.s3.create_bucket("listing").await?;
    let t = Instant::now();
    let st = Command::new(std::env::current_exe()?)
        .args(["fill-index", "--metad", metad, "--bucket", "listing"])
        .env(
            "SOV_TLS_DIR",
            c["tls_dir"].as_str().context("cluster.json: no tls_dir")?,
        )
        .args(["--keys", &keys.to_string()])
        .stdout(Stdio::null())
        .status()?;
    ensure!(st.success(), "fill-index failed ({st})");
    let fill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (mut n, mut token) = (0, None::<String>);
    for page in 0.. {
        // A server that keeps answering "truncated" must not keep us here.
        ensure!(
            page <= keys / 1000 + 2,
            "listing did not end after {page} pages"
        );
        let (k, next) = sov.s3.list_page("listing", 1000, token.as_deref()).await?;
        n += k;
        match next {
            Some(tok) => token = Some(tok),
            None => break,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    ensure!(n == keys, "listed {n} keys, filled {keys}");
    Ok((n, secs, fill))
}

fn s3_result(
    targets: &[Target],
    size_cases: &[Case],
    conc_cases: &[Case],
    samples: &Samples,
    rounds: usize,
    listing: Option<(usize, f64, f64)>,
    sc: usize,
) -> BenchResult {
    let nsize = size_cases.len();
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let mut res = BenchResult {
        bench: "s3".into(),
        title: if names.len() > 1 {
            format!("S3: sov's gateway against {}", names[1..].join(", "))
        } else {
            "S3: sov's gateway".into()
        },
        command: this_command(),
        setup: format!(
            "One Rust client on this machine (HTTP/1.1, SigV4 with UNSIGNED-PAYLOAD, every GET \
             compared byte for byte with what was PUT) drives each endpoint in turn. {} \
             Everything shares this machine's {} cores and its disk. Each case: PUT of N \
             objects, then GET of each (checked), then DELETE (not timed). Medians of {rounds} \
             round(s); the order of the endpoints rotates between rounds and cases.",
            targets
                .iter()
                .map(|t| format!("**{}**: {}.", t.name, t.about))
                .collect::<Vec<_>>()
                .join(" "),
            cores()
        ),
        ..Default::default()
    };
    let peers: Vec<usize> = (1..targets.len()).collect();
    // By size.
    for (get, op) in [(false, "PUT"), (true, "GET")] {
        let mut cols: Vec<String> = vec!["size".into(), "objects".into()];
        cols.extend(names.iter().map(|n| format!("{n} MiB/s")));
        cols.extend(peers.iter().map(|&p| format!("sov / {}", names[p])));
        cols.extend(names.iter().map(|n| format!("{n} p50 / p99 ms")));
        let cref: Vec<&str> = cols.iter().map(String::as_str).collect();
        let mut t = Table::new(
            format!("{op} by object size, {sc} requests in flight"),
            &cref,
        );
        for (ci, c) in size_cases.iter().enumerate() {
            let m: Vec<f64> = (0..targets.len())
                .map(|ti| med(&samples[ti][ci], get, |f| f.mib_s))
                .collect();
            let mut row = vec![size_label(c.size), c.ops.to_string()];
            row.extend(m.iter().map(|&v| num(v)));
            row.extend(peers.iter().map(|&p| ratio_cell(ratio(m[0], m[p]))));
            row.extend((0..targets.len()).map(|ti| {
                format!(
                    "{} / {}",
                    num(med(&samples[ti][ci], get, |f| f.p50_ms)),
                    num(med(&samples[ti][ci], get, |f| f.p99_ms))
                )
            }));
            t.row(row);
        }
        res.tables.push(t);
        res.plots.push(Plot {
            name: format!("s3-size-{}", op.to_lowercase()),
            title: format!("S3 {op} throughput by object size ({sc} in flight)"),
            x_label: "object size".into(),
            y_label: "MiB/s".into(),
            log_x: true,
            log_y: true,
            series: (0..targets.len())
                .map(|ti| Series {
                    name: names[ti].into(),
                    points: size_cases
                        .iter()
                        .enumerate()
                        .map(|(ci, c)| (c.size as f64, med(&samples[ti][ci], get, |f| f.mib_s)))
                        .collect(),
                })
                .collect(),
        });
    }
    // By concurrency.
    let csize = conc_cases.first().map(|c| c.size).unwrap_or(0);
    for (get, op) in [(false, "PUT"), (true, "GET")] {
        let mut cols: Vec<String> = vec!["in flight".into(), "objects".into()];
        cols.extend(names.iter().map(|n| format!("{n} ops/s")));
        cols.extend(peers.iter().map(|&p| format!("sov / {}", names[p])));
        cols.extend(names.iter().map(|n| format!("{n} p50 / p99 ms")));
        let cref: Vec<&str> = cols.iter().map(String::as_str).collect();
        let mut t = Table::new(
            format!("{op} by concurrency, {} objects", size_label(csize)),
            &cref,
        );
        for (k, c) in conc_cases.iter().enumerate() {
            let ci = nsize + k;
            let m: Vec<f64> = (0..targets.len())
                .map(|ti| med(&samples[ti][ci], get, |f| f.ops_s))
                .collect();
            let mut row = vec![c.conc.to_string(), c.ops.to_string()];
            row.extend(m.iter().map(|&v| num(v)));
            row.extend(peers.iter().map(|&p| ratio_cell(ratio(m[0], m[p]))));
            row.extend((0..targets.len()).map(|ti| {
                format!(
                    "{} / {}",
                    num(med(&samples[ti][ci], get, |f| f.p50_ms)),
                    num(med(&samples[ti][ci], get, |f| f.p99_ms))
                )
            }));
            t.row(row);
        }
        res.tables.push(t);
        res.plots.push(Plot {
            name: format!("s3-concurrency-{}", op.to_lowercase()),
            title: format!("S3 {op} of {} objects by concurrency", size_label(csize)),
            x_label: "requests in flight".into(),
            y_label: "ops/s".into(),
            log_x: true,
            log_y: false,
            series: (0..targets.len())
                .map(|ti| Series {
                    name: names[ti].into(),
                    points: conc_cases
                        .iter()
                        .enumerate()
                        .map(|(k, c)| {
                            (
                                c.conc as f64,
                                med(&samples[ti][nsize + k], get, |f| f.ops_s),
                            )
                        })
                        .collect(),
                })
                .collect(),
        });
    }
    // Headline: the largest objects and the most concurrent small ones, against each peer.
    for &p in &peers {
        if let Some(ci) = size_cases.len().checked_sub(1) {
            for (get, op) in [(false, "PUT"), (true, "GET")] {
                let a = med(&samples[0][ci], get, |f| f.mib_s);
                let b = med(&samples[p][ci], get, |f| f.mib_s);
                res.headline.push(Headline {
                    what: format!(
                        "S3 {op} {} objects, {sc} in flight",
                        size_label(size_cases[ci].size)
                    ),
                    sov: format!("{} MiB/s", num(a)),
                    peer_name: names[p].into(),
                    peer: format!("{} MiB/s", num(b)),
                    ratio: ratio(a, b),
                });
            }
        }
        if let Some(k) = conc_cases.len().checked_sub(1) {
            for (get, op) in [(false, "PUT"), (true, "GET")] {
                let a = med(&samples[0][nsize + k], get, |f| f.ops_s);
                let b = med(&samples[p][nsize + k], get, |f| f.ops_s);
                res.headline.push(Headline {
                    what: format!(
                        "S3 {op} {} objects, {} in flight",
                        size_label(conc_cases[k].size),
                        conc_cases[k].conc
                    ),
                    sov: format!("{} ops/s", num(a)),
                    peer_name: names[p].into(),
                    peer: format!("{} ops/s", num(b)),
                    ratio: ratio(a, b),
                });
            }
        }
    }
    if let Some((n, secs, fill)) = listing {
        let mut t = Table::new(
            "Listing: ListObjectsV2, 1000 keys per page, on sov",
            &["keys", "seconds", "objects/s", "fill seconds"],
        );
        t.row(vec![
            n.to_string(),
            num(secs),
            num(n as f64 / secs),
            num(fill),
        ]);
        res.tables.push(t);
        res.notes.push(
            "The listing's keys are written straight into metad's index with `sov-bench \
             fill-index` (no object data), then listed through the gateway."
                .into(),
        );
    }
    res
}

/// Prints the tables of a result to stdout.
pub fn print_result(res: &BenchResult) {
    println!("## {}\n", res.title);
    for t in &res.tables {
        println!("{}", t.markdown());
    }
    for n in &res.notes {
        println!("- {n}");
    }
    println!("\nreproduce: {}", res.command);
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn run_scaling(args: ScalingArgs) -> anyhow::Result<()> {
    let quick = args.quick;
    let mut nodes = args
        .nodes
        .clone()
        .unwrap_or(if quick { vec![1, 3] } else { vec![1, 3, 6] });
    nodes.sort_unstable();
    nodes.dedup();
    ensure!(
        nodes.iter().all(|&n| (1..=32).contains(&n)),
        "--nodes: 1 to 32 each"
    );
    let rounds = args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let size = parse_size(&args.size)?;
    let case = Case {
        size,
        conc: args.concurrency.max(1),
        ops: args.objects.unwrap_or(if quick { 64 } else { 384 }).max(1),
    };
    std::fs::create_dir_all(&args.work)?;
    let work = tempfile::Builder::new()
        .prefix("sov-bench-scaling-")
        .tempdir_in(&args.work)?;
    let rt = tokio::runtime::Runtime::new()?;
    let bar = progress(2 * case.ops as u64 * rounds as u64 * nodes.len() as u64);
    let mut rows = Vec::new();
    for &n in &nodes {
        bar.set_message(format!("starting sov up with {n} storaged"));
        let t = start_sov(
            &args.sov_bin,
            &work.path().join(format!("n{n}")),
            &format!("{n} storaged"),
            n,
        )?;
        let samples = rt.block_on(async {
            t.s3.create_bucket(&t.bucket).await?;
            let mut s = Vec::new();
            for round in 0..rounds {
                bar.set_message(format!("{n} storaged, round {}/{rounds}", round + 1));
                s.push(
                    run_case(
                        &t,
                        case,
                        &format!("r{round}"),
                        case_buffer(case, round as u64),
                        &bar,
                    )
                    .await?,
                );
            }
            anyhow::Ok(s)
        })?;
        drop(t);
        rows.push((n, samples));
    }
    bar.finish_and_clear();
    let mut res = BenchResult {
        bench: "scaling".into(),
        title: format!(
            "Scaling: S3 throughput with {} storaged on one machine",
            nodes
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        command: this_command(),
        setup: format!(
            "`sov up --storage-nodes N --zones min(N,3)` for each N, one after the other; the \
             same client as the S3 benchmark writes {} objects of {} with {} in flight, reads \
             them back (checked) and deletes them; medians of {rounds} round(s). STANDARD is \
             replicated{{min(N,3)}}: one copy on one node, three copies from three nodes up, so \
             the bytes each PUT stores grow from 1 to 3 copies. All nodes share this machine's \
             {} cores and one disk, so this shows the software's overhead per node, not a \
             cluster's growth.",
            case.ops,
            size_label(size),
            case.conc,
            cores()
        ),
        ..Default::default()
    };
    let base = rows
        .first()
        .map(|(_, s)| (med(s, false, |f| f.mib_s), med(s, true, |f| f.mib_s)));
    let mut t = Table::new(
        "",
        &[
            "storaged",
            "copies",
            "PUT MiB/s",
            "GET MiB/s",
            "stored MiB/s",
            "PUT vs first",
            "GET vs first",
            "PUT p99 ms",
            "GET p99 ms",
        ],
    );
    let mut put_s = Series::new("PUT");
    let mut get_s = Series::new("GET");
    let mut stored_s = Series::new("bytes stored (PUT x copies)");
    for (n, s) in &rows {
        let (p, g) = (med(s, false, |f| f.mib_s), med(s, true, |f| f.mib_s));
        let copies = (*n).min(3);
        let (bp, bg) = base.unwrap_or((p, g));
        t.row(vec![
            n.to_string(),
            copies.to_string(),
            num(p),
            num(g),
            num(p * copies as f64),
            ratio_cell(ratio(p, bp)),
            ratio_cell(ratio(g, bg)),
            num(med(s, false, |f| f.p99_ms)),
            num(med(s, true, |f| f.p99_ms)),
        ]);
        put_s.points.push((*n as f64, p));
        get_s.points.push((*n as f64, g));
        stored_s.points.push((*n as f64, p * copies as f64));
    }
    res.tables.push(t);
    res.plots.push(Plot {
        name: "scaling".into(),
        title: format!(
            "S3 throughput by storaged count ({} objects)",
            size_label(size)
        ),
        x_label: "storaged processes".into(),
        y_label: "MiB/s".into(),
        log_x: false,
        log_y: false,
        series: vec![put_s, get_s, stored_s],
    });
    if let (Some((n0, s0)), Some((n1, s1))) = (rows.first(), rows.last())
        && rows.len() > 1
    {
        let (a, b) = (med(s1, true, |f| f.mib_s), med(s0, true, |f| f.mib_s));
        res.headline.push(Headline {
            what: format!("S3 GET {} with {n1} storaged vs {n0}", size_label(size)),
            sov: format!("{} MiB/s", num(a)),
            peer_name: format!("sov, {n0} storaged"),
            peer: format!("{} MiB/s", num(b)),
            ratio: ratio(a, b),
        });
    }
    print_result(&res);
    res.write_to(args.results.as_deref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("0").is_err());
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn percentiles_and_figures() {
        let mut lat = vec![0.003, 0.001, 0.002, 0.004];
        let f = figures(
            &mut lat,
            2.0,
            Case {
                size: MIB,
                conc: 1,
                ops: 4,
            },
        );
        assert_eq!(f.ops_s, 2.0);
        assert_eq!(f.mib_s, 2.0);
        assert!((f.p50_ms - 3.0).abs() < 1e-9, "{f:?}");
        assert!((f.p99_ms - 4.0).abs() < 1e-9);
    }
}
