//! Block volume extents: mutable 4 MiB regions of 1024 sectors of 4 KiB, written in place.
//!
//! On disk, under `<first disk>/extents/<volume id>/`:
//! - `<index:08x>.dat`: the sectors' ciphertext (sparse: unwritten sectors take no space);
//! - `<index:08x>.meta`: a 64-byte header (magic, `born`, `last_snap`) and one 32-byte record
//!   per sector: lease epoch, flags (written, zeroed), write sequence and the client's GCM tag;
//! - `<index:08x>@<tag:016x>.dat|.meta`: a copy preserved for snapshots (copy-on-write);
//! - `fence`: the highest lease epoch seen for the volume.
//!
//! A sector is replaced only by a version (epoch, seq) at least as new as the one it holds, so
//! replicas that receive the same writes in different orders, or a repair racing the writer,
//! end with the same content. The first write after a newer snapshot copies the extent before
//! changing it: the copy tagged `T` holds the content for every snapshot in `(prev, T]`, where
//! `prev` is the previous copy's tag (or `born`, the snapshot sequence when the extent was
//! first written: older snapshots did not have it). Sector data and records are written with
//! the node's I/O engine (io_uring where the kernel has it); FLUSH (or FUA) fdatasyncs them.

// tonic::Status is the error of every call here.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use sov_proto::storaged as pb;
use tonic::Status;

use crate::io::Io;

pub const SECTOR: usize = 4096;
pub const SECTORS: usize = 1024;
pub const EXTENT_BYTES: usize = SECTOR * SECTORS;
const TAG: usize = 16;
const RECORD: usize = 32;
const HEADER: usize = 64;
const META_BYTES: usize = HEADER + RECORD * SECTORS;
const MAGIC: &[u8; 8] = b"SOVEXT01";
const F_WRITTEN: u32 = 1;
const F_ZERO: u32 = 2;

/// One sector's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rec {
    pub epoch: u32,
    pub flags: u32,
    pub seq: u64,
    pub tag: [u8; TAG],
}

impl Rec {
    fn version(&self) -> (u32, u64) {
        (self.epoch, self.seq)
    }
    fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.epoch.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..32].copy_from_slice(&self.tag);
    }
    fn decode(b: &[u8]) -> Rec {
        Rec {
            epoch: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            flags: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            seq: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            tag: b[16..32].try_into().expect("16 bytes"),
        }
    }
}

/// The in-memory copy of an extent's metadata.
#[derive(Debug, Clone)]
struct Meta {
    born: u64,
    last_snap: u64,
    recs: Vec<Rec>,
}

impl Meta {
    fn new(born: u64) -> Meta {
        Meta {
            born,
            last_snap: born,
            recs: vec![Rec::default(); SECTORS],
        }
    }
    fn header(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&self.born.to_le_bytes());
        h[16..24].copy_from_slice(&self.last_snap.to_le_bytes());
        h
    }
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; META_BYTES];
        out[..HEADER].copy_from_slice(&self.header());
        for (i, r) in self.recs.iter().enumerate() {
            r.encode(&mut out[HEADER + i * RECORD..HEADER + (i + 1) * RECORD]);
        }
        out
    }
    fn decode(b: &[u8]) -> Result<Meta, String> {
        if b.len() < HEADER || &b[0..8] != MAGIC {
            return Err("bad extent metadata header".into());
        }
        let born = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let last_snap = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        let mut recs = vec![Rec::default(); SECTORS];
        for (i, r) in recs.iter_mut().enumerate() {
            let at = HEADER + i * RECORD;
            if at + RECORD <= b.len() {
                *r = Rec::decode(&b[at..at + RECORD]);
            }
        }
        Ok(Meta {
            born,
            last_snap,
            recs,
        })
    }
}

/// An open extent.
struct Extent {
    dat: Arc<File>,
    meta_file: Arc<File>,
    meta: Meta,
    /// Snapshot copy tags held, ascending.
    copies: Vec<u64>,
    dirty: bool,
}

type Key = (String, u64);

/// One disk write of an extent operation, run together with the others.
type IoFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), Status>> + Send + 'static>>;

