//! vhost-blk: exports sov block volumes to VMs and tools, as NBD exports (named after the
//! volume, over TCP) and vhost-user-blk sockets.
//!
//! It takes its work from metad: a volume whose state is `attaching` with this exporter named
//! in its attachment is opened (writer lease, fencing, replica convergence), exported, and
//! moved to `in-use` with its URI; `detaching` closes it (flush, lease released) and moves it
//! to `available`. Volumes `in-use` here when the process starts (after a crash) are opened
//! again. While a volume is exported the lease is renewed, the exporter's view of its size
//! and snapshots is kept current (online resize; snapshots wait for `snap_seen`), and replicas
//! that missed writes are repaired in the background.
//!
//! Module map: [`export`] (the device trait the front ends use) → [`nbd`] and [`vhost_user`]
//! (the protocols) → [`device`] (a volume behind QoS) → this file (attachments).

// tonic::Status is the error of every gRPC call.
#![allow(clippy::result_large_err)]

pub mod device;
pub mod export;
pub mod mem;
pub mod metrics;
pub mod nbd;
pub mod vhost_user;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sov_client::volume::{OpenOptions, VolumeHandle};
use sov_client::{Client, ClientConfig};
use sov_common::shutdown::Shutdown;
use sov_proto::metad as mpb;

use crate::device::VolumeDevice;
use crate::export::Exports;
use crate::metrics::Metrics;
use crate::vhost_user::{ServeControl, VhostUserBlkOptions};

/// What vhost-blk runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: String,
    pub metad: Vec<String>,
    /// Where vhost-user sockets go.
    pub data: PathBuf,
    pub lease_ttl: Duration,
    /// How often metad is asked for attachment changes.
    pub poll: Duration,
    pub vhost_queues: usize,
    /// STARTTLS on the NBD listener, and whether it is required.
    pub nbd_tls: Option<nbd::NbdTls>,
}

/// The binary's TOML config file: the keys of its flags, with underscores, each optional
/// (flags override them); unknown keys are refused.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub metad: Option<Vec<String>>,
    pub id: Option<String>,
    pub data: Option<PathBuf>,
    pub lease_ttl_ms: Option<u64>,
    pub vhost_queues: Option<usize>,
}

/// What a started vhost-blk tells whoever waits for it (`--ready-file`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub id: String,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub pid: u32,
}

