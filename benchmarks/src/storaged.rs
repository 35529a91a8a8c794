//! `sov-bench storaged`: chunk PUT and GET throughput of one real storaged over gRPC, next to
//! a raw-disk baseline that writes the same bytes with the same number of fdatasyncs on the
//! same filesystem in the same run.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use sov_proto::storaged as pb;
use sov_proto::storaged::chunk_store_client::ChunkStoreClient;
use sov_testkit::Storaged;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::report::{self, Op, Row, Sample};
use crate::{payload, rawdisk};

type Client = ChunkStoreClient<Channel>;

const MIB: u64 = 1 << 20;
/// Largest data frame of a Put stream.
const FRAME: usize = 1 << 20;
/// A single RPC taking longer than this fails the run instead of hanging it.
const OP_TIMEOUT: Duration = Duration::from_secs(120);
/// Chunk sizes measured, largest first.
const SIZES: [u64; 3] = [4 * MIB, MIB, 4096];
/// Client concurrencies measured for every size.
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Concurrency of the untimed clean-up deletes.
const DELETE_CONCURRENCY: usize = 64;

/// Flags of `sov-bench storaged`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Small cases and one round: a smoke run, well under a minute in a debug build.
    #[arg(long)]
    pub quick: bool,
    /// Directory on the filesystem to measure; a fresh sov-bench-* directory is made in it and
    /// removed afterwards.
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Rounds per case; the median is reported [default: 3, 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    /// storaged's --io-engine.
    #[arg(long, value_enum, default_value_t = IoEngine::Auto)]
    pub io_engine: IoEngine,
    /// How to print the results.
    #[arg(long, value_enum, default_value_t = Output::Markdown)]
    pub output: Output,
    /// Also write the results file for `sov-bench report` here.
    #[arg(long)]
    pub results: Option<PathBuf>,
}

/// storaged's I/O engine choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    Auto,
    #[value(name = "io_uring")]
    IoUring,
    Pread,
}

impl IoEngine {
    fn as_str(self) -> &'static str {
        match self {
            IoEngine::Auto => "auto",
            IoEngine::IoUring => "io_uring",
            IoEngine::Pread => "pread",
        }
    }
}

/// Result formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A Markdown table with notes and the command that reproduces it.
    Markdown,
    /// The same as one JSON object with a `rows` array.
    Json,
}

/// One (size, concurrency) cell of the matrix.
#[derive(Debug, Clone, Copy)]
struct Case {
    size: u64,
    conc: usize,
    /// Operations per round, on each side.
    ops: u64,
}

impl Case {
    fn name(&self) -> String {
        format!("{}-c{}", report::size_label(self.size), self.conc)
    }
}

/// Operations per round: 20000 (quick 2000) for small chunks; for large ones 256 MiB
/// (quick 16 MiB) but at least 4 (quick 1) per client task, so that every task is busy.
fn ops_for(size: u64, conc: usize, quick: bool) -> u64 {
    let conc = conc as u64;
    if size <= 64 << 10 {
        return (if quick { 2000 } else { 20_000 }).max(conc);
    }
    let (bytes, per_task) = if quick { (16 * MIB, 1) } else { (256 * MIB, 4) };
    (bytes / size).max(per_task * conc)
}

fn cases(quick: bool) -> Vec<Case> {
    SIZES
        .iter()
        .flat_map(|&size| {
            CONCURRENCY.iter().map(move |&conc| Case {
                size,
                conc,
                ops: ops_for(size, conc, quick),
            })
        })
        .collect()
}

/// Runs the whole matrix and prints the result on stdout; progress goes to stderr.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("sov-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a work directory in {}", args.dir.display()))?;
    let work = tmp.path().to_path_buf();
    let fs = filesystem(&work);
    eprintln!("sov-bench: working in {} ({fs})", work.display());
    if fs == "tmpfs" {
        eprintln!(
            "sov-bench: warning: {} is tmpfs, not a disk",
            work.display()
        );
    }
    match measure(&args, rounds, &work) {
        Ok((rows, io_engine)) => {
            let ctx = report::Context {
                dir: work.display().to_string(),
                filesystem: fs,
                io_engine,
                build: if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
                notes: notes(args.quick),
                command: command_line(&args, rounds),
            };
            match args.output {
                Output::Markdown => print!("{}", report::markdown(&ctx, &rows)),
                Output::Json => println!("{}", report::json(&ctx, &rows)?),
            }
            results(&ctx, &rows).write_to(args.results.as_deref())?;
            tmp.close()
                .with_context(|| format!("removing {}", work.display()))
        }
        Err(e) => {
            // Keep the storaged log for the post-mortem, not the gigabytes of test data.
            let _ = std::fs::remove_dir_all(work.join("disk"));
            let _ = std::fs::remove_file(work.join("raw.bin"));
            eprintln!(
                "sov-bench: storaged log kept in {}",
                tmp.keep().join("storaged/storaged.log").display()
            );
            Err(e)
        }
    }
}

