//! One disk: append-only segment files plus a RocksDB index, written by a single writer thread
//! with group commit, read through the I/O engine with blake3 verification, and recovered at
//! start-up so that the index and the segments agree.
//!
//! Write path (the writer thread, one per disk): take every queued operation (up to a byte and
//! count bound), lay their records out back to back in the active segment, write them with one
//! vectored write, fdatasync once, then update the index (with the recovery checkpoint in the
//! same atomic batch) and only then acknowledge. Every mutation of a disk, compaction's copies
//! included, goes through this one thread, so the order of records in the segments is the order
//! of the mutations, which is what makes replay after a crash correct.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::index::{CorruptRecord, Index, IndexBatch, Location, ScrubState};
use crate::io::{Io, MAX_IOVECS};
use crate::metrics::Metrics;
use crate::record::{self, HEADER_LEN, RecordKind};

const FORMAT_FILE: &str = "FORMAT";
const FORMAT_TEXT: &str = "sov-storaged-disk 1\n";
/// Most operations in one group commit (two iovecs each must fit one vectored write).
const MAX_BATCH_OPS: usize = MAX_IOVECS / 2;

/// Settings of a disk.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// A segment is sealed once the next record would take it past this size.
    pub segment_size: u64,
    /// Free space kept back for the index and tombstones; data writes stop above it.
    pub reserved_space: u64,
    /// Most bytes in one group commit.
    pub max_batch_bytes: u64,
}

/// Filesystem capacity figures, from statvfs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Space {
    pub capacity: u64,
    pub used: u64,
    pub available: u64,
}

/// Point-in-time figures of one disk.
#[derive(Debug, Clone, Default)]
pub struct DiskStats {
    pub space: Space,
    pub live_bytes: u64,
    pub segment_bytes: u64,
    pub chunks: u64,
    pub health: String,
    pub segments: usize,
}

struct Accounting {
    /// Live record bytes per segment.
    live: HashMap<u64, u64>,
    /// Length of each segment file.
    seg_len: BTreeMap<u64, u64>,
    chunks: u64,
    /// The segment being appended to.
    active: u64,
    /// The segment the recovery checkpoint is in: compaction stays below it.
    checkpoint_segment: u64,
}

impl Accounting {
    fn add_live(&mut self, seg: u64, n: u64) {
        *self.live.entry(seg).or_default() += n;
    }
    fn sub_live(&mut self, seg: u64, n: u64) {
        let e = self.live.entry(seg).or_default();
        *e = e.saturating_sub(n);
    }
}

/// What compaction is handed for one segment.
#[derive(Debug, Clone, Copy)]
pub struct CompactionCandidate {
    pub segment: u64,
    pub len: u64,
    pub live: u64,
}