struct Attached {
    dev: Arc<VolumeDevice>,
    protocol: String,
    uri: String,
    vhost: Option<(ServeControl, std::thread::JoinHandle<()>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The exporter: attached volumes by name.
pub struct Exporter {
    cfg: Config,
    client: Client,
    metrics: Metrics,
    nbd_addr: SocketAddr,
    attached: Mutex<HashMap<String, Attached>>,
}

impl Exports for Exporter {
    type Device = VolumeDevice;

    fn open(&self, name: &str) -> impl Future<Output = Option<Arc<VolumeDevice>>> + Send {
        let dev = self
            .attached
            .lock()
            .expect("attached")
            .get(name)
            .filter(|a| a.protocol == "nbd")
            .map(|a| a.dev.clone());
        async move { dev }
    }

    fn list(&self) -> Vec<(String, String)> {
        let a = self.attached.lock().expect("attached");
        let mut v: Vec<(String, String)> = a
            .iter()
            .filter(|(_, a)| a.protocol == "nbd")
            .map(|(n, a)| {
                (
                    n.clone(),
                    format!("sov volume, {} bytes", a.dev.handle.size()),
                )
            })
            .collect();
        v.sort();
        v
    }
}

impl Exporter {
    async fn set_state(
        &self,
        name: &str,
        from: &str,
        to: &str,
        attachment: Option<mpb::VolumeAttachment>,
        error: String,
    ) -> Result<mpb::Volume, tonic::Status> {
        let req = mpb::SetVolumeStateRequest {
            name: name.to_string(),
            from: from.into(),
            to: to.into(),
            attachment,
            error,
        };
        self.client
            .meta()
            .call(|mut c| {
                let req = req.clone();
                async move { c.set_volume_state(req).await }
            })
            .await
    }

    fn is_attached(&self, name: &str) -> bool {
        self.attached.lock().expect("attached").contains_key(name)
    }

    /// Opens and exports a volume; returns its URI.
    async fn attach(self: &Arc<Self>, v: &mpb::Volume) -> anyhow::Result<String> {
        let protocol = v
            .attachment
            .as_ref()
            .map(|a| a.protocol.clone())
            .unwrap_or_default();
        if protocol != "nbd" && protocol != "vhost-user" {
            anyhow::bail!("unknown protocol {protocol:?}: nbd or vhost-user");
        }
        let handle = VolumeHandle::open(
            self.client.clone(),
            &v.name,
            OpenOptions {
                holder: self.cfg.id.clone(),
                lease_ttl: self.cfg.lease_ttl,
            },
        )
        .await
        .with_context(|| format!("opening volume {}", v.name))?;
        let qos = v.qos.unwrap_or_default();
        let dev = Arc::new(VolumeDevice::new(
            handle.clone(),
            qos.iops,
            qos.bytes_per_sec,
            self.metrics.clone(),
        ));
        let mut vhost = None;
        let uri = if protocol == "nbd" {
            format!("nbd://{}/{}", self.nbd_addr, v.name)
        } else {
            let dir = self.cfg.data.join("sockets");
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("{}.sock", v.name));
            let _ = std::fs::remove_file(&path);
            let control = ServeControl::new();
            let opts = VhostUserBlkOptions {
                num_queues: self.cfg.vhost_queues,
                queue_size: 256,
                serial: v.name.chars().take(20).collect(),
                control: control.clone(),
            };
            let (d, p, rt) = (dev.clone(), path.clone(), tokio::runtime::Handle::current());
            let name = v.name.clone();
            let t = std::thread::Builder::new()
                .name(format!("vhost-user-{name}"))
                .spawn(move || {
                    // One frontend at a time; a frontend that goes away may come back.
                    while !opts.control.is_stopped() {
                        match vhost_user::serve_vhost_user_blk(&p, d.clone(), rt.clone(), opts.clone()) {
                            Ok(()) => tracing::info!(volume = %name, "vhost-user frontend left"),
                            Err(e) => {
                                tracing::warn!(volume = %name, error = %e, "vhost-user session ended");
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                })?;
            vhost = Some((control, t));
            path.display().to_string()
        };
        let mut tasks = Vec::new();
        // Lease renewal.
        let (h, ttl) = (handle.clone(), self.cfg.lease_ttl);
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if let Err(e) = h.renew(ttl).await {
                    tracing::warn!(volume = %h.name(), error = %e, "lease renewal failed");
                    if h.lease_lost() {
                        tracing::error!(volume = %h.name(), "lease lost: writes are refused from now on");
                        return;
                    }
                }
            }
        }));
        // Background repair of replicas that missed writes.
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if h.stale_extents() > 0 {
                    match h.repair_stale().await {
                        Ok(n) if n > 0 => {
                            tracing::info!(volume = %h.name(), extents = n, "replicas repaired")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(volume = %h.name(), error = %e, "repair waits"),
                    }
                }
            }
        }));
        self.attached.lock().expect("attached").insert(
            v.name.clone(),
            Attached {
                dev,
                protocol,
                uri: uri.clone(),
                vhost,
                tasks,
            },
        );
        self.metrics
            .exports
            .set(self.attached.lock().expect("attached").len() as i64);
        tracing::info!(volume = %v.name, %uri, epoch = handle.lease_epoch(), "volume exported");
        Ok(uri)
    }

    /// Stops exporting a volume: no new I/O, flush, lease released.
    async fn detach(&self, name: &str) -> anyhow::Result<()> {
        let Some(a) = self.attached.lock().expect("attached").remove(name) else {
            return Ok(());
        };
        self.metrics
            .exports
            .set(self.attached.lock().expect("attached").len() as i64);
        a.dev.detach();
        for t in &a.tasks {
            t.abort();
        }
        if let Some((control, t)) = a.vhost {
            control.stop();
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        a.dev.handle.close().await?;
        tracing::info!(volume = %name, "volume detached");
        Ok(())
    }

    /// One look at metad: attach, detach and refresh what changed.
    async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let req = mpb::ListVolumesRequest { consistency: 0 };
        let vols = self
            .client
            .meta()
            .call(|mut c| async move { c.list_volumes(req).await })
            .await?
            .volumes;
        let mut seen = std::collections::HashSet::new();
        for v in &vols {
            let a = v.attachment.clone().unwrap_or_default();
            if a.exporter != self.cfg.id {
                continue;
            }
            seen.insert(v.name.clone());
            match v.state.as_str() {
                "attaching" | "in-use" if !self.is_attached(&v.name) => {
                    let r = self.attach(v).await;
                    let from = v.state.as_str();
                    match r {
                        Ok(uri) => {
                            self.metrics
                                .attach
                                .with_label_values(&["attach", "ok"])
                                .inc();
                            let att = mpb::VolumeAttachment {
                                uri,
                                snap_seen: sov_client::volume::max_live_snap(v),
                                ..a.clone()
                            };
                            let to = "in-use";
                            if let Err(e) = self
                                .set_state(&v.name, from, to, Some(att), String::new())
                                .await
                            {
                                tracing::warn!(volume = %v.name, error = %e, "could not record the attachment");
                                self.detach(&v.name).await.ok();
                            }
                        }
                        Err(e) => {
                            self.metrics
                                .attach
                                .with_label_values(&["attach", "error"])
                                .inc();
                            tracing::warn!(volume = %v.name, error = %format!("{e:#}"), "attach failed");
                            let _ = self
                                .set_state(&v.name, from, "error", None, format!("{e:#}"))
                                .await;
                        }
                    }
                }
                "in-use" => {
                    let dev = self
                        .attached
                        .lock()
                        .expect("attached")
                        .get(&v.name)
                        .map(|x| x.dev.clone());
                    if let Some(dev) = dev {
                        dev.handle.refresh(v).await;
                        let seen_now = dev.handle.snap_seq();
                        if a.snap_seen != seen_now {
                            let att = mpb::VolumeAttachment {
                                snap_seen: seen_now,
                                ..a.clone()
                            };
                            let _ = self
                                .set_state(&v.name, "in-use", "in-use", Some(att), String::new())
                                .await;
                        }
                    }
                }
                "detaching" => {
                    let r = self.detach(&v.name).await;
                    let ok = r.is_ok();
                    self.metrics
                        .attach
                        .with_label_values(&["detach", if ok { "ok" } else { "error" }])
                        .inc();
                    let err = r.err().map(|e| format!("{e:#}")).unwrap_or_default();
                    let to = if ok { "available" } else { "error" };
                    let _ = self.set_state(&v.name, "detaching", to, None, err).await;
                }
                _ => {}
            }
        }
        // Exports whose volume went elsewhere or away.
        let gone: Vec<String> = self
            .attached
            .lock()
            .expect("attached")
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            tracing::warn!(volume = %n, "no longer attached here");
            let _ = self.detach(&n).await;
        }
        Ok(())
    }

    /// The URIs of what is exported now.
    pub fn exports(&self) -> Vec<(String, String)> {
        self.attached
            .lock()
            .expect("attached")
            .iter()
            .map(|(n, a)| (n.clone(), a.uri.clone()))
            .collect()
    }
}