/// The rows as a results file: the table, PUT and GET throughput by size at concurrency 16,
/// and the headline (large and small PUTs at 16 in flight against the raw disk).
fn results(ctx: &report::Context, rows: &[Row]) -> crate::results::BenchResult {
    use crate::results::{BenchResult, Plot, Series, tables_from_markdown};
    let md = report::markdown(ctx, rows);
    let mut res = BenchResult {
        bench: "storaged".into(),
        title: "storaged against the raw disk".into(),
        command: ctx.command.clone(),
        setup: format!(
            "One storaged (scrub off) on a folder of `{}` ({}), driven over gRPC on loopback; \
             the baseline is the same disk in the same process right after: `pwrite` of the \
             same sizes into one file with as many fdatasyncs as storaged made, then `pread`. \
             I/O engine {}, {} build.",
            ctx.dir, ctx.filesystem, ctx.io_engine, ctx.build
        ),
        tables: tables_from_markdown(&md),
        notes: ctx.notes.clone(),
        ..Default::default()
    };
    for (op, name) in [(report::Op::Put, "put"), (report::Op::Get, "get")] {
        let pick = |sov: bool| {
            let mut s = Series::new(if sov { "storaged" } else { "raw disk" });
            for r in rows.iter().filter(|r| r.op == op && r.conc == 16) {
                s.points.push((
                    r.size_bytes as f64,
                    if sov { r.sov_mb_s } else { r.raw_mb_s },
                ));
            }
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
            s
        };
        res.plots.push(Plot {
            name: format!("storaged-{name}"),
            title: format!(
                "storaged chunk {} vs raw disk, 16 in flight",
                name.to_uppercase()
            ),
            x_label: "chunk size".into(),
            y_label: "MB/s".into(),
            log_x: true,
            log_y: true,
            series: vec![pick(true), pick(false)],
        });
    }
    for r in rows
        .iter()
        .filter(|r| r.op == report::Op::Put && r.conc == 16)
    {
        res.headline.push(crate::results::Headline {
            what: format!("storaged chunk PUT {}, 16 in flight", r.size),
            sov: format!("{:.0} MB/s", r.sov_mb_s),
            peer_name: "raw disk (same syncs)".into(),
            peer: format!("{:.0} MB/s", r.raw_mb_s),
            ratio: r.ratio,
        });
    }
    res
}

/// Starts storaged, runs every case, stops storaged. Returns the rows and the I/O engine
/// storaged reported.
fn measure(args: &Args, rounds: u32, work: &Path) -> anyhow::Result<(Vec<Row>, String)> {
    let disk = work.join("disk");
    std::fs::create_dir_all(&disk).with_context(|| format!("creating {}", disk.display()))?;
    let mut storaged = Storaged::start(
        &work.join("storaged"),
        &[disk],
        &["--no-scrub", "--io-engine", args.io_engine.as_str()],
    )
    .context("starting storaged")?;
    let io_engine = storaged.ready.io_engine.clone();
    eprintln!(
        "sov-bench: storaged pid {} on {} ({io_engine})",
        storaged.ready.pid,
        storaged.addr()
    );
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let rows = rt.block_on(async {
        let all = async {
            let bench = Bench {
                client: storaged.client().await.context("connecting to storaged")?,
                metrics_url: storaged.metrics_url(),
                raw: work.join("raw.bin"),
                rounds,
            };
            let mut rows = Vec::new();
            for case in cases(args.quick) {
                rows.extend(bench.case(case).await?);
            }
            anyhow::Ok(rows)
        };
        // storaged runs in its own process group, so a Ctrl-C does not reach it: stop through
        // the error path, which kills it and removes the data.
        tokio::select! {
            r = all => r,
            e = interrupted() => Err(e),
        }
    });
    // Raw-disk threads of an interrupted case may still be running; do not wait long for them.
    rt.shutdown_timeout(Duration::from_secs(10));
    let rows = rows?;
    let status = storaged.terminate(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "storaged exited with {status} after SIGTERM:\n{}",
        storaged.proc.log_tail(20)
    );
    Ok((rows, io_engine))
}