/// Every extent on this node.
pub struct Extents {
    root: PathBuf,
    io: Io,
    open: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Option<Extent>>>>>,
    fences: Mutex<HashMap<String, u64>>,
    /// Serializes raising fences (check, write, rename).
    fence_write: Mutex<()>,
    dirty: Mutex<HashMap<String, HashSet<u64>>>,
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn ioerr(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// Volume ids are what metad makes: lowercase hex.
fn check_volume_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("bad volume id {id:?}")));
    }
    Ok(())
}

fn check_range(first: u32, count: u32) -> Result<(usize, usize), Status> {
    let (f, c) = (first as usize, count as usize);
    if c == 0 || f >= SECTORS || f + c > SECTORS {
        return Err(bad(format!(
            "sectors {first}+{count} are outside an extent of {SECTORS}"
        )));
    }
    Ok((f, c))
}

fn sync_dir(d: &Path) -> Result<(), Status> {
    File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| ioerr("syncing a folder", e))
}

fn version(v: &pb::SectorVersion) -> (u32, u64) {
    (v.epoch, v.seq)
}

impl Extents {
    pub fn open(root: &Path, io: Io) -> std::io::Result<Extents> {
        std::fs::create_dir_all(root)?;
        // Writes acknowledged by a previous process may still be only in the page cache, and
        // the list of what the next FLUSH must sync died with it: sync them all now.
        let dir = File::open(root)?;
        // SAFETY: syncfs on a valid open descriptor.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Extents {
            root: root.to_path_buf(),
            io,
            open: Mutex::new(HashMap::new()),
            fences: Mutex::new(HashMap::new()),
            fence_write: Mutex::new(()),
            dirty: Mutex::new(HashMap::new()),
        })
    }

    fn vol_dir(&self, vol: &str) -> PathBuf {
        self.root.join(vol)
    }

    fn paths(&self, vol: &str, index: u64, tag: Option<u64>) -> (PathBuf, PathBuf) {
        let base = match tag {
            None => format!("{index:08x}"),
            Some(t) => format!("{index:08x}@{t:016x}"),
        };
        let d = self.vol_dir(vol);
        (
            d.join(format!("{base}.dat")),
            d.join(format!("{base}.meta")),
        )
    }

    fn slot(&self, vol: &str, index: u64) -> Arc<tokio::sync::Mutex<Option<Extent>>> {
        self.open
            .lock()
            .expect("extent table")
            .entry((vol.to_string(), index))
            .or_default()
            .clone()
    }

    /// Loads an extent from disk into `slot` if it exists there; with `create_born`, creates
    /// it when absent.
    fn load(
        &self,
        vol: &str,
        index: u64,
        slot: &mut Option<Extent>,
        create_born: Option<u64>,
    ) -> Result<bool, Status> {
        if slot.is_some() {
            return Ok(false);
        }
        let (dat, meta) = self.paths(vol, index, None);
        let exists = meta.exists();
        if !exists && create_born.is_none() {
            return Ok(false);
        }
        let m = if exists {
            let raw = std::fs::read(&meta).map_err(|e| ioerr("reading extent metadata", e))?;
            Meta::decode(&raw).map_err(|e| Status::data_loss(format!("{}: {e}", meta.display())))?
        } else {
            self.make_vol_dir(vol)?;
            let m = Meta::new(create_born.unwrap_or(0));
            std::fs::write(&meta, m.encode()).map_err(|e| ioerr("creating extent metadata", e))?;
            // The new files' names must survive a crash along with what FLUSH syncs in them.
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&dat)
                .map_err(|e| ioerr("creating extent data", e))?;
            sync_dir(&self.vol_dir(vol))?;
            m
        };
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map(Arc::new)
                .map_err(|e| ioerr("opening an extent file", e))
        };
        let copies = self.copy_tags(vol, index);
        *slot = Some(Extent {
            dat: open(&dat)?,
            meta_file: open(&meta)?,
            meta: m,
            copies,
            dirty: false,
        });
        Ok(!exists)
    }

    /// Creates the volume's folder (and makes its name durable) if it is new.
    fn make_vol_dir(&self, vol: &str) -> Result<(), Status> {
        let d = self.vol_dir(vol);
        if !d.exists() {
            std::fs::create_dir_all(&d).map_err(|e| ioerr("creating the volume folder", e))?;
            sync_dir(&self.root)?;
        }
        Ok(())
    }

    fn copy_tags(&self, vol: &str, index: u64) -> Vec<u64> {
        let prefix = format!("{index:08x}@");
        let mut tags: Vec<u64> = std::fs::read_dir(self.vol_dir(vol))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                let rest = n.strip_prefix(&prefix)?.strip_suffix(".meta")?;
                u64::from_str_radix(rest, 16).ok()
            })
            .collect();
        tags.sort_unstable();
        tags
    }

    fn fence_path(&self, vol: &str) -> PathBuf {
        self.vol_dir(vol).join("fence")
    }

    fn fence_of(&self, vol: &str) -> u64 {
        if let Some(f) = self.fences.lock().expect("fences").get(vol) {
            return *f;
        }
        let f = std::fs::read_to_string(self.fence_path(vol))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        self.fences.lock().expect("fences").insert(vol.into(), f);
        f
    }

    /// Checks `epoch` against the volume's fence and raises the fence to it.
    fn fence(&self, vol: &str, epoch: u64) -> Result<u64, Status> {
        // The common case, the current writer again: no lock beyond the table's.
        if self.fences.lock().expect("fences").get(vol) == Some(&epoch) {
            return Ok(epoch);
        }
        let _g = self.fence_write.lock().expect("fence lock");
        let cur = self.fence_of(vol);
        if epoch < cur {
            return Err(Status::failed_precondition(format!(
                "fenced: volume {vol} has a writer at lease epoch {cur}, this one has {epoch}"
            )));
        }
        if epoch > cur {
            self.make_vol_dir(vol)?;
            let tmp = self.vol_dir(vol).join("fence.tmp");
            let write = || -> std::io::Result<()> {
                let f = File::create(&tmp)?;
                std::io::Write::write_all(&mut &f, epoch.to_string().as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, self.fence_path(vol))?;
                File::open(self.vol_dir(vol))?.sync_all()
            };
            write().map_err(|e| ioerr("recording the fence", e))?;
            self.fences
                .lock()
                .expect("fences")
                .insert(vol.into(), epoch);
        }
        Ok(epoch.max(cur))
    }

    pub async fn fence_volume(&self, r: pb::FenceVolumeRequest) -> Result<u64, Status> {
        check_volume_id(&r.volume_id)?;
        self.fence(&r.volume_id, r.lease_epoch)
    }

    /// Preserves the extent's current content as the copy for snapshots up to `tag`.
    async fn preserve(
        &self,
        vol: &str,
        index: u64,
        e: &mut Extent,
        tag: u64,
    ) -> Result<(), Status> {
        let (src_dat, _) = self.paths(vol, index, None);
        let (dst_dat, dst_meta) = self.paths(vol, index, Some(tag));
        let meta_bytes = e.meta.encode();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // copy_file_range keeps holes and may share blocks on filesystems that can.
            std::fs::copy(&src_dat, &dst_dat)?;
            File::open(&dst_dat)?.sync_data()?;
            let tmp = dst_meta.with_extension("meta.tmp");
            std::fs::write(&tmp, &meta_bytes)?;
            File::open(&tmp)?.sync_data()?;
            std::fs::rename(&tmp, &dst_meta)?;
            File::open(dst_meta.parent().expect("a folder"))?.sync_all()
        })
        .await
        .map_err(|e| ioerr("copy task", e))?
        .map_err(|e| ioerr("preserving an extent for a snapshot", e))?;
        e.copies.push(tag);
        e.copies.sort_unstable();
        Ok(())
    }

    async fn write_meta(&self, e: &Extent, first: usize, count: usize) -> Result<(), Status> {
        futures::future::try_join_all(self.meta_writes(e, first, count, true)).await?;
        Ok(())
    }

    /// The writes that put records `first..first+count` (and the header, with `header`) on
    /// disk, to run together with the data writes.
    fn meta_writes(&self, e: &Extent, first: usize, count: usize, header: bool) -> Vec<IoFuture> {
        let mut out: Vec<IoFuture> = Vec::new();
        if header {
            let (io, f, h) = (self.io.clone(), e.meta_file.clone(), e.meta.header());
            out.push(Box::pin(async move {
                io.write(f, 0, vec![Bytes::copy_from_slice(&h)])
                    .await
                    .map_err(|e| ioerr("writing extent metadata", e))
            }));
        }
        let mut recs = vec![0u8; RECORD * count];
        for i in 0..count {
            e.meta.recs[first + i].encode(&mut recs[i * RECORD..(i + 1) * RECORD]);
        }
        let (io, f) = (self.io.clone(), e.meta_file.clone());
        out.push(Box::pin(async move {
            io.write(f, (HEADER + first * RECORD) as u64, vec![Bytes::from(recs)])
                .await
                .map_err(|e| ioerr("writing extent metadata", e))
        }));
        out
    }

    pub async fn write(&self, r: pb::WriteExtentRequest) -> Result<u32, Status> {
        let addr = r.extent.as_ref().ok_or_else(|| bad("no extent"))?;
        check_volume_id(&addr.volume_id)?;
        let (first, count) = check_range(r.first_sector, r.count)?;
        let vol = addr.volume_id.as_str();
        if r.repair {
            if r.versions.len() != count || (!r.zeros.is_empty() && r.zeros.len() != count) {
                return Err(bad(
                    "a repair write needs one version (and zero flag) per sector",
                ));
            }
        } else {
            if r.lease_epoch == 0 || r.lease_epoch > u32::MAX as u64 {
                return Err(bad("a write needs a lease epoch (1 to 2^32-1)"));
            }
            self.fence(vol, r.lease_epoch)?;
        }
        if !r.zero && (r.data.len() != count * SECTOR || r.tags.len() != count * TAG) {
            return Err(bad(format!(
                "{count} sectors need {} data bytes and {} tag bytes, got {} and {}",
                count * SECTOR,
                count * TAG,
                r.data.len(),
                r.tags.len()
            )));
        }
        let slot = self.slot(vol, addr.index);
        let mut g = slot.lock().await;
        let born = if r.repair { r.born } else { r.snap_seq };
        let created = self.load(vol, addr.index, &mut g, Some(born))?;
        let e = g.as_mut().expect("loaded or created");
        let header_before = (e.meta.born, e.meta.last_snap);
        if r.repair && r.snap_seq > e.meta.last_snap {
            // The source wrote after that snapshot: its copies came first (PutSnapCopy), so
            // this replica must not make one of its own later.
            e.meta.last_snap = r.snap_seq;
        }
        if !r.repair && !created && r.snap_seq > e.meta.last_snap {
            if e.meta.recs.iter().any(|x| x.flags != 0) {
                self.preserve(vol, addr.index, e, r.snap_seq).await?;
            }
            e.meta.last_snap = r.snap_seq;
        }
        let new_version = |i: usize| -> (u32, u64) {
            if r.repair {
                version(&r.versions[i])
            } else {
                (r.lease_epoch as u32, r.seq + i as u64)
            }
        };
        let mut applied = vec![false; count];
        for (i, a) in applied.iter_mut().enumerate() {
            let cur = e.meta.recs[first + i].version();
            let new = new_version(i);
            *a = if r.repair { new > cur } else { new >= cur };
        }
        // The data and the records that describe it are written together: without a sync in
        // between, their order on disk is not defined anyway (a torn sector fails its tag and
        // is repaired from another replica).
        let mut writes: Vec<IoFuture> = Vec::new();
        if !r.zero {
            let mut i = 0;
            while i < count {
                if !applied[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < count && applied[i] {
                    i += 1;
                }
                let bytes = r.data.slice(start * SECTOR..i * SECTOR);
                let (io, f) = (self.io.clone(), e.dat.clone());
                let at = ((first + start) * SECTOR) as u64;
                writes.push(Box::pin(async move {
                    io.write(f, at, vec![bytes])
                        .await
                        .map_err(|e| ioerr("writing extent data", e))
                }));
            }
        }
        let mut n = 0;
        for (i, a) in applied.iter().enumerate() {
            if !a {
                continue;
            }
            n += 1;
            let (epoch, seq) = new_version(i);
            let zero = if r.repair && !r.zeros.is_empty() {
                r.zeros.get(i).copied().unwrap_or(false)
            } else {
                r.zero
            };
            let mut tag = [0u8; TAG];
            if !zero {
                tag.copy_from_slice(&r.tags[i * TAG..(i + 1) * TAG]);
            }
            e.meta.recs[first + i] = Rec {
                epoch,
                flags: if zero { F_WRITTEN | F_ZERO } else { F_WRITTEN },
                seq,
                tag,
            };
        }
        let header = created || (e.meta.born, e.meta.last_snap) != header_before;
        writes.extend(self.meta_writes(e, first, count, header));
        if let Err(err) = futures::future::try_join_all(writes).await {
            // Memory may now be ahead of the disk: read the extent again next time.
            *g = None;
            return Err(err);
        }
        let e = g.as_mut().expect("still loaded");
        if r.fua {
            self.sync_extent(e).await?;
        } else if !e.dirty {
            e.dirty = true;
            self.dirty
                .lock()
                .expect("dirty set")
                .entry(vol.to_string())
                .or_default()
                .insert(addr.index);
        }
        Ok(n)
    }

    async fn sync_extent(&self, e: &Extent) -> Result<(), Status> {
        self.io
            .sync(e.dat.clone())
            .await
            .map_err(|err| ioerr("syncing extent data", err))?;
        self.io
            .sync(e.meta_file.clone())
            .await
            .map_err(|err| ioerr("syncing extent metadata", err))
    }

    /// fdatasyncs every extent of the volume written since the last flush.
    pub async fn flush(&self, vol: &str) -> Result<u32, Status> {
        check_volume_id(vol)?;
        let dirty: Vec<u64> = self
            .dirty
            .lock()
            .expect("dirty set")
            .remove(vol)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut n = 0;
        for (k, &index) in dirty.iter().enumerate() {
            let slot = self.slot(vol, index);
            let mut g = slot.lock().await;
            let Some(e) = g.as_mut() else { continue };
            // Cleared first: a write landing during the sync marks it dirty again.
            e.dirty = false;
            if let Err(err) = self.sync_extent(e).await {
                // This one and the rest stay dirty: the next flush tries again.
                e.dirty = true;
                drop(g);
                let mut d = self.dirty.lock().expect("dirty set");
                let set = d.entry(vol.to_string()).or_default();
                set.extend(dirty[k..].iter().copied());
                return Err(err);
            }
            n += 1;
        }
        Ok(n)
    }

    pub async fn read(&self, r: pb::ReadExtentRequest) -> Result<pb::ReadExtentResponse, Status> {
        let addr = r.extent.as_ref().ok_or_else(|| bad("no extent"))?;
        check_volume_id(&addr.volume_id)?;
        let (first, count) = check_range(r.first_sector, r.count)?;
        let vol = addr.volume_id.as_str();
        let slot = self.slot(vol, addr.index);
        let mut g = slot.lock().await;
        self.load(vol, addr.index, &mut g, None)?;
        let Some(e) = g.as_ref() else {
            return Ok(pb::ReadExtentResponse::default());
        };
        let mut resp = pb::ReadExtentResponse {
            exists: true,
            snap_copies: e.copies.clone(),
            born: e.meta.born,
            last_snap: e.meta.last_snap,
            ..Default::default()
        };
        // Which content: the head, or the copy that holds the snapshot.
        let (meta, file) = if r.snap_id == 0 {
            (e.meta.clone(), e.dat.clone())
        } else if r.snap_id <= e.meta.born {
            resp.exists = false;
            return Ok(resp);
        } else if let Some(tag) = e.copies.iter().find(|t| **t >= r.snap_id) {
            let (dat, meta) = self.paths(vol, addr.index, Some(*tag));
            let raw = std::fs::read(&meta).map_err(|e| ioerr("reading a snapshot copy", e))?;
            let m = Meta::decode(&raw).map_err(|e| Status::data_loss(e.to_string()))?;
            let f = File::open(&dat).map_err(|e| ioerr("opening a snapshot copy", e))?;
            (m, Arc::new(f))
        } else {
            (e.meta.clone(), e.dat.clone())
        };
        let recs = &meta.recs[first..first + count];
        resp.versions = recs
            .iter()
            .map(|x| pb::SectorVersion {
                epoch: x.epoch,
                seq: x.seq,
            })
            .collect();
        resp.zero = recs.iter().map(|x| x.flags & F_ZERO != 0).collect();
        if r.versions_only {
            return Ok(resp);
        }
        let mut tags = BytesMut::with_capacity(count * TAG);
        for x in recs {
            tags.extend_from_slice(&x.tag);
        }
        let mut data = self
            .io
            .read(file, (first * SECTOR) as u64, count * SECTOR)
            .await
            .map_err(|e| ioerr("reading extent data", e))?;
        data.resize(count * SECTOR, 0);
        resp.data = data.into();
        resp.tags = tags.freeze();
        Ok(resp)
    }

    /// Stores a snapshot copy a replica lacks (repair), unless it has one with that tag.
    pub async fn put_copy(&self, r: pb::PutSnapCopyRequest) -> Result<u32, Status> {
        let addr = r.extent.as_ref().ok_or_else(|| bad("no extent"))?;
        check_volume_id(&addr.volume_id)?;
        let vol = addr.volume_id.as_str();
        if r.data.len() != EXTENT_BYTES
            || r.tags.len() != SECTORS * TAG
            || r.versions.len() != SECTORS
            || r.zero.len() != SECTORS
        {
            return Err(bad("a snapshot copy is a whole extent"));
        }
        let slot = self.slot(vol, addr.index);
        let mut g = slot.lock().await;
        self.load(vol, addr.index, &mut g, Some(r.born))?;
        let e = g.as_mut().expect("loaded or created");
        if e.copies.contains(&r.tag) {
            return Ok(0);
        }
        let mut m = Meta::new(r.born);
        m.last_snap = r.tag;
        for (i, rec) in m.recs.iter_mut().enumerate() {
            let v = &r.versions[i];
            rec.epoch = v.epoch;
            rec.seq = v.seq;
            if (v.epoch, v.seq) != (0, 0) {
                rec.flags = if r.zero[i] {
                    F_WRITTEN | F_ZERO
                } else {
                    F_WRITTEN
                };
                rec.tag.copy_from_slice(&r.tags[i * TAG..(i + 1) * TAG]);
            }
        }
        let (dat, meta) = self.paths(vol, addr.index, Some(r.tag));
        let data = r.data.clone();
        let bytes = m.encode();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::write(&dat, &data)?;
            File::open(&dat)?.sync_data()?;
            let tmp = meta.with_extension("meta.tmp");
            std::fs::write(&tmp, &bytes)?;
            File::open(&tmp)?.sync_data()?;
            std::fs::rename(&tmp, &meta)?;
            File::open(meta.parent().expect("a folder"))?.sync_all()
        })
        .await
        .map_err(|e| ioerr("copy task", e))?
        .map_err(|e| ioerr("storing a snapshot copy", e))?;
        e.copies.push(r.tag);
        e.copies.sort_unstable();
        // The head's `born` cannot be younger than the copy's, and a copy tagged T means a
        // write after snapshot T happened.
        if r.born < e.meta.born || r.tag > e.meta.last_snap {
            e.meta.born = e.meta.born.min(r.born);
            e.meta.last_snap = e.meta.last_snap.max(r.tag);
            self.write_meta(e, 0, 1).await?;
        }
        Ok(1)
    }

    fn volumes(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect()
    }

    fn indexes(&self, vol: &str) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(self.vol_dir(vol))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                let stem = n.strip_suffix(".meta")?;
                if stem.contains('@') {
                    return None;
                }
                u64::from_str_radix(stem, 16).ok()
            })
            .collect();
        v.sort_unstable();
        v
    }

    pub async fn list(&self, vol: &str) -> Result<Vec<pb::ExtentSummary>, Status> {
        let vols = if vol.is_empty() {
            self.volumes()
        } else {
            check_volume_id(vol)?;
            vec![vol.to_string()]
        };
        let mut out = Vec::new();
        for v in vols {
            for index in self.indexes(&v) {
                let slot = self.slot(&v, index);
                let mut g = slot.lock().await;
                self.load(&v, index, &mut g, None)?;
                let Some(e) = g.as_ref() else { continue };
                let mut h = blake3::Hasher::new();
                h.update(&e.meta.born.to_le_bytes());
                for t in &e.copies {
                    h.update(&t.to_le_bytes());
                }
                let mut newest = (0u32, 0u64);
                for r in &e.meta.recs {
                    h.update(&r.epoch.to_le_bytes());
                    h.update(&r.seq.to_le_bytes());
                    h.update(&r.flags.to_le_bytes());
                    newest = newest.max(r.version());
                }
                out.push(pb::ExtentSummary {
                    extent: Some(pb::ExtentAddr {
                        volume_id: v.clone(),
                        index,
                    }),
                    digest: Bytes::copy_from_slice(h.finalize().as_bytes()),
                    newest: Some(pb::SectorVersion {
                        epoch: newest.0,
                        seq: newest.1,
                    }),
                });
            }
        }
        Ok(out)
    }

    /// Frees every extent of a deleted volume. Returns how many extents went.
    pub async fn delete_volume(&self, vol: &str) -> Result<usize, Status> {
        check_volume_id(vol)?;
        let n = self.indexes(vol).len();
        self.open
            .lock()
            .expect("extent table")
            .retain(|k, _| k.0 != vol);
        self.dirty.lock().expect("dirty set").remove(vol);
        self.fences.lock().expect("fences").remove(vol);
        match std::fs::remove_dir_all(self.vol_dir(vol)) {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(ioerr("deleting a volume's extents", e)),
        }
    }

    /// Frees the snapshot copies (tags up to `upto`) that hold none of `live`: what a deleted
    /// snapshot alone kept. Returns how many copies went.
    pub async fn trim_snapshots(
        &self,
        vol: &str,
        upto: u64,
        live: &[u64],
    ) -> Result<usize, Status> {
        check_volume_id(vol)?;
        let mut freed = 0;
        for index in self.indexes(vol) {
            let slot = self.slot(vol, index);
            let mut g = slot.lock().await;
            self.load(vol, index, &mut g, None)?;
            let Some(e) = g.as_mut() else { continue };
            let mut prev = e.meta.born;
            let mut keep = Vec::new();
            for &t in &e.copies {
                let needed = t > upto || live.iter().any(|s| *s > prev && *s <= t);
                if needed {
                    keep.push(t);
                    prev = t;
                } else {
                    let (d, m) = self.paths(vol, index, Some(t));
                    let _ = std::fs::remove_file(m);
                    let _ = std::fs::remove_file(d);
                    freed += 1;
                }
            }
            e.copies = keep;
        }
        Ok(freed)
    }
}

