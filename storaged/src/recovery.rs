//! The recovery worker: makes this node hold exactly what the cluster map says it should.
//!
//! A pass runs at every epoch change, when a chunk is found corrupt, and every `interval`
//! otherwise. It first frees the data of due tombstones (deleted or replaced object versions),
//! then walks every placement group of every pool. For each PG it compares what every up node
//! holds (one listing per pool and node, taken when the pass reaches the pool) with the PG's
//! positions at the pass's epoch:
//! - a copy or shard this node should hold but lacks (or holds corrupt) is copied from a node
//!   that has it, or, for an erasure-coded shard nobody has, rebuilt from `k` others;
//! - one it holds but should not (a stray, e.g. after it came back from an outage) is deleted
//!   once the node that should hold it is up and confirmed to have it.
//!
//! Pulls are throttled to `rate`; progress goes to metrics, to NodeInfo and to a cursor file so
//! a restarted node resumes its pass at the same epoch.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sov_client::manifest;
use sov_client::map::{PoolView, View};
use sov_client::nodes::Nodes;
use sov_common::layout::ChunkId;
use sov_common::placement::Redundancy;
use sov_common::stripe;
use sov_common::worker::{Worker, WorkerState};
use sov_proto::metad::AckTombstoneRequest;
use sov_proto::storaged as pb;

use crate::cluster::Cluster;
use crate::config::RecoveryConfig;
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::store::Store;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Pulls in flight at once within a PG.
const PULLS: usize = 4;

/// Who holds what, for one pool: base id → shard (None = replica) → node ids.
type Holders = BTreeMap<String, BTreeMap<Option<u8>, BTreeSet<String>>>;

/// One pass over every PG at one epoch.
struct Pass {
    view: Arc<View>,
    tombs: HashSet<(u64, String)>,
    corrupt: HashSet<String>,
    pgs: Vec<(PoolView, u32)>,
    next: usize,
    /// Listings of the pool being walked: pool id → pg → holders.
    listing: Option<(u64, BTreeMap<u32, Holders>)>,
    missing: u64,
    unrecoverable: u64,
    started: Instant,
}

/// What one action did.
enum Done {
    Copied(u64),
    Rebuilt(u64),
    Healed(u64),
    Stray,
    Unrecoverable(String),
    Nothing,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Cursor {
    epoch: u64,
    next: usize,
}

/// The recovery worker of a node.
pub struct Recovery {
    cluster: Arc<Cluster>,
    store: Arc<Store>,
    nodes: Nodes,
    cfg: RecoveryConfig,
    metrics: Metrics,
    info: Arc<Mutex<pb::RecoveryInfo>>,
    cursor_path: PathBuf,
    pass: Option<Pass>,
    last_epoch: u64,
    last_end: Option<Instant>,
    extents: Option<Arc<crate::extents::Extents>>,
}

impl Recovery {
    /// Volume tombstones free extents here too.
    pub fn with_extents(mut self, x: Arc<crate::extents::Extents>) -> Recovery {
        self.extents = Some(x);
        self
    }

    pub fn new(
        cluster: Arc<Cluster>,
        store: Arc<Store>,
        cfg: RecoveryConfig,
        metrics: Metrics,
        info: Arc<Mutex<pb::RecoveryInfo>>,
        cursor_path: PathBuf,
    ) -> Recovery {
        info.lock().expect("info lock").enabled = true;
        for kind in ["copy", "rebuild", "heal", "stray"] {
            metrics.repair_chunks.with_label_values(&[kind]);
        }
        for s in ["done", "total"] {
            metrics.repair_pgs.with_label_values(&[s]);
        }
        Recovery {
            cluster,
            store,
            nodes: Nodes::new(Default::default()),
            cfg,
            metrics,
            info,
            cursor_path,
            pass: None,
            last_epoch: 0,
            last_end: None,
            extents: None,
        }
    }

    fn me(&self) -> &str {
        &self.cluster.node_id
    }

    fn due(&self, view: &View) -> anyhow::Result<bool> {
        if view.epoch != self.last_epoch {
            return Ok(true);
        }
        if self
            .last_end
            .is_none_or(|t| t.elapsed() >= self.cfg.interval.0)
        {
            return Ok(true);
        }
        Ok(!self.store.corrupt()?.is_empty())
    }

