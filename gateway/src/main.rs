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
    /// Write {listen, metrics_listen, pid} as JSON here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    sov_common::telemetry::init_tracing();
    let f = Flags::parse();
    let cfg = GatewayConfig {
        metad: f.metad.clone(),
        pools: Pools {
            standard: f.pool_standard.clone(),
            infrequent: f.pool_infrequent.clone(),
            archive: f.pool_archive.clone(),
        },
        zone: f.zone.clone(),
    };
    sov_common::daemon::main("gateway-s3", Ok(cfg), move |cfg, sd| async move {
        let s3 = tokio::net::TcpListener::bind(&f.listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", f.listen))?;
        let m = tokio::net::TcpListener::bind(&f.metrics_listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", f.metrics_listen))?;
        run(cfg, s3, m, sd, f.ready_file).await
    })
}
