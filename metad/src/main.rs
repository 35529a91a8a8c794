//! The metad binary: flags, config file, tracing, signals; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use metad::config::MetadConfig;
use sov_common::units::HumanDuration;

/// The sov metadata service (one Raft member).
#[derive(Debug, Parser)]
#[command(name = "metad", version, about, args_override_self = true)]
struct Flags {
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This member's id (> 0, never reused).
    #[arg(long)]
    id: Option<u64>,
    /// gRPC address (Raft and API).
    #[arg(long)]
    listen: Option<String>,
    /// Address others reach this member at (default: the bound listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Prometheus /metrics address.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Initial members, `id=host:port,id=host:port,...` (this one included).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Start empty and wait to be added with `sov metad add`.
    #[arg(long)]
    join: bool,
    /// Master key file (64 hex digits, mode 0600).
    #[arg(long)]
    master_key_file: Option<PathBuf>,
    /// An earlier master key, still accepted until `sov master-key rotate` re-wrapped
    /// everything; repeat for several.
    #[arg(long = "old-master-key-file")]
    old_master_key_files: Vec<PathBuf>,
    /// TLS directory with this member's `metad` certificate (ca.pem, cert.pem, key.pem,
    /// crl.der).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// No TLS (only when every address is loopback).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Raft heartbeat period, e.g. 250ms.
    #[arg(long)]
    heartbeat_interval: Option<HumanDuration>,
    /// Lower bound of the election timeout, e.g. 1s.
    #[arg(long)]
    election_timeout_min: Option<HumanDuration>,
    /// Upper bound of the election timeout, e.g. 2s.
    #[arg(long)]
    election_timeout_max: Option<HumanDuration>,
    /// Snapshot after this many log entries.
    #[arg(long)]
    snapshot_logs: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long)]
    keep_logs: Option<u64>,
    /// Storage node heartbeat period, e.g. 1s.
    #[arg(long)]
    node_heartbeat_interval: Option<HumanDuration>,
    /// A storage node silent this long goes `down`, e.g. 10s.
    #[arg(long)]
    down_after: Option<HumanDuration>,
    /// A storage node silent this long goes `out`, e.g. 10m.
    #[arg(long)]
    out_after: Option<HumanDuration>,
    /// Storage nodes free deleted object data this long after the delete, e.g. 60s.
    #[arg(long)]
    delete_grace: Option<HumanDuration>,
    /// Write {listen, metrics_listen, pid, id} as JSON here once serving (used by tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn config(f: Flags) -> anyhow::Result<(MetadConfig, Option<PathBuf>)> {
    let mut c: MetadConfig = match &f.config {
        Some(p) => sov_common::config::load_toml(p)?,
        None => MetadConfig::default(),
    };
    macro_rules! set {
        ($flag:expr => $($field:tt)+) => {
            if let Some(v) = $flag {
                c.$($field)+ = v;
            }
        };
    }
    set!(f.id => id);
    set!(f.listen => listen);
    set!(f.metrics_listen => metrics_listen);
    set!(f.data_dir => data_dir);
    set!(f.heartbeat_interval => raft.heartbeat_interval);
    set!(f.election_timeout_min => raft.election_timeout_min);
    set!(f.election_timeout_max => raft.election_timeout_max);
    set!(f.snapshot_logs => raft.snapshot_logs);
    set!(f.keep_logs => raft.keep_logs);
    set!(f.node_heartbeat_interval => nodes.heartbeat_interval);
    set!(f.down_after => nodes.down_after);
    set!(f.out_after => nodes.out_after);
    set!(f.delete_grace => nodes.delete_grace);
    if f.advertise.is_some() {
        c.advertise = f.advertise;
    }
    if f.master_key_file.is_some() {
        c.master_key_file = f.master_key_file;
    }
    if !f.old_master_key_files.is_empty() {
        c.old_master_key_files = f.old_master_key_files;
    }
    if f.tls_dir.is_some() {
        c.tls_dir = f.tls_dir;
    }
    if f.insecure_plaintext {
        c.insecure_plaintext = true;
    }
    if !f.peers.is_empty() {
        c.peers = f.peers;
    }
    if f.join {
        c.join = true;
    }
    c.validate()?;
    Ok((c, f.ready_file))
}

async fn serve(
    cfg: MetadConfig,
    ready: Option<PathBuf>,
    shutdown: sov_common::shutdown::Shutdown,
) -> anyhow::Result<()> {
    let (grpc, _) = sov_common::telemetry::bind(&cfg.listen).await?;
    let (metrics, _) = sov_common::telemetry::bind(&cfg.metrics_listen).await?;
    metad::run(cfg, metad::Listeners { grpc, metrics }, shutdown, ready).await
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    sov_common::telemetry::init_tracing();
    sov_common::daemon::main("metad", config(flags), |(cfg, ready), sd| {
        serve(cfg, ready, sd)
    })
}