    async fn start_pass(&mut self, view: Arc<View>) -> anyhow::Result<()> {
        let tombs = self.tombstones().await?;
        let corrupt: HashSet<String> = self.store.corrupt()?.into_iter().map(|c| c.0).collect();
        let mut pgs = Vec::new();
        for p in view.pools.values() {
            for pg in 0..p.pg_count {
                pgs.push((p.clone(), pg));
            }
        }
        let mut next = 0;
        // Only the first pass after a start resumes: a cursor is left only by a pass that a
        // restart cut short.
        if self.last_end.is_none()
            && let Ok(raw) = std::fs::read(&self.cursor_path)
            && let Ok(c) = serde_json::from_slice::<Cursor>(&raw)
            && c.epoch == view.epoch
            && c.next <= pgs.len()
        {
            tracing::info!(
                epoch = c.epoch,
                at = c.next,
                of = pgs.len(),
                "resuming the recovery pass"
            );
            next = c.next;
        }
        {
            let mut i = self.info.lock().expect("info lock");
            i.active = true;
            i.pass_epoch = view.epoch;
            i.pgs_total = pgs.len() as u64;
            i.pgs_done = next as u64;
        }
        self.metrics
            .repair_pgs
            .with_label_values(&["total"])
            .set(pgs.len() as i64);
        self.pass = Some(Pass {
            view,
            tombs,
            corrupt,
            pgs,
            next,
            listing: None,
            missing: 0,
            unrecoverable: 0,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Lists tombstones; frees the due ones here and acknowledges those naming this node.
    /// Returns every tombstoned `(pool, uid)`, due or not, so the pass copies none of them.
    async fn tombstones(&self) -> anyhow::Result<HashSet<(u64, String)>> {
        let all = self.cluster.meta.all_tombstones().await?;
        let now = unix_ms();
        let mut set = HashSet::new();
        for t in all {
            if !t.volume_id.is_empty() {
                if t.not_before_unix_ms <= now {
                    if let Some(x) = &self.extents {
                        let freed = if t.snap_upto == 0 {
                            x.delete_volume(&t.volume_id).await?
                        } else {
                            x.trim_snapshots(&t.volume_id, t.snap_upto, &t.live_snaps)
                                .await?
                        };
                        self.metrics.tombstone_deletes.inc_by(freed as u64);
                    }
                    self.ack_tombstone(&t).await?;
                }
                continue;
            }
            let Ok(m) = manifest::decode(&t.manifest) else {
                continue;
            };
            set.insert((m.pool_id, hex::encode(&m.uid)));
            if t.not_before_unix_ms > now {
                continue;
            }
            let mut freed = 0u64;
            for id in manifest::stored_ids(&m) {
                match self.store.delete(&id).await {
                    Ok(()) => freed += 1,
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.metrics.tombstone_deletes.inc_by(freed);
            self.info.lock().expect("info lock").tombstone_deletes += freed;
            self.ack_tombstone(&t).await?;
        }
        Ok(set)
    }

    async fn ack_tombstone(&self, t: &sov_proto::metad::Tombstone) -> anyhow::Result<()> {
        if t.pending.iter().any(|n| n == self.me()) {
            let req = AckTombstoneRequest {
                id: t.id.clone(),
                node_id: self.me().to_string(),
            };
            self.cluster
                .meta
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.ack_tombstone(req).await }
                })
                .await?;
        }
        Ok(())
    }

    /// Every up node's holdings in one pool, by PG (this node's from its own index).
    async fn list_pool(&self, view: &View, pool: u64) -> anyhow::Result<BTreeMap<u32, Holders>> {
        let prefix = format!("o1/{pool:016x}/");
        let mut out: BTreeMap<u32, Holders> = BTreeMap::new();
        let mut add = |node: &str, id: &str| {
            if let Ok(c) = ChunkId::parse(id) {
                out.entry(c.pg)
                    .or_default()
                    .entry(ChunkId { shard: None, ..c }.base())
                    .or_default()
                    .entry(c.shard)
                    .or_default()
                    .insert(node.to_string());
            }
        };
        let mut after = String::new();
        loop {
            let (page, more) = self.store.list(&prefix, &after, 10_000)?;
            for l in &page {
                add(self.me(), &l.id);
            }
            match page.last() {
                Some(l) if more => after = l.id.clone(),
                _ => break,
            }
        }
        let peers: Vec<_> = view.up_nodes().filter(|n| n.id != self.me()).collect();
        let lists = futures::future::join_all(peers.iter().map(|n| {
            let prefix = prefix.clone();
            async move { (n.id.clone(), self.nodes.list_all(&n.addr, &prefix).await) }
        }))
        .await;
        for (node, r) in lists {
            match r {
                Ok(entries) => {
                    for e in entries {
                        add(&node, &e.id);
                    }
                }
                // Its pieces look missing; nothing is deleted on the strength of that.
                Err(e) => tracing::warn!(%node, error = %e.message(), "listing a peer failed"),
            }
        }
        Ok(out)
    }

    async fn throttle(&self, bytes: u64) {
        let rate = self.cfg.rate.as_u64();
        if rate > 0 && bytes > 0 {
            tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / rate as f64)).await;
        }
    }

