//! Block volumes as a writer sees them: a volume is 4 MiB extents of 1024 sectors of 4 KiB,
//! each extent held by every member of its placement group in a replicated pool.
//!
//! - **Encryption**: every sector is sealed here with AES-256-GCM under the volume's data key.
//!   The nonce is the writer's lease epoch (32 bits) and a per-sector write sequence (64 bits),
//!   so no (key, nonce) pair is ever used twice: a lease epoch is handed out once, and the
//!   sequence only grows within it. The AAD binds the sector to its volume, extent and index.
//!   The 16-byte tag is stored in the extent's metadata on storaged, which sees ciphertext only.
//! - **Writes** go to every live member with the sector versions (epoch, seq); a member that
//!   misses one is remembered as stale for that extent (neither read from nor written to) and
//!   repaired in the background. A write is acknowledged when at least `min_size` members
//!   took it (`size - 1`, at least 1); the others are marked stale.
//! - **Flush** fdatasyncs on every node written since the last flush. A node that fails it
//!   is marked stale for the extents it took; the flush succeeds when each of them is durable
//!   on at least `min_size` of the members that took writes.
//! - **Reads** take one member's sectors and verify each tag; a sector that member lacks or
//!   fails is read from the others, newest version first.
//! - **Open** takes the writer lease (metad), raises every node's fence to its epoch and makes
//!   the replicas of every extent converge on the newest version of each sector before any I/O.
//! - **Snapshots** and **clones**: writes carry the highest live snapshot id, so storaged keeps
//!   a copy of an extent the first time it changes after a snapshot. A clone reads through to
//!   its parent's snapshot until an extent is first written, which copies it up first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use sov_common::placement::{self, Redundancy};
use sov_proto::metad as mpb;
use sov_proto::storaged as pb;
use tonic::{Code, Status};

use crate::error::ClientError;
use crate::map::View;
use crate::object::Client;

pub const SECTOR: usize = 4096;
pub const SECTORS: usize = 1024;
pub const EXTENT: u64 = (SECTOR * SECTORS) as u64;
const TAG: usize = 16;

/// How a volume is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Who holds the lease (the exporter's name).
    pub holder: String,
    pub lease_ttl: Duration,
}

/// One layer a clone reads through: the parent volume at a snapshot.
struct Layer {
    id: String,
    snap_id: u64,
    keys: Keys,
}

/// An open volume with its writer lease.
pub struct VolumeHandle {
    client: Client,
    name: String,
    id: String,
    pool: String,
    keys: Keys,
    parents: Vec<Layer>,
    epoch: u64,
    seq: AtomicU64,
    size: AtomicU64,
    snap_seq: AtomicU64,
    lost: AtomicBool,
    holder: String,
    /// Nodes written since the last flush, with the extents written there.
    unflushed: Mutex<HashMap<String, HashSet<u64>>>,
    /// Extent → members that missed writes (neither read from nor written to until
    /// repaired), each with the generation of its latest mark.
    stale: Mutex<HashMap<u64, HashMap<String, u64>>>,
    marks: AtomicU64,
    /// Writes hold it shared; a change of the snapshot sequence takes it exclusively, so no
    /// write carrying the old sequence is still in flight once the new one is reported.
    gate: tokio::sync::RwLock<()>,
    /// Nodes whose extents were not compared at open (down, or not answering): they may hold
    /// stale data for any extent, so nothing is read from them until a later convergence
    /// includes them.
    unknown: Mutex<HashSet<String>>,
    /// Extent → the nodes that listed it at the last convergence (members or not).
    holders: Mutex<HashMap<u64, HashSet<String>>>,
    /// The newest cluster map seen, to notice nodes that come (back) up.
    last_view: Mutex<Option<Arc<View>>>,
    /// Extents known to exist in this volume (a clone copies up the others before writing).
    present: Mutex<HashSet<u64>>,
    /// Serialize read-modify-write and copy-up per extent (striped).
    locks: Vec<tokio::sync::Mutex<()>>,
}

/// One sector as read: its version and its data (plaintext once checked).
#[derive(Clone)]
struct SectorRead {
    version: (u32, u64),
    data: Bytes,
    tag: Bytes,
}

fn aad(volume_id: &str, extent: u64, sector: usize) -> Vec<u8> {
    let mut a = Vec::with_capacity(volume_id.len() + 12);
    a.extend_from_slice(volume_id.as_bytes());
    a.extend_from_slice(&extent.to_be_bytes());
    a.extend_from_slice(&(sector as u32).to_be_bytes());
    a
}