pub(crate) enum WriteOp {
    Put {
        id: String,
        /// The chunk's bytes as received (frames are written as they are, no concatenation).
        data: Vec<Bytes>,
        blake3: [u8; 32],
        reply: oneshot::Sender<Result<Location, StoreError>>,
    },
    Delete {
        id: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Copy a live record elsewhere if the index still points at `from` (compaction).
    Relocate {
        id: String,
        from: Location,
        data: Bytes,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

struct Inner {
    name: String,
    path: PathBuf,
    index: Index,
    io: Io,
    cfg: DiskConfig,
    metrics: Metrics,
    segments: RwLock<BTreeMap<u64, Arc<File>>>,
    acct: Mutex<Accounting>,
    failed: Mutex<Option<String>>,
    /// The last data write was refused for lack of space (cleared by the next one that fits).
    refused_for_space: std::sync::atomic::AtomicBool,
    scrub: Mutex<ScrubState>,
}

/// A disk in service.
pub struct Disk {
    inner: Arc<Inner>,
    writer: Mutex<Option<crossbeam_channel::Sender<WriteOp>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
}

fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join("segments").join(format!("seg-{seg:016x}.dat"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".dat")?;
    u64::from_str_radix(hex, 16).ok()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// statvfs of the filesystem holding `path`.
pub fn space(path: &Path) -> io::Result<Space> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path has a NUL byte"))?;
    // SAFETY: statvfs writes into a zeroed struct we own; c is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize;
    let capacity = st.f_blocks * frsize;
    Ok(Space {
        capacity,
        used: capacity.saturating_sub(st.f_bfree * frsize),
        available: st.f_bavail * frsize,
    })
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_segment(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}

/// Result of verifying a record read from disk.
fn verify_record(id: &str, loc: &Location, buf: &[u8]) -> Result<(), String> {
    if buf.len() as u64 != loc.record_len() {
        return Err(format!(
            "record truncated: {} of {} bytes readable",
            buf.len(),
            loc.record_len()
        ));
    }
    let h = record::parse_fixed(buf).map_err(|e| format!("bad record header: {e}"))?;
    let id_end = HEADER_LEN + h.id_len;
    if h.id_len != id.len() || buf.get(HEADER_LEN..id_end) != Some(id.as_bytes()) {
        return Err("record belongs to another chunk".into());
    }
    record::verify_check(buf, &buf[HEADER_LEN..id_end])
        .map_err(|e| format!("bad record header: {e}"))?;
    if h.kind != RecordKind::Put || h.data_len != loc.data_len || h.blake3 != loc.blake3 {
        return Err("record header disagrees with the index".into());
    }
    let actual = blake3::hash(&buf[id_end..]);
    if actual.as_bytes() != &loc.blake3 {
        return Err(format!(
            "blake3 mismatch: expected {}, got {}",
            hex::encode(loc.blake3),
            actual.to_hex()
        ));
    }
    Ok(())
}

impl Disk {
    /// Opens (or formats) the disk at `path`, recovers it, and starts its writer thread.
    pub fn open(path: &Path, cfg: DiskConfig, io: Io, metrics: Metrics) -> anyhow::Result<Disk> {
        use anyhow::Context;
        let name = path.display().to_string();
        std::fs::create_dir_all(path.join("segments"))
            .with_context(|| format!("cannot create {name}/segments"))?;
        let format = path.join(FORMAT_FILE);
        match std::fs::read_to_string(&format) {
            Ok(text) if text == FORMAT_TEXT => {}
            Ok(text) => anyhow::bail!(
                "{name} holds an unknown disk format {:?}; refusing to touch it",
                text.trim()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = File::create(&format).with_context(|| format!("cannot format {name}"))?;
                std::io::Write::write_all(&mut &f, FORMAT_TEXT.as_bytes())?;
                f.sync_all()?;
                fsync_dir(path)?;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", format.display())),
        }
        let index = Index::open(&path.join("index"))
            .with_context(|| format!("cannot open the index of {name}"))?;
        let scrub = index.scrub_state()?;
        let inner = Arc::new(Inner {
            name: name.clone(),
            path: path.to_path_buf(),
            index,
            io,
            cfg,
            metrics,
            segments: RwLock::new(BTreeMap::new()),
            acct: Mutex::new(Accounting {
                live: HashMap::new(),
                seg_len: BTreeMap::new(),
                chunks: 0,
                active: 1,
                checkpoint_segment: 1,
            }),
            failed: Mutex::new(None),
            refused_for_space: std::sync::atomic::AtomicBool::new(false),
            scrub: Mutex::new(scrub),
        });
        let (active, offset) = recover(&inner).with_context(|| format!("recovery of {name}"))?;
        // Unbounded so that async callers never block a runtime thread on a full queue; the
        // bytes queued are bounded by the service's put-memory admission control.
        let (tx, rx) = crossbeam_channel::unbounded::<WriteOp>();
        let w = inner.clone();
        let active_file = inner
            .segments
            .read()
            .expect("segments lock")
            .get(&active)
            .cloned()
            .expect("recovery opens the active segment");
        let thread = std::thread::Builder::new()
            .name("disk-writer".into())
            .spawn(move || {
                Writer {
                    d: w,
                    active,
                    active_file,
                    offset,
                }
                .run(rx)
            })?;
        Ok(Disk {
            inner,
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    fn send(&self, op: WriteOp) -> Result<(), StoreError> {
        let guard = self.writer.lock().expect("writer lock");
        let tx = guard.as_ref().ok_or(StoreError::ShuttingDown)?;
        tx.send(op).map_err(|_| StoreError::ShuttingDown)
    }

    /// Stores a chunk durably; returns where it went.
    pub async fn put(
        &self,
        id: String,
        data: Vec<Bytes>,
        blake3: [u8; 32],
    ) -> Result<Location, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Put {
            id,
            data,
            blake3,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    pub async fn delete(&self, id: String) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Delete { id, reply })?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn relocate(&self, id: String, from: Location, data: Bytes) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Relocate {
            id,
            from,
            data,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// Reads and verifies a chunk; returns its location and data. A failed verification is
    /// recorded (metric and index) and returned as [`StoreError::Corrupt`].
    pub async fn read(&self, id: &str, found_by: &str) -> Result<(Location, Bytes), StoreError> {
        for _ in 0..3 {
            let Some(loc) = self.inner.index.get(id)? else {
                return Err(StoreError::NotFound(id.to_string()));
            };
            match self.read_at(id, loc, found_by).await {
                Err(StoreError::NotFound(_)) => continue, // moved by compaction; look again
                other => return other.map(|data| (loc, data)),
            }
        }
        Err(StoreError::NotFound(id.to_string()))
    }

    /// Reads and verifies the record at `loc`. NotFound when its segment is gone.
    pub async fn read_at(
        &self,
        id: &str,
        loc: Location,
        found_by: &str,
    ) -> Result<Bytes, StoreError> {
        let file = self
            .inner
            .segments
            .read()
            .expect("segments lock")
            .get(&loc.segment)
            .cloned();
        let Some(file) = file else {
            return Err(StoreError::NotFound(id.to_string()));
        };
        let buf = self
            .inner
            .io
            .read(file, loc.offset, loc.record_len() as usize)
            .await
            .map_err(|e| StoreError::io(&self.inner.name, e))?;
        if let Err(reason) = verify_record(id, &loc, &buf) {
            // Only a record the index still points at is corrupt; otherwise it was replaced.
            if self.inner.index.get(id)? != Some(loc) {
                return Err(StoreError::NotFound(id.to_string()));
            }
            self.mark_corrupt(id, &reason, found_by);
            // A write or delete that committed meanwhile made the mark stale: take it back.
            if self.inner.index.get(id)? != Some(loc) {
                self.inner.index.clear_corrupt(id)?;
            }
            return Err(StoreError::Corrupt {
                id: id.to_string(),
                reason,
            });
        }
        let data_start = HEADER_LEN + loc.id_len as usize;
        Ok(Bytes::from(buf).slice(data_start..))
    }

    fn mark_corrupt(&self, id: &str, reason: &str, found_by: &str) {
        tracing::error!(disk = %self.inner.name, chunk = %id, %reason, found_by, "chunk failed verification");
        self.inner
            .metrics
            .corrupt_found
            .with_label_values(&[self.inner.name.as_str(), found_by])
            .inc();
        let rec = CorruptRecord {
            reason: reason.to_string(),
            found_at: now_secs(),
            found_by: found_by.to_string(),
        };
        if let Err(e) = self.inner.index.record_corrupt(id, &rec) {
            tracing::error!(error = %e, "cannot record a corrupt chunk");
        }
    }

    pub fn stats(&self) -> DiskStats {
        let space = space(&self.inner.path).unwrap_or_default();
        let acct = self.inner.acct.lock().expect("accounting lock");
        let health = if let Some(reason) = self.inner.failed.lock().expect("failed lock").clone() {
            format!("failed: {reason}")
        } else if space.available <= self.inner.cfg.reserved_space
            || self
                .inner
                .refused_for_space
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            "full".to_string()
        } else {
            "ok".to_string()
        };
        DiskStats {
            space,
            live_bytes: acct.live.values().sum(),
            segment_bytes: acct.seg_len.values().sum(),
            chunks: acct.chunks,
            health,
            segments: acct.seg_len.len(),
        }
    }

    pub fn is_failed(&self) -> bool {
        self.inner.failed.lock().expect("failed lock").is_some()
    }

    pub fn scrub_state(&self) -> ScrubState {
        self.inner.scrub.lock().expect("scrub lock").clone()
    }

    pub fn set_scrub_state(&self, s: ScrubState) -> Result<(), StoreError> {
        self.inner.index.set_scrub_state(&s)?;
        *self.inner.scrub.lock().expect("scrub lock") = s;
        Ok(())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The sealed segment with the largest share of garbage, if it passes `ratio`.
    pub fn compaction_candidate(&self, ratio: f64) -> Option<CompactionCandidate> {
        let acct = self.inner.acct.lock().expect("accounting lock");
        let limit = acct.active.min(acct.checkpoint_segment);
        acct.seg_len
            .range(..limit)
            .map(|(&segment, &len)| CompactionCandidate {
                segment,
                len,
                live: acct.live.get(&segment).copied().unwrap_or(0),
            })
            .filter(|c| c.len == 0 || (c.len - c.live.min(c.len)) as f64 >= ratio * c.len as f64)
            .max_by_key(|c| c.len - c.live.min(c.len))
    }

    /// Copies the live records of `seg` to the active segment, then removes `seg`. Returns the
    /// bytes reclaimed.
    pub async fn compact(&self, seg: u64) -> Result<u64, StoreError> {
        let name = self.inner.name.clone();
        let file = self
            .inner
            .segments
            .read()
            .expect("segments lock")
            .get(&seg)
            .cloned();
        let Some(file) = file else {
            // Already removed (a previous attempt failed after taking it out of service).
            let mut acct = self.inner.acct.lock().expect("accounting lock");
            acct.seg_len.remove(&seg);
            acct.live.remove(&seg);
            return Ok(0);
        };
        let len = file.metadata().map_err(|e| StoreError::io(&name, e))?.len();
        let mut pos = 0u64;
        let mut relocated = 0u64;
        while pos + HEADER_LEN as u64 <= len {
            let head = self
                .inner
                .io
                .read(file.clone(), pos, HEADER_LEN + 1024)
                .await
                .map_err(|e| StoreError::io(&name, e))?;
            let Ok(h) = record::parse_fixed(&head) else {
                break;
            };
            if head.len() < HEADER_LEN + h.id_len
                || record::verify_check(&head, &head[HEADER_LEN..HEADER_LEN + h.id_len]).is_err()
            {
                break;
            }
            let id = String::from_utf8_lossy(&head[HEADER_LEN..HEADER_LEN + h.id_len]).into_owned();
            let rec_len = h.record_len();
            if h.kind == RecordKind::Put
                && let Some(loc) = self.inner.index.get(&id)?
                && loc.segment == seg
                && loc.offset == pos
            {
                let data_start = pos + (HEADER_LEN + h.id_len) as u64;
                let data = self
                    .inner
                    .io
                    .read(file.clone(), data_start, h.data_len as usize)
                    .await
                    .map_err(|e| StoreError::io(&name, e))?;
                if data.len() as u64 != h.data_len {
                    break; // a short segment; what is left stays live and the segment is kept
                }
                // Copied verbatim with the original blake3: a rotten record stays detectable.
                if self.relocate(id, loc, Bytes::from(data)).await? {
                    relocated += rec_len;
                }
            }
            pos += rec_len;
        }
        let live_in = |seg: u64| {
            let acct = self.inner.acct.lock().expect("accounting lock");
            acct.live.get(&seg).copied().unwrap_or(0)
        };
        if live_in(seg) > 0 {
            // The walk stopped early (unreadable bytes inside the segment): find the remaining
            // live records through the index instead, and copy them by their index location.
            let mut rest = Vec::new();
            self.inner.index.for_each_chunk(|id, loc| {
                if loc.segment == seg {
                    rest.push((id.to_string(), *loc));
                }
            })?;
            for (id, loc) in rest {
                let start = loc.offset + HEADER_LEN as u64 + u64::from(loc.id_len);
                let data = self
                    .inner
                    .io
                    .read(file.clone(), start, loc.data_len as usize)
                    .await
                    .map_err(|e| StoreError::io(&name, e))?;
                if data.len() as u64 == loc.data_len
                    && self.relocate(id, loc, Bytes::from(data)).await?
                {
                    relocated += loc.record_len();
                }
            }
        }
        let live_left = live_in(seg);
        if live_left > 0 {
            return Err(StoreError::Io {
                disk: name,
                source: io::Error::other(format!(
                    "segment {seg} still holds {live_left} live bytes after compaction; kept"
                )),
            });
        }
        // The index must be durable before the segment goes: if it rolled back past this point
        // after a power loss, replay would miss the tombstones and copies that lived here.
        self.inner.index.sync()?;
        self.inner
            .segments
            .write()
            .expect("segments lock")
            .remove(&seg);
        let path = segment_path(&self.inner.path, seg);
        std::fs::remove_file(&path).map_err(|e| StoreError::io(&name, e))?;
        fsync_dir(&self.inner.path.join("segments")).map_err(|e| StoreError::io(&name, e))?;
        {
            let mut acct = self.inner.acct.lock().expect("accounting lock");
            acct.seg_len.remove(&seg);
            acct.live.remove(&seg);
        }
        let reclaimed = len.saturating_sub(relocated);
        let m = &self.inner.metrics;
        m.compaction_segments.with_label_values(&[&name]).inc();
        m.compaction_reclaimed
            .with_label_values(&[&name])
            .inc_by(reclaimed);
        m.compaction_relocated
            .with_label_values(&[&name])
            .inc_by(relocated);
        tracing::info!(disk = %name, segment = seg, reclaimed, relocated, "segment compacted");
        Ok(reclaimed)
    }

    /// Stops the writer after it has finished what is queued, and flushes the index.
    pub fn close(&self) {
        self.writer.lock().expect("writer lock").take();
        if let Some(t) = self.writer_thread.lock().expect("writer lock").take() {
            let _ = t.join();
        }
        if let Err(e) = self.inner.index.flush() {
            tracing::warn!(disk = %self.inner.name, error = %e, "index flush on close failed");
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.close();
    }
}

// ---------------------------------------------------------------------------------------------
// Recovery.

/// Replays the segments after the checkpoint into the index, cuts torn tails, drops index
/// entries whose records are gone, rebuilds the accounting and opens the active segment.
/// Returns the active segment and its append offset.
fn recover(d: &Inner) -> anyhow::Result<(u64, u64)> {
    let seg_dir = d.path.join("segments");
    let mut segs: Vec<u64> = std::fs::read_dir(&seg_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_segment_name(&e.file_name().to_string_lossy()))
        .collect();
    segs.sort_unstable();
    let (cp_seg, cp_off) = d
        .index
        .checkpoint()?
        .unwrap_or((segs.first().copied().unwrap_or(1), 0));
    let last = segs.last().copied();
    let mut lens: BTreeMap<u64, u64> = BTreeMap::new();
    for &seg in &segs {
        let path = segment_path(&d.path, seg);
        let file = open_segment(&path, false)?;
        if seg >= cp_seg {
            let start = if seg == cp_seg { cp_off } else { 0 };
            replay_segment(d, seg, &file, start, Some(seg) == last)?;
        }
        lens.insert(seg, file.metadata()?.len());
        d.segments
            .write()
            .expect("segments lock")
            .insert(seg, Arc::new(file));
    }
    // The index must only point at records that exist.
    let mut live: HashMap<u64, u64> = HashMap::new();
    let mut chunks = 0u64;
    let mut dangling = Vec::new();
    d.index.for_each_chunk(|id, loc| {
        let ok = lens
            .get(&loc.segment)
            .is_some_and(|&len| loc.offset + loc.record_len() <= len);
        if ok {
            *live.entry(loc.segment).or_default() += loc.record_len();
            chunks += 1;
        } else {
            dangling.push(id.to_string());
        }
    })?;
    if !dangling.is_empty() {
        let mut b = IndexBatch::default();
        for id in &dangling {
            b.delete(id);
        }
        d.index.write(b)?;
        for id in &dangling {
            tracing::error!(disk = %d.name, chunk = %id, "index entry points past its segment; chunk lost");
            d.metrics
                .corrupt_found
                .with_label_values(&[d.name.as_str(), "recovery"])
                .inc();
            d.index.record_corrupt(
                id,
                &CorruptRecord {
                    reason: "record missing from its segment".into(),
                    found_at: now_secs(),
                    found_by: "recovery".into(),
                },
            )?;
        }
    }
    // The active segment: the last one, or a new one.
    let (active, offset) = match lens.iter().next_back() {
        Some((&seg, &len)) if len < d.cfg.segment_size => (seg, len),
        Some((&seg, _)) => (seg + 1, 0),
        None => (1, 0),
    };
    if let std::collections::btree_map::Entry::Vacant(e) = lens.entry(active) {
        let file = open_segment(&segment_path(&d.path, active), true)?;
        fsync_dir(&seg_dir)?;
        e.insert(0);
        d.segments
            .write()
            .expect("segments lock")
            .insert(active, Arc::new(file));
    }
    {
        let mut acct = d.acct.lock().expect("accounting lock");
        acct.live = live;
        acct.seg_len = lens;
        acct.chunks = chunks;
        acct.active = active;
        acct.checkpoint_segment = cp_seg.max(active);
    }
    // Persist where replay ended, so the next start does not redo it.
    let mut b = IndexBatch::default();
    b.checkpoint(active, offset);
    d.index.write(b)?;
    d.index.flush()?;
    tracing::info!(disk = %d.name, chunks, active, offset, "disk recovered");
    Ok((active, offset))
}

fn replay_segment(
    d: &Inner,
    seg: u64,
    file: &File,
    start: u64,
    is_last: bool,
) -> anyhow::Result<()> {
    let len = file.metadata()?.len();
    let mut pos = start;
    let mut batch = IndexBatch::default();
    let mut n = 0usize;
    let mut corrupt = Vec::new();
    let mut cut_at = None;
    while pos < len {
        let mut head = vec![0u8; HEADER_LEN];
        let fixed = if pos + HEADER_LEN as u64 <= len {
            file.read_exact_at(&mut head, pos)?;
            record::parse_fixed(&head).ok()
        } else {
            None
        };
        let Some(h) = fixed.filter(|h| {
            pos.checked_add(h.record_len())
                .is_some_and(|end| end <= len)
        }) else {
            cut_at = Some(pos);
            break;
        };
        let mut id = vec![0u8; h.id_len];
        file.read_exact_at(&mut id, pos + HEADER_LEN as u64)?;
        if record::verify_check(&head, &id).is_err() {
            cut_at = Some(pos);
            break;
        }
        let id_str = String::from_utf8_lossy(&id).into_owned();
        let rec_end = pos + h.record_len();
        match h.kind {
            RecordKind::Tombstone => batch.delete(&id_str),
            RecordKind::Put => {
                let mut data = vec![0u8; h.data_len as usize];
                file.read_exact_at(&mut data, pos + (HEADER_LEN + h.id_len) as u64)?;
                let good = blake3::hash(&data).as_bytes() == &h.blake3;
                if !good && is_last && rec_end == len {
                    // The last record of the last segment, torn by a crash mid-write.
                    cut_at = Some(pos);
                    break;
                }
                let loc = Location {
                    segment: seg,
                    offset: pos,
                    id_len: h.id_len as u16,
                    data_len: h.data_len,
                    blake3: h.blake3,
                };
                if good {
                    batch.put(&id_str, &loc);
                } else {
                    // A torn, never-acknowledged overwrite (a power loss can keep later pages
                    // and lose these) must not replace the acknowledged version: keep a
                    // previous entry if there is one, else index it as corrupt for repair.
                    d.index.write(std::mem::take(&mut batch))?;
                    if d.index.get(&id_str)?.is_none() {
                        batch.put(&id_str, &loc);
                        corrupt.push(id_str);
                    } else {
                        tracing::warn!(disk = %d.name, segment = seg, offset = pos, "a rotten record in the replay window left the previous version in place");
                    }
                }
            }
        }
        pos = rec_end;
        n += 1;
        if n.is_multiple_of(1024) {
            batch.checkpoint(seg, pos);
            d.index.write(std::mem::take(&mut batch))?;
        }
    }
    batch.checkpoint(seg, pos);
    d.index.write(batch)?;
    for id in corrupt {
        d.metrics
            .corrupt_found
            .with_label_values(&[d.name.as_str(), "recovery"])
            .inc();
        d.index.record_corrupt(
            &id,
            &CorruptRecord {
                reason: "blake3 mismatch found during recovery".into(),
                found_at: now_secs(),
                found_by: "recovery".into(),
            },
        )?;
    }
    if let Some(at) = cut_at {
        if is_last {
            let dropped = len - at;
            tracing::warn!(disk = %d.name, segment = seg, offset = at, dropped, "cutting a torn segment tail");
            file.set_len(at)?;
            file.sync_all()?;
            d.metrics
                .recovery_truncated
                .with_label_values(&[d.name.as_str()])
                .inc_by(dropped);
        } else {
            tracing::error!(disk = %d.name, segment = seg, offset = at, "unreadable bytes inside a sealed segment; left for scrub and compaction");
        }
    }
    if n > 0 {
        tracing::info!(disk = %d.name, segment = seg, records = n, "replayed segment");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The writer thread.

struct Writer {
    d: Arc<Inner>,
    active: u64,
    active_file: Arc<File>,
    offset: u64,
}

enum Planned {
    Put {
        id: String,
        loc: Location,
        prev: Option<Location>,
        reply: oneshot::Sender<Result<Location, StoreError>>,
    },
    Delete {
        id: String,
        prev: Location,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Relocate {
        id: String,
        loc: Location,
        from: Location,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

impl Planned {
    fn fail(self, e: &dyn Fn() -> StoreError) {
        match self {
            Planned::Put { reply, .. } => drop(reply.send(Err(e()))),
            Planned::Delete { reply, .. } => drop(reply.send(Err(e()))),
            Planned::Relocate { reply, .. } => drop(reply.send(Err(e()))),
        }
    }
}

impl WriteOp {
    /// Answers the operation with an error.
    fn fail(self, e: StoreError) {
        match self {
            WriteOp::Put { reply, .. } => drop(reply.send(Err(e))),
            WriteOp::Delete { reply, .. } => drop(reply.send(Err(e))),
            WriteOp::Relocate { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// Total length of a chunk held as frames.
pub fn frames_len(frames: &[Bytes]) -> u64 {
    frames.iter().map(|f| f.len() as u64).sum()
}

fn op_bytes(op: &WriteOp) -> u64 {
    match op {
        WriteOp::Put { id, data, .. } => HEADER_LEN as u64 + id.len() as u64 + frames_len(data),
        WriteOp::Relocate { id, data, .. } => (HEADER_LEN + id.len() + data.len()) as u64,
        WriteOp::Delete { id, .. } => (HEADER_LEN + id.len()) as u64,
    }
}

impl Writer {
    fn run(mut self, rx: crossbeam_channel::Receiver<WriteOp>) {
        while let Ok(first) = rx.recv() {
            let mut bytes = op_bytes(&first);
            let mut ops = vec![first];
            while ops.len() < MAX_BATCH_OPS && bytes < self.d.cfg.max_batch_bytes {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op_bytes(&op);
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit(ops);
        }
    }

    fn failed(&self) -> Option<String> {
        self.d.failed.lock().expect("failed lock").clone()
    }

    /// Writes one group of operations durably, then indexes and acknowledges them.
    fn commit(&mut self, ops: Vec<WriteOp>) {
        let name = self.d.name.clone();
        if let Some(reason) = self.failed() {
            for op in ops {
                op.fail(StoreError::DiskFailed {
                    disk: name.clone(),
                    reason: reason.clone(),
                });
            }
            return;
        }
        let available = space(&self.d.path).map(|s| s.available).unwrap_or(0);
        let reserve = self.d.cfg.reserved_space;
        let start_seg = self.active;
        let start_off = self.offset;
        // Per segment: (file, start offset, buffers).
        let mut writes: Vec<(u64, Arc<File>, u64, Vec<Bytes>)> = Vec::new();
        let mut new_files: Vec<(u64, Arc<File>)> = Vec::new();
        let mut planned: Vec<Planned> = Vec::with_capacity(ops.len());
        let mut overlay: HashMap<String, Option<Location>> = HashMap::new();
        let mut need = 0u64;

        for op in ops {
            let rec_len = op_bytes(&op);
            let current =
                |id: &str, overlay: &HashMap<String, Option<Location>>| match overlay.get(id) {
                    Some(v) => Ok(*v),
                    None => self.d.index.get(id),
                };
            // Tombstones may dip into the reserve (deleting is how space comes back).
            let is_delete = matches!(op, WriteOp::Delete { .. });
            let room = if is_delete {
                available
            } else {
                available.saturating_sub(reserve)
            };
            if need + rec_len > room {
                if !is_delete {
                    self.d
                        .refused_for_space
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                op.fail(StoreError::OutOfSpace {
                    disk: name.clone(),
                    needed: rec_len,
                    available: room.saturating_sub(need),
                });
                continue;
            }
            // Check the operation still applies before giving it space.
            let prev = match &op {
                WriteOp::Put { id, .. }
                | WriteOp::Delete { id, .. }
                | WriteOp::Relocate { id, .. } => match current(id, &overlay) {
                    Ok(p) => p,
                    Err(e) => {
                        op.fail(StoreError::Index(e));
                        continue;
                    }
                },
            };
            if matches!(op, WriteOp::Delete { .. }) && prev.is_none() {
                if let WriteOp::Delete { id, reply } = op {
                    let _ = reply.send(Err(StoreError::NotFound(id)));
                }
                continue;
            }
            if let WriteOp::Relocate { from, .. } = &op
                && prev != Some(*from)
            {
                if let WriteOp::Relocate { reply, .. } = op {
                    let _ = reply.send(Ok(false));
                }
                continue;
            }
            // Room in the active segment, or a new one.
            if self.offset > 0 && self.offset + rec_len > self.d.cfg.segment_size {
                let next = self.active + 1;
                // A leftover file here can only hold bytes of a group that failed: start empty.
                let created = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(segment_path(&self.d.path, next));
                match created {
                    Ok(f) => {
                        let f = Arc::new(f);
                        new_files.push((next, f.clone()));
                        self.active = next;
                        self.active_file = f;
                        self.offset = 0;
                    }
                    Err(e) => {
                        op.fail(StoreError::io(&name, e));
                        continue;
                    }
                }
            }
            let seg = self.active;
            let off = self.offset;
            if writes.last().map(|w| w.0) != Some(seg) {
                writes.push((seg, self.active_file.clone(), off, Vec::new()));
            }
            let bufs = &mut writes.last_mut().expect("just pushed").3;
            self.offset += rec_len;
            need += rec_len;
            match op {
                WriteOp::Put {
                    id,
                    data,
                    blake3,
                    reply,
                } => {
                    let data_len = frames_len(&data);
                    bufs.push(Bytes::from(record::encode_head(
                        RecordKind::Put,
                        id.as_bytes(),
                        data_len,
                        &blake3,
                    )));
                    bufs.extend(data.into_iter().filter(|f| !f.is_empty()));
                    let loc = Location {
                        segment: seg,
                        offset: off,
                        id_len: id.len() as u16,
                        data_len,
                        blake3,
                    };
                    overlay.insert(id.clone(), Some(loc));
                    planned.push(Planned::Put {
                        id,
                        loc,
                        prev,
                        reply,
                    });
                }
                WriteOp::Delete { id, reply } => {
                    bufs.push(Bytes::from(record::encode_head(
                        RecordKind::Tombstone,
                        id.as_bytes(),
                        0,
                        &[0; 32],
                    )));
                    overlay.insert(id.clone(), None);
                    planned.push(Planned::Delete {
                        id,
                        prev: prev.expect("checked above"),
                        reply,
                    });
                }
                WriteOp::Relocate {
                    id,
                    from,
                    data,
                    reply,
                } => {
                    bufs.push(Bytes::from(record::encode_head(
                        RecordKind::Put,
                        id.as_bytes(),
                        data.len() as u64,
                        &from.blake3,
                    )));
                    if !data.is_empty() {
                        bufs.push(data);
                    }
                    let loc = Location {
                        segment: seg,
                        offset: off,
                        ..from
                    };
                    overlay.insert(id.clone(), Some(loc));
                    planned.push(Planned::Relocate {
                        id,
                        loc,
                        from,
                        reply,
                    });
                }
            }
        }
        if planned.is_empty() {
            return;
        }
        // Write, then sync every touched segment.
        let mut result: Result<(), StoreError> = Ok(());
        'write: for (_, file, off, bufs) in &writes {
            let mut at = *off;
            for part in bufs.chunks(MAX_IOVECS) {
                let n: u64 = part.iter().map(|b| b.len() as u64).sum();
                if let Err(e) = self.d.io.write_blocking(file.clone(), at, part.to_vec()) {
                    result = Err(StoreError::io(&name, e));
                    break 'write;
                }
                at += n;
            }
        }
        if result.is_ok() {
            for (_, file, _, _) in &writes {
                if let Err(e) = self.d.io.sync_blocking(file.clone()) {
                    // After a failed fdatasync the page cache can no longer be trusted: stop
                    // taking writes on this disk rather than acknowledge what may be lost.
                    let reason = format!("fdatasync failed: {e}");
                    tracing::error!(disk = %name, %reason, "disk marked failed");
                    *self.d.failed.lock().expect("failed lock") = Some(reason.clone());
                    result = Err(StoreError::DiskFailed {
                        disk: name.clone(),
                        reason,
                    });
                    break;
                }
                self.d.metrics.syncs.with_label_values(&[&name]).inc();
            }
        }
        if result.is_ok()
            && !new_files.is_empty()
            && let Err(e) = fsync_dir(&self.d.path.join("segments"))
        {
            result = Err(StoreError::io(&name, e));
        }
        if let Err(e) = result {
            self.rollback(start_seg, start_off, &new_files);
            let msg = e.to_string();
            let is_space = matches!(e, StoreError::DiskFull { .. });
            let is_failed = matches!(e, StoreError::DiskFailed { .. });
            for p in planned {
                p.fail(&|| {
                    if is_space {
                        StoreError::DiskFull { disk: name.clone() }
                    } else if is_failed {
                        StoreError::DiskFailed {
                            disk: name.clone(),
                            reason: msg.clone(),
                        }
                    } else {
                        StoreError::Io {
                            disk: name.clone(),
                            source: io::Error::other(msg.clone()),
                        }
                    }
                });
            }
            return;
        }
        {
            let mut segs = self.d.segments.write().expect("segments lock");
            for (seg, f) in &new_files {
                segs.insert(*seg, f.clone());
            }
        }
        // Index the batch, with the checkpoint, atomically.
        let mut batch = IndexBatch::default();
        for p in &planned {
            match p {
                Planned::Put { id, loc, .. } => batch.put(id, loc),
                Planned::Relocate { id, loc, .. } => batch.relocate(id, loc),
                Planned::Delete { id, .. } => batch.delete(id),
            }
        }
        batch.checkpoint(self.active, self.offset);
        if let Err(e) = self.d.index.write(batch) {
            // The records are durable but not indexed, and the next group's checkpoint would
            // skip them: stop writing; a restart's replay indexes them.
            *self.d.failed.lock().expect("failed lock") = Some(format!("index write failed: {e}"));
            // The records are durable but not indexed; a restart's replay would index them.
            let msg = e.to_string();
            tracing::error!(disk = %name, error = %msg, "index write failed");
            for p in planned {
                p.fail(&|| StoreError::Io {
                    disk: name.clone(),
                    source: io::Error::other(msg.clone()),
                });
            }
            return;
        }
        self.d
            .metrics
            .group_commit_ops
            .observe(planned.len() as f64);
        let mut acct = self.d.acct.lock().expect("accounting lock");
        for (seg, _, off, bufs) in &writes {
            let end = off + bufs.iter().map(|b| b.len() as u64).sum::<u64>();
            let e = acct.seg_len.entry(*seg).or_default();
            *e = (*e).max(end);
        }
        acct.active = self.active;
        acct.checkpoint_segment = self.active;
        for p in planned {
            match p {
                Planned::Put {
                    loc, prev, reply, ..
                } => {
                    self.d
                        .refused_for_space
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    acct.add_live(loc.segment, loc.record_len());
                    match prev {
                        Some(p) => acct.sub_live(p.segment, p.record_len()),
                        None => acct.chunks += 1,
                    }
                    let _ = reply.send(Ok(loc));
                }
                Planned::Delete { prev, reply, .. } => {
                    acct.sub_live(prev.segment, prev.record_len());
                    acct.chunks = acct.chunks.saturating_sub(1);
                    let _ = reply.send(Ok(()));
                }
                Planned::Relocate {
                    loc, from, reply, ..
                } => {
                    acct.add_live(loc.segment, loc.record_len());
                    acct.sub_live(from.segment, from.record_len());
                    let _ = reply.send(Ok(true));
                }
            }
        }
    }

    /// Undoes the space a failed batch took: the append offset goes back and new segments go.
    fn rollback(&mut self, seg: u64, off: u64, new_files: &[(u64, Arc<File>)]) {
        for (s, _) in new_files {
            let _ = std::fs::remove_file(segment_path(&self.d.path, *s));
        }
        if self.active != seg {
            let file = self
                .d
                .segments
                .read()
                .expect("segments lock")
                .get(&seg)
                .cloned();
            if let Some(f) = file {
                self.active_file = f;
            }
        }
        self.active = seg;
        self.offset = off;
        if let Err(e) = self.active_file.set_len(off) {
            tracing::error!(disk = %self.d.name, error = %e, "cannot cut a failed write back; disk marked failed");
            *self.d.failed.lock().expect("failed lock") =
                Some(format!("cannot cut a failed write back: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoEngineKind;

    fn cfg() -> DiskConfig {
        DiskConfig {
            segment_size: 64 << 10,
            reserved_space: 0,
            max_batch_bytes: 1 << 20,
        }
    }

    fn open(path: &Path, kind: IoEngineKind) -> Disk {
        Disk::open(path, cfg(), Io::start(kind).unwrap(), Metrics::new()).unwrap()
    }

    fn data(i: u64, len: usize) -> Bytes {
        Bytes::from(
            (0..len)
                .map(|j| (i as usize * 31 + j) as u8)
                .collect::<Vec<_>>(),
        )
    }

    async fn put(d: &Disk, id: &str, b: Bytes) -> Location {
        let h = *blake3::hash(&b).as_bytes();
        // Split in uneven frames, as a client's stream would arrive.
        let cut = b.len() / 3;
        d.put(id.to_string(), vec![b.slice(..cut), b.slice(cut..)], h)
            .await
            .unwrap()
    }

    fn last_segment(path: &Path) -> PathBuf {
        let mut v: Vec<_> = std::fs::read_dir(path.join("segments"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v.pop().unwrap()
    }

    async fn torn_tail_is_cut(kind: IoEngineKind) {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), kind);
        for i in 0..30u64 {
            put(&d, &format!("c{i}"), data(i, 5000)).await;
        }
        d.delete("c3".into()).await.unwrap();
        drop(d);
        // A crash mid-append leaves half a record at the end of the last segment.
        let seg = last_segment(dir.path());
        let good_len = std::fs::metadata(&seg).unwrap().len();
        let mut torn = record::encode_head(RecordKind::Put, b"c99", 5000, &[1; 32]);
        torn.extend_from_slice(&[7u8; 100]);
        let f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all_at(&torn, good_len).unwrap();
        let d = open(dir.path(), kind);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
        for i in 0..30u64 {
            let r = d.read(&format!("c{i}"), "read").await;
            if i == 3 {
                assert!(matches!(r, Err(StoreError::NotFound(_))));
            } else {
                assert_eq!(r.unwrap().1, data(i, 5000));
            }
        }
        assert!(matches!(
            d.read("c99", "read").await,
            Err(StoreError::NotFound(_))
        ));
        // Appends continue where the valid data ends.
        put(&d, "after", data(100, 10)).await;
        drop(d);
        let d = open(dir.path(), kind);
        assert_eq!(d.read("after", "read").await.unwrap().1, data(100, 10));
        assert_eq!(d.stats().chunks, 30);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn torn_tail_is_cut_on_io_uring() {
        torn_tail_is_cut(IoEngineKind::IoUring).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn torn_tail_is_cut_on_pread() {
        torn_tail_is_cut(IoEngineKind::Pread).await;
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), &target).unwrap();
            }
        }
    }

    /// A crash can stop an append after any byte. Whatever the cut, recovery keeps every
    /// earlier record, keeps the new one only if it is whole, and appends continue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_cut_of_an_unfinished_append_recovers() {
        let base = tempfile::tempdir().unwrap();
        let d = open(base.path(), IoEngineKind::Pread);
        for i in 0..5u64 {
            put(&d, &format!("c{i}"), data(i, 3000)).await;
        }
        drop(d);
        let late = data(77, 5000);
        let extra = record::encode_put(b"late", &late);
        let cuts: Vec<usize> = (0..=HEADER_LEN + 6)
            .chain([100, 2500, extra.len() - 1, extra.len()])
            .collect();
        for cut in cuts {
            let case = tempfile::tempdir().unwrap();
            copy_dir(base.path(), case.path());
            let seg = last_segment(case.path());
            let good = std::fs::metadata(&seg).unwrap().len();
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            f.write_all_at(&extra[..cut], good).unwrap();
            drop(f);
            let d = open(case.path(), IoEngineKind::Pread);
            let whole = cut == extra.len();
            let want_len = if whole { good + cut as u64 } else { good };
            assert_eq!(
                std::fs::metadata(&seg).unwrap().len(),
                want_len,
                "cut {cut}"
            );
            for i in 0..5u64 {
                assert_eq!(
                    d.read(&format!("c{i}"), "read").await.unwrap().1,
                    data(i, 3000)
                );
            }
            match d.read("late", "read").await {
                Ok((_, b)) => assert!(whole && b == late, "cut {cut}: partial record served"),
                Err(StoreError::NotFound(_)) => assert!(!whole, "cut {cut}: whole record lost"),
                Err(e) => panic!("cut {cut}: {e}"),
            }
            put(&d, "next", data(9, 10)).await;
            drop(d);
            let d = open(case.path(), IoEngineKind::Pread);
            assert_eq!(
                d.read("next", "read").await.unwrap().1,
                data(9, 10),
                "cut {cut}"
            );
            assert_eq!(d.stats().chunks, 6 + u64::from(whole), "cut {cut}");
        }
    }

    /// A power loss can keep a later record and lose the pages of an earlier, never
    /// acknowledged overwrite: replay must not let that torn record replace the version that
    /// was acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_overwrite_does_not_replace_the_acknowledged_version() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), IoEngineKind::Pread);
        put(&d, "x", data(1, 4000)).await;
        drop(d);
        let seg = last_segment(dir.path());
        let end = std::fs::metadata(&seg).unwrap().len();
        // x = v2 with its data pages lost (zeros), then a whole record after it.
        let v2 = data(2, 4000);
        let mut torn = record::encode_head(
            RecordKind::Put,
            b"x",
            v2.len() as u64,
            blake3::hash(&v2).as_bytes(),
        );
        torn.extend_from_slice(&vec![0u8; v2.len()]);
        let y = data(3, 100);
        let whole = record::encode_put(b"y", &y);
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&torn, end).unwrap();
        f.write_all_at(&whole, end + torn.len() as u64).unwrap();
        drop(f);
        let d = open(dir.path(), IoEngineKind::Pread);
        assert_eq!(d.read("x", "read").await.unwrap().1, data(1, 4000));
        assert_eq!(d.read("y", "read").await.unwrap().1, y);
        assert!(d.index().corrupt().unwrap().is_empty());
    }

    /// A sealed segment with a rotten header in the middle is still compacted: the records
    /// after the damage are found through the index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_gets_past_a_rotten_header() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), IoEngineKind::Pread);
        let mut locs = Vec::new();
        for i in 0..12u64 {
            locs.push(put(&d, &format!("c{i:02}"), data(i, 6000)).await);
        }
        let seg = locs[0].segment;
        assert!(locs[11].segment > seg, "the first segment is sealed");
        // Delete most of the first segment, keep c03 and c07, and rot c05's header.
        let in_first: Vec<u64> = (0..12)
            .filter(|&i| locs[i as usize].segment == seg)
            .collect();
        for &i in &in_first {
            if i != 3 && i != 7 {
                d.delete(format!("c{i:02}")).await.unwrap();
            }
        }
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), seg))
            .unwrap();
        f.write_all_at(b"JUNK", locs[5].offset).unwrap();
        drop(f);
        d.compact(seg).await.unwrap();
        assert!(!segment_path(dir.path(), seg).exists());
        for i in [3u64, 7] {
            assert_eq!(
                d.read(&format!("c{i:02}"), "read").await.unwrap().1,
                data(i, 6000)
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_index_is_rebuilt_from_the_segments() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), IoEngineKind::Pread);
        for i in 0..40u64 {
            put(&d, &format!("c{i:02}"), data(i, 3000)).await;
        }
        put(&d, "c05", data(500, 100)).await;
        d.delete("c07".into()).await.unwrap();
        drop(d);
        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let d = open(dir.path(), IoEngineKind::Pread);
        assert_eq!(d.stats().chunks, 39);
        assert_eq!(d.read("c05", "read").await.unwrap().1, data(500, 100));
        assert!(matches!(
            d.read("c07", "read").await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(d.read("c39", "read").await.unwrap().1, data(39, 3000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rot_inside_a_sealed_record_is_kept_indexed_and_marked() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), IoEngineKind::Pread);
        let first = put(&d, "a", data(1, 2000)).await;
        put(&d, "b", data(2, 2000)).await;
        drop(d);
        // Rot in a's data, then remove the index so replay must judge the record itself.
        let seg = segment_path(dir.path(), first.segment);
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0xEE], first.offset + HEADER_LEN as u64 + 1 + 10)
            .unwrap();
        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let d = open(dir.path(), IoEngineKind::Pread);
        assert!(matches!(
            d.read("a", "read").await,
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(d.read("b", "read").await.unwrap().1, data(2, 2000));
        let marked: Vec<String> = d
            .index()
            .corrupt()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(marked, ["a"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_moves_live_records_and_removes_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), IoEngineKind::IoUring);
        for i in 0..40u64 {
            put(&d, &format!("c{i:02}"), data(i, 8000)).await;
        }
        for i in 0..40u64 {
            if i % 4 != 0 {
                d.delete(format!("c{i:02}")).await.unwrap();
            }
        }
        let mut compacted = 0;
        while let Some(c) = d.compaction_candidate(0.5) {
            d.compact(c.segment).await.unwrap();
            compacted += 1;
            assert!(compacted < 100, "compaction terminates");
        }
        assert!(compacted >= 3, "{compacted}");
        for i in (0..40u64).step_by(4) {
            assert_eq!(
                d.read(&format!("c{i:02}"), "read").await.unwrap().1,
                data(i, 8000)
            );
        }
        drop(d);
        let d = open(dir.path(), IoEngineKind::IoUring);
        assert_eq!(d.stats().chunks, 10);
        assert!(matches!(
            d.read("c01", "read").await,
            Err(StoreError::NotFound(_))
        ));
    }
}