    /// Gets `id` from the first of `from` that has a good copy.
    async fn fetch(&self, view: &View, id: &str, from: &BTreeSet<String>) -> Option<Bytes> {
        for n in from {
            if n == self.me() || !view.is_up(n) {
                continue;
            }
            let Some(addr) = view.addr(n) else { continue };
            if let Ok(b) = self.nodes.get(addr, id).await {
                return Some(b);
            }
        }
        None
    }

    async fn store_local(&self, id: &str, data: Bytes) -> Result<u64, StoreError> {
        let len = data.len() as u64;
        let h = *blake3::hash(&data).as_bytes();
        self.store.put(id.to_string(), vec![data], h).await?;
        Ok(len)
    }

    /// Makes this node hold `id` (a copy, or shard `shard` of an erasure-coded chunk).
    async fn pull(
        &self,
        view: &View,
        r: Redundancy,
        base: &str,
        shard: Option<u8>,
        pieces: &BTreeMap<Option<u8>, BTreeSet<String>>,
        heal: bool,
    ) -> Done {
        let Ok(cid) = ChunkId::parse(base) else {
            return Done::Nothing;
        };
        let id = ChunkId { shard, ..cid }.to_string();
        let none = BTreeSet::new();
        let holders = pieces.get(&shard).unwrap_or(&none);
        if let Some(b) = self.fetch(view, &id, holders).await {
            let ok_shard = match shard {
                Some(s) => stripe::Header::parse(&b).is_ok_and(|h| h.index == s),
                None => true,
            };
            if ok_shard {
                return match self.store_local(&id, b).await {
                    Ok(n) if heal => Done::Healed(n),
                    Ok(n) => Done::Copied(n),
                    Err(e) => Done::Unrecoverable(format!("{id}: storing: {e}")),
                };
            }
        }
        let (Redundancy::Ec { k, m }, Some(s)) = (r, shard) else {
            return Done::Unrecoverable(format!("{id}: no up node has a good copy"));
        };
        let (k, m) = (usize::from(k), usize::from(m));
        // Nobody has this shard: decode from any k others and encode it again.
        let mut shards: Vec<Option<Bytes>> = vec![None; k + m];
        let mut got = 0usize;
        let mut pulled = 0u64;
        #[allow(clippy::needless_range_loop)] // `i` names the shard id as well as the slot
        for i in 0..k + m {
            if got >= k {
                break;
            }
            if i == usize::from(s) {
                continue;
            }
            let sid = ChunkId {
                shard: Some(i as u8),
                ..cid
            }
            .to_string();
            let from = pieces.get(&Some(i as u8)).unwrap_or(&none);
            let local = if from.contains(self.me()) {
                self.store.get(&sid).await.ok().map(|(_, _, b)| b)
            } else {
                None
            };
            let b = match local {
                Some(b) => Some(b),
                None => self.fetch(view, &sid, from).await,
            };
            if let Some(b) = b {
                pulled += b.len() as u64;
                shards[i] = Some(b);
                got += 1;
            }
        }
        if got < k {
            return Done::Unrecoverable(format!(
                "{id}: only {got} of the {k} shards needed are readable"
            ));
        }
        let built = tokio::task::spawn_blocking(move || {
            let refs: Vec<Option<&[u8]>> = shards.iter().map(|s| s.as_deref()).collect();
            stripe::rebuild(k, m, &refs, usize::from(s))
        })
        .await;
        match built {
            Ok(Ok(b)) => match self.store_local(&id, Bytes::from(b)).await {
                Ok(_) if heal => Done::Healed(pulled),
                Ok(_) => Done::Rebuilt(pulled),
                Err(e) => Done::Unrecoverable(format!("{id}: storing: {e}")),
            },
            Ok(Err(e)) => Done::Unrecoverable(format!("{id}: {e}")),
            Err(e) => Done::Unrecoverable(format!("{id}: rebuild task: {e}")),
        }
    }

