//! The vhost-blk binary: flags and config file, then [`vhost_blk::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vhost_blk::FileConfig;

/// Exports sov volumes as NBD and vhost-user-blk.
#[derive(Debug, Parser)]
#[command(name = "vhost-blk", version, about)]
struct Flags {
    /// TOML config file (keys as the flags, with underscores); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// NBD server address (exports are named after volumes).
    #[arg(long)]
    listen: Option<String>,
    /// Prometheus /metrics address.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// metad members, `host:port,host:port,...`.
    #[arg(long, value_delimiter = ',')]
    metad: Vec<String>,
    /// This exporter's name, as attachments name it (and the lease holder).
    #[arg(long)]
    id: Option<String>,
    /// Folder for vhost-user sockets.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Writer lease time, in milliseconds.
    #[arg(long)]
    lease_ttl_ms: Option<u64>,
    /// Queues offered to vhost-user frontends.
    #[arg(long)]
    vhost_queues: Option<usize>,
    /// TLS directory with this exporter's `vhost-blk` certificate (ca.pem, cert.pem, key.pem,
    /// crl.der): mutual TLS to metad and the storage nodes.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// No TLS to metad and storage nodes (only when every metad address is loopback).
    #[arg(long)]
    insecure_plaintext: bool,
    /// NBD over TLS (STARTTLS with this exporter's certificate, clients need one from the
    /// cluster CA): `required`, `optional` or `off`. Default: required unless --listen is
    /// loopback (then optional with --tls-dir, else off). `off` is refused off loopback.
    #[arg(long)]
    nbd_tls: Option<String>,
    /// Write {id, listen, metrics_listen, pid} as JSON here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

struct Settings {
    cfg: vhost_blk::Config,
    listen: String,
    metrics_listen: String,
}

fn settings(f: &Flags) -> anyhow::Result<Settings> {
    let file: FileConfig = match &f.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let metad = if f.metad.is_empty() {
        file.metad.unwrap_or_default()
    } else {
        f.metad.clone()
    };
    if metad.is_empty() {
        anyhow::bail!("--metad is required (or `metad` in the config file)");
    }
    let addrs: Vec<&str> = metad.iter().map(String::as_str).collect();
    let transport = sov_common::tls::transport_from_flags(
        f.tls_dir.as_deref(),
        f.insecure_plaintext,
        sov_common::tls::Role::VhostBlk,
        &addrs,
    )?;
    sov_common::tls::install(transport.clone());
    let listen = f
        .listen
        .clone()
        .or(file.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:10809".into());
    let loopback = sov_common::tls::is_loopback(&listen);
    let ctx = match &transport {
        sov_common::tls::Transport::Tls(c) => Some(c.clone()),
        sov_common::tls::Transport::Plain => None,
    };
    use vhost_blk::nbd::TlsMode;
    let mode = match (f.nbd_tls.as_deref(), &ctx, loopback) {
        (Some("off"), _, false) => {
            anyhow::bail!(
                "--nbd-tls off is only allowed when --listen is loopback ({listen} is not)"
            )
        }
        (Some("off"), _, true) | (None, None, true) => None,
        (Some("required") | None, Some(_), false) | (Some("required"), Some(_), true) => {
            Some(TlsMode::Required)
        }
        (Some("optional"), Some(_), _) | (None, Some(_), true) => Some(TlsMode::Optional),
        (Some("required" | "optional"), None, _) | (None, None, false) => {
            anyhow::bail!("NBD over TLS needs --tls-dir")
        }
        (Some(other), _, _) => {
            anyhow::bail!("--nbd-tls {other}: use required, optional or off")
        }
    };
    let nbd_tls = match (mode, ctx) {
        (Some(mode), Some(ctx)) => Some(vhost_blk::nbd::NbdTls {
            config: std::sync::Arc::new(move || ctx.block_server_config()),
            mode,
        }),
        _ => None,
    };
    let ttl = f.lease_ttl_ms.or(file.lease_ttl_ms).unwrap_or(10_000);
    if ttl < 300 {
        anyhow::bail!("lease_ttl_ms must be at least 300, got {ttl}");
    }
    let queues = f.vhost_queues.or(file.vhost_queues).unwrap_or(2);
    if queues == 0 || queues > 16 {
        anyhow::bail!("vhost_queues must be 1 to 16, got {queues}");
    }
    let id =
        f.id.clone()
            .or(file.id)
            .unwrap_or_else(|| "vhost-blk-1".into());
    Ok(Settings {
        cfg: vhost_blk::Config {
            data: f
                .data
                .clone()
                .or(file.data)
                .unwrap_or_else(|| PathBuf::from(format!("/tmp/sov-{id}"))),
            id,
            metad,
            lease_ttl: Duration::from_millis(ttl),
            poll: Duration::from_millis(200),
            vhost_queues: queues,
            nbd_tls,
        },
        listen,
        metrics_listen: f
            .metrics_listen
            .clone()
            .or(file.metrics_listen)
            .unwrap_or_else(|| "127.0.0.1:9500".into()),
    })
}

fn main() -> ExitCode {
    sov_common::telemetry::init_tracing();
    let f = Flags::parse();
    let ready = f.ready_file.clone();
    sov_common::daemon::main("vhost-blk", settings(&f), move |s, sd| async move {
        let nbd = tokio::net::TcpListener::bind(&s.listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", s.listen))?;
        let m = tokio::net::TcpListener::bind(&s.metrics_listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", s.metrics_listen))?;
        vhost_blk::run(s.cfg, nbd, m, sd, ready).await
    })
}
