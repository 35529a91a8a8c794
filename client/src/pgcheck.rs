//! A full audit of every placement group: lists every up storage node, and for each live
//! chunk counts the copies or shards missing from their position and those held where they do
//! not belong; for each volume, the extents whose members do not all hold the same sector
//! versions. What `sov repair status --deep` and the data-path tests use to say "redundancy
//! is full and nothing is stored twice".

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use sov_common::layout::ChunkId;
use sov_common::placement::Redundancy;

use crate::error::ClientError;
use crate::object::Client;

/// One pool's audit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolCheck {
    pub pool: String,
    pub redundancy: String,
    pub pgs: u32,
    /// PGs with every piece in place and no strays.
    pub clean_pgs: u32,
    /// PGs whose set is shorter than the profile (too few eligible nodes).
    pub undersized_pgs: u32,
    /// Live chunks (each counted once, whatever its copies or shards).
    pub chunks: u64,
    /// Copies or shards missing from the node that should hold them.
    pub missing: u64,
    /// Copies or shards on a node that should not hold them.
    pub strays: u64,
    /// Chunks with fewer readable pieces than a read needs.
    pub unreadable: u64,
    /// Chunks of deleted versions not yet freed.
    pub tombstoned: u64,
}

/// One volume's audit: its extents against the members of their placement groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeCheck {
    pub volume: String,
    /// Extents held by at least one node.
    pub extents: u64,
    /// Extents a member lacks, or whose members differ (sector versions or snapshot copies):
    /// the exporter's repair has not brought them together yet.
    pub diverged: u64,
}

/// The audit of the whole cluster at one epoch.
#[derive(Debug, Clone, Default)]
pub struct Check {
    pub epoch: u64,
    pub pools: Vec<PoolCheck>,
    pub volumes: Vec<VolumeCheck>,
    /// Up nodes that could not be listed (their pieces count as missing).
    pub unreachable: Vec<String>,
}

impl Check {
    /// Every piece in place, no strays, every volume extent the same on its members, every
    /// node listed.
    pub fn clean(&self) -> bool {
        self.unreachable.is_empty()
            && self
                .pools
                .iter()
                .all(|p| p.missing == 0 && p.strays == 0 && p.unreadable == 0)
            && self.volumes.iter().all(|v| v.diverged == 0)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<16} {:<16} {:>5} {:>6} {:>10} {:>8} {:>8} {:>7} {:>10} {:>10}",
            "POOL",
            "REDUNDANCY",
            "PGS",
            "CLEAN",
            "UNDERSIZED",
            "CHUNKS",
            "MISSING",
            "STRAYS",
            "UNREADABLE",
            "TOMBSTONED"
        )?;
        for p in &self.pools {
            writeln!(
                f,
                "{:<16} {:<16} {:>5} {:>6} {:>10} {:>8} {:>8} {:>7} {:>10} {:>10}",
                p.pool,
                p.redundancy,
                p.pgs,
                p.clean_pgs,
                p.undersized_pgs,
                p.chunks,
                p.missing,
                p.strays,
                p.unreadable,
                p.tombstoned
            )?;
        }
        for v in &self.volumes {
            writeln!(
                f,
                "volume {}: {} extents, {} diverged",
                v.volume, v.extents, v.diverged
            )?;
        }
        for n in &self.unreachable {
            writeln!(f, "unreachable: {n}")?;
        }
        write!(
            f,
            "epoch {}: {}",
            self.epoch,
            if self.clean() { "clean" } else { "not clean" }
        )
    }
}

/// Every `(pool id, uid hex)` with a tombstone.
pub async fn tombstoned(client: &Client) -> Result<HashSet<(u64, String)>, ClientError> {
    let mut out = HashSet::new();
    for t in client.meta().all_tombstones().await? {
        if let Some((pool, uid)) = t.id.split_once('/')
            && let Ok(pool) = u64::from_str_radix(pool, 16)
        {
            out.insert((pool, uid.to_string()));
        }
    }
    Ok(out)
}