    /// Deletes a piece held here that belongs on `owner`, once `owner` confirms it has it.
    async fn drop_stray(&self, view: &View, id: &str, owners: &[String]) -> Done {
        if owners.is_empty() {
            return Done::Nothing;
        }
        for o in owners {
            let Some(addr) = view.addr(o).filter(|_| view.is_up(o)) else {
                return Done::Nothing;
            };
            if self.nodes.stat(addr, id).await.is_err() {
                return Done::Nothing;
            }
        }
        match self.store.delete(id).await {
            Ok(()) => Done::Stray,
            Err(_) => Done::Nothing,
        }
    }

    /// One PG: pulls what this node lacks, drops what it should not hold.
    async fn do_pg(&mut self) -> anyhow::Result<()> {
        let pass = self.pass.as_mut().expect("a pass is running");
        let (pool, pg) = pass.pgs[pass.next].clone();
        let view = pass.view.clone();
        if pass.listing.as_ref().map(|l| l.0) != Some(pool.id) {
            pass.listing = None;
            let l = self.list_pool(&view, pool.id).await?;
            self.pass.as_mut().expect("a pass").listing = Some((pool.id, l));
        }
        let pass = self.pass.as_ref().expect("a pass is running");
        let holders = pass
            .listing
            .as_ref()
            .and_then(|l| l.1.get(&pg))
            .cloned()
            .unwrap_or_default();
        let tombs = pass.tombs.clone();
        let corrupt = pass.corrupt.clone();
        let r = pool.redundancy;
        let slots = view.slots(pool.id, &r, pg);
        let me = self.me().to_string();
        let mine: Vec<Option<u8>> = match r {
            Redundancy::Replicated { .. } => {
                if slots.iter().flatten().any(|s| *s == me) {
                    vec![None]
                } else {
                    vec![]
                }
            }
            Redundancy::Ec { .. } => slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.as_deref() == Some(me.as_str()))
                .map(|(i, _)| Some(i as u8))
                .collect(),
        };
        enum Job {
            Pull(String, Option<u8>, bool),
            Stray(String, Vec<String>),
        }
        let mut jobs = Vec::new();
        for (base, pieces) in &holders {
            let Ok(cid) = ChunkId::parse(base) else {
                continue;
            };
            if tombs.contains(&(pool.id, cid.uid.to_string())) {
                continue;
            }
            for want in &mine {
                let id = ChunkId {
                    shard: *want,
                    ..cid
                }
                .to_string();
                let have = pieces.get(want).is_some_and(|h| h.contains(&me));
                let bad = corrupt.contains(&id);
                if !have || bad {
                    jobs.push(Job::Pull(base.clone(), *want, bad));
                }
            }
            for (shard, who) in pieces {
                if !who.contains(&me) || mine.contains(shard) {
                    continue;
                }
                let id = ChunkId {
                    shard: *shard,
                    ..cid
                }
                .to_string();
                let owners: Vec<String> = match shard {
                    None => slots.iter().flatten().cloned().collect(),
                    Some(s) => match slots.get(usize::from(*s)) {
                        Some(Some(n)) => vec![n.clone()],
                        // An unplaced position: keep the only copy of that shard.
                        _ => vec![],
                    },
                };
                if !corrupt.contains(&id) {
                    jobs.push(Job::Stray(id, owners));
                }
            }
        }
        let this = &*self;
        let results: Vec<Done> = futures::stream::iter(jobs.into_iter().map(|j| {
            let view = view.clone();
            let holders = &holders;
            async move {
                match j {
                    Job::Pull(base, shard, heal) => {
                        let pieces = holders.get(&base).cloned().unwrap_or_default();
                        let d = this.pull(&view, r, &base, shard, &pieces, heal).await;
                        if let Done::Copied(n) | Done::Rebuilt(n) | Done::Healed(n) = d {
                            this.throttle(n).await;
                        }
                        d
                    }
                    Job::Stray(id, owners) => this.drop_stray(&view, &id, &owners).await,
                }
            }
        }))
        .buffer_unordered(PULLS)
        .collect()
        .await;
        let (mut missing, mut unrecoverable) = (0u64, 0u64);
        {
            let mut info = self.info.lock().expect("info lock");
            for d in results {
                let (kind, bytes) = match d {
                    Done::Copied(n) => ("copy", n),
                    Done::Rebuilt(n) => ("rebuild", n),
                    Done::Healed(n) => ("heal", n),
                    Done::Stray => ("stray", 0),
                    Done::Unrecoverable(why) => {
                        tracing::warn!(%why, "a piece could not be recovered");
                        missing += 1;
                        unrecoverable += 1;
                        continue;
                    }
                    Done::Nothing => continue,
                };
                if kind != "stray" {
                    missing += 1;
                }
                self.metrics.repair_chunks.with_label_values(&[kind]).inc();
                self.metrics.repair_bytes.inc_by(bytes);
                info.bytes += bytes;
                match kind {
                    "copy" => info.copied += 1,
                    "rebuild" => info.rebuilt += 1,
                    "heal" => info.healed += 1,
                    _ => info.strays_deleted += 1,
                }
            }
        }
        let pass = self.pass.as_mut().expect("a pass is running");
        pass.missing += missing;
        pass.unrecoverable += unrecoverable;
        pass.next += 1;
        let cursor = Cursor {
            epoch: pass.view.epoch,
            next: pass.next,
        };
        // The cursor is saved before the progress is shown, and whole (a new file renamed over
        // the old): a node killed at any moment leaves either the old cursor or the new one,
        // never a torn file that would make the next start begin the pass again from zero.
        if let Ok(raw) = serde_json::to_vec(&cursor) {
            let tmp = self.cursor_path.with_extension("tmp");
            if std::fs::write(&tmp, raw).is_ok() {
                let _ = std::fs::rename(&tmp, &self.cursor_path);
            }
        }
        self.info.lock().expect("info lock").pgs_done = pass.next as u64;
        self.metrics
            .repair_pgs
            .with_label_values(&["done"])
            .set(pass.next as i64);
        Ok(())
    }

