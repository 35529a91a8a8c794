//! `sov-bench metad`: linearizable write throughput and latency of a 3-member metad cluster on
//! loopback, next to a 3-member etcd cluster on loopback taking the same writes (the same bytes
//! under the same keys) in the same run.
//!
//! Both clusters run for the whole benchmark; only one is driven at a time. For every round and
//! every client count, each system gets a warm-up and then a fixed measured window; only writes
//! acknowledged OK inside the window count. Medians over rounds are reported, per column.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use sov_proto::metad as pb;
use sov_proto::metad::metad_client::MetadClient;
use sov_testkit::{MetadCluster, Process};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::report::median;
use crate::storaged::{filesystem, interrupted, shell_quote};

/// The part of etcd's v3 API used here (`benchmarks/proto/etcd_kv.proto`).
mod etcdpb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

use etcdpb::kv_client::KvClient;

/// Members of each cluster.
const MEMBERS: usize = 3;
/// Client tasks sharing one HTTP/2 connection to each member (same layout for both systems).
const CLIENTS_PER_CONN: usize = 16;
/// The bucket every metad write goes to; also the prefix of the etcd keys.
const BUCKET: &str = "bench";
/// Bytes of the opaque manifest in every object.
const MANIFEST_BYTES: usize = 100;
/// A write taking longer than this counts as failed.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause of a client after a failed write, so a broken cluster is not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Idle time between two measured runs.
const SETTLE: Duration = Duration::from_millis(500);
/// Longest wait for a cluster to elect a leader and accept writes.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Distinct error messages kept per run, to show what went wrong.
const MAX_ERROR_SAMPLES: usize = 3;
/// Where Debian's etcd-server puts etcd.
const DEFAULT_ETCD: &str = "/usr/bin/etcd";

/// Flags of `sov-bench metad`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Short rounds (2 s) and one round: a smoke run.
    #[arg(long)]
    pub quick: bool,
    /// Directory on the filesystem holding both clusters' data; a fresh sov-bench-metad-*
    /// directory is made in it and removed afterwards (kept, logs only, on failure).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Rounds; the median of each column is reported [default: 3, 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    /// Measured seconds per round, client count and system, after a warm-up
    /// [default: 10, 2 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: Option<u64>,
    /// Concurrent clients to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 256])]
    pub clients: Vec<usize>,
    /// The etcd binary (etcd 3.4 or later).
    #[arg(long, default_value = DEFAULT_ETCD)]
    pub etcd: PathBuf,
    /// Extra flag for every metad member, repeatable (`--metad-flag=--some-flag=value`).
    #[arg(long = "metad-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub metad_flags: Vec<String>,
    /// Extra flag for every etcd member, repeatable (`--etcd-flag=--snapshot-count=10000`).
    #[arg(long = "etcd-flag", value_name = "FLAG", allow_hyphen_values = true)]
    pub etcd_flags: Vec<String>,
    /// Also write the results file for `sov-bench report` here.
    #[arg(long)]
    pub results: Option<PathBuf>,
}

/// What to run, with the defaults resolved.
#[derive(Debug, Clone)]
struct Plan {
    rounds: u32,
    /// Measured window of one run.
    window: Duration,
    /// Untimed writes before the window of every run.
    warmup: Duration,
    clients: Vec<usize>,
}

impl Plan {
    fn new(args: &Args) -> anyhow::Result<Plan> {
        ensure!(
            !args.clients.is_empty(),
            "--clients needs at least one number"
        );
        ensure!(
            args.clients.iter().all(|&c| c > 0),
            "--clients must all be at least 1, got {:?}",
            args.clients
        );
        let secs = args.seconds.unwrap_or(if args.quick { 2 } else { 10 });
        Ok(Plan {
            rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }),
            window: Duration::from_secs(secs),
            warmup: Duration::from_millis(if args.quick { 500 } else { 1000 }),
            clients: args.clients.clone(),
        })
    }
}

/// The two systems measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Metad,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Metad => "metad",
            System::Etcd => "etcd",
        }
    }
}