/// Resolves on SIGINT or SIGTERM; never if the handlers cannot be installed.
pub(crate) async fn interrupted() -> anyhow::Error {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => anyhow!("interrupted (SIGINT)"),
        _ = term.recv() => anyhow!("terminated (SIGTERM)"),
    }
}

/// What the cases share.
struct Bench {
    client: Client,
    metrics_url: String,
    raw: PathBuf,
    rounds: u32,
}

impl Bench {
    /// All rounds of one case: a put row and a get row.
    async fn case(&self, case: Case) -> anyhow::Result<[Row; 2]> {
        let (size, conc) = (case.size, case.conc);
        let buffers: Arc<Vec<Bytes>> = Arc::new(
            tokio::task::spawn_blocking(move || {
                (0..conc)
                    .map(|t| Bytes::from(payload::random_buffer(size as usize, t as u64)))
                    .collect()
            })
            .await
            .context("generating data")?,
        );
        let (mut puts, mut gets) = (Vec::new(), Vec::new());
        for round in 0..self.rounds {
            let prefix = format!("bench/{}/{round}/", case.name());

            let before = self.syncs().await?.unwrap_or(0);
            let sov_put = self.sov_put(case, &buffers, &prefix, round).await?;
            let after = self
                .syncs()
                .await?
                .context("storaged's /metrics has no storaged_syncs_total")?;
            let syncs = after.saturating_sub(before);
            ensure!(
                syncs > 0,
                "storaged reported no fdatasync for {} puts",
                case.ops
            );

            let (raw, bufs) = (self.raw.clone(), buffers.clone());
            let raw_put = tokio::task::spawn_blocking(move || {
                rawdisk::put(&raw, &bufs, case.ops, syncs, round)
            })
            .await
            .context("raw put panicked")?
            .context("raw put")?;

            let sov_get = self.sov_get(case, &prefix).await?;
            let raw = self.raw.clone();
            let raw_get =
                tokio::task::spawn_blocking(move || rawdisk::get(&raw, size, case.ops, conc))
                    .await
                    .context("raw get panicked")?
                    .context("raw get")?;

            self.delete(case, &prefix).await?;
            std::fs::remove_file(&self.raw)
                .with_context(|| format!("removing {}", self.raw.display()))?;

            let mb_s = |d: Duration| (case.ops * size) as f64 / d.as_secs_f64() / 1e6;
            eprintln!(
                "[{} round {}/{}] {} ops; put: sov {:.1} MB/s, raw {:.1} MB/s, {syncs} syncs; \
                 get: sov {:.1} MB/s, raw {:.1} MB/s",
                case.name(),
                round + 1,
                self.rounds,
                case.ops,
                mb_s(sov_put),
                mb_s(raw_put),
                mb_s(sov_get),
                mb_s(raw_get),
            );
            puts.push(Sample {
                sov: sov_put,
                raw: raw_put,
                syncs: Some(syncs),
            });
            gets.push(Sample {
                sov: sov_get,
                raw: raw_get,
                syncs: None,
            });
        }
        Ok([
            Row::new(Op::Put, size, conc, case.ops, &puts),
            Row::new(Op::Get, size, conc, case.ops, &gets),
        ])
    }

    /// Total fdatasyncs storaged has made, if the metric is there yet.
    async fn syncs(&self) -> anyhow::Result<Option<u64>> {
        let url = self.metrics_url.clone();
        let text = tokio::task::spawn_blocking(move || sov_testkit::http_get(&url))
            .await
            .context("metrics fetch panicked")?
            .context("reading storaged's /metrics")?;
        Ok(sov_testkit::metric_value(&text, "storaged_syncs_total", "").map(|v| v.round() as u64))
    }

