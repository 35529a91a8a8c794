//! `gateway-s3`: flags, then [`gateway_s3::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gateway_s3::s3::Pools;
use gateway_s3::{GatewayConfig, run};

/// The sov S3 gateway.
#[derive(Debug, Parser)]
#[command(name = "gateway-s3", version, about)]
struct Flags {
    /// S3 endpoint address.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    /// Prometheus /metrics address.
    #[arg(long, default_value = "127.0.0.1:9300")]
    metrics_listen: String,
    /// metad members, `host:port,host:port,...`.
    #[arg(long, value_delimiter = ',', required = true)]
    metad: Vec<String>,
    /// Pool for STANDARD objects (when the bucket names none).
    #[arg(long, default_value = "standard")]
    pool_standard: String,
    /// Pool for STANDARD_IA (and other infrequent-access) objects.
    #[arg(long, default_value = "standard-ia")]
    pool_infrequent: String,
    /// Pool for GLACIER and DEEP_ARCHIVE objects.
    #[arg(long, default_value = "archive")]
    pool_archive: String,
    /// Zone of this gateway (reads prefer storage nodes there).
    #[arg(long)]
    zone: Option<String>,
    /// TLS directory with this gateway's `gateway` certificate (ca.pem, cert.pem, key.pem,
    /// crl.der): mutual TLS to metad and the storage nodes.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// No TLS to metad and storage nodes (only when every address is loopback).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Serve S3 over HTTPS with this certificate (PEM, chain allowed) ...
    #[arg(long, requires = "https_key")]
    https_cert: Option<PathBuf>,
    /// ... and this key (PEM, mode 0600).
    #[arg(long, requires = "https_cert")]
    https_key: Option<PathBuf>,
    /// Serve S3 over plain HTTP; only on a loopback address.
    #[arg(long, conflicts_with = "https_cert")]
    insecure_http: bool,
    /// Write {listen, metrics_listen, pid} as JSON here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn config(f: &Flags) -> anyhow::Result<GatewayConfig> {
    use sov_common::tls;
    let mut addrs: Vec<&str> = vec![&f.listen];
    addrs.extend(f.metad.iter().map(String::as_str));
    let transport = tls::transport_from_flags(
        f.tls_dir.as_deref(),
        f.insecure_plaintext,
        tls::Role::Gateway,
        &addrs,
    )?;
    tls::install(transport);
    let https = match (&f.https_cert, &f.https_key, f.insecure_http) {
        (Some(c), Some(k), false) => Some(tls::https_server_config(c, k)?),
        (None, None, true) => {
            if !tls::is_loopback(&f.listen) {
                anyhow::bail!(
                    "--insecure-http is only allowed on loopback, and {} is not; give --https-cert and --https-key",
                    f.listen
                );
            }
            None
        }
        _ => anyhow::bail!("give --https-cert and --https-key (or --insecure-http on loopback)"),
    };
    Ok(GatewayConfig {
        metad: f.metad.clone(),
        pools: Pools {
            standard: f.pool_standard.clone(),
            infrequent: f.pool_infrequent.clone(),
            archive: f.pool_archive.clone(),
        },
        zone: f.zone.clone(),
        https,
    })
}

fn main() -> ExitCode {
    sov_common::telemetry::init_tracing();
    let f = Flags::parse();
    let cfg = config(&f);
    sov_common::daemon::main("gateway-s3", cfg, move |cfg, sd| async move {
        let s3 = tokio::net::TcpListener::bind(&f.listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", f.listen))?;
        let m = tokio::net::TcpListener::bind(&f.metrics_listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", f.metrics_listen))?;
        run(cfg, s3, m, sd, f.ready_file).await
    })
}
