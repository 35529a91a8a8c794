//! Block volumes in the index: one record per volume (`vol/<name>`) holding its size, pool,
//! QoS, snapshots, clone parent, writer lease and attachment. Every change is a
//! read-modify-write of that record checked against its previous value, so concurrent callers
//! cannot lose each other's changes. Deleting a volume (or a snapshot) writes a tombstone that
//! every storage node acts on, as deleted objects do.

use prost::Message;
use sov_proto::metad::*;
use tonic::Status;

use crate::core::unix_ms;
use crate::service::{MetadService, RMW_TRIES, decode};
use crate::store::{Check, Op};
use crate::tables;

/// Volumes are made of 4 KiB sectors.
pub const SECTOR: u64 = 4096;
/// Largest volume: 64 TiB.
pub const MAX_VOLUME: u64 = 64 << 40;
/// Default lease time.
const DEFAULT_TTL_MS: u64 = 10_000;

pub const STATES: [&str; 7] = [
    "creating",
    "available",
    "attaching",
    "in-use",
    "detaching",
    "deleting",
    "error",
];

/// The attach state machine (Cinder's, without migration): which steps `SetVolumeState` takes.
fn transition_allowed(from: &str, to: &str) -> bool {
    matches!(
        (from, to),
        ("available", "attaching")
            | ("attaching", "in-use")
            | ("attaching", "available")
            | ("attaching", "error")
            | ("in-use", "detaching")
            | ("in-use", "in-use")
            | ("in-use", "error")
            | ("detaching", "available")
            | ("detaching", "error")
            | ("error", "available")
    )
}

/// QoS defaults per tier: (IOPS, bytes per second).
pub fn tier_qos(tier: &str) -> Option<VolumeQos> {
    let (iops, mib) = match tier {
        "performance" => (50_000, 1024),
        "standard" => (10_000, 400),
        "hdd" => (1_000, 150),
        "archive" => (200, 50),
        _ => return None,
    };
    Some(VolumeQos {
        iops,
        bytes_per_sec: mib << 20,
    })
}

fn no_such_volume(name: &str) -> Status {
    Status::not_found(format!("no such volume: {name}"))
}

fn check_size(size: u64) -> Result<(), Status> {
    if size == 0 || !size.is_multiple_of(SECTOR) || size > MAX_VOLUME {
        return Err(Status::invalid_argument(format!(
            "volume size must be a non-zero multiple of 4096 bytes up to 64 TiB, got {size}"
        )));
    }
    Ok(())
}

fn volume_tombstone(
    svc: &MetadService,
    v: &Volume,
    snap_upto: u64,
    live_snaps: Vec<u64>,
) -> Result<Op, Status> {
    let pending = svc.registered_nodes()?;
    let now = unix_ms();
    let id = format!("vol/{}/{snap_upto:016x}-{now:x}", v.id);
    let t = Tombstone {
        id: id.clone(),
        not_before_unix_ms: now + svc.core.cfg.nodes.delete_grace.0.as_millis() as u64,
        pending,
        created_unix_ms: now,
        volume_id: v.id.clone(),
        snap_upto,
        live_snaps,
        ..Default::default()
    };
    Ok(Op::Put {
        key: tables::tomb_key(&id),
        value: t.encode_to_vec(),
    })
}

impl MetadService {
    fn read_volume(&self, name: &str) -> Result<Option<(Vec<u8>, Volume)>, Status> {
        match self.get(&tables::volume_key(name))? {
            Some(raw) => {
                let v = decode("volume", &raw)?;
                Ok(Some((raw, v)))
            }
            None => Ok(None),
        }
    }

    /// Reads the volume, lets `change` edit it, and writes it back if nobody changed it in
    /// between (else tries again).
    async fn update_volume(
        &self,
        name: &str,
        change: impl Fn(&mut Volume) -> Result<(), Status>,
    ) -> Result<Volume, Status> {
        self.update_volume_with(name, |v| change(v).map(|()| Vec::new()))
            .await
    }