/// Runs the benchmark and prints the table and the JSON line on stdout; progress goes to stderr.
/// Fails (after printing) if any write failed.
pub fn run(args: Args) -> anyhow::Result<()> {
    let plan = Plan::new(&args)?;
    if !args.etcd.exists() {
        bail!(
            "{} not found: `sov-bench metad` runs an etcd cluster as its baseline. Install it \
             with ./scripts/install-deps.sh --bench (Debian package etcd-server), or pass \
             --etcd PATH",
            args.etcd.display()
        );
    }
    let metad_bin = sov_testkit::bin_dir().join("metad");
    ensure!(
        metad_bin.exists(),
        "{} is missing: build it first (cargo build --release -p metad -p sov-bench), or point \
         SOV_BIN_DIR at the directory holding it",
        metad_bin.display()
    );
    let etcd_version = etcd_version(&args.etcd)?;

    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("sov-bench-metad-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a work directory in {}", args.dir.display()))?;
    let work = tmp.path().to_path_buf();
    let fs = filesystem(&work);
    eprintln!(
        "sov-bench: working in {} ({fs}); metad from {}, etcd {etcd_version} from {}",
        work.display(),
        metad_bin.display(),
        args.etcd.display()
    );
    if fs == "tmpfs" {
        eprintln!(
            "sov-bench: warning: {} is tmpfs, so fsync costs nothing for either side",
            work.display()
        );
    }

    let rows = match measure(&args, &plan, &work) {
        Ok(rows) => rows,
        Err(e) => {
            // Keep the logs for the post-mortem, not the databases.
            remove_data(&work);
            eprintln!(
                "sov-bench: logs kept in {} (metad/metad-*/metad.log, etcd/etcd-*/etcd.log)",
                tmp.keep().display()
            );
            return Err(e);
        }
    };

    let report = Report {
        bench: "metad",
        etcd_version,
        dir: work.display().to_string(),
        filesystem: fs,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        members: MEMBERS,
        rounds: plan.rounds,
        seconds: plan.window.as_secs(),
        warmup_seconds: plan.warmup.as_secs_f64(),
        clients_per_connection: CLIENTS_PER_CONN,
        value_bytes: value_bytes(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        errors: rows.iter().map(|r| r.metad_errors + r.etcd_errors).sum(),
        command: command_line(&args, &plan),
        rows,
    };
    print!("{}", report.markdown());
    results(&report).write_to(args.results.as_deref())?;
    println!(
        "{}",
        serde_json::to_string(&report).context("encoding the JSON line")?
    );
    tmp.close()
        .with_context(|| format!("removing {}", work.display()))?;
    ensure!(
        report.errors == 0,
        "{} writes failed (see above); the figures count only acknowledged writes",
        report.errors
    );
    Ok(())
}

/// The report as a results file: the table, writes/s and p99 by clients, and the headline
/// (the fewest and the most clients).
fn results(report: &Report) -> crate::results::BenchResult {
    use crate::results::{BenchResult, Plot, tables_from_markdown};
    let md = report.markdown();
    let tables = tables_from_markdown(&md);
    let mut res = BenchResult {
        bench: "metad".into(),
        title: "metad against etcd".into(),
        command: report.command.clone(),
        setup: format!(
            "Linearizable writes of a ~{}-byte record by N concurrent clients (each one write in \
             flight, a new key every time) to a {}-member metad cluster and a {}-member etcd \
             {} cluster on loopback, data on `{}` ({}), one after the other in every round; \
             both acknowledge once a majority has the entry in a synced log. {} build.",
            report.value_bytes,
            report.members,
            report.members,
            report.etcd_version,
            report.dir,
            report.filesystem,
            report.build
        ),
        notes: vec![format!(
            "Failed writes: {} (the figures count only acknowledged writes).",
            report.errors
        )],
        ..Default::default()
    };
    if let Some(t) = tables.first() {
        res.plots.push(Plot {
            name: "metad-writes".into(),
            title: "Linearizable writes/s by concurrent clients".into(),
            x_label: "clients".into(),
            y_label: "writes/s".into(),
            log_x: true,
            log_y: false,
            series: vec![
                t.series("metad", "clients", "metad writes/s", |_| true),
                t.series("etcd", "clients", "etcd writes/s", |_| true),
            ],
        });
        res.plots.push(Plot {
            name: "metad-p99".into(),
            title: "p99 write latency by concurrent clients".into(),
            x_label: "clients".into(),
            y_label: "ms".into(),
            log_x: true,
            log_y: true,
            series: vec![
                t.series("metad", "clients", "metad p99 ms", |_| true),
                t.series("etcd", "clients", "etcd p99 ms", |_| true),
            ],
        });
        let last = t.rows.len().saturating_sub(1);
        for r in if last > 0 { vec![0, last] } else { vec![0] } {
            if r < t.rows.len() {
                let clients = &t.rows[r][0];
                res.headline.push(t.headline(
                    r,
                    &format!("metad writes/s, {clients} client(s)"),
                    "metad writes/s",
                    "etcd writes/s",
                    &format!("etcd {}", report.etcd_version),
                    "writes/s",
                ));
            }
        }
    }
    res.tables = tables;
    res
}

