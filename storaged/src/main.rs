//! The storaged binary: flags, config file, tracing, signals; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sov_common::units::{ByteSize, HumanDuration, Rate};
use storaged::config::{IoEngineChoice, StoragedConfig};

/// The sov storage node.
#[derive(Debug, Parser)]
#[command(name = "storaged", version, about, args_override_self = true)]
struct Flags {
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC API address.
    #[arg(long)]
    listen: Option<String>,
    /// Prometheus /metrics address.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// A disk directory; repeat for several disks. Replaces the config file's list.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Node name.
    #[arg(long)]
    node_id: Option<String>,
    /// Availability zone.
    #[arg(long)]
    zone: Option<String>,
    /// metad members to register with, `host:port,host:port,...`.
    #[arg(long, value_delimiter = ',')]
    metad: Vec<String>,
    /// Address metad hands out for this node (default: the bound listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// TLS directory with this node's `storaged` certificate (ca.pem, cert.pem, key.pem,
    /// crl.der).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// No TLS (only when every address is loopback).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Disk I/O engine.
    #[arg(long, value_enum)]
    io_engine: Option<IoEngineChoice>,
    /// Largest chunk accepted, e.g. 16MiB.
    #[arg(long)]
    max_chunk_size: Option<ByteSize>,
    /// Segment file size, e.g. 256MiB.
    #[arg(long)]
    segment_size: Option<ByteSize>,
    /// Free space kept back on each disk, e.g. 64MiB.
    #[arg(long)]
    reserved_space: Option<ByteSize>,
    /// Scrub read rate per disk, e.g. 64MiB/s (0 = unlimited).
    #[arg(long)]
    scrub_rate: Option<Rate>,
    /// Pause between scrub passes, e.g. 24h.
    #[arg(long)]
    scrub_interval: Option<HumanDuration>,
    /// Turn scrub off.
    #[arg(long)]
    no_scrub: bool,
    /// Garbage share that makes a segment due for compaction, in (0, 1].
    #[arg(long)]
    garbage_ratio: Option<f64>,
    /// How often compaction looks for work.
    #[arg(long)]
    compaction_interval: Option<HumanDuration>,
    /// Recovery pull rate, e.g. 128MiB/s (0 = unlimited).
    #[arg(long)]
    recovery_rate: Option<Rate>,
    /// Pause between recovery passes when nothing changed, e.g. 30s.
    #[arg(long)]
    recovery_interval: Option<HumanDuration>,
    /// Turn the recovery worker off.
    #[arg(long)]
    no_recovery: bool,
    /// How long SIGTERM waits for requests in flight.
    #[arg(long)]
    drain_timeout: Option<HumanDuration>,
    /// Write {listen, metrics_listen, pid, ...} as JSON here once serving (used by tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn config(f: Flags) -> anyhow::Result<(StoragedConfig, Option<PathBuf>)> {
    let mut c: StoragedConfig = match &f.config {
        Some(p) => sov_common::config::load_toml(p)?,
        None => StoragedConfig::default(),
    };
    if let Some(v) = f.listen {
        c.listen = v;
    }
    if let Some(v) = f.metrics_listen {
        c.metrics_listen = v;
    }
    if !f.disks.is_empty() {
        c.disks = f.disks;
    }
    if let Some(v) = f.node_id {
        c.node_id = Some(v);
    }
    if let Some(v) = f.zone {
        c.zone = v;
    }
    if !f.metad.is_empty() {
        c.metad = f.metad;
    }
    if f.advertise.is_some() {
        c.advertise = f.advertise;
    }
    if f.tls_dir.is_some() {
        c.tls_dir = f.tls_dir;
    }
    if f.insecure_plaintext {
        c.insecure_plaintext = true;
    }
    if let Some(v) = f.io_engine {
        c.io_engine = v;
    }
    if let Some(v) = f.max_chunk_size {
        c.max_chunk_size = v;
    }
    if let Some(v) = f.segment_size {
        c.segment_size = v;
    }
    if let Some(v) = f.reserved_space {
        c.reserved_space = v;
    }
    if let Some(v) = f.scrub_rate {
        c.scrub.rate = v;
    }
    if let Some(v) = f.scrub_interval {
        c.scrub.interval = v;
    }
    if f.no_scrub {
        c.scrub.enabled = false;
    }
    if let Some(v) = f.garbage_ratio {
        c.compaction.garbage_ratio = v;
    }
    if let Some(v) = f.compaction_interval {
        c.compaction.interval = v;
    }
    if let Some(v) = f.recovery_rate {
        c.recovery.rate = v;
    }
    if let Some(v) = f.recovery_interval {
        c.recovery.interval = v;
    }
    if f.no_recovery {
        c.recovery.enabled = false;
    }
    if let Some(v) = f.drain_timeout {
        c.drain_timeout = v;
    }
    c.validate()?;
    Ok((c, f.ready_file))
}

async fn serve(
    cfg: StoragedConfig,
    ready: Option<PathBuf>,
    shutdown: sov_common::shutdown::Shutdown,
) -> anyhow::Result<()> {
    let (grpc, _) = sov_common::telemetry::bind(&cfg.listen).await?;
    let (metrics, _) = sov_common::telemetry::bind(&cfg.metrics_listen).await?;
    storaged::run(cfg, storaged::Listeners { grpc, metrics }, shutdown, ready).await
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    sov_common::telemetry::init_tracing();
    sov_common::daemon::main("storaged", config(flags), |(cfg, ready), sd| {
        serve(cfg, ready, sd)
    })
}