fn nonce(epoch: u32, seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

fn cipher(key: &sov_common::codec::ChunkKey) -> Aes256Gcm {
    Aes256Gcm::new_from_slice(key.as_bytes()).expect("32-byte key")
}

/// A volume's data keys by the lease epoch they start at (`RotateVolumeKey` adds one): a
/// sector is sealed and opened with the key of the epoch in its version.
struct Keys(Vec<(u64, Aes256Gcm)>);

impl Keys {
    /// The volume's keys, fetched from metad (the current one and every one it replaced).
    async fn of(client: &Client, v: &mpb::Volume) -> Result<Keys, ClientError> {
        let mut ids: Vec<(u64, &str)> = v
            .older_keys
            .iter()
            .map(|k| (k.from_epoch, k.data_key_id.as_str()))
            .collect();
        ids.push((v.key_from_epoch, v.data_key_id.as_str()));
        let mut keys = Vec::with_capacity(ids.len());
        for (from, id) in ids {
            keys.push((from, cipher(&client.data_key(id).await?)));
        }
        Ok(Keys::new(keys))
    }

    fn new(mut keys: Vec<(u64, Aes256Gcm)>) -> Keys {
        // Stable: of two keys starting at the same epoch, the later one wins.
        keys.sort_by_key(|(from, _)| *from);
        Keys(keys)
    }

    /// The key for sectors written under lease epoch `epoch`.
    fn for_epoch(&self, epoch: u64) -> &Aes256Gcm {
        self.0
            .iter()
            .rev()
            .find(|(from, _)| *from <= epoch)
            .or(self.0.first())
            .map(|(_, k)| k)
            .expect("a volume has a key")
    }
}

/// The placement id of an extent (what its PG is hashed from).
pub fn extent_pid(volume_id: &str, index: u64) -> String {
    format!("v1/{volume_id}/{index:08x}")
}

fn unavailable(m: String) -> ClientError {
    ClientError::Unavailable(m)
}

impl VolumeHandle {
    /// Opens `name` for writing: takes the lease, fences older writers, converges replicas.
    pub async fn open(
        client: Client,
        name: &str,
        opts: OpenOptions,
    ) -> Result<Arc<VolumeHandle>, ClientError> {
        let req = mpb::VolumeLeaseRequest {
            name: name.to_string(),
            holder: opts.holder.clone(),
            epoch: 0,
            ttl_ms: opts.lease_ttl.as_millis() as u64,
        };
        let v = client
            .meta()
            .call(|mut c| {
                let req = req.clone();
                async move { c.acquire_volume_lease(req).await }
            })
            .await?;
        let epoch = v.lease.as_ref().map(|l| l.epoch).unwrap_or(0);
        if epoch == 0 || epoch > u32::MAX as u64 {
            return Err(ClientError::Internal(format!("bad lease epoch {epoch}")));
        }
        let keys = Keys::of(&client, &v).await?;
        // The chain of parents a clone reads through.
        let mut parents = Vec::new();
        let (mut pname, mut pid, mut psnap) =
            (v.parent.clone(), v.parent_id.clone(), v.parent_snap_id);
        while !pname.is_empty() {
            let req = mpb::GetVolumeRequest {
                name: pname.clone(),
                consistency: 0,
            };
            let p = client
                .meta()
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.get_volume(req).await }
                })
                .await?;
            if p.id != pid {
                return Err(ClientError::DataLoss(format!(
                    "the parent {pname} of volume {name} was replaced"
                )));
            }
            parents.push(Layer {
                id: p.id.clone(),
                snap_id: psnap,
                keys: Keys::of(&client, &p).await?,
            });
            (pname, pid, psnap) = (p.parent.clone(), p.parent_id.clone(), p.parent_snap_id);
        }
        let h = Arc::new(VolumeHandle {
            client,
            name: v.name.clone(),
            id: v.id.clone(),
            pool: v.pool.clone(),
            keys,
            parents,
            epoch,
            seq: AtomicU64::new(1),
            size: AtomicU64::new(v.size),
            snap_seq: AtomicU64::new(max_live_snap(&v)),
            lost: AtomicBool::new(false),
            holder: opts.holder.clone(),
            unflushed: Mutex::new(HashMap::new()),
            stale: Mutex::new(HashMap::new()),
            marks: AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
            unknown: Mutex::new(HashSet::new()),
            last_view: Mutex::new(None),
            holders: Mutex::new(HashMap::new()),
            present: Mutex::new(HashSet::new()),
            locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
        });
        let ready = async {
            h.fence_all().await?;
            h.converge().await
        };
        if let Err(e) = ready.await {
            // Give the lease back rather than hold it until it expires.
            let _ = h.release().await;
            return Err(e);
        }
        Ok(h)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    pub fn lease_epoch(&self) -> u64 {
        self.epoch
    }
    pub fn snap_seq(&self) -> u64 {
        self.snap_seq.load(Ordering::Relaxed)
    }
    pub fn lease_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Takes in a newer volume record (size, snapshots): what the exporter's watch sees. A
    /// new snapshot sequence waits for the writes in flight to finish first.
    pub async fn refresh(&self, v: &mpb::Volume) {
        if v.id != self.id {
            return;
        }
        self.size.fetch_max(v.size, Ordering::Relaxed);
        let seq = max_live_snap(v);
        if seq != self.snap_seq() {
            let _g = self.gate.write().await;
            self.snap_seq.store(seq, Ordering::Relaxed);
        }
    }

    /// Renews the lease; a lost lease stops every later write.
    pub async fn renew(&self, ttl: Duration) -> Result<mpb::Volume, ClientError> {
        let req = mpb::VolumeLeaseRequest {
            name: self.name.clone(),
            holder: self.holder.clone(),
            epoch: self.epoch,
            ttl_ms: ttl.as_millis() as u64,
        };
        let r = self
            .client
            .meta()
            .call(|mut c| {
                let req = req.clone();
                async move { c.renew_volume_lease(req).await }
            })
            .await;
        match r {
            Ok(v) => {
                self.refresh(&v).await;
                Ok(v)
            }
            Err(s) => {
                if s.code() == Code::FailedPrecondition || s.code() == Code::NotFound {
                    self.lost.store(true, Ordering::Relaxed);
                }
                Err(s.into())
            }
        }
    }

    /// Flushes and gives the lease back.
    pub async fn close(&self) -> Result<(), ClientError> {
        let flushed = self.flush().await;
        self.release().await?;
        flushed
    }

    async fn release(&self) -> Result<(), ClientError> {
        let req = mpb::VolumeLeaseRequest {
            name: self.name.clone(),
            holder: self.holder.clone(),
            epoch: self.epoch,
            ttl_ms: 0,
        };
        self.client
            .meta()
            .call(|mut c| {
                let req = req.clone();
                async move { c.release_volume_lease(req).await }
            })
            .await?;
        Ok(())
    }

    /// The cluster map. A node that is up in it but was not in the previous one (it was down
    /// or out, or is new) may have missed writes to any extent, including while it was out of
    /// the placement groups: it is neither read nor written until a convergence includes it.
    async fn view(&self) -> Result<Arc<View>, ClientError> {
        let v = self.client.map().get().await?;
        let mut last = self.last_view.lock().expect("last view");
        match last.as_ref() {
            Some(prev) if prev.epoch < v.epoch => {
                let back: Vec<String> = v
                    .up_nodes()
                    .filter(|n| !prev.is_up(&n.id))
                    .map(|n| n.id.clone())
                    .collect();
                if !back.is_empty() {
                    tracing::info!(volume = %self.name, nodes = ?back, "nodes back up: not used until compared");
                    self.unknown.lock().expect("unknown").extend(back);
                }
                *last = Some(v.clone());
            }
            Some(_) => {}
            None => *last = Some(v.clone()),
        }
        Ok(v)
    }

    /// The members of an extent's PG (node id, address), in placement order.
    fn members(
        &self,
        view: &View,
        volume_id: &str,
        index: u64,
    ) -> Result<(Vec<String>, usize), ClientError> {
        let pool = view
            .pools
            .get(&self.pool)
            .ok_or_else(|| ClientError::Invalid(format!("no pool {} in the map", self.pool)))?;
        let Redundancy::Replicated { size } = pool.redundancy else {
            return Err(ClientError::Invalid(format!(
                "pool {} is not replicated",
                self.pool
            )));
        };
        let pg = placement::pg_of(extent_pid(volume_id, index).as_bytes(), pool.pg_count);
        let members: Vec<String> = view
            .slots(pool.id, &pool.redundancy, pg)
            .into_iter()
            .flatten()
            .collect();
        let min = (size as usize).saturating_sub(1).max(1);
        Ok((members, min))
    }

    fn live(&self, view: &View, node: &str) -> bool {
        view.is_up(node) && !self.client.nodes().is_suspect(node)
    }

    fn addr<'a>(view: &'a View, node: &str) -> Result<&'a str, ClientError> {
        view.addr(node)
            .ok_or_else(|| ClientError::Internal(format!("node {node} has no address")))
    }

    async fn fence_all(&self) -> Result<(), ClientError> {
        let view = self.view().await?;
        let calls = view.up_nodes().map(|n| {
            let req = pb::FenceVolumeRequest {
                volume_id: self.id.clone(),
                lease_epoch: self.epoch,
            };
            let nodes = self.client.nodes();
            async move {
                let mut c = nodes.extents(&n.addr)?;
                nodes
                    .with_deadline(0, "fence", async move { c.fence_volume(req).await })
                    .await
            }
        });
        for r in join_all(calls).await {
            if let Err(s) = r {
                if s.code() == Code::FailedPrecondition {
                    self.lost.store(true, Ordering::Relaxed);
                    return Err(ClientError::Meta(s));
                }
                // Not fatal: the node may be down; converge() leaves unanswering nodes unread
                // and unwritten until a later convergence includes them.
                tracing::warn!(error = %s, "a node was not fenced");
            }
        }
        Ok(())
    }

    /// Makes every extent's replicas agree (newest version of each sector wins) before I/O.
    pub async fn converge(&self) -> Result<usize, ClientError> {
        let view = self.view().await?;
        let mut digests: BTreeMap<u64, HashMap<String, Bytes>> = BTreeMap::new();
        let mut unknown: HashSet<String> = view
            .nodes
            .values()
            .filter(|n| !view.is_up(&n.id))
            .map(|n| n.id.clone())
            .collect();
        let mut listed: HashSet<String> = HashSet::new();
        for n in view.up_nodes() {
            let req = pb::ListExtentsRequest {
                volume_id: self.id.clone(),
            };
            let nodes = self.client.nodes();
            let mut c = nodes.extents(&n.addr)?;
            match nodes
                .with_deadline(0, "list extents", async move { c.list_extents(req).await })
                .await
            {
                Ok(r) => {
                    listed.insert(n.id.clone());
                    for s in r.into_inner().extents {
                        if let Some(a) = s.extent {
                            digests
                                .entry(a.index)
                                .or_default()
                                .insert(n.id.clone(), s.digest);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %n.id, error = %e, "listing extents failed");
                    unknown.insert(n.id.clone());
                }
            }
        }
        *self.holders.lock().expect("holders") = digests
            .iter()
            .map(|(i, held)| (*i, held.keys().cloned().collect()))
            .collect();
        let mut synced = 0;
        for (index, held) in digests {
            self.present.lock().expect("present").insert(index);
            let (members, _) = self.members(&view, &self.id, index)?;
            let live: Vec<&String> = members.iter().filter(|m| view.is_up(m)).collect();
            let first = held.values().next().cloned();
            let same = live.iter().all(|m| held.get(*m) == first.as_ref());
            if !same {
                if let Err(e) = self.sync_extent(&view, index).await {
                    // Until a convergence completes, these nodes stay unread.
                    self.unknown.lock().expect("unknown").extend(unknown);
                    return Err(e);
                }
                synced += 1;
            }
        }
        {
            // Compared now: the listed nodes. Nodes that came up meanwhile stay unknown.
            let mut u = self.unknown.lock().expect("unknown");
            u.retain(|n| !listed.contains(n));
            u.extend(unknown);
        }
        if synced > 0 {
            tracing::info!(volume = %self.name, extents = synced, "replicas converged");
        }
        Ok(synced)
    }

    /// Brings every live member of an extent to the newest version of each sector (and the
    /// snapshot copies it lacks). Clears the extent's stale marks for members it reached.
    pub async fn sync_extent(&self, view: &View, index: u64) -> Result<(), ClientError> {
        let (members, _) = self.members(view, &self.id, index)?;
        // Marks made after this point (a write failing during the sync) must survive it.
        let generation = self.marks.load(Ordering::SeqCst);
        let mut states = Vec::new();
        for m in members.iter().filter(|m| view.is_up(m)) {
            match self
                .read_member(view, m, &self.id, index, 0, SECTORS, 0, false)
                .await
            {
                Ok(r) => states.push((m.clone(), r)),
                Err(e) => tracing::warn!(node = %m, error = %e, "extent sync: read failed"),
            }
        }
        // Sources: the members, and nodes outside the placement group that held the extent when
        // the volume was opened (its members changed since it was written).
        let mut sources = states.clone();
        let holders: Vec<String> = self
            .holders
            .lock()
            .expect("holders")
            .get(&index)
            .map(|h| {
                h.iter()
                    .filter(|n| !members.contains(*n) && view.is_up(n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for n in holders {
            match self
                .read_member(view, &n, &self.id, index, 0, SECTORS, 0, false)
                .await
            {
                Ok(r) => sources.push((n, r)),
                Err(e) => tracing::warn!(node = %n, error = %e, "extent sync: read failed"),
            }
        }
        let Some(_) = sources.iter().find(|(_, r)| r.exists) else {
            return Ok(());
        };
        // Snapshot copies first: a member that missed the write that made a copy lacks it.
        let mut all_copies: Vec<(u64, String)> = Vec::new();
        for (m, r) in &sources {
            for t in &r.snap_copies {
                if !all_copies.iter().any(|(x, _)| x == t) {
                    all_copies.push((*t, m.clone()));
                }
            }
        }
        for (tag, holder) in &all_copies {
            for (m, r) in &states {
                if r.snap_copies.contains(tag) {
                    continue;
                }
                let src = self
                    .read_member(view, holder, &self.id, index, 0, SECTORS, *tag, false)
                    .await?;
                let req = pb::PutSnapCopyRequest {
                    extent: Some(pb::ExtentAddr {
                        volume_id: self.id.clone(),
                        index,
                    }),
                    tag: *tag,
                    born: src.born,
                    data: src.data.clone(),
                    tags: src.tags.clone(),
                    versions: src.versions.clone(),
                    zero: src.zero.clone(),
                };
                let nodes = self.client.nodes();
                let mut c = nodes.extents(Self::addr(view, m)?)?;
                nodes
                    .with_deadline(EXTENT, "put snapshot copy", async move {
                        c.put_snap_copy(req).await
                    })
                    .await?;
            }
        }
        // Then the head: per sector, the newest version any source has.
        let born = sources
            .iter()
            .filter(|(_, r)| r.exists)
            .map(|(_, r)| r.born)
            .min();
        let last_snap = sources.iter().map(|(_, r)| r.last_snap).max().unwrap_or(0);
        let mut best: Vec<Option<usize>> = vec![None; SECTORS];
        for (i, b) in best.iter_mut().enumerate() {
            let mut top = (0u32, 0u64);
            for (k, (_, r)) in sources.iter().enumerate() {
                let v = r
                    .versions
                    .get(i)
                    .map(|v| (v.epoch, v.seq))
                    .unwrap_or((0, 0));
                if v > top {
                    top = v;
                    *b = Some(k);
                }
            }
        }
        for (m, r) in &states {
            let mut sectors = Vec::new();
            for (i, b) in best.iter().enumerate() {
                let Some(k) = b else { continue };
                let theirs = &sources[*k].1;
                let mine = r
                    .versions
                    .get(i)
                    .map(|v| (v.epoch, v.seq))
                    .unwrap_or((0, 0));
                let top = (theirs.versions[i].epoch, theirs.versions[i].seq);
                if top > mine {
                    sectors.push((i, *k));
                }
            }
            // Runs of sectors, each written as one repair request.
            let mut j = 0;
            while j < sectors.len() {
                let start = j;
                while j + 1 < sectors.len() && sectors[j + 1].0 == sectors[j].0 + 1 {
                    j += 1;
                }
                let run = &sectors[start..=j];
                j += 1;
                let mut data = BytesMut::with_capacity(run.len() * SECTOR);
                let mut tags = BytesMut::with_capacity(run.len() * TAG);
                let mut versions = Vec::new();
                let mut zeros = Vec::new();
                for (i, k) in run {
                    let src = &sources[*k].1;
                    data.extend_from_slice(&src.data[i * SECTOR..(i + 1) * SECTOR]);
                    tags.extend_from_slice(&src.tags[i * TAG..(i + 1) * TAG]);
                    versions.push(src.versions[*i]);
                    zeros.push(src.zero.get(*i).copied().unwrap_or(false));
                }
                let req = pb::WriteExtentRequest {
                    extent: Some(pb::ExtentAddr {
                        volume_id: self.id.clone(),
                        index,
                    }),
                    snap_seq: last_snap,
                    born: born.unwrap_or(0),
                    first_sector: run[0].0 as u32,
                    count: run.len() as u32,
                    data: data.freeze(),
                    tags: tags.freeze(),
                    repair: true,
                    versions,
                    zeros,
                    fua: true,
                    ..Default::default()
                };
                let nodes = self.client.nodes();
                let mut c = nodes.extents(Self::addr(view, m)?)?;
                nodes
                    .with_deadline(
                        EXTENT,
                        "repair write",
                        async move { c.write_extent(req).await },
                    )
                    .await?;
            }
        }
        let mut stale = self.stale.lock().expect("stale");
        if let Some(s) = stale.get_mut(&index) {
            for (m, _) in &states {
                if s.get(m).is_some_and(|g| *g <= generation) {
                    s.remove(m);
                }
            }
            if s.is_empty() {
                stale.remove(&index);
            }
        }
        Ok(())
    }

    /// Repairs the extents whose replicas missed writes, where the member is back.
    pub async fn repair_stale(&self) -> Result<usize, ClientError> {
        let view = self.view().await?;
        let back = self
            .unknown
            .lock()
            .expect("unknown")
            .iter()
            .any(|n| view.is_up(n));
        if back {
            // A node absent at open is back: compare everything again, with it.
            let n = self.converge().await?;
            return Ok(n);
        }
        let todo: Vec<u64> = {
            let stale = self.stale.lock().expect("stale");
            stale
                .iter()
                .filter(|(_, ms)| ms.keys().any(|m| view.is_up(m)))
                .map(|(i, _)| *i)
                .collect()
        };
        let mut n = 0;
        for index in todo {
            let g = self.lock(index).await;
            self.sync_extent(&view, index).await?;
            drop(g);
            n += 1;
        }
        Ok(n)
    }

    /// Extents with a member known to lack writes, plus nodes not yet compared since open.
    pub fn stale_extents(&self) -> usize {
        self.stale.lock().expect("stale").len() + self.unknown.lock().expect("unknown").len()
    }

    async fn lock(&self, index: u64) -> tokio::sync::MutexGuard<'_, ()> {
        self.locks[(index % self.locks.len() as u64) as usize]
            .lock()
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn read_member(
        &self,
        view: &View,
        node: &str,
        volume_id: &str,
        index: u64,
        first: usize,
        count: usize,
        snap_id: u64,
        versions_only: bool,
    ) -> Result<pb::ReadExtentResponse, ClientError> {
        let req = pb::ReadExtentRequest {
            extent: Some(pb::ExtentAddr {
                volume_id: volume_id.to_string(),
                index,
            }),
            first_sector: first as u32,
            count: count as u32,
            snap_id,
            versions_only,
        };
        let nodes = self.client.nodes();
        let mut c = nodes.extents(Self::addr(view, node)?)?;
        let r = nodes
            .with_deadline((count * SECTOR) as u64, "read extent", async move {
                c.read_extent(req).await
            })
            .await;
        match r {
            Ok(r) => {
                nodes.clear(node);
                Ok(r.into_inner())
            }
            Err(s) => {
                if !matches!(s.code(), Code::InvalidArgument | Code::DataLoss) {
                    nodes.suspect(node);
                }
                Err(s.into())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// Reads sectors `first..first+count` of one layer (this volume or a parent at its
    /// snapshot): per sector, the newest verified version among the members. None when no
    /// member has the extent.
    async fn read_layer(
        &self,
        view: &View,
        volume_id: &str,
        keys: &Keys,
        snap_id: u64,
        index: u64,
        first: usize,
        count: usize,
    ) -> Result<Option<Vec<Bytes>>, ClientError> {
        let (members, _) = self.members(view, volume_id, index)?;
        let stale: HashSet<String> = if volume_id == self.id {
            let mut s = self
                .stale
                .lock()
                .expect("stale")
                .get(&index)
                .map(|m| m.keys().cloned().collect::<HashSet<String>>())
                .unwrap_or_default();
            s.extend(self.unknown.lock().expect("unknown").iter().cloned());
            s
        } else {
            HashSet::new()
        };
        let mut order: Vec<&String> = members
            .iter()
            .filter(|m| self.live(view, m) && !stale.contains(*m))
            .collect();
        // Members that just failed are tried last, not never.
        order.extend(
            members
                .iter()
                .filter(|m| view.is_up(m) && !stale.contains(*m) && !self.live(view, m)),
        );
        let mut out: Vec<Option<SectorRead>> = vec![None; count];
        let mut any_exists = false;
        let mut errors = Vec::new();
        let mut asked = 0;
        for m in order {
            asked += 1;
            let r = match self
                .read_member(view, m, volume_id, index, first, count, snap_id, false)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!("{m}: {e}"));
                    continue;
                }
            };
            if !r.exists {
                continue;
            }
            any_exists = true;
            if r.data.len() != count * SECTOR
                || r.tags.len() != count * TAG
                || r.versions.len() != count
            {
                errors.push(format!("{m}: short extent read"));
                continue;
            }
            #[allow(clippy::needless_range_loop)]
            for i in 0..count {
                let v = (r.versions[i].epoch, r.versions[i].seq);
                let have = out[i].as_ref().map(|s| s.version).unwrap_or((0, 0));
                if out[i].is_some() && v <= have {
                    continue;
                }
                let zero = r.zero.get(i).copied().unwrap_or(false);
                let s = SectorRead {
                    version: v,
                    data: r.data.slice(i * SECTOR..(i + 1) * SECTOR),
                    tag: r.tags.slice(i * TAG..(i + 1) * TAG),
                };
                if v == (0, 0) {
                    if out[i].is_none() {
                        out[i] = Some(s);
                    }
                    continue;
                }
                if !zero {
                    // Check the tag now: a bad copy is skipped, not returned.
                    let mut buf = s.data.to_vec();
                    let ok = keys
                        .for_epoch(u64::from(v.0))
                        .decrypt_in_place_detached(
                            Nonce::from_slice(&nonce(v.0, v.1)),
                            &aad(volume_id, index, first + i),
                            &mut buf,
                            Tag::from_slice(&s.tag),
                        )
                        .is_ok();
                    if !ok {
                        errors.push(format!("{m}: sector {} failed its check", first + i));
                        if volume_id == self.id {
                            self.mark_stale(index, m);
                        }
                        continue;
                    }
                    out[i] = Some(SectorRead {
                        data: Bytes::from(buf),
                        ..s
                    });
                } else {
                    out[i] = Some(SectorRead {
                        data: Bytes::from(vec![0u8; SECTOR]),
                        ..s
                    });
                }
            }
            // Done when every sector has a written version from this member or all members
            // were asked; unwritten sectors are confirmed by the others.
            let unsure = out
                .iter()
                .any(|s| s.as_ref().is_none_or(|s| s.version == (0, 0)));
            if !unsure {
                break;
            }
        }
        if !any_exists {
            if asked == 0 || (errors.len() == asked) {
                return Err(unavailable(format!(
                    "volume {}: extent {index} could not be read from any member: {}",
                    self.name,
                    if errors.is_empty() {
                        "no live member".to_string()
                    } else {
                        errors.join("; ")
                    }
                )));
            }
            return Ok(None);
        }
        let mut sectors = Vec::with_capacity(count);
        for (i, s) in out.into_iter().enumerate() {
            match s {
                Some(s) if s.version == (0, 0) => sectors.push(Bytes::new()),
                Some(s) => sectors.push(s.data),
                None => {
                    return Err(ClientError::DataLoss(format!(
                        "volume {}: extent {index} sector {} has no good copy: {}",
                        self.name,
                        first + i,
                        errors.join("; ")
                    )));
                }
            }
        }
        Ok(Some(sectors))
    }

    fn mark_stale(&self, index: u64, node: &str) {
        let g = self.marks.fetch_add(1, Ordering::SeqCst) + 1;
        self.stale
            .lock()
            .expect("stale")
            .entry(index)
            .or_default()
            .insert(node.to_string(), g);
    }

    /// Members not to write to or read from for this extent: stale there, or not compared
    /// since open.
    fn excluded(&self, index: u64) -> HashSet<String> {
        let mut s: HashSet<String> = self
            .stale
            .lock()
            .expect("stale")
            .get(&index)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        s.extend(self.unknown.lock().expect("unknown").iter().cloned());
        s
    }

    /// Plaintext of sectors `first..first+count` of an extent, reading through parents.
    /// Empty `Bytes` for a sector nobody wrote (zeroes).
    async fn read_sectors(
        &self,
        view: &View,
        index: u64,
        first: usize,
        count: usize,
    ) -> Result<Vec<Bytes>, ClientError> {
        if let Some(s) = self
            .read_layer(view, &self.id, &self.keys, 0, index, first, count)
            .await?
        {
            return Ok(s);
        }
        // No member has it, but other nodes did at open: the placement group moved while the
        // volume was attached. Fill the members from them, then read again.
        let elsewhere = self
            .holders
            .lock()
            .expect("holders")
            .get(&index)
            .is_some_and(|h| !h.is_empty());
        if elsewhere {
            self.sync_extent(view, index).await?;
            if let Some(s) = self
                .read_layer(view, &self.id, &self.keys, 0, index, first, count)
                .await?
            {
                return Ok(s);
            }
            // Never zeroes for data that exists somewhere.
            return Err(unavailable(format!(
                "volume {}: extent {index} is held only outside its placement group, by nodes \
                 that cannot be read now",
                self.name
            )));
        }
        for p in &self.parents {
            if let Some(s) = self
                .read_layer(view, &p.id, &p.keys, p.snap_id, index, first, count)
                .await?
            {
                return Ok(s);
            }
        }
        Ok(vec![Bytes::new(); count])
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let size = self.size();
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ClientError::Invalid(format!(
                "{len} bytes at {offset} are outside volume {} of {size} bytes",
                self.name
            )));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        self.check_range(offset, len)?;
        let view = self.view().await?;
        let mut out = BytesMut::with_capacity(len as usize);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let index = pos / EXTENT;
            let ext_end = ((index + 1) * EXTENT).min(end);
            let first = ((pos % EXTENT) as usize) / SECTOR;
            let last = ((ext_end - 1) % EXTENT) as usize / SECTOR;
            let count = last - first + 1;
            let sectors = self.read_sectors(&view, index, first, count).await?;
            let base = index * EXTENT + (first * SECTOR) as u64;
            for (i, s) in sectors.iter().enumerate() {
                let s_start = base + (i * SECTOR) as u64;
                let from = pos.max(s_start) - s_start;
                let to = ext_end.min(s_start + SECTOR as u64) - s_start;
                if from >= to {
                    continue;
                }
                if s.is_empty() {
                    out.resize(out.len() + (to - from) as usize, 0);
                } else {
                    out.extend_from_slice(&s[from as usize..to as usize]);
                }
            }
            pos = ext_end;
        }
        Ok(out.freeze())
    }

    /// A clone's first write to an extent copies the parent's sectors up first.
    async fn copy_up(&self, view: &View, index: u64) -> Result<(), ClientError> {
        if self.parents.is_empty() || self.present.lock().expect("present").contains(&index) {
            return Ok(());
        }
        if self
            .read_layer(view, &self.id, &self.keys, 0, index, 0, 1)
            .await?
            .is_none()
        {
            for p in &self.parents {
                if let Some(s) = self
                    .read_layer(view, &p.id, &p.keys, p.snap_id, index, 0, SECTORS)
                    .await?
                {
                    let mut i = 0;
                    while i < SECTORS {
                        if s[i].is_empty() {
                            i += 1;
                            continue;
                        }
                        let start = i;
                        let mut data = BytesMut::new();
                        while i < SECTORS && !s[i].is_empty() {
                            data.extend_from_slice(&s[i]);
                            i += 1;
                        }
                        self.write_sectors(
                            view,
                            index,
                            start,
                            Some(data.freeze()),
                            i - start,
                            false,
                        )
                        .await?;
                    }
                    break;
                }
            }
        }
        self.present.lock().expect("present").insert(index);
        Ok(())
    }

    /// Writes whole sectors of one extent (`data` None = zeroes) to every live member.
    async fn write_sectors(
        &self,
        view: &View,
        index: u64,
        first: usize,
        data: Option<Bytes>,
        count: usize,
        fua: bool,
    ) -> Result<(), ClientError> {
        if self.lease_lost() {
            return Err(ClientError::Meta(Status::permission_denied(format!(
                "volume {}: the writer lease (epoch {}) was lost",
                self.name, self.epoch
            ))));
        }
        let _gate = self.gate.read().await;
        let seq = self.seq.fetch_add(count as u64, Ordering::Relaxed);
        let (payload, tags) = match &data {
            Some(plain) => {
                let mut buf = plain.to_vec();
                let mut tags = BytesMut::with_capacity(count * TAG);
                for i in 0..count {
                    let t = self
                        .keys
                        .for_epoch(self.epoch)
                        .encrypt_in_place_detached(
                            Nonce::from_slice(&nonce(self.epoch as u32, seq + i as u64)),
                            &aad(&self.id, index, first + i),
                            &mut buf[i * SECTOR..(i + 1) * SECTOR],
                        )
                        .map_err(|_| ClientError::Internal("sector encryption failed".into()))?;
                    tags.extend_from_slice(&t);
                }
                (Bytes::from(buf), tags.freeze())
            }
            None => (Bytes::new(), Bytes::new()),
        };
        let (members, min) = self.members(view, &self.id, index)?;
        let req = pb::WriteExtentRequest {
            extent: Some(pb::ExtentAddr {
                volume_id: self.id.clone(),
                index,
            }),
            lease_epoch: self.epoch,
            snap_seq: self.snap_seq(),
            first_sector: first as u32,
            count: count as u32,
            seq,
            data: payload,
            tags,
            zero: data.is_none(),
            fua,
            map_epoch: view.epoch,
            ..Default::default()
        };
        let mut skipped = Vec::new();
        let mut calls = Vec::new();
        // A member that missed writes is brought up to date by repair, not by new writes
        // (it would otherwise preserve its stale content in a snapshot copy).
        let excluded = self.excluded(index);
        for m in &members {
            if !self.live(view, m) || excluded.contains(m) {
                skipped.push(m.clone());
                continue;
            }
            let nodes = self.client.nodes();
            let addr = Self::addr(view, m)?.to_string();
            let req = req.clone();
            let node = m.clone();
            calls.push(async move {
                let mut first_try = true;
                loop {
                    let mut c = match nodes.extents(&addr) {
                        Ok(c) => c,
                        Err(s) => return Err((node, s)),
                    };
                    let req = req.clone();
                    let r = nodes
                        .with_deadline((count * SECTOR) as u64, "write extent", async move {
                            c.write_extent(req).await
                        })
                        .await;
                    match &r {
                        Ok(_) => nodes.clear(&node),
                        // The connection broke under the call (a reset, a restart): once more
                        // on a new one. The write carries its version, so a repeat is harmless.
                        Err(s) if first_try && connection_broke(s) => {
                            first_try = false;
                            continue;
                        }
                        Err(s) if s.code() != Code::FailedPrecondition => nodes.suspect(&node),
                        Err(_) => {}
                    }
                    return r.map(|_| node.clone()).map_err(|s| (node, s));
                }
            });
        }
        let mut ok = 0;
        let mut errors = Vec::new();
        for r in join_all(calls).await {
            match r {
                Ok(node) => {
                    ok += 1;
                    if !fua {
                        self.unflushed
                            .lock()
                            .expect("unflushed")
                            .entry(node)
                            .or_default()
                            .insert(index);
                    }
                }
                Err((node, s)) => {
                    if s.code() == Code::FailedPrecondition && s.message().starts_with("fenced") {
                        self.lost.store(true, Ordering::Relaxed);
                        return Err(ClientError::Meta(Status::permission_denied(format!(
                            "volume {}: {}",
                            self.name,
                            s.message()
                        ))));
                    }
                    errors.push(format!("{node}: {}", s.message()));
                    skipped.push(node);
                }
            }
        }
        for m in &skipped {
            self.mark_stale(index, m);
        }
        if ok < min {
            return Err(unavailable(format!(
                "volume {}: extent {index} reached {ok} of {} members, at least {min} needed ({})",
                self.name,
                members.len(),
                errors.join("; ")
            )));
        }
        self.present.lock().expect("present").insert(index);
        Ok(())
    }

    /// Writes `data` at `offset` (any alignment: partial sectors are read, changed and
    /// written back). With `fua`, durable on every member that took it before returning.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        self.write_or_zero(offset, data.len() as u64, Some(data), fua)
            .await
    }

    /// Zeroes `len` bytes at `offset`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        self.write_or_zero(offset, len, None, fua).await
    }

    async fn write_or_zero(
        &self,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.check_range(offset, len)?;
        let view = self.view().await?;
        let end = offset + len;
        let mut pos = offset;
        let mut tasks = Vec::new();
        while pos < end {
            let index = pos / EXTENT;
            let ext_end = ((index + 1) * EXTENT).min(end);
            let chunk = data
                .as_ref()
                .map(|d| d.slice((pos - offset) as usize..(ext_end - offset) as usize));
            tasks.push(self.write_in_extent(&view, index, pos, ext_end, chunk, fua));
            pos = ext_end;
        }
        for r in join_all(tasks).await {
            r?;
        }
        Ok(())
    }

    async fn write_in_extent(
        &self,
        view: &View,
        index: u64,
        start: u64,
        end: u64,
        data: Option<Bytes>,
        fua: bool,
    ) -> Result<(), ClientError> {
        let base = index * EXTENT;
        let aligned = start.is_multiple_of(SECTOR as u64) && end.is_multiple_of(SECTOR as u64);
        let needs_lock = !aligned
            || (!self.parents.is_empty()
                && !self.present.lock().expect("present").contains(&index));
        let _g = if needs_lock {
            Some(self.lock(index).await)
        } else {
            None
        };
        self.copy_up(view, index).await?;
        let first = ((start - base) as usize) / SECTOR;
        let last = ((end - 1 - base) as usize) / SECTOR;
        let count = last - first + 1;
        if aligned {
            return self
                .write_sectors(view, index, first, data, count, fua)
                .await;
        }
        // Read-modify-write of the partial sectors at either end.
        let old = self.read_sectors(view, index, first, count).await?;
        let mut buf = BytesMut::with_capacity(count * SECTOR);
        for s in &old {
            if s.is_empty() {
                buf.resize(buf.len() + SECTOR, 0);
            } else {
                buf.extend_from_slice(s);
            }
        }
        let at = (start - base) as usize - first * SECTOR;
        let n = (end - start) as usize;
        match &data {
            Some(d) => buf[at..at + n].copy_from_slice(d),
            None => buf[at..at + n].fill(0),
        }
        self.write_sectors(view, index, first, Some(buf.freeze()), count, fua)
            .await
    }

    /// Discards a range: it reads back as zeroes.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.write_zeroes(offset, len, false).await
    }

    /// Makes every acknowledged write durable on every node that took it.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let todo: Vec<(String, HashSet<u64>)> =
            self.unflushed.lock().expect("unflushed").drain().collect();
        if todo.is_empty() {
            return Ok(());
        }
        let view = self.view().await?;
        let calls = todo.iter().map(|(n, _)| {
            let nodes = self.client.nodes();
            let addr = view.addr(n).map(str::to_string);
            let req = pb::FlushVolumeRequest {
                volume_id: self.id.clone(),
            };
            async move {
                let addr = addr.ok_or_else(|| Status::not_found("node left the map"))?;
                let mut c = nodes.extents(&addr)?;
                let r = nodes
                    .with_deadline(0, "flush", c.flush_volume(req.clone()))
                    .await;
                match r {
                    Err(s) if connection_broke(&s) => {
                        nodes.with_deadline(0, "flush", c.flush_volume(req)).await
                    }
                    r => r,
                }
            }
        });
        let results = join_all(calls).await;
        // A node that failed the flush (down, stalled, restarting) may have lost what it took
        // since the last one: its copies of those extents are marked stale, neither read nor
        // written until repair brings them up to date from the others. The flush succeeds when
        // every such extent is durable on at least as many other members as a write needs.
        let mut flushed: HashMap<u64, usize> = HashMap::new();
        let mut writers: HashMap<u64, usize> = HashMap::new();
        for ((_, extents), r) in todo.iter().zip(&results) {
            for e in extents {
                *writers.entry(*e).or_default() += 1;
                if r.is_ok() {
                    *flushed.entry(*e).or_default() += 1;
                }
            }
        }
        let mut failed = Vec::new();
        for ((n, extents), r) in todo.into_iter().zip(results) {
            let Err(s) = r else { continue };
            self.client.nodes().suspect(&n);
            let mut short = Vec::new();
            for e in extents {
                self.mark_stale(e, &n);
                let min = match self.members(&view, &self.id, e) {
                    Ok((_, min)) => min,
                    Err(_) => 1,
                };
                let need = min.min(writers.get(&e).copied().unwrap_or(0)).max(1);
                if flushed.get(&e).copied().unwrap_or(0) < need {
                    short.push(e);
                }
            }
            if !short.is_empty() {
                failed.push(format!(
                    "{n}: {} (extents {short:?} not durable on enough members)",
                    s.message()
                ));
                if view.is_up(&n) {
                    self.unflushed
                        .lock()
                        .expect("unflushed")
                        .entry(n)
                        .or_default()
                        .extend(short);
                }
            }
        }
        if !failed.is_empty() {
            return Err(unavailable(format!(
                "volume {}: flush failed on {}",
                self.name,
                failed.join("; ")
            )));
        }
        Ok(())
    }
}