/// Runs vhost-blk until `shutdown`.
pub async fn run(
    cfg: Config,
    nbd: tokio::net::TcpListener,
    metrics_listener: tokio::net::TcpListener,
    mut shutdown: Shutdown,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data)
        .with_context(|| format!("creating {}", cfg.data.display()))?;
    let client = Client::new(&cfg.metad, ClientConfig::default())?;
    let crl_task = tokio::spawn(sov_client::meta::keep_crl_current(client.meta().clone()));
    let metrics = Metrics::new();
    let nbd_addr = nbd.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let exporter = Arc::new(Exporter {
        cfg: cfg.clone(),
        client,
        metrics: metrics.clone(),
        nbd_addr,
        attached: Mutex::new(HashMap::new()),
    });
    let mut server = nbd::NbdServer::new(exporter.clone());
    if let Some(t) = cfg.nbd_tls.clone() {
        server = server.with_tls(t);
    }
    let server = Arc::new(server);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut rx = stop_rx.clone();
    let nbd_task = tokio::spawn(server.serve_tcp(nbd, async move {
        let _ = rx.wait_for(|v| *v).await;
    }));
    let metrics_task = tokio::spawn(sov_common::telemetry::serve_metrics(
        metrics_listener,
        metrics.registry.clone(),
        shutdown.clone(),
    ));
    tracing::info!(id = %cfg.id, nbd = %nbd_addr, metrics = %metrics_addr, "vhost-blk serving");
    if let Some(path) = ready_file {
        sov_common::daemon::write_ready_file(
            &path,
            &Ready {
                id: cfg.id.clone(),
                listen: nbd_addr,
                metrics_listen: metrics_addr,
                pid: std::process::id(),
            },
        )?;
    }
    loop {
        if let Err(e) = exporter.reconcile().await {
            tracing::warn!(error = %format!("{e:#}"), "reconcile failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.poll) => {}
            _ = shutdown.wait() => break,
        }
    }
    // Stop serving, then flush and release every volume (it stays in-use here: a restarted
    // exporter takes it up again).
    let _ = stop_tx.send(true);
    let _ = nbd_task.await;
    let names: Vec<String> = exporter.exports().into_iter().map(|(n, _)| n).collect();
    for n in names {
        if let Err(e) = exporter.detach(&n).await {
            tracing::warn!(volume = %n, error = %format!("{e:#}"), "closing failed");
        }
    }
    crl_task.abort();
    let _ = metrics_task.await;
    tracing::info!("vhost-blk stopped");
    Ok(())
}