    fn finish_pass(&mut self) {
        let Some(p) = self.pass.take() else { return };
        let _ = std::fs::remove_file(&self.cursor_path);
        self.last_epoch = p.view.epoch;
        self.last_end = Some(Instant::now());
        self.metrics.repair_passes.inc();
        self.metrics.repair_missing.set(p.missing as i64);
        self.metrics
            .repair_unrecoverable
            .set(p.unrecoverable as i64);
        let mut i = self.info.lock().expect("info lock");
        i.active = false;
        i.passes += 1;
        i.last_missing = p.missing;
        i.last_unrecoverable = p.unrecoverable;
        i.last_pass_unix_ms = unix_ms();
        if p.missing == 0 && p.unrecoverable == 0 {
            i.clean_epoch = p.view.epoch;
        }
        if p.missing > 0 {
            tracing::info!(
                epoch = p.view.epoch,
                missing = p.missing,
                unrecoverable = p.unrecoverable,
                secs = p.started.elapsed().as_secs_f64(),
                "recovery pass done"
            );
        }
    }
}

impl Worker for Recovery {
    fn name(&self) -> &'static str {
        "recovery"
    }

    async fn step(&mut self) -> anyhow::Result<WorkerState> {
        let Some(view) = self.cluster.view() else {
            return Ok(WorkerState::Idle(Duration::from_millis(500)));
        };
        if let Some(p) = &self.pass
            && p.view.epoch != view.epoch
        {
            // The map moved on: start over at the new epoch.
            self.pass = None;
        }
        if self.pass.is_none() {
            if !self.due(&view)? {
                return Ok(WorkerState::Idle(Duration::from_millis(250)));
            }
            self.start_pass(view).await?;
        }
        let p = self.pass.as_ref().expect("a pass is running");
        if p.next >= p.pgs.len() {
            self.finish_pass();
            return Ok(WorkerState::Idle(Duration::from_millis(250)));
        }
        self.do_pg().await?;
        Ok(WorkerState::Busy)
    }
}
