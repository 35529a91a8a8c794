//! The cluster map as the data path uses it: nodes (address, zone, state), pools (id,
//! redundancy, PG count) and the placement of every PG, cached with a bounded age and
//! refreshed (one fetch at a time) when a storage node says the epoch moved on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sov_common::placement::{self, ClusterMap, NodeInfo, NodeState, Redundancy};
use sov_proto::metad::{self as pb, GetClusterMapRequest};

use crate::meta::MetaClient;

/// One pool, as placement needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub id: u64,
    pub name: String,
    pub redundancy: Redundancy,
    pub pg_count: u32,
}

/// One storage node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub addr: String,
    pub zone: String,
    pub state: NodeState,
}

/// The cluster map at one epoch.
#[derive(Debug, Clone)]
pub struct View {
    pub epoch: u64,
    pub nodes: BTreeMap<String, NodeView>,
    pub pools: BTreeMap<String, PoolView>,
    placement: ClusterMap,
    fetched: Instant,
}

/// A pool's redundancy from its protobuf form.
pub fn redundancy_of(r: Option<&pb::Redundancy>) -> Result<Redundancy, String> {
    let small = |v: u32| u8::try_from(v).map_err(|_| format!("redundancy value {v} too large"));
    match r.and_then(|r| r.kind.as_ref()) {
        Some(pb::redundancy::Kind::Replicated(r)) => Ok(Redundancy::Replicated {
            size: small(r.size)?,
        }),
        Some(pb::redundancy::Kind::Ec(e)) => Ok(Redundancy::Ec {
            k: small(e.k)?,
            m: small(e.m)?,
        }),
        None => Err("pool has no redundancy".into()),
    }
}

fn state_of(s: &str) -> NodeState {
    match s {
        "up" => NodeState::Up,
        "out" => NodeState::Out,
        _ => NodeState::Down,
    }
}

impl View {
    /// Builds the view from metad's answer.
    pub fn from_proto(m: pb::ClusterMap) -> Result<View, String> {
        let mut nodes = BTreeMap::new();
        let mut infos = Vec::new();
        for n in m.nodes {
            let state = state_of(&n.state);
            infos.push(NodeInfo {
                id: n.id.clone(),
                zone: n.zone.clone(),
                weight: n.weight,
                state,
            });
            nodes.insert(
                n.id.clone(),
                NodeView {
                    id: n.id,
                    addr: n.addr,
                    zone: n.zone,
                    state,
                },
            );
        }
        let mut pools = BTreeMap::new();
        for p in m.pools {
            let redundancy = redundancy_of(p.redundancy.as_ref())
                .map_err(|e| format!("pool {}: {e}", p.name))?;
            pools.insert(
                p.name.clone(),
                PoolView {
                    id: p.id,
                    name: p.name,
                    redundancy,
                    pg_count: p.pg_count.max(1),
                },
            );
        }
        Ok(View {
            epoch: m.epoch,
            nodes,
            pools,
            placement: ClusterMap {
                epoch: m.epoch,
                nodes: infos,
            },
            fetched: Instant::now(),
        })
    }

    /// The pool with this id.
    pub fn pool_by_id(&self, id: u64) -> Option<&PoolView> {
        self.pools.values().find(|p| p.id == id)
    }

    /// Which node holds each position of a PG (see [`placement::slots`]).
    pub fn slots(&self, pool_id: u64, r: &Redundancy, pg: u32) -> Vec<Option<String>> {
        let set = placement::acting_set(pool_id, pg, r.width(), &self.placement);
        placement::slots(r, &set)
    }

    /// Whether the map says the node is up.
    pub fn is_up(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.state == NodeState::Up)
    }

    /// The node's address, if known.
    pub fn addr(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).map(|n| n.addr.as_str())
    }

    /// Every node the map says is up.
    pub fn up_nodes(&self) -> impl Iterator<Item = &NodeView> {
        self.nodes.values().filter(|n| n.state == NodeState::Up)
    }
}

/// A cached [`View`], refreshed from metad.
pub struct MapCache {
    meta: MetaClient,
    current: Mutex<Option<Arc<View>>>,
    refreshing: tokio::sync::Mutex<()>,
    max_age: Duration,
}

impl MapCache {
    pub fn new(meta: MetaClient, max_age: Duration) -> MapCache {
        MapCache {
            meta,
            current: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            max_age,
        }
    }

    /// The cached view, without fetching.
    pub fn cached(&self) -> Option<Arc<View>> {
        self.current.lock().expect("map lock").clone()
    }

    /// The view, fetched again when older than the cache's age limit.
    pub async fn get(&self) -> Result<Arc<View>, tonic::Status> {
        if let Some(v) = self.cached()
            && v.fetched.elapsed() < self.max_age
        {
            return Ok(v);
        }
        self.refresh(0).await
    }

    /// Fetches the map unless one at `at_least` or newer arrived meanwhile (callers that saw
    /// "stale epoch" together share one fetch).
    pub async fn refresh(&self, at_least: u64) -> Result<Arc<View>, tonic::Status> {
        let _one = self.refreshing.lock().await;
        if let Some(v) = self.cached()
            && at_least > 0
            && v.epoch >= at_least
        {
            return Ok(v);
        }
        let m = self
            .meta
            .call(|mut c| async move {
                c.get_cluster_map(GetClusterMapRequest {
                    consistency: pb::Consistency::Linearizable as i32,
                })
                .await
            })
            .await?;
        let v = Arc::new(View::from_proto(m).map_err(tonic::Status::internal)?);
        let mut cur = self.current.lock().expect("map lock");
        // Never go back to an older epoch (two fetches can finish out of order).
        if cur.as_ref().is_none_or(|c| c.epoch <= v.epoch) {
            *cur = Some(v.clone());
        }
        Ok(cur.clone().expect("just set"))
    }
}