    /// Puts `case.ops` chunks `<prefix><n>` with `case.conc` tasks; returns the wall time.
    async fn sov_put(
        &self,
        case: Case,
        buffers: &Arc<Vec<Bytes>>,
        prefix: &str,
        round: u32,
    ) -> anyhow::Result<Duration> {
        let (client, buffers, prefix) = (self.client.clone(), buffers.clone(), prefix.to_string());
        in_parallel(case.conc, case.ops, move |task, i| {
            let mut client = client.clone();
            let buf = buffers[task].clone();
            let id = format!("{prefix}{i}");
            async move { put_one(&mut client, id, buf, round, i).await }
        })
        .await
    }

    /// Gets the chunks [`Bench::sov_put`] wrote, checking their length.
    async fn sov_get(&self, case: Case, prefix: &str) -> anyhow::Result<Duration> {
        let (client, prefix) = (self.client.clone(), prefix.to_string());
        in_parallel(case.conc, case.ops, move |_, i| {
            let mut client = client.clone();
            let id = format!("{prefix}{i}");
            async move { get_one(&mut client, id, case.size).await }
        })
        .await
    }

    /// Deletes the chunks [`Bench::sov_put`] wrote (untimed).
    async fn delete(&self, case: Case, prefix: &str) -> anyhow::Result<()> {
        let (client, prefix) = (self.client.clone(), prefix.to_string());
        in_parallel(DELETE_CONCURRENCY, case.ops, move |_, i| {
            let mut client = client.clone();
            let id = format!("{prefix}{i}");
            async move {
                let req = pb::DeleteRequest { id: id.clone() };
                let rpc = async { client.delete(req).await.map_err(status) };
                with_timeout(&id, "delete", rpc).await?;
                Ok(())
            }
        })
        .await?;
        Ok(())
    }
}

/// Runs operations `0..ops` on `conc` tasks, each taking the next number until none is left;
/// `op(task, n)` does one. Returns the wall time; the first failure ends the run.
async fn in_parallel<F, Fut>(conc: usize, ops: u64, op: F) -> anyhow::Result<Duration>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for task in 0..conc {
        let (op, next) = (op.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= ops {
                    return anyhow::Ok(());
                }
                op(task, n).await?;
            }
        });
    }
    // Returning early drops the set, which aborts the tasks still running.
    while let Some(r) = tasks.join_next().await {
        r.context("a client task panicked")??;
    }
    Ok(start.elapsed())
}

/// Awaits one RPC, naming it in the error and failing it after [`OP_TIMEOUT`].
async fn with_timeout<T>(
    id: &str,
    what: &str,
    rpc: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, rpc).await {
        Ok(r) => r.with_context(|| format!("{what} {id}")),
        Err(_) => bail!("{what} {id}: no answer within {}s", OP_TIMEOUT.as_secs()),
    }
}

/// A gRPC status as an error: its code and message.
fn status(s: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", s.code(), s.message())
}

/// Puts `buf`, stamped with (`round`, `n`), as chunk `id`. Only the first frame is copied (to
/// stamp it); the others are slices of the task's buffer.
async fn put_one(
    client: &mut Client,
    id: String,
    buf: Bytes,
    round: u32,
    n: u64,
) -> anyhow::Result<()> {
    let size = buf.len();
    let mut head = buf[..size.min(FRAME)].to_vec();
    payload::stamp(&mut head, round, n);
    let data = |b: Bytes| pb::PutRequest {
        msg: Some(pb::put_request::Msg::Data(b)),
    };
    let mut msgs = Vec::with_capacity(2 + size / FRAME);
    msgs.push(pb::PutRequest {
        msg: Some(pb::put_request::Msg::Header(pb::PutHeader {
            id: id.clone(),
            length: size as u64,
            expected_blake3: Bytes::new(),
            epoch: 0,
        })),
    });
    msgs.push(data(Bytes::from(head)));
    let mut at = FRAME;
    while at < size {
        let end = (at + FRAME).min(size);
        msgs.push(data(buf.slice(at..end)));
        at = end;
    }
    let rpc = async {
        let resp = client.put(futures::stream::iter(msgs)).await;
        Ok(resp.map_err(status)?.into_inner())
    };
    let resp = with_timeout(&id, "put", rpc).await?;
    ensure!(
        resp.length == size as u64,
        "put {id}: storaged stored {} bytes, {size} were sent",
        resp.length
    );
    Ok(())
}