/// Entry points for the fuzz targets (`sov-fuzz-targets`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes a `.meta` file as an extent's load does and, if it decodes, encodes it again.
    pub fn meta_round_trip(raw: &[u8]) -> Result<Vec<u8>, String> {
        super::Meta::decode(raw).map(|m| m.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoEngineKind;

    fn store(dir: &Path) -> Extents {
        Extents::open(dir, Io::start(IoEngineKind::Pread).unwrap()).unwrap()
    }

    fn addr(index: u64) -> Option<pb::ExtentAddr> {
        Some(pb::ExtentAddr {
            volume_id: "abcd".into(),
            index,
        })
    }

    fn write(first: u32, fill: u8, epoch: u64, seq: u64, snap: u64) -> pb::WriteExtentRequest {
        pb::WriteExtentRequest {
            extent: addr(0),
            lease_epoch: epoch,
            snap_seq: snap,
            first_sector: first,
            count: 1,
            seq,
            data: Bytes::from(vec![fill; SECTOR]),
            tags: Bytes::from(vec![fill; TAG]),
            ..Default::default()
        }
    }

    async fn read(x: &Extents, first: u32, snap: u64) -> pb::ReadExtentResponse {
        x.read(pb::ReadExtentRequest {
            extent: addr(0),
            first_sector: first,
            count: 1,
            snap_id: snap,
            versions_only: false,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn newer_versions_win_whatever_the_order() {
        let d = tempfile::tempdir().unwrap();
        let x = store(d.path());
        x.write(write(3, 0xbb, 1, 20, 0)).await.unwrap();
        // An older write arriving late changes nothing.
        assert_eq!(x.write(write(3, 0xaa, 1, 10, 0)).await.unwrap(), 0);
        let r = read(&x, 3, 0).await;
        assert!(r.data.iter().all(|b| *b == 0xbb));
        assert_eq!(r.versions[0].seq, 20);
        // A new lease epoch beats any sequence of the old one; then the old writer is fenced.
        x.write(write(3, 0xcc, 2, 1, 0)).await.unwrap();
        let e = x.write(write(4, 0xdd, 1, 30, 0)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("fenced"));
        // The fence survives a restart.
        drop(x);
        let x = store(d.path());
        assert!(x.write(write(4, 0xdd, 1, 31, 0)).await.is_err());
        let r = read(&x, 3, 0).await;
        assert!(r.data.iter().all(|b| *b == 0xcc));
    }

    #[tokio::test]
    async fn snapshots_keep_the_content_of_their_time() {
        let d = tempfile::tempdir().unwrap();
        let x = store(d.path());
        x.write(write(0, 0xa1, 1, 1, 0)).await.unwrap();
        // Snapshot 1 is taken; the next write preserves A first.
        x.write(write(0, 0xb2, 1, 2, 1)).await.unwrap();
        x.write(write(0, 0xb3, 1, 3, 1)).await.unwrap();
        // Snapshot 2, then C.
        x.write(write(0, 0xc4, 1, 4, 2)).await.unwrap();
        assert!(read(&x, 0, 1).await.data.iter().all(|b| *b == 0xa1));
        assert!(read(&x, 0, 2).await.data.iter().all(|b| *b == 0xb3));
        assert!(read(&x, 0, 0).await.data.iter().all(|b| *b == 0xc4));
        // A sector first written after snapshot 2 was not there at snapshot 1 or 2... but the
        // extent was: it reads as never written.
        x.write(write(9, 0xee, 1, 5, 2)).await.unwrap();
        assert_eq!(read(&x, 9, 1).await.versions[0].seq, 0);
        // Deleting snapshot 1 frees its copy; snapshot 2's stays.
        assert_eq!(x.trim_snapshots("abcd", 2, &[2]).await.unwrap(), 1);
        assert!(read(&x, 0, 2).await.data.iter().all(|b| *b == 0xb3));
        // An extent born after a snapshot does not exist in it.
        let mut w = write(0, 0x11, 1, 6, 2);
        w.extent = addr(1);
        x.write(w).await.unwrap();
        let r = x
            .read(pb::ReadExtentRequest {
                extent: addr(1),
                first_sector: 0,
                count: 1,
                snap_id: 2,
                versions_only: false,
            })
            .await
            .unwrap();
        assert!(!r.exists);
        assert_eq!(x.delete_volume("abcd").await.unwrap(), 2);
        assert!(!read(&x, 0, 0).await.exists);
    }

    #[tokio::test]
    async fn bad_requests_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let x = store(d.path());
        let mut w = write(0, 1, 1, 1, 0);
        w.count = 2;
        assert_eq!(
            x.write(w).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let mut w = write(1023, 1, 1, 1, 0);
        w.count = 2;
        assert!(x.write(w).await.is_err());
        let mut w = write(0, 1, 1, 1, 0);
        w.extent = Some(pb::ExtentAddr {
            volume_id: "../etc".into(),
            index: 0,
        });
        assert!(x.write(w).await.is_err());
        assert!(x.write(write(0, 1, 0, 1, 0)).await.is_err());
    }
}
