//! storaged, the sov storage node: it keeps opaque, client-encrypted chunks in append-only
//! segment files on local disks, indexed in RocksDB, verified with blake3 on every read,
//! scrubbed and compacted in the background, and served over gRPC.
//!
//! Module map: [`record`] (segment record format) → [`io`] (io_uring / pread engines) →
//! [`index`] (RocksDB) → [`disk`] (writer thread, group commit, recovery, reads) → [`store`]
//! (the node's disks) → [`service`] (gRPC); [`scrub`] and [`compaction`] are workers over a
//! disk; [`config`] and [`metrics`] are what they sound like.

pub mod cluster;
pub mod compaction;
pub mod config;
pub mod disk;
pub mod error;
pub mod extents;
pub mod index;
pub mod io;
pub mod metrics;
pub mod record;
pub mod recovery;
pub mod registration;
pub mod scrub;
pub mod service;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use sov_common::shutdown::{self, Shutdown};
use sov_proto::storaged::chunk_store_server::ChunkStoreServer;
use sov_proto::storaged::extent_store_server::ExtentStoreServer;
use tokio::net::TcpListener;

use crate::config::{IoEngineChoice, StoragedConfig};
use crate::disk::{Disk, DiskConfig};
use crate::io::{Io, IoEngineKind};
use crate::metrics::Metrics;
use crate::service::{ChunkService, NodeIdent};
use crate::store::Store;

/// The sockets storaged serves on, bound by the caller (so tests can use port 0).
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: TcpListener,
}

/// What a started storaged tells whoever waits for it (written as JSON to `--ready-file`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub pid: u32,
    pub node_id: String,
    pub io_engine: String,
}

fn default_node_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{port}")
}

