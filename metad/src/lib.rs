//! metad, the sov metadata service: a Raft group (openraft on RocksDB) holding the cluster
//! map, pools, buckets, the object index, access keys and data keys.
//!
//! Module map: [`store`] (Raft log and key-value state machine in RocksDB) → [`network`]
//! (Raft messages over gRPC) → [`core`] (batched proposals, shared read-index rounds, the route
//! to the leader) → [`service`] (the `Metad` API, forwarding) over [`tables`] (key layout,
//! validation, listing). [`client`] is what other components use to call metad.

// tonic's `Status` (176 bytes) is the error of every gRPC handler and of the helpers they call;
// boxing it at each step would only be unboxed again at the boundary.
#![allow(clippy::result_large_err)]

pub use sov_client::meta as client;
pub mod audit;
pub mod config;
pub mod core;
pub mod metrics;
pub mod multipart;
pub mod network;
pub mod service;
pub mod store;
pub mod tables;
pub mod volumes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use openraft::SnapshotPolicy;
use sov_common::codec::ChunkKey;
use sov_common::shutdown::{self, Shutdown};
use sov_proto::metad::metad_server::MetadServer;
use sov_proto::metad::raft_server::RaftServer;
use tokio::net::TcpListener;

use crate::config::MetadConfig;
use crate::core::Core;
use crate::metrics::Metrics;
use crate::network::{Network, Raft, RaftService};
use crate::service::MetadService;
use crate::store::Member;

/// The sockets metad serves on, bound by the caller (so tests can use port 0).
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: TcpListener,
}

/// What a started metad tells whoever waits for it (JSON in `--ready-file`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub pid: u32,
    pub id: u64,
}

/// Reads the master key: 64 hex digits (surrounding whitespace ignored) or 32 raw bytes. A
/// key file that group or others may read is refused.
pub fn load_master_key(path: &Path) -> anyhow::Result<ChunkKey> {
    sov_common::tls::check_private(path).context("master key file")?;
    let raw = std::fs::read(path)
        .with_context(|| format!("cannot read master key file {}", path.display()))?;
    let bytes: Vec<u8> = match std::str::from_utf8(&raw).map(str::trim) {
        Ok(t) if t.len() == 64 => hex::decode(t).context("master key is not valid hex")?,
        _ if raw.len() == 32 => raw,
        _ => bail!(
            "master key file {} must hold 64 hex digits or 32 raw bytes",
            path.display()
        ),
    };
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("master key must be 32 bytes"))?;
    Ok(ChunkKey::from_bytes(arr))
}

fn raft_config(cfg: &MetadConfig) -> anyhow::Result<openraft::Config> {
    let r = &cfg.raft;
    let ms = |d: &sov_common::units::HumanDuration| d.0.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "sov-metad".into(),
        heartbeat_interval: ms(&r.heartbeat_interval),
        election_timeout_min: ms(&r.election_timeout_min),
        election_timeout_max: ms(&r.election_timeout_max),
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_logs),
        max_in_snapshot_log_to_keep: r.keep_logs,
        snapshot_max_chunk_size: 4 << 20,
        // Entries hold whole batches: a few per AppendEntries keep each RPC well inside the
        // heartbeat interval that bounds it.
        max_payload_entries: 64,
        ..Default::default()
    };
    Ok(c.validate()?)
}