/// Audits every PG of every pool against a fresh map.
pub async fn check(client: &Client) -> Result<Check, ClientError> {
    let view = client.map().refresh(0).await?;
    let tombs = tombstoned(client).await?;
    // pool id -> base id -> shard (None = replica) -> holders
    type Holders = BTreeMap<String, BTreeMap<Option<u8>, BTreeSet<String>>>;
    let mut held: BTreeMap<u64, Holders> = BTreeMap::new();
    let mut unreachable = Vec::new();
    let nodes = client.nodes();
    let lists = futures::future::join_all(view.up_nodes().map(|n| {
        let pools: Vec<u64> = view.pools.values().map(|p| p.id).collect();
        let (id, addr) = (n.id.clone(), n.addr.clone());
        async move {
            let mut all = Vec::new();
            for p in pools {
                match nodes.list_all(&addr, &format!("o1/{p:016x}/")).await {
                    Ok(l) => all.extend(l.into_iter().map(|e| e.id)),
                    Err(e) => return (id, Err(e)),
                }
            }
            (id, Ok(all))
        }
    }))
    .await;
    for (node, r) in lists {
        match r {
            Ok(ids) => {
                for id in ids {
                    let Ok(c) = ChunkId::parse(&id) else { continue };
                    held.entry(c.pool)
                        .or_default()
                        .entry(ChunkId { shard: None, ..c }.base())
                        .or_default()
                        .entry(c.shard)
                        .or_default()
                        .insert(node.clone());
                }
            }
            Err(e) => unreachable.push(format!("{node}: {}", e.message())),
        }
    }
    let mut pools = Vec::new();
    for p in view.pools.values() {
        let r = p.redundancy;
        let mut pc = PoolCheck {
            pool: p.name.clone(),
            redundancy: r.to_string(),
            pgs: p.pg_count,
            ..Default::default()
        };
        let mut dirty_pgs = BTreeSet::new();
        let slots_of: Vec<Vec<Option<String>>> =
            (0..p.pg_count).map(|pg| view.slots(p.id, &r, pg)).collect();
        for s in &slots_of {
            if s.iter().any(Option::is_none) {
                pc.undersized_pgs += 1;
            }
        }
        let empty = Holders::new();
        for (base, pieces) in held.get(&p.id).unwrap_or(&empty) {
            let Ok(c) = ChunkId::parse(base) else {
                continue;
            };
            if tombs.contains(&(p.id, c.uid.to_string())) {
                pc.tombstoned += 1;
                continue;
            }
            pc.chunks += 1;
            let Some(slots) = slots_of.get(c.pg as usize) else {
                continue;
            };
            let before = (pc.missing, pc.strays);
            match r {
                Redundancy::Replicated { .. } => {
                    let want: BTreeSet<&String> = slots.iter().flatten().collect();
                    let none = BTreeSet::new();
                    let have = pieces.get(&None).unwrap_or(&none);
                    pc.missing += want.iter().filter(|n| !have.contains(n.as_str())).count() as u64;
                    pc.strays += have.iter().filter(|n| !want.contains(n)).count() as u64;
                    if have.is_empty() {
                        pc.unreadable += 1;
                    }
                }
                Redundancy::Ec { k, .. } => {
                    let mut readable = 0;
                    for (s, slot) in slots.iter().enumerate() {
                        let none = BTreeSet::new();
                        let have = pieces.get(&Some(s as u8)).unwrap_or(&none);
                        if !have.is_empty() {
                            readable += 1;
                        }
                        match slot {
                            Some(n) if have.contains(n) => {
                                pc.strays += have.len() as u64 - 1;
                            }
                            Some(_) => {
                                pc.missing += 1;
                                pc.strays += have.len() as u64;
                            }
                            None => pc.strays += have.len() as u64,
                        }
                    }
                    if readable < usize::from(k) {
                        pc.unreadable += 1;
                    }
                }
            }
            if (pc.missing, pc.strays) != before {
                dirty_pgs.insert(c.pg);
            }
        }
        pc.clean_pgs = p.pg_count - dirty_pgs.len() as u32;
        pools.push(pc);
    }
    let volumes = volumes(client, &view, &mut unreachable).await?;
    Ok(Check {
        epoch: view.epoch,
        pools,
        volumes,
        unreachable,
    })
}

/// Every volume's extents, listed on every up node with their digests (sector versions and
/// snapshot copies), compared across the members of each extent's placement group.
async fn volumes(
    client: &Client,
    view: &crate::map::View,
    unreachable: &mut Vec<String>,
) -> Result<Vec<VolumeCheck>, ClientError> {
    use sov_proto::metad as mpb;
    use sov_proto::storaged as pb;
    let vols = client
        .meta()
        .call(|mut c| async move {
            c.list_volumes(mpb::ListVolumesRequest { consistency: 0 })
                .await
        })
        .await?
        .volumes;
    let nodes = client.nodes();
    let mut out = Vec::new();
    for v in vols {
        let Some(pool) = view.pools.get(&v.pool) else {
            continue;
        };
        let lists = futures::future::join_all(view.up_nodes().map(|n| {
            let (id, addr, vid) = (n.id.clone(), n.addr.clone(), v.id.clone());
            async move {
                let r = match nodes.extents(&addr) {
                    Ok(mut c) => c
                        .list_extents(pb::ListExtentsRequest { volume_id: vid })
                        .await
                        .map(|r| r.into_inner().extents),
                    Err(s) => Err(s),
                };
                (id, r)
            }
        }))
        .await;
        // extent index -> node -> digest
        let mut held: BTreeMap<u64, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
        for (node, r) in lists {
            match r {
                Ok(extents) => {
                    for e in extents {
                        let Some(addr) = e.extent else { continue };
                        held.entry(addr.index)
                            .or_default()
                            .insert(node.clone(), e.digest.to_vec());
                    }
                }
                Err(s) => {
                    let line = format!("{node}: {}", s.message());
                    if !unreachable.contains(&line) {
                        unreachable.push(line);
                    }
                }
            }
        }
        let mut vc = VolumeCheck {
            volume: v.name.clone(),
            ..Default::default()
        };
        for (index, holders) in &held {
            vc.extents += 1;
            let pg = sov_common::placement::pg_of(
                crate::volume::extent_pid(&v.id, *index).as_bytes(),
                pool.pg_count,
            );
            let members: Vec<String> = view
                .slots(pool.id, &pool.redundancy, pg)
                .into_iter()
                .flatten()
                .collect();
            let digests: BTreeSet<Option<&Vec<u8>>> =
                members.iter().map(|m| holders.get(m)).collect();
            if digests.len() != 1 || digests.contains(&None) {
                vc.diverged += 1;
            }
        }
        out.push(vc);
    }
    Ok(out)
}