/// Runs storaged until `shutdown`, then drains: no new requests, requests in flight finish
/// (up to `drain_timeout`), workers stop, queued writes complete and the indexes are flushed.
pub async fn run(
    cfg: StoragedConfig,
    listeners: Listeners,
    mut shutdown: Shutdown,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let io = match cfg.io_engine {
        IoEngineChoice::Auto => Io::start_auto(),
        IoEngineChoice::IoUring => {
            Io::start(IoEngineKind::IoUring).context("io_uring was asked for but is unavailable")?
        }
        IoEngineChoice::Pread => Io::start(IoEngineKind::Pread)?,
    };
    let metrics = Metrics::new();
    metrics
        .io_engine
        .with_label_values(&[&io.kind().to_string()])
        .set(1);
    let disk_cfg = DiskConfig {
        segment_size: cfg.segment_size.0,
        reserved_space: cfg.reserved_space.0,
        max_batch_bytes: cfg.max_batch.0,
    };
    let mut disks = Vec::new();
    for path in &cfg.disks {
        let (p, c, i, m) = (path.clone(), disk_cfg.clone(), io.clone(), metrics.clone());
        let disk = tokio::task::spawn_blocking(move || Disk::open(&p, c, i, m))
            .await
            .context("disk open task")??;
        disks.push(Arc::new(disk));
    }
    let store = Arc::new(Store::new(disks, cfg.max_chunk_size.0));
    let extents_root = cfg.disks.first().context("no disk")?.join("extents");
    let extents = Arc::new(
        extents::Extents::open(&extents_root, io.clone())
            .with_context(|| format!("opening {}", extents_root.display()))?,
    );
    let grpc_addr = listeners.grpc.local_addr()?;
    let metrics_addr = listeners.metrics.local_addr()?;
    let transport = {
        let grpc = grpc_addr.to_string();
        let mut addrs: Vec<&str> = vec![&grpc];
        addrs.extend(cfg.advertise.as_deref());
        addrs.extend(cfg.metad.iter().map(String::as_str));
        sov_common::tls::transport_from_flags(
            cfg.tls_dir.as_deref(),
            cfg.insecure_plaintext,
            sov_common::tls::Role::Storaged,
            &addrs,
        )?
    };
    // The certificate names the node and its zone; the flags must agree with it.
    let cert_name = match &transport {
        sov_common::tls::Transport::Tls(ctx) => {
            let id = ctx.identity();
            if let Some(n) = &cfg.node_id
                && n != &id.name
            {
                anyhow::bail!("--node-id {n} but the certificate is for {}", id.name);
            }
            if let Some(z) = &id.zone
                && z != &cfg.zone
            {
                anyhow::bail!("--zone {} but the certificate is for zone {z}", cfg.zone);
            }
            Some(id.name.clone())
        }
        sov_common::tls::Transport::Plain => None,
    };
    sov_common::tls::install(transport.clone());
    let ident = NodeIdent {
        node_id: cfg
            .node_id
            .clone()
            .or(cert_name)
            .unwrap_or_else(|| default_node_id(grpc_addr.port())),
        zone: cfg.zone.clone(),
        io_engine: io.kind().to_string(),
    };

    // Background work stops before the disks close.
    let (workers_stop, workers_sd) = shutdown::channel();
    let mut tasks = tokio::task::JoinSet::new();
    for d in store.disks() {
        if cfg.scrub.enabled {
            let w = scrub::Scrub::new(d.clone(), cfg.scrub.rate.0, cfg.scrub.interval.0);
            tasks.spawn(sov_common::worker::run(
                w,
                workers_sd.clone(),
                Duration::from_secs(5),
            ));
        }
        if cfg.compaction.enabled {
            let w = compaction::Compaction::new(
                d.clone(),
                cfg.compaction.garbage_ratio,
                cfg.compaction.interval.0,
            );
            tasks.spawn(sov_common::worker::run(
                w,
                workers_sd.clone(),
                Duration::from_secs(5),
            ));
        }
    }
    let recovery_info = Arc::new(std::sync::Mutex::new(
        sov_proto::storaged::RecoveryInfo::default(),
    ));
    let mut cluster = None;
    let mut crl_task = None;
    if !cfg.metad.is_empty() {
        if cfg.advertise.is_none() && grpc_addr.ip().is_unspecified() {
            anyhow::bail!("listening on {grpc_addr}, which metad cannot hand out: set --advertise");
        }
        let node = registration::NodeRegistration {
            id: ident.node_id.clone(),
            addr: cfg
                .advertise
                .clone()
                .unwrap_or_else(|| grpc_addr.to_string()),
            metrics_addr: metrics_addr.to_string(),
            zone: cfg.zone.clone(),
        };
        let meta = registration::client(&cfg.metad)?;
        crl_task = Some(tokio::spawn(sov_client::meta::keep_crl_current(
            meta.clone(),
        )));
        let c = cluster::Cluster::new(ident.node_id.clone(), meta, metrics.clone());
        tasks.spawn(registration::run(
            c.clone(),
            node,
            store.clone(),
            workers_sd.clone(),
        ));
        if cfg.recovery.enabled {
            let cursor = cfg
                .disks
                .first()
                .map(|d| d.join("recovery-cursor.json"))
                .context("no disk")?;
            let w = recovery::Recovery::new(
                c.clone(),
                store.clone(),
                cfg.recovery.clone(),
                metrics.clone(),
                recovery_info.clone(),
                cursor,
            )
            .with_extents(extents.clone());
            tasks.spawn(sov_common::worker::run(
                w,
                workers_sd.clone(),
                Duration::from_secs(2),
            ));
        }
        cluster = Some(c);
    }
    tasks.spawn(refresh_gauges(
        store.clone(),
        metrics.clone(),
        workers_sd.clone(),
    ));
    let metrics_server = tokio::spawn(sov_common::telemetry::serve_metrics(
        listeners.metrics,
        metrics.registry.clone(),
        workers_sd.clone(),
    ));

    let draining = Arc::new(AtomicBool::new(false));
    let svc = ChunkService::new(
        store.clone(),
        metrics.clone(),
        cfg.put_memory.0,
        cfg.request_idle_timeout.0,
        ident.clone(),
        draining.clone(),
    );
    let svc = match cluster {
        Some(c) => svc.with_cluster(c, recovery_info),
        None => svc,
    };
    let (grpc_stop, mut grpc_sd) = shutdown::channel();
    // Small replies must not wait for Nagle's algorithm (a 40 ms stall per small Get otherwise).
    let incoming = sov_common::tls::incoming(listeners.grpc, transport.clone());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(sov_common::tls::AuthzLayer::new(
                sov_common::tls::storaged_policy,
                transport,
            ))
            .concurrency_limit_per_connection(256)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            // Chunks are megabytes: HTTP/2's default 64 KiB windows would stall every stream
            // on a round trip per 64 KiB.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(64 << 20))
            .add_service(
                ExtentStoreServer::new(service::ExtentService::new(extents, metrics.clone()))
                    .max_decoding_message_size(8 << 20)
                    .max_encoding_message_size(8 << 20),
            )
            .add_service(
                ChunkStoreServer::new(svc)
                    .max_decoding_message_size(8 << 20)
                    .max_encoding_message_size(8 << 20),
            )
            .serve_with_incoming_shutdown(incoming, async move { grpc_sd.wait().await }),
    );
    tracing::info!(listen = %grpc_addr, metrics = %metrics_addr, node = %ident.node_id, io_engine = %ident.io_engine, "storaged serving");
    if let Some(path) = ready_file {
        let ready = Ready {
            listen: grpc_addr,
            metrics_listen: metrics_addr,
            pid: std::process::id(),
            node_id: ident.node_id.clone(),
            io_engine: ident.io_engine.clone(),
        };
        sov_common::daemon::write_ready_file(&path, &ready)?;
    }

    shutdown.wait().await;
    draining.store(true, Ordering::Relaxed);
    grpc_stop.trigger();
    match tokio::time::timeout(cfg.drain_timeout.0, server).await {
        Ok(Ok(Ok(()))) => tracing::info!("requests drained"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
        Err(_) => tracing::warn!("drain timeout passed with requests still in flight"),
    }
    workers_stop.trigger();
    if let Some(t) = crl_task {
        t.abort();
    }
    while tasks.join_next().await.is_some() {}
    let _ = metrics_server.await;
    tokio::task::spawn_blocking(move || store.close()).await?;
    tracing::info!("storaged stopped");
    Ok(())
}