/// A call failed because its connection broke (reset, closed, refused), not because the node
/// answered: worth one more try on a new connection.
fn connection_broke(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// The highest snapshot id still alive (writes carry it so storaged preserves what changes).
pub fn max_live_snap(v: &mpb::Volume) -> u64 {
    v.snapshots.iter().map(|s| s.id).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sector_opens_with_the_key_of_its_epoch() {
        let k = |b: u8| Aes256Gcm::new_from_slice(&[b; 32]).unwrap();
        let keys = Keys::new(vec![(5, k(2)), (0, k(1)), (9, k(3))]);
        let seal = |key: &Aes256Gcm| {
            let mut buf = [7u8; 16];
            key.encrypt_in_place_detached(Nonce::from_slice(&[0; 12]), b"", &mut buf)
                .unwrap()
        };
        assert_eq!(seal(keys.for_epoch(1)), seal(&k(1)));
        assert_eq!(seal(keys.for_epoch(4)), seal(&k(1)));
        assert_eq!(seal(keys.for_epoch(5)), seal(&k(2)));
        assert_eq!(seal(keys.for_epoch(8)), seal(&k(2)));
        assert_eq!(seal(keys.for_epoch(9)), seal(&k(3)));
        assert_eq!(seal(keys.for_epoch(1000)), seal(&k(3)));
    }

    #[test]
    fn nonces_never_repeat_across_epochs_and_sequences() {
        let mut seen = HashSet::new();
        for epoch in 1..4u32 {
            for seq in 0..1000u64 {
                assert!(seen.insert(nonce(epoch, seq)));
            }
        }
        assert_ne!(aad("ab", 1, 2), aad("ab", 2, 1));
    }
}
