//! Membership in the cluster map: registers this node with metad at start (retrying until
//! metad answers), then heartbeats with live disk figures. A heartbeat that metad does not
//! recognise (the map was rebuilt, or the node was removed) registers again.

use std::sync::Arc;
use std::time::Duration;

use sov_client::meta::MetaClient;
use sov_common::shutdown::Shutdown;
use sov_proto::metad::{Disk, HeartbeatRequest, Node, RegisterNodeRequest};
use tonic::Code;

use crate::cluster::Cluster;
use crate::store::Store;

/// What this node tells metad about itself.
#[derive(Debug, Clone)]
pub struct NodeRegistration {
    pub id: String,
    pub addr: String,
    pub metrics_addr: String,
    pub zone: String,
}

async fn disks(store: &Arc<Store>) -> Result<Vec<Disk>, tonic::Status> {
    let s = store.clone();
    let stats = tokio::task::spawn_blocking(move || s.stats())
        .await
        .map_err(|e| tonic::Status::internal(format!("reading disk figures: {e}")))?;
    Ok(stats
        .into_iter()
        .map(|(name, st)| Disk {
            path: name,
            capacity_bytes: st.space.capacity,
            used_bytes: st.space.used,
            health: if st.health.starts_with("failed") {
                "failed".into()
            } else {
                st.health
            },
        })
        .collect())
}

async fn register(
    client: &MetaClient,
    me: &NodeRegistration,
    store: &Arc<Store>,
) -> Result<Duration, tonic::Status> {
    let disks = disks(store).await?;
    let node = Node {
        id: me.id.clone(),
        addr: me.addr.clone(),
        zone: me.zone.clone(),
        capacity_bytes: disks
            .iter()
            .filter(|d| d.health != "failed")
            .map(|d| d.capacity_bytes)
            .sum(),
        disks,
        metrics_addr: me.metrics_addr.clone(),
        ..Default::default()
    };
    let req = RegisterNodeRequest { node: Some(node) };
    let r = client
        .call(|mut c| {
            let req = req.clone();
            async move { c.register_node(req).await }
        })
        .await?;
    tracing::info!(epoch = r.epoch, node = %me.id, "registered with metad");
    Ok(Duration::from_millis(
        r.heartbeat_interval_ms.clamp(100, 60_000),
    ))
}

/// The metad client registration and the cluster view use.
pub fn client(metad: &[String]) -> anyhow::Result<MetaClient> {
    Ok(MetaClient::new(metad)
        .map_err(|e| anyhow::anyhow!("bad metad address: {}", e.message()))?
        .with_retry_for(Duration::from_secs(2))
        // A heartbeat stuck on a frozen or cut-off leader would let the node go `down`:
        // move on to the next member quickly.
        .with_attempt_timeout(Duration::from_secs(1)))
}

/// Registers, then heartbeats until `sd`; keeps `cluster`'s map at the epoch metad reports.
pub async fn run(cluster: Arc<Cluster>, me: NodeRegistration, store: Arc<Store>, mut sd: Shutdown) {
    let client = cluster.meta.clone();
    let mut interval: Option<Duration> = None;
    loop {
        let pause = match interval {
            None => match register(&client, &me, &store).await {
                Ok(i) => {
                    interval = Some(i);
                    if let Err(e) = cluster.refresh(0).await {
                        tracing::warn!(error = %e.message(), "fetching the cluster map failed");
                    }
                    i
                }
                Err(e) => {
                    tracing::warn!(error = %e.message(), "registering with metad failed; retrying");
                    Duration::from_secs(1)
                }
            },
            Some(i) => {
                let req = HeartbeatRequest {
                    node_id: me.id.clone(),
                    disks: disks(&store).await.unwrap_or_default(),
                };
                let r = client
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.heartbeat(req).await }
                    })
                    .await;
                match r {
                    Ok(r) => {
                        if r.epoch > cluster.epoch()
                            && let Err(e) = cluster.refresh(r.epoch).await
                        {
                            tracing::warn!(error = %e.message(), "fetching the cluster map failed");
                        }
                    }
                    Err(e) if e.code() == Code::NotFound => {
                        tracing::warn!("metad does not know this node; registering again");
                        interval = None;
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e.message(), "heartbeat to metad failed"),
                }
                i
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = sd.wait() => return,
        }
    }
}