/// Keeps the per-disk gauges current.
async fn refresh_gauges(store: Arc<Store>, m: Metrics, mut sd: Shutdown) {
    // Create every labelled counter series once, so each exists (at 0) from the start.
    for d in store.disks() {
        let n = [d.name()];
        for c in [
            &m.syncs,
            &m.scrub_chunks,
            &m.scrub_bytes,
            &m.scrub_passes,
            &m.compaction_segments,
            &m.compaction_reclaimed,
            &m.compaction_relocated,
            &m.recovery_truncated,
        ] {
            c.with_label_values(&n);
        }
        for by in ["read", "scrub", "recovery"] {
            m.corrupt_found.with_label_values(&[d.name(), by]);
        }
    }
    loop {
        let s = store.clone();
        if let Ok(stats) = tokio::task::spawn_blocking(move || s.stats()).await {
            for (name, st) in stats {
                let n = [name.as_str()];
                m.disk_capacity
                    .with_label_values(&n)
                    .set(st.space.capacity as i64);
                m.disk_used.with_label_values(&n).set(st.space.used as i64);
                m.disk_free
                    .with_label_values(&n)
                    .set(st.space.available as i64);
                m.disk_live.with_label_values(&n).set(st.live_bytes as i64);
                m.disk_segment_bytes
                    .with_label_values(&n)
                    .set(st.segment_bytes as i64);
                m.disk_chunks.with_label_values(&n).set(st.chunks as i64);
                m.disk_healthy
                    .with_label_values(&n)
                    .set(i64::from(st.health == "ok"));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = sd.wait() => return,
        }
    }
}