/// Gets chunk `id` whole and checks that its info and its data are `size` bytes long.
async fn get_one(client: &mut Client, id: String, size: u64) -> anyhow::Result<()> {
    let req = pb::GetRequest {
        id: id.clone(),
        offset: 0,
        length: 0,
    };
    let read = async {
        let mut stream = client.get(req).await.map_err(status)?.into_inner();
        let Some(pb::GetResponse {
            msg: Some(pb::get_response::Msg::Info(info)),
        }) = stream.message().await.map_err(status)?
        else {
            bail!("the first message is not the chunk info");
        };
        ensure!(
            info.length == size && info.range_length == size,
            "storaged says {} bytes ({} in range), {size} were put",
            info.length,
            info.range_length
        );
        let mut got = 0u64;
        while let Some(msg) = stream.message().await.map_err(status)? {
            let Some(pb::get_response::Msg::Data(d)) = msg.msg else {
                bail!("a message other than data after the info");
            };
            got += d.len() as u64;
        }
        ensure!(got == size, "received {got} bytes, {size} were put");
        Ok(())
    };
    with_timeout(&id, "get", read).await
}

/// Notes printed under the table.
fn notes(quick: bool) -> Vec<String> {
    let mut n = vec![
        "sov: storaged over gRPC on loopback, `conc` client tasks in this process sharing one \
         HTTP/2 connection. raw: `conc` threads doing pwrite/pread on one appended file in the \
         same directory, right after the sov run."
            .to_string(),
        "put: storaged acknowledges after fdatasync (group commit). syncs = fdatasyncs storaged \
         made for the case (storaged_syncs_total delta, median of rounds); the raw baseline \
         issues the same number, spread evenly over its writes, the last one after the last \
         write."
            .to_string(),
        "get: both sides read data just written, so most likely from the page cache; storaged \
         also verifies each chunk's blake3 before sending it, raw pread does not."
            .to_string(),
        "MB = 10^6 bytes; ratio = sov MB/s / raw MB/s (= sov ops/s / raw ops/s); medians over \
         rounds, taken per column."
            .to_string(),
    ];
    let per_case: Vec<String> = cases(quick)
        .iter()
        .map(|c| format!("{} {}", c.name(), c.ops))
        .collect();
    n.push(format!("ops per round: {}.", per_case.join(", ")));
    n
}

/// The command that reproduces this run, build included.
fn command_line(args: &Args, rounds: u32) -> String {
    let (build, profile) = if cfg!(debug_assertions) {
        ("cargo build -p storaged -p sov-bench", "debug")
    } else {
        ("cargo build --release -p storaged -p sov-bench", "release")
    };
    let mut cmd = format!("{build} && target/{profile}/sov-bench storaged");
    if args.quick {
        cmd.push_str(" --quick");
    }
    cmd.push_str(&format!(
        " --rounds {rounds} --io-engine {} --dir {}",
        args.io_engine.as_str(),
        shell_quote(&args.dir.display().to_string())
    ));
    if args.output == Output::Json {
        cmd.push_str(" --output json");
    }
    cmd
}

pub(crate) fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The filesystem type of `path`, by statfs(2) magic number.
pub(crate) fn filesystem(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown filesystem".into();
    };
    // SAFETY: statfs is a plain C struct for which all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and st is a valid, writable statfs.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return "unknown filesystem".into();
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but not on every target
    match st.f_type as i64 {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        other => format!("filesystem magic {other:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_gets_work_and_defaults_hold() {
        for quick in [false, true] {
            for c in cases(quick) {
                assert!(c.ops >= c.conc as u64, "{c:?}");
            }
        }
        assert_eq!(ops_for(4 * MIB, 1, false), 64);
        assert_eq!(ops_for(4 * MIB, 64, false), 256);
        assert_eq!(ops_for(4096, 64, false), 20_000);
        assert_eq!(ops_for(4 * MIB, 1, true), 4);
        assert_eq!(ops_for(4096, 16, true), 2000);
        assert_eq!(cases(false).len(), 9);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/var/tmp"), "/var/tmp");
        assert_eq!(shell_quote("/a b"), "'/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn command_line_reproduces_the_flags() {
        let args = Args {
            quick: true,
            dir: "/var/tmp".into(),
            rounds: None,
            io_engine: IoEngine::Pread,
            output: Output::Json,
            results: None,
        };
        let cmd = command_line(&args, 1);
        assert!(
            cmd.ends_with("sov-bench storaged --quick --rounds 1 --io-engine pread --dir /var/tmp --output json"),
            "{cmd}"
        );
    }
}