/// Removes the clusters' databases under `work`, leaving their logs.
fn remove_data(work: &Path) {
    for cluster in ["metad", "etcd"] {
        let Ok(entries) = std::fs::read_dir(work.join(cluster)) else {
            continue;
        };
        for member in entries.flatten() {
            let _ = std::fs::remove_dir_all(member.path().join("data"));
        }
    }
}

/// The version `etcd --version` reports ("unknown" if it prints none).
fn etcd_version(bin: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} --version exited with {}: {}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into()))
}

/// Starts both clusters, runs every (round, client count, system), stops the clusters (by
/// dropping them, which kills their process groups, also on error).
fn measure(args: &Args, plan: &Plan, work: &Path) -> anyhow::Result<Vec<Row>> {
    let metad_flags: Vec<&str> = args.metad_flags.iter().map(String::as_str).collect();
    let mut metad = MetadCluster::start(&work.join("metad"), MEMBERS, &metad_flags)
        .context("starting the metad cluster")?;
    eprintln!("sov-bench: metad members on {}", metad.addr_list());
    let mut etcd = EtcdCluster::start(&args.etcd, &work.join("etcd"), MEMBERS, &args.etcd_flags)
        .context("starting the etcd cluster")?;
    eprintln!("sov-bench: etcd members on {}", etcd.addrs().join(","));

    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let rows = rt.block_on(async {
        let all = async {
            let leader = metad
                .leader(START_TIMEOUT)
                .await
                .context("waiting for a metad leader")?;
            create_bucket(&metad, leader).await?;
            etcd.wait_healthy(START_TIMEOUT).await?;
            let metad_addrs: Vec<String> = metad.members.iter().map(|m| m.addr.clone()).collect();
            let etcd_addrs = etcd.addrs();
            // Every member of both clusters takes (and forwards) a write before timing starts.
            warm_up(System::Metad, &metad_addrs).await?;
            warm_up(System::Etcd, &etcd_addrs).await?;

            // results[level][0] for metad, [1] for etcd, one entry per round.
            let mut results: Vec<[Vec<RunResult>; 2]> = plan
                .clients
                .iter()
                .map(|_| [Vec::new(), Vec::new()])
                .collect();
            for round in 0..plan.rounds {
                for (level, &clients) in plan.clients.iter().enumerate() {
                    // Alternate who goes first, so neither always runs on a fresher machine.
                    let order = if (round as usize + level).is_multiple_of(2) {
                        [System::Metad, System::Etcd]
                    } else {
                        [System::Etcd, System::Metad]
                    };
                    for system in order {
                        let addrs = match system {
                            System::Metad => &metad_addrs,
                            System::Etcd => &etcd_addrs,
                        };
                        let r = run_once(system, addrs, clients, round, plan).await?;
                        eprintln!(
                            "[{} c{clients} round {}/{}] {:.0} writes/s, p50 {:.2} ms, \
                             p99 {:.2} ms, {} ok, {} errors",
                            system.name(),
                            round + 1,
                            plan.rounds,
                            r.writes_s,
                            r.p50_ms,
                            r.p99_ms,
                            r.ok,
                            r.errors
                        );
                        for e in &r.error_samples {
                            eprintln!("    error: {e}");
                        }
                        check_alive(&mut metad, &mut etcd)?;
                        results[level][usize::from(system == System::Etcd)].push(r);
                        tokio::time::sleep(SETTLE).await;
                    }
                }
            }
            let rows: Vec<Row> = plan
                .clients
                .iter()
                .zip(&results)
                .map(|(&clients, [m, e])| Row::new(clients, m, e))
                .collect();
            anyhow::Ok(rows)
        };
        // The members run in their own process groups, so a Ctrl-C does not reach them: stop
        // through the error path, which kills them.
        tokio::select! {
            r = all => r,
            e = interrupted() => Err(e),
        }
    });
    // Client tasks of an interrupted run are aborted; do not wait long for them.
    rt.shutdown_timeout(Duration::from_secs(5));
    rows
}

/// Fails if a member of either cluster has exited.
fn check_alive(metad: &mut MetadCluster, etcd: &mut EtcdCluster) -> anyhow::Result<()> {
    for m in &mut metad.members {
        if let Some(status) = m.proc.try_wait() {
            bail!(
                "metad member {} exited with {status}:\n{}",
                m.id,
                m.proc.log_tail(30)
            );
        }
    }
    for m in &mut etcd.members {
        if let Some(status) = m.proc.try_wait() {
            bail!(
                "{} exited with {status}:\n{}",
                m.proc.name,
                m.proc.log_tail(30)
            );
        }
    }
    Ok(())
}