/// Runs one metad member until `shutdown`.
pub async fn run(
    cfg: MetadConfig,
    listeners: Listeners,
    mut shutdown: Shutdown,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let master = cfg
        .master_key_file
        .as_deref()
        .map(load_master_key)
        .transpose()?;
    let old_masters = cfg
        .old_master_key_files
        .iter()
        .map(|p| load_master_key(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !old_masters.is_empty() && master.is_none() {
        bail!("--old-master-key-file needs a current --master-key-file");
    }
    let grpc_addr = listeners.grpc.local_addr()?;
    let metrics_addr = listeners.metrics.local_addr()?;
    let advertised = cfg.advertised(grpc_addr);
    let transport = {
        let peers = cfg.parsed_peers()?;
        let grpc = grpc_addr.to_string();
        let mut addrs: Vec<&str> = vec![&grpc, &advertised];
        addrs.extend(peers.iter().map(|(_, a)| a.as_str()));
        sov_common::tls::transport_from_flags(
            cfg.tls_dir.as_deref(),
            cfg.insecure_plaintext,
            sov_common::tls::Role::Metad,
            &addrs,
        )?
    };
    sov_common::tls::install(transport.clone());
    if advertised
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified())
    {
        bail!(
            "this member would be known as {advertised}, which no peer can reach: set --advertise"
        );
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    let dir = cfg.data_dir.join("raft");
    let (log, sm) = tokio::task::spawn_blocking(move || store::open(&dir))
        .await?
        .context("opening the Raft RocksDB")?;
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_config(&cfg)?),
        Network,
        log,
        sm.clone(),
    )
    .await
    .context("starting Raft")?;
    let metrics = Metrics::new();
    let core = Core::new(
        cfg.id,
        raft.clone(),
        sm,
        cfg.clone(),
        metrics.clone(),
        master,
    );
    core.set_old_masters(old_masters);

    let (grpc_stop, mut grpc_sd) = shutdown::channel();
    // Refused calls go to the audit log; a flood of them is dropped (and counted) rather
    // than queued without bound.
    if let sov_common::tls::Transport::Tls(ctx) = &transport {
        tokio::spawn(service::install_published_crls(core.clone(), ctx.clone()));
    }
    let (refused_tx, refused_rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(service::audit_refusals(core.clone(), refused_rx));
    let dropped = metrics.audit_dropped.clone();
    let observer: sov_common::tls::RefusalObserver = Arc::new(move |path, peer, status| {
        let origin = audit::Origin::of_peer(peer);
        if refused_tx
            .try_send((path.to_string(), origin, status.clone()))
            .is_err()
        {
            dropped.inc();
        }
    });
    let incoming = sov_common::tls::incoming(listeners.grpc, transport.clone());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(
                sov_common::tls::AuthzLayer::new(sov_common::tls::metad_policy, transport)
                    .with_observer(observer),
            )
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(
                RaftServer::new(RaftService { raft: raft.clone() })
                    .max_decoding_message_size(256 << 20)
                    .max_encoding_message_size(256 << 20),
            )
            .add_service(
                MetadServer::new(MetadService { core: core.clone() })
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(64 << 20),
            )
            .serve_with_incoming_shutdown(incoming, async move { grpc_sd.wait().await }),
    );

    if !raft.is_initialized().await? && !cfg.join {
        let peers = cfg.parsed_peers()?;
        let members: BTreeMap<u64, Member> = if peers.is_empty() {
            BTreeMap::from([(
                cfg.id,
                Member {
                    addr: advertised.clone(),
                },
            )])
        } else {
            peers
                .into_iter()
                .map(|(id, addr)| (id, Member { addr }))
                .collect()
        };
        // The lowest id forms the cluster; the others wait for its vote request.
        if members.keys().next() == Some(&cfg.id) {
            tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "forming the cluster");
            if let Err(e) = raft.initialize(members).await {
                tracing::warn!(error = %e, "initialize");
            }
        }
    }

    let (workers_stop, workers_sd) = shutdown::channel();
    let background = tokio::spawn(background(core.clone(), workers_sd.clone()));
    let metrics_server = tokio::spawn(sov_common::telemetry::serve_metrics(
        listeners.metrics,
        metrics.registry.clone(),
        workers_sd,
    ));
    tracing::info!(id = cfg.id, listen = %grpc_addr, advertise = %advertised, metrics = %metrics_addr, "metad serving");
    if let Some(path) = ready_file {
        let ready = Ready {
            listen: grpc_addr,
            metrics_listen: metrics_addr,
            pid: std::process::id(),
            id: cfg.id,
        };
        sov_common::daemon::write_ready_file(&path, &ready)?;
    }

    shutdown.wait().await;
    workers_stop.trigger();
    grpc_stop.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = background.await;
    let _ = metrics_server.await;
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    tracing::info!("metad stopped");
    Ok(())
}

/// Keeps the gauges current and, on the leader, runs the storage node liveness pass.
async fn background(core: Arc<Core>, mut sd: Shutdown) {
    for s in ["up", "down", "out"] {
        core.metrics.nodes.with_label_values(&[s]);
    }
    let mut last_expiry = std::time::Instant::now();
    loop {
        {
            let m = core.raft.metrics();
            let m = m.borrow();
            let g = &core.metrics;
            g.raft_term.set(m.current_term as i64);
            g.raft_leader.set(m.current_leader.unwrap_or(0) as i64);
            g.raft_is_leader
                .set(i64::from(m.state == openraft::ServerState::Leader));
            g.raft_last_log_index
                .set(m.last_log_index.unwrap_or(0) as i64);
            g.raft_applied_index
                .set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
            g.raft_snapshot_index
                .set(m.snapshot.map(|l| l.index).unwrap_or(0) as i64);
            g.snapshots_installed
                .set(store::SNAPSHOTS_INSTALLED.load(std::sync::atomic::Ordering::Relaxed) as i64);
            g.raft_members
                .set(m.membership_config.membership().voter_ids().count() as i64);
        }
        if let Ok(summary) = service::map_summary(&core) {
            core.metrics.cluster_epoch.set(summary.epoch as i64);
            for (state, n) in summary.nodes_by_state {
                core.metrics.nodes.with_label_values(&[state]).set(n);
            }
            core.metrics.pools.set(summary.pools);
        }
        if let Err(e) = service::liveness_pass(&core).await {
            tracing::warn!(error = %e.message(), "liveness pass");
        }
        if last_expiry.elapsed() >= Duration::from_secs(60) {
            last_expiry = std::time::Instant::now();
            if core.raft.metrics().borrow().state == openraft::ServerState::Leader {
                let svc = service::MetadService { core: core.clone() };
                let max_age = core.cfg.nodes.upload_expiry.0.as_millis() as u64;
                if let Err(e) = svc.expire_uploads(max_age).await {
                    tracing::warn!(error = %e.message(), "expiring incomplete uploads");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = sd.wait() => return,
        }
    }
}