    /// Like [`Self::update_volume`], with more writes (returned by `change`) in the same
    /// transaction.
    async fn update_volume_with(
        &self,
        name: &str,
        change: impl Fn(&mut Volume) -> Result<Vec<Op>, Status>,
    ) -> Result<Volume, Status> {
        tables::validate_name("volume name", name).map_err(Status::invalid_argument)?;
        let mut confirmed = false;
        for _ in 0..RMW_TRIES {
            let Some((raw, mut v)) = self.read_volume(name)? else {
                if !confirmed {
                    self.core.linearize().await?;
                    confirmed = true;
                    continue;
                }
                return Err(no_such_volume(name));
            };
            let more = change(&mut v)?;
            let key = tables::volume_key(name);
            let mut ops = vec![Op::Put {
                key: key.clone(),
                value: v.encode_to_vec(),
            }];
            ops.extend(more);
            let failed = self.txn(vec![(key, Check::Equals(raw))], ops).await?;
            if failed.is_none() {
                return Ok(v);
            }
        }
        Err(Status::aborted(format!(
            "volume {name} kept changing; retry"
        )))
    }

    pub(crate) async fn create_volume(&self, r: CreateVolumeRequest) -> Result<Volume, Status> {
        tables::validate_name("volume name", &r.name).map_err(Status::invalid_argument)?;
        let tier = if r.tier.is_empty() {
            "standard"
        } else {
            &r.tier
        };
        let mut qos = tier_qos(tier).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown tier {tier:?}: performance, standard, hdd or archive"
            ))
        })?;
        if let Some(o) = &r.qos {
            if o.iops != 0 {
                qos.iops = o.iops;
            }
            if o.bytes_per_sec != 0 {
                qos.bytes_per_sec = o.bytes_per_sec;
            }
        }
        // A clone lives in its parent's pool.
        let parent_pool = if r.parent.is_empty() {
            None
        } else {
            Some(
                self.read_volume(&r.parent)?
                    .ok_or_else(|| no_such_volume(&r.parent))?
                    .1
                    .pool,
            )
        };
        let pool_name = match (&parent_pool, r.pool.is_empty()) {
            (Some(p), _) => p.clone(),
            (None, true) => "standard".to_string(),
            (None, false) => r.pool.clone(),
        };
        if parent_pool.is_some() && !r.pool.is_empty() && r.pool != pool_name {
            return Err(Status::invalid_argument(format!(
                "a clone lives in its parent's pool ({pool_name})"
            )));
        }
        for _ in 0..RMW_TRIES {
            let pool_raw = self
                .get(&tables::pool_key(&pool_name))?
                .ok_or_else(|| Status::not_found(format!("no such pool: {pool_name}")))?;
            let pool: Pool = decode("pool", &pool_raw)?;
            let replicated = matches!(
                pool.redundancy.as_ref().and_then(|r| r.kind.as_ref()),
                Some(redundancy::Kind::Replicated(_))
            );
            if !replicated {
                return Err(Status::invalid_argument(format!(
                    "pool {pool_name} is erasure coded: volumes need a replicated pool"
                )));
            }
            let mut v = Volume {
                id: hex::encode(rand::random::<[u8; 12]>()),
                name: r.name.clone(),
                size: r.size,
                pool: pool_name.clone(),
                tier: tier.to_string(),
                state: "available".into(),
                created_unix_ms: unix_ms(),
                qos: Some(qos),
                lease: Some(VolumeLease::default()),
                ..Default::default()
            };
            let mut checks = vec![
                (tables::volume_key(&r.name), Check::Absent),
                (tables::pool_key(&pool_name), Check::Equals(pool_raw)),
            ];
            let mut ops = Vec::new();
            if r.parent.is_empty() {
                check_size(r.size)?;
                let (key_id, _, value) = self.new_data_key(&format!("volume:{}", r.name))?;
                ops.push(Op::Put {
                    key: tables::dkey_key(&key_id),
                    value,
                });
                v.data_key_id = key_id;
            } else {
                // A clone: its own data key, reading through to the parent's snapshot.
                let (praw, mut parent) = self
                    .read_volume(&r.parent)?
                    .ok_or_else(|| no_such_volume(&r.parent))?;
                v.pool = parent.pool.clone();
                let snap = parent
                    .snapshots
                    .iter_mut()
                    .find(|s| s.name == r.parent_snapshot)
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "volume {} has no snapshot {:?}",
                            r.parent, r.parent_snapshot
                        ))
                    })?;
                v.size = if r.size == 0 { snap.size } else { r.size };
                check_size(v.size)?;
                if v.size < snap.size {
                    return Err(Status::invalid_argument(format!(
                        "a clone cannot be smaller than its snapshot ({} bytes)",
                        snap.size
                    )));
                }
                snap.clones += 1;
                v.parent = parent.name.clone();
                v.parent_id = parent.id.clone();
                v.parent_snap_id = snap.id;
                let (key_id, _, value) = self.new_data_key(&format!("volume:{}", r.name))?;
                ops.push(Op::Put {
                    key: tables::dkey_key(&key_id),
                    value,
                });
                v.data_key_id = key_id;
                checks.push((tables::volume_key(&r.parent), Check::Equals(praw)));
                ops.push(Op::Put {
                    key: tables::volume_key(&r.parent),
                    value: parent.encode_to_vec(),
                });
            }
            ops.push(Op::Put {
                key: tables::volume_key(&r.name),
                value: v.encode_to_vec(),
            });
            match self.txn(checks, ops).await? {
                None => return Ok(v),
                Some((0, _)) => {
                    return Err(Status::already_exists(format!(
                        "volume {} already exists",
                        r.name
                    )));
                }
                Some(_) => continue,
            }
        }
        Err(Status::aborted("volumes kept changing; retry"))
    }

    pub(crate) async fn get_volume(&self, r: GetVolumeRequest) -> Result<Volume, Status> {
        tables::validate_name("volume name", &r.name).map_err(Status::invalid_argument)?;
        self.read_barrier(r.consistency).await?;
        self.read_volume(&r.name)?
            .map(|(_, v)| v)
            .ok_or_else(|| no_such_volume(&r.name))
    }

    pub(crate) async fn list_volumes(
        &self,
        r: ListVolumesRequest,
    ) -> Result<ListVolumesResponse, Status> {
        self.read_barrier(r.consistency).await?;
        let mut volumes = Vec::new();
        for (_, raw) in self.scan(tables::VOLUME_PREFIX)? {
            volumes.push(decode("volume", &raw)?);
        }
        Ok(ListVolumesResponse { volumes })
    }

    pub(crate) async fn delete_volume(&self, r: DeleteVolumeRequest) -> Result<(), Status> {
        tables::validate_name("volume name", &r.name).map_err(Status::invalid_argument)?;
        self.core.linearize().await?;
        for _ in 0..RMW_TRIES {
            let (raw, v) = self
                .read_volume(&r.name)?
                .ok_or_else(|| no_such_volume(&r.name))?;
            if v.state != "available" && v.state != "error" {
                return Err(Status::failed_precondition(format!(
                    "volume {} is {}: detach it first",
                    r.name, v.state
                )));
            }
            if let Some(s) = v.snapshots.iter().find(|s| s.clones > 0) {
                return Err(Status::failed_precondition(format!(
                    "snapshot {} of volume {} has {} clone(s): delete them first",
                    s.name, r.name, s.clones
                )));
            }
            let mut checks = vec![(tables::volume_key(&r.name), Check::Equals(raw))];
            let mut ops = vec![
                Op::Delete {
                    key: tables::volume_key(&r.name),
                },
                volume_tombstone(self, &v, 0, Vec::new())?,
            ];
            if !v.parent.is_empty()
                && let Some((praw, mut p)) = self.read_volume(&v.parent)?
                && p.id == v.parent_id
            {
                if let Some(s) = p.snapshots.iter_mut().find(|s| s.id == v.parent_snap_id) {
                    s.clones = s.clones.saturating_sub(1);
                }
                checks.push((tables::volume_key(&v.parent), Check::Equals(praw)));
                ops.push(Op::Put {
                    key: tables::volume_key(&v.parent),
                    value: p.encode_to_vec(),
                });
            }
            if self.txn(checks, ops).await?.is_none() {
                return Ok(());
            }
        }
        Err(Status::aborted(format!(
            "volume {} kept changing; retry",
            r.name
        )))
    }

    pub(crate) async fn resize_volume(&self, r: ResizeVolumeRequest) -> Result<Volume, Status> {
        check_size(r.size)?;
        self.update_volume(&r.name, |v| {
            if r.size < v.size {
                return Err(Status::invalid_argument(format!(
                    "volume {} is {} bytes: shrinking is not supported",
                    v.name, v.size
                )));
            }
            v.size = r.size;
            Ok(())
        })
        .await
    }

    /// A new data key for the volume's sectors from its next lease epoch on; the current
    /// holder (if any) keeps the old key for its epoch.
    pub(crate) async fn rotate_volume_key(&self, name: &str) -> Result<Volume, Status> {
        self.update_volume_with(name, |v| {
            let (key_id, _, dkey) = self.new_data_key(&format!("volume:{name}"))?;
            let old = VolumeKey {
                data_key_id: std::mem::replace(&mut v.data_key_id, key_id.clone()),
                from_epoch: v.key_from_epoch,
            };
            v.older_keys.push(old);
            v.key_from_epoch = v.lease.as_ref().map(|l| l.epoch).unwrap_or(0) + 1;
            Ok(vec![Op::Put {
                key: tables::dkey_key(&key_id),
                value: dkey,
            }])
        })
        .await
    }

    pub(crate) async fn create_snapshot(&self, r: CreateSnapshotRequest) -> Result<Volume, Status> {
        tables::validate_name("snapshot name", &r.name).map_err(Status::invalid_argument)?;
        self.update_volume(&r.volume, |v| {
            if v.snapshots.iter().any(|s| s.name == r.name) {
                return Err(Status::already_exists(format!(
                    "volume {} already has a snapshot {}",
                    v.name, r.name
                )));
            }
            v.last_snap_id += 1;
            v.snapshots.push(VolumeSnapshot {
                id: v.last_snap_id,
                name: r.name.clone(),
                size: v.size,
                created_unix_ms: unix_ms(),
                clones: 0,
            });
            Ok(())
        })
        .await
    }

    pub(crate) async fn delete_snapshot(&self, r: DeleteSnapshotRequest) -> Result<Volume, Status> {
        tables::validate_name("volume name", &r.volume).map_err(Status::invalid_argument)?;
        self.core.linearize().await?;
        for _ in 0..RMW_TRIES {
            let (raw, mut v) = self
                .read_volume(&r.volume)?
                .ok_or_else(|| no_such_volume(&r.volume))?;
            let Some(pos) = v.snapshots.iter().position(|s| s.name == r.name) else {
                return Err(Status::not_found(format!(
                    "volume {} has no snapshot {:?}",
                    r.volume, r.name
                )));
            };
            if v.snapshots[pos].clones > 0 {
                return Err(Status::failed_precondition(format!(
                    "snapshot {} has {} clone(s): delete them first",
                    r.name, v.snapshots[pos].clones
                )));
            }
            v.snapshots.remove(pos);
            let live = v.snapshots.iter().map(|s| s.id).collect();
            let tomb = volume_tombstone(self, &v, v.last_snap_id, live)?;
            let key = tables::volume_key(&r.volume);
            let failed = self
                .txn(
                    vec![(key.clone(), Check::Equals(raw))],
                    vec![
                        Op::Put {
                            key,
                            value: v.encode_to_vec(),
                        },
                        tomb,
                    ],
                )
                .await?;
            if failed.is_none() {
                return Ok(v);
            }
        }
        Err(Status::aborted(format!(
            "volume {} kept changing; retry",
            r.volume
        )))
    }

    pub(crate) async fn acquire_volume_lease(
        &self,
        r: VolumeLeaseRequest,
    ) -> Result<Volume, Status> {
        if r.holder.is_empty() {
            return Err(Status::invalid_argument("a lease needs a holder"));
        }
        let ttl = if r.ttl_ms == 0 {
            DEFAULT_TTL_MS
        } else {
            r.ttl_ms
        };
        self.update_volume(&r.name, |v| {
            let now = unix_ms();
            let l = v.lease.get_or_insert_with(Default::default);
            if !l.holder.is_empty() && l.holder != r.holder && l.expires_unix_ms > now {
                return Err(Status::failed_precondition(format!(
                    "volume {} is exported by {} (lease epoch {}, {} ms left)",
                    v.name,
                    l.holder,
                    l.epoch,
                    l.expires_unix_ms - now
                )));
            }
            l.epoch += 1;
            l.holder = r.holder.clone();
            l.expires_unix_ms = now + ttl;
            Ok(())
        })
        .await
    }

    pub(crate) async fn renew_volume_lease(&self, r: VolumeLeaseRequest) -> Result<Volume, Status> {
        let ttl = if r.ttl_ms == 0 {
            DEFAULT_TTL_MS
        } else {
            r.ttl_ms
        };
        self.update_volume(&r.name, |v| {
            let l = v.lease.get_or_insert_with(Default::default);
            if l.holder != r.holder || l.epoch != r.epoch {
                return Err(Status::failed_precondition(format!(
                    "lease lost: volume {} is held by {:?} at epoch {}",
                    v.name, l.holder, l.epoch
                )));
            }
            l.expires_unix_ms = unix_ms() + ttl;
            Ok(())
        })
        .await
    }

    pub(crate) async fn release_volume_lease(
        &self,
        r: VolumeLeaseRequest,
    ) -> Result<Volume, Status> {
        self.update_volume(&r.name, |v| {
            let l = v.lease.get_or_insert_with(Default::default);
            if l.holder == r.holder && l.epoch == r.epoch {
                l.holder.clear();
                l.expires_unix_ms = 0;
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn set_volume_state(
        &self,
        r: SetVolumeStateRequest,
    ) -> Result<Volume, Status> {
        if !STATES.contains(&r.to.as_str()) {
            return Err(Status::invalid_argument(format!(
                "unknown volume state {:?}",
                r.to
            )));
        }
        self.update_volume(&r.name, |v| {
            if v.state != r.from {
                return Err(Status::failed_precondition(format!(
                    "volume {} is {}, not {}",
                    v.name, v.state, r.from
                )));
            }
            if !transition_allowed(&r.from, &r.to) {
                return Err(Status::failed_precondition(format!(
                    "volume {}: {} -> {} is not a valid step",
                    v.name, r.from, r.to
                )));
            }
            v.state = r.to.clone();
            if let Some(a) = &r.attachment {
                v.attachment = Some(a.clone());
            }
            if r.to == "available" {
                v.attachment = None;
            }
            v.error = r.error.clone();
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attach_cycle_is_allowed_and_shortcuts_are_not() {
        for (a, b) in [
            ("available", "attaching"),
            ("attaching", "in-use"),
            ("in-use", "detaching"),
            ("detaching", "available"),
        ] {
            assert!(transition_allowed(a, b), "{a} -> {b}");
        }
        for (a, b) in [
            ("available", "in-use"),
            ("in-use", "available"),
            ("deleting", "available"),
        ] {
            assert!(!transition_allowed(a, b), "{a} -> {b}");
        }
    }

    #[test]
    fn sizes_are_whole_sectors() {
        assert!(check_size(4096).is_ok());
        assert!(check_size(0).is_err());
        assert!(check_size(4097).is_err());
        assert!(check_size(MAX_VOLUME + 4096).is_err());
        assert!(tier_qos("performance").unwrap().iops > tier_qos("hdd").unwrap().iops);
        assert!(tier_qos("gold").is_none());
    }
}