/// Creates [`BUCKET`] through the leader, retrying until [`START_TIMEOUT`].
async fn create_bucket(metad: &MetadCluster, leader: usize) -> anyhow::Result<()> {
    let mut client = metad.members[leader]
        .client()
        .context("a client for the metad leader")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let req = pb::CreateBucketRequest {
            name: BUCKET.into(),
            owner: "sov-bench".into(),
            pool: String::new(),
        };
        let err = match tokio::time::timeout(OP_TIMEOUT, client.create_bucket(req)).await {
            Ok(Ok(_)) => return Ok(()),
            // An earlier attempt that timed out on our side may have gone through.
            Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Ok(Err(s)) => status_text(&s),
            Err(_) => format!("no answer within {}s", OP_TIMEOUT.as_secs()),
        };
        if Instant::now() > deadline {
            bail!("creating bucket {BUCKET} on metad: {err}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One write through every member in turn, each retried until [`START_TIMEOUT`]: the cluster
/// has a leader and every member accepts (or forwards) writes.
async fn warm_up(system: System, addrs: &[String]) -> anyhow::Result<()> {
    let mut members = Members::connect(system, addrs).await?;
    for (member, addr) in addrs.iter().enumerate() {
        let deadline = Instant::now() + START_TIMEOUT;
        for attempt in 0u64.. {
            let obj = object(format!("warmup/m{member}/{attempt}"));
            let err = match tokio::time::timeout(OP_TIMEOUT, members.put(member, obj)).await {
                Ok(Ok(())) => break,
                Ok(Err(s)) => status_text(&s),
                Err(_) => format!("no answer within {}s", OP_TIMEOUT.as_secs()),
            };
            if Instant::now() > deadline {
                bail!(
                    "{} member {addr} does not accept writes after {START_TIMEOUT:?}: {err}",
                    system.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// One client's view of a cluster: a gRPC client per member, members in a fixed order.
#[derive(Clone)]
enum Members {
    Metad(Vec<MetadClient<Channel>>),
    Etcd(Vec<KvClient<Channel>>),
}

impl Members {
    /// One new HTTP/2 connection to each of `addrs`, with the same settings for both systems.
    async fn connect(system: System, addrs: &[String]) -> anyhow::Result<Members> {
        let mut channels = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let ep = Channel::from_shared(format!("http://{addr}"))
                .with_context(|| format!("bad address {addr}"))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            // metad speaks mutual TLS (the process's transport); etcd runs without TLS here.
            let t = match system {
                System::Metad => sov_common::tls::transport(),
                System::Etcd => sov_common::tls::Transport::Plain,
            };
            let ch = sov_common::tls::connect_with(ep, sov_common::tls::Role::Metad, t)
                .await
                .with_context(|| format!("connecting to {} member {addr}", system.name()))?;
            channels.push(ch);
        }
        Ok(match system {
            System::Metad => Members::Metad(channels.into_iter().map(MetadClient::new).collect()),
            System::Etcd => Members::Etcd(channels.into_iter().map(KvClient::new).collect()),
        })
    }

    fn len(&self) -> usize {
        match self {
            Members::Metad(c) => c.len(),
            Members::Etcd(c) => c.len(),
        }
    }

    /// Writes `obj` through member `member`: metad PutObject, or etcd Put of the encoded
    /// object under [`etcd_key`]. Ok once the system acknowledges the write.
    async fn put(&mut self, member: usize, obj: pb::ObjectVersion) -> Result<(), tonic::Status> {
        match self {
            Members::Metad(c) => {
                let req = pb::PutObjectRequest {
                    object: Some(obj),
                    expected_version_id: None,
                };
                c[member].put_object(req).await?;
            }
            Members::Etcd(c) => {
                let req = etcdpb::PutRequest {
                    key: Bytes::from(etcd_key(&obj)),
                    value: Bytes::from(obj.encode_to_vec()),
                    ..Default::default()
                };
                c[member].put(req).await?;
            }
        }
        Ok(())
    }
}

/// The etcd key of an object: `<bucket>/<key>`.
fn etcd_key(obj: &pb::ObjectVersion) -> String {
    format!("{}/{}", obj.bucket, obj.key)
}

/// A gRPC status as text: its code and message.
fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The object written under `key`: about 230 bytes encoded, like the index entry of a real
/// upload (size, 32-hex etag, content type, a 100-byte manifest). Everything metad would fill
/// in (version id, modification time) is set here, so metad stores exactly these bytes, and
/// etcd is given the same encoding.
fn object(key: String) -> pb::ObjectVersion {
    let mut hasher = blake3::Hasher::new();
    hasher.update(key.as_bytes());
    let mut xof = hasher.finalize_xof();
    let mut etag = [0u8; 16];
    xof.fill(&mut etag);
    let mut version = [0u8; 5];
    xof.fill(&mut version);
    let mut manifest = vec![0u8; MANIFEST_BYTES];
    xof.fill(&mut manifest);
    let now = unix_ms();
    pb::ObjectVersion {
        bucket: BUCKET.into(),
        key,
        version_id: format!("{now:012x}{}", hex(&version)),
        size: 1 << 20,
        etag: hex(&etag),
        modified_unix_ms: now,
        storage_class: "STANDARD".into(),
        content_type: "application/octet-stream".into(),
        manifest: Bytes::from(manifest),
        ..Default::default()
    }
}

/// Encoded size of a typical object (key as at 256 clients).
fn value_bytes() -> usize {
    object("r0/c256/t100/10000".into()).encoded_len()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a set of clients saw in one run.
#[derive(Debug, Default)]
struct ClientStats {
    /// Writes acknowledged OK that completed in the window.
    ok: u64,
    /// Failed writes, warm-up included.
    errors: u64,
    /// Send-to-acknowledgement time of every counted write, ns.
    latencies_ns: Vec<u64>,
    error_samples: Vec<String>,
}

impl ClientStats {
    fn error(&mut self, msg: String) {
        self.errors += 1;
        self.keep_sample(msg);
    }

    fn keep_sample(&mut self, msg: String) {
        if self.error_samples.len() < MAX_ERROR_SAMPLES && !self.error_samples.contains(&msg) {
            self.error_samples.push(msg);
        }
    }

    fn merge(&mut self, other: ClientStats) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.latencies_ns.extend(other.latencies_ns);
        for msg in other.error_samples {
            self.keep_sample(msg);
        }
    }

    fn finish(mut self, window: Duration) -> RunResult {
        self.latencies_ns.sort_unstable();
        RunResult {
            ok: self.ok,
            errors: self.errors,
            writes_s: self.ok as f64 / window.as_secs_f64(),
            p50_ms: percentile(&self.latencies_ns, 0.50) / 1e6,
            p99_ms: percentile(&self.latencies_ns, 0.99) / 1e6,
            error_samples: self.error_samples,
        }
    }
}

/// Nearest-rank percentile `p` (0 < p <= 1) of sorted values; NaN when empty.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// One measured run of one system at one client count.
#[derive(Debug, Clone)]
struct RunResult {
    ok: u64,
    errors: u64,
    writes_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    error_samples: Vec<String>,
}

/// `clients` client tasks writing to `system` for the warm-up and then the window.
async fn run_once(
    system: System,
    addrs: &[String],
    clients: usize,
    round: u32,
    plan: &Plan,
) -> anyhow::Result<RunResult> {
    // Connections first, untimed: one to each member for every CLIENTS_PER_CONN clients.
    let mut conns = Vec::new();
    for _ in 0..clients.div_ceil(CLIENTS_PER_CONN) {
        conns.push(Members::connect(system, addrs).await?);
    }
    let start = Instant::now() + plan.warmup;
    let end = start + plan.window;
    let mut tasks = JoinSet::new();
    for task in 0..clients {
        let members = conns[task / CLIENTS_PER_CONN].clone();
        let prefix = format!("r{round}/c{clients}/t{task}/");
        tasks.spawn(client_task(members, prefix, task, start, end));
    }
    let mut total = ClientStats::default();
    // Returning early drops the set, which aborts the tasks still running.
    while let Some(r) = tasks.join_next().await {
        total.merge(r.context("a client task panicked")?);
    }
    Ok(total.finish(plan.window))
}

/// One client: writes a new key `<prefix><n>` at a time, one write in flight, each through the
/// next member in turn, until `end`. Counts the OK writes that complete in [`start`, `end`).
async fn client_task(
    mut members: Members,
    prefix: String,
    task: usize,
    start: Instant,
    end: Instant,
) -> ClientStats {
    let mut stats = ClientStats::default();
    let n_members = members.len();
    let mut member = task % n_members;
    for n in 0u64.. {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let obj = object(format!("{prefix}{n}"));
        let r = match tokio::time::timeout(OP_TIMEOUT, members.put(member, obj)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(s)) => Err(status_text(&s)),
            Err(_) => Err(format!("no answer within {}s", OP_TIMEOUT.as_secs())),
        };
        let done = Instant::now();
        match r {
            Ok(()) => {
                if done >= start && done < end {
                    stats.ok += 1;
                    stats
                        .latencies_ns
                        .push(done.duration_since(sent).as_nanos() as u64);
                }
            }
            Err(e) => {
                stats.error(format!("member {member}: {e}"));
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
        member = (member + 1) % n_members;
    }
    stats
}

/// An etcd member started by this benchmark.
struct EtcdMember {
    proc: Process,
    /// Client address, `127.0.0.1:<port>`.
    addr: String,
}

/// A 3-member etcd cluster on loopback; dropping it kills every member.
struct EtcdCluster {
    members: Vec<EtcdMember>,
}

impl EtcdCluster {
    /// Starts `n` members `etcd-<i>`, each with its data and log in `work/etcd-<i>`, with the
    /// same Raft timings as the metad test cluster (heartbeat 200 ms, elections after 1 to 2 s).
    fn start(bin: &Path, work: &Path, n: usize, extra: &[String]) -> anyhow::Result<EtcdCluster> {
        let ports = distinct_free_ports(2 * n);
        let (client_ports, peer_ports) = ports.split_at(n);
        let initial_cluster = peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("etcd-{}=http://127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("sov-bench-{}", std::process::id());
        let mut members = Vec::with_capacity(n);
        for (i, (client_port, peer_port)) in client_ports.iter().zip(peer_ports).enumerate() {
            let name = format!("etcd-{}", i + 1);
            let dir = work.join(&name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let client_url = format!("http://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let data_dir = dir.join("data").display().to_string();
            let flags = [
                ("--name", name.as_str()),
                ("--data-dir", data_dir.as_str()),
                ("--listen-client-urls", client_url.as_str()),
                ("--advertise-client-urls", client_url.as_str()),
                ("--listen-peer-urls", peer_url.as_str()),
                ("--initial-advertise-peer-urls", peer_url.as_str()),
                ("--initial-cluster", initial_cluster.as_str()),
                ("--initial-cluster-state", "new"),
                ("--initial-cluster-token", token.as_str()),
                ("--heartbeat-interval", "200"),
                ("--election-timeout", "1000"),
                // 8 GiB instead of 2: a long run must not hit the space alarm.
                ("--quota-backend-bytes", "8589934592"),
                ("--logger", "zap"),
                ("--log-outputs", "stderr"),
            ];
            let mut args: Vec<String> = flags
                .iter()
                .flat_map(|(k, v)| [k.to_string(), v.to_string()])
                .collect();
            args.extend(extra.iter().cloned());
            let proc = Process::spawn(&name, bin, &args, &dir.join("etcd.log"))
                .with_context(|| format!("starting {name}"))?;
            members.push(EtcdMember {
                proc,
                addr: format!("127.0.0.1:{client_port}"),
            });
        }
        Ok(EtcdCluster { members })
    }

    fn addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.addr.clone()).collect()
    }

    /// Waits until every member's `/health` says true (the cluster has a leader), failing early
    /// if a member exits.
    async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut healthy = 0;
            let mut last = String::new();
            for m in &mut self.members {
                if let Some(status) = m.proc.try_wait() {
                    bail!(
                        "{} exited with {status} while starting:\n{}",
                        m.proc.name,
                        m.proc.log_tail(30)
                    );
                }
                let url = format!("http://{}/health", m.addr);
                let r = tokio::task::spawn_blocking(move || sov_testkit::http_get(&url))
                    .await
                    .context("health check panicked")?;
                match r {
                    Ok(body) if body.contains(r#""health":"true""#) => healthy += 1,
                    Ok(body) => last = format!("{}: {}", m.proc.name, body.trim()),
                    Err(e) => last = format!("{}: {e:#}", m.proc.name),
                }
            }
            if healthy == self.members.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| format!("---- {} ----\n{}", m.proc.name, m.proc.log_tail(15)))
                    .collect();
                bail!(
                    "etcd not healthy after {timeout:?} ({last}):\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `n` different loopback ports that were free a moment ago.
fn distinct_free_ports(n: usize) -> Vec<u16> {
    let mut seen = HashSet::new();
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let p = sov_testkit::free_port();
        if seen.insert(p) {
            ports.push(p);
        }
    }
    ports
}

/// One line of the result: medians over rounds, per column.
#[derive(Debug, Clone, Serialize)]
struct Row {
    clients: usize,
    metad_writes_s: f64,
    metad_p50_ms: f64,
    metad_p99_ms: f64,
    /// Acknowledged writes counted, all rounds.
    metad_ok: u64,
    /// Failed writes, all rounds, warm-ups included.
    metad_errors: u64,
    etcd_writes_s: f64,
    etcd_p50_ms: f64,
    etcd_p99_ms: f64,
    etcd_ok: u64,
    etcd_errors: u64,
    /// metad_writes_s / etcd_writes_s.
    ratio: f64,
}

impl Row {
    fn new(clients: usize, metad: &[RunResult], etcd: &[RunResult]) -> Row {
        fn col(runs: &[RunResult], f: impl Fn(&RunResult) -> f64) -> f64 {
            median(runs.iter().map(f).collect())
        }
        let metad_writes_s = col(metad, |r| r.writes_s);
        let etcd_writes_s = col(etcd, |r| r.writes_s);
        Row {
            clients,
            metad_writes_s,
            metad_p50_ms: col(metad, |r| r.p50_ms),
            metad_p99_ms: col(metad, |r| r.p99_ms),
            metad_ok: metad.iter().map(|r| r.ok).sum(),
            metad_errors: metad.iter().map(|r| r.errors).sum(),
            etcd_writes_s,
            etcd_p50_ms: col(etcd, |r| r.p50_ms),
            etcd_p99_ms: col(etcd, |r| r.p99_ms),
            etcd_ok: etcd.iter().map(|r| r.ok).sum(),
            etcd_errors: etcd.iter().map(|r| r.errors).sum(),
            ratio: metad_writes_s / etcd_writes_s,
        }
    }
}

/// The whole result; serialised as the JSON line.
#[derive(Debug, Clone, Serialize)]
struct Report {
    bench: &'static str,
    etcd_version: String,
    dir: String,
    filesystem: String,
    build: &'static str,
    members: usize,
    rounds: u32,
    /// Measured window of every run.
    seconds: u64,
    warmup_seconds: f64,
    clients_per_connection: usize,
    /// Encoded size of a typical object (the etcd value; metad's index entry).
    value_bytes: usize,
    cpus: usize,
    /// Failed writes over the whole run.
    errors: u64,
    command: String,
    rows: Vec<Row>,
}

impl Report {
    /// The Markdown form: a heading line, the table, the errors, the notes, the command.
    fn markdown(&self) -> String {
        let mut out = format!(
            "metad vs etcd {}: {}-member clusters on loopback, {} ({}), {} build, medians of {} \
             round(s) of {} s\n\n",
            self.etcd_version,
            self.members,
            self.dir,
            self.filesystem,
            self.build,
            self.rounds,
            self.seconds,
        );
        out.push_str(
            "| clients | metad writes/s | metad p50 ms | metad p99 ms | etcd writes/s | \
             etcd p50 ms | etcd p99 ms | ratio |\n",
        );
        out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
                r.clients,
                r.metad_writes_s,
                r.metad_p50_ms,
                r.metad_p99_ms,
                r.etcd_writes_s,
                r.etcd_p50_ms,
                r.etcd_p99_ms,
                r.ratio,
            ));
        }
        out.push('\n');
        if self.errors == 0 {
            out.push_str("errors: none\n");
        } else {
            out.push_str(&format!(
                "ERRORS: {} writes failed (metad: {}; etcd: {}); the table counts only \
                 acknowledged writes\n",
                self.errors,
                errors_by_level(&self.rows, |r| r.metad_errors),
                errors_by_level(&self.rows, |r| r.etcd_errors),
            ));
        }
        out.push('\n');
        for n in self.notes() {
            out.push_str(&format!("- {n}\n"));
        }
        out.push_str(&format!("\nreproduce: {}\n", self.command));
        out
    }

    fn notes(&self) -> Vec<String> {
        vec![
            format!(
                "Each client has one write in flight and writes a new key every time, sending \
                 its writes to the {} members in turn; a member that does not lead forwards \
                 (metad: the call, to the leader; etcd: the Raft proposal). Every {} clients \
                 share one HTTP/2 connection per member, the same layout for both systems.",
                self.members, self.clients_per_connection
            ),
            format!(
                "metad: PutObject of a {}-byte ObjectVersion into one bucket (a read and a \
                 compare-and-set through Raft). etcd: Put of the same encoded bytes under \
                 `{BUCKET}/<key>`. Both answer after a majority has the entry in a synced log \
                 and the answering member has applied it.",
                self.value_bytes
            ),
            format!(
                "Counted: writes acknowledged OK that completed within the {} s window after a \
                 {} s warm-up; latency from send to acknowledgement, p50/p99 over those writes. \
                 Medians over rounds, per column; ratio = metad writes/s / etcd writes/s.",
                self.seconds, self.warmup_seconds
            ),
            format!(
                "Both clusters and the clients share this machine's {} CPU(s); only one cluster \
                 is driven at a time, which one first alternating. Raft timings: heartbeat \
                 200 ms, elections after 1 to 2 s, on both.",
                self.cpus
            ),
        ]
    }
}

/// `N at C clients, ...` for the levels with errors, or `none`.
fn errors_by_level(rows: &[Row], errors: impl Fn(&Row) -> u64) -> String {
    let parts: Vec<String> = rows
        .iter()
        .filter(|r| errors(r) > 0)
        .map(|r| format!("{} at {} clients", errors(r), r.clients))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// The command that reproduces this run, build included.
fn command_line(args: &Args, plan: &Plan) -> String {
    let (build, profile) = if cfg!(debug_assertions) {
        ("cargo build -p metad -p sov-bench", "debug")
    } else {
        ("cargo build --release -p metad -p sov-bench", "release")
    };
    let mut cmd = format!("{build} && target/{profile}/sov-bench metad");
    if args.quick {
        cmd.push_str(" --quick");
    }
    let clients: Vec<String> = plan.clients.iter().map(|c| c.to_string()).collect();
    cmd.push_str(&format!(
        " --rounds {} --seconds {} --clients {} --dir {}",
        plan.rounds,
        plan.window.as_secs(),
        clients.join(","),
        shell_quote(&args.dir.display().to_string())
    ));
    if args.etcd != Path::new(DEFAULT_ETCD) {
        cmd.push_str(&format!(
            " --etcd {}",
            shell_quote(&args.etcd.display().to_string())
        ));
    }
    for f in &args.metad_flags {
        cmd.push_str(&format!(" --metad-flag={}", shell_quote(f)));
    }
    for f in &args.etcd_flags {
        cmd.push_str(&format!(" --etcd-flag={}", shell_quote(f)));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(writes_s: f64, p50_ms: f64, p99_ms: f64, errors: u64) -> RunResult {
        RunResult {
            ok: writes_s as u64,
            errors,
            writes_s,
            p50_ms,
            p99_ms,
            error_samples: Vec::new(),
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn objects_are_about_200_bytes_and_differ_by_key() {
        let n = value_bytes();
        assert!((180..=280).contains(&n), "{n} bytes");
        let (a, b) = (object("a".into()), object("b".into()));
        assert_eq!(a.etag.len(), 32);
        assert_eq!(a.version_id.len(), 22);
        assert_eq!(a.manifest.len(), MANIFEST_BYTES);
        assert_ne!(a.etag, b.etag);
        assert_eq!(etcd_key(&a), "bench/a");
    }

    #[test]
    fn a_row_holds_medians_sums_and_the_ratio() {
        let metad = [
            result(100.0, 1.0, 5.0, 0),
            result(300.0, 3.0, 9.0, 2),
            result(200.0, 2.0, 7.0, 0),
        ];
        let etcd = [
            result(400.0, 0.5, 2.0, 0),
            result(400.0, 0.5, 2.0, 0),
            result(500.0, 0.4, 1.0, 1),
        ];
        let row = Row::new(16, &metad, &etcd);
        assert_eq!(row.metad_writes_s, 200.0);
        assert_eq!(row.metad_p50_ms, 2.0);
        assert_eq!(row.metad_p99_ms, 7.0);
        assert_eq!(row.metad_errors, 2);
        assert_eq!(row.etcd_writes_s, 400.0);
        assert_eq!(row.etcd_errors, 1);
        assert_eq!(row.ratio, 0.5);
    }

    #[test]
    fn command_line_reproduces_the_flags() {
        let args = Args {
            quick: true,
            dir: "/var/tmp".into(),
            rounds: None,
            seconds: None,
            clients: vec![1, 16],
            etcd: DEFAULT_ETCD.into(),
            metad_flags: vec![],
            etcd_flags: vec!["--snapshot-count=1000".into()],
            results: None,
        };
        let plan = Plan::new(&args).expect("valid args");
        assert_eq!(plan.window, Duration::from_secs(2));
        assert_eq!(plan.rounds, 1);
        let cmd = command_line(&args, &plan);
        assert!(
            cmd.ends_with(
                "sov-bench metad --quick --rounds 1 --seconds 2 --clients 1,16 --dir /var/tmp \
                 --etcd-flag=--snapshot-count=1000"
            ),
            "{cmd}"
        );
    }
}
