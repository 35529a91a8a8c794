//! What this node knows of the cluster: the map (nodes, pools, placement) at the newest epoch
//! it has heard of. Heartbeat answers carry metad's epoch; a newer one, or a Put placed at a
//! newer one, makes the node fetch the map again (one fetch at a time).

use std::sync::Arc;
use std::time::Duration;

use sov_client::map::{MapCache, View};
use sov_client::meta::MetaClient;

use crate::metrics::Metrics;

/// The node's view of the cluster.
pub struct Cluster {
    pub node_id: String,
    pub meta: MetaClient,
    map: MapCache,
    metrics: Metrics,
}

impl Cluster {
    pub fn new(node_id: String, meta: MetaClient, metrics: Metrics) -> Arc<Cluster> {
        Arc::new(Cluster {
            node_id,
            // Refreshed on epoch news, never by age.
            map: MapCache::new(meta.clone(), Duration::MAX),
            meta,
            metrics,
        })
    }

    /// The newest map fetched, if any.
    pub fn view(&self) -> Option<Arc<View>> {
        self.map.cached()
    }

    /// The epoch of that map (0 before the first fetch).
    pub fn epoch(&self) -> u64 {
        self.view().map(|v| v.epoch).unwrap_or(0)
    }

    /// Fetches the map unless one at `at_least` is already here (`0` = always fetch).
    pub async fn refresh(&self, at_least: u64) -> Result<Arc<View>, tonic::Status> {
        let before = self.epoch();
        let v = self.map.refresh(at_least).await?;
        if v.epoch != before {
            tracing::info!(from = before, to = v.epoch, "cluster map epoch changed");
        }
        self.metrics.map_epoch.set(v.epoch as i64);
        Ok(v)
    }
}
