//! metad's Raft storage: the log (`raft_log`, `raft_meta`) and the state machine (`sm`,
//! `sm_meta`) as column families of one RocksDB.
//!
//! The state machine is an ordered key-value map. Every log entry carries a [`Batch`] of
//! commands (many clients' proposals share one entry) applied in order; the changes of a whole
//! `apply` call and the new last-applied id go in one RocksDB batch, so the data and the
//! position in the log can never disagree after a crash. Typed tables (cluster map, pools,
//! buckets, ...) are key ranges on top of this map.
//!
//! Keys: `raft_log`: the log index as 8 big-endian bytes (so byte order is index order) →
//! entry. `raft_meta`: `vote`, `committed`, `last_purged`. `sm_meta`: `applied`, `membership`,
//! `snapshot` (the current snapshot: meta and data). Values are JSON with a version field
//! where they are ours.

// openraft's trait methods return its `StorageError`; helpers return the same type rather than
// box it only to unbox it again.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use prost::Message;
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use sov_proto::metad::AuditRecord;

use crate::audit;

/// Byte strings as hex in human-readable encodings (JSON, where serde_json would write them as
/// arrays of numbers), as plain bytes in binary ones (bincode: the log, Raft messages,
/// snapshots).
mod hexser {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    fn decode<'de, D: Deserializer<'de>>(s: &str) -> Result<Vec<u8>, D::Error> {
        hex::decode(s).map_err(serde::de::Error::custom)
    }

    /// A byte buffer from a binary format (bincode writes `serialize_bytes` as a length and
    /// the bytes, which reads back as a `Vec<u8>` sequence).
    fn serde_bytes_buf<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Vec::<u8>::deserialize(d)
    }

    pub mod bytes {
        use super::*;
        pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            if s.is_human_readable() {
                s.serialize_str(&hex::encode(v))
            } else {
                s.serialize_bytes(v)
            }
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            if d.is_human_readable() {
                decode::<D>(&String::deserialize(d)?)
            } else {
                Ok(serde_bytes_buf(d)?)
            }
        }
    }

    pub mod opt {
        use super::*;
        pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            if s.is_human_readable() {
                v.as_ref().map(hex::encode).serialize(s)
            } else {
                v.serialize(s)
            }
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            if d.is_human_readable() {
                Option::<String>::deserialize(d)?
                    .map(|h| decode::<D>(&h))
                    .transpose()
            } else {
                Option::<Vec<u8>>::deserialize(d)
            }
        }
    }

    pub mod pairs {
        use super::*;
        pub fn serialize<S: Serializer>(v: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
            if !s.is_human_readable() {
                return v.serialize(s);
            }
            s.collect_seq(v.iter().map(|(k, v)| (hex::encode(k), hex::encode(v))))
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<crate::store::Pairs, D::Error> {
            if !d.is_human_readable() {
                return crate::store::Pairs::deserialize(d);
            }
            Vec::<(String, String)>::deserialize(d)?
                .into_iter()
                .map(|(k, v)| Ok((decode::<D>(&k)?, decode::<D>(&v)?)))
                .collect()
        }
    }

    pub mod checks {
        use super::*;
        use crate::store::Check;
        pub fn serialize<S: Serializer>(v: &[(Vec<u8>, Check)], s: S) -> Result<S::Ok, S::Error> {
            if !s.is_human_readable() {
                return v.serialize(s);
            }
            s.collect_seq(v.iter().map(|(k, c)| (hex::encode(k), c)))
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<(Vec<u8>, Check)>, D::Error> {
            if !d.is_human_readable() {
                return Vec::<(Vec<u8>, Check)>::deserialize(d);
            }
            Vec::<(String, Check)>::deserialize(d)?
                .into_iter()
                .map(|(k, c)| Ok((decode::<D>(&k)?, c)))
                .collect()
        }
    }
}

/// Members are numbered.
pub type NodeId = u64;

/// What the log knows about a member: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// gRPC address of the member's metad API.
    pub addr: String,
}

openraft::declare_raft_types!(
    /// openraft's type configuration for metad.
    pub TypeConfig:
        D = Batch,
        R = BatchResult,
        NodeId = NodeId,
        Node = Member,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// One state machine command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets a key.
    Put {
        #[serde(with = "hexser::bytes")]
        key: Vec<u8>,
        #[serde(with = "hexser::bytes")]
        value: Vec<u8>,
    },
    /// Removes a key (absent is fine).
    Delete {
        #[serde(with = "hexser::bytes")]
        key: Vec<u8>,
    },
    /// Sets (`Some`) or removes (`None`) a key only if its current value is `expected`
    /// (`None` = absent). The building block of every read-modify-write on a table.
    CompareAndSet {
        #[serde(with = "hexser::bytes")]
        key: Vec<u8>,
        #[serde(with = "hexser::opt")]
        expected: Option<Vec<u8>>,
        #[serde(with = "hexser::opt")]
        new: Option<Vec<u8>>,
    },
    /// Applies `ops` only if every check holds, all at once; otherwise changes nothing and
    /// reports the first check that failed.
    Txn {
        #[serde(with = "hexser::checks")]
        checks: Vec<(Vec<u8>, Check)>,
        ops: Vec<Op>,
    },
    /// Appends an audit record (an encoded `AuditRecord`; apply numbers it and chains it to
    /// the one before). The only way to write under `audit/`.
    AuditAppend {
        #[serde(with = "hexser::bytes")]
        record: Vec<u8>,
    },
}

/// What apply answers a write under `audit/` other than `AuditAppend`: refused.
fn audit_refused() -> CommandResult {
    CommandResult::Failed {
        check: u32::MAX,
        current: None,
    }
}

/// A condition on the state machine, checked when the command is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Check {
    /// The key has no value.
    Absent,
    /// The key has a value.
    Exists,
    /// The key has exactly this value.
    Equals(#[serde(with = "hexser::bytes")] Vec<u8>),
    /// No key starts with this prefix (the check's key is the prefix).
    PrefixEmpty,
}

/// A write inside a [`Command::Txn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        #[serde(with = "hexser::bytes")]
        key: Vec<u8>,
        #[serde(with = "hexser::bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "hexser::bytes")]
        key: Vec<u8>,
    },
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Done,
    /// A compare-and-set found another value; nothing was changed.
    Conflict {
        #[serde(with = "hexser::opt")]
        current: Option<Vec<u8>>,
    },
    /// A transaction's check number `check` failed; `current` is the key's value (for
    /// `PrefixEmpty`, the first key found under the prefix).
    Failed {
        check: u32,
        #[serde(with = "hexser::opt")]
        current: Option<Vec<u8>>,
    },
}

/// Commands applied in order, as one log entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub commands: Vec<Command>,
}

/// One result per command of a [`Batch`] (empty for blank and membership entries).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    pub results: Vec<CommandResult>,
}

type StorageResult<T> = Result<T, StorageError<NodeId>>;
/// The last applied log id and the membership it carries.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, Member>);
/// Adds one write to an `apply` call's batch and makes it visible to the checks after it.
fn stage(
    b: &mut WriteBatch,
    sm: &rocksdb::ColumnFamily,
    pending: &mut Pending,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
) {
    match &value {
        Some(v) => b.put_cf(sm, &key, v),
        None => b.delete_cf(sm, &key),
    }
    pending.insert(key, value);
}

/// What [`StateMachine::walk`] does after a pair.
pub enum Walk {
    Next,
    SeekTo(Vec<u8>),
    Stop,
}

/// Values written earlier in one `apply` call, which its RocksDB batch does not show to reads.
type Pending = std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>;
/// Key-value pairs in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

const CF_LOG: &str = "raft_log";
const CF_META: &str = "raft_meta";
const CF_SM: &str = "sm";
const CF_SM_META: &str = "sm_meta";

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// Opens (or creates) the RocksDB holding a member's log and state machine.
pub fn open(path: &Path) -> std::io::Result<(LogStore, StateMachine)> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::None);
    // Reuse old WAL files instead of growing new ones: a sync of an overwrite needs no file
    // size update in the filesystem journal, which halves the cost of each log sync on ext4.
    // Recycled files need the tail-tolerant recovery mode (a torn tail after a crash holds
    // only writes that were never synced, hence never acknowledged).
    opts.set_recycle_log_file_num(4);
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
    let cfs = [CF_LOG, CF_META, CF_SM, CF_SM_META]
        .into_iter()
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs).map_err(std::io::Error::other)?);
    let (flushes, rx) = std::sync::mpsc::channel();
    let fdb = Arc::downgrade(&db);
    std::thread::Builder::new()
        .name("metad-log-sync".into())
        .spawn(move || flusher(fdb, rx))?;
    Ok((
        LogStore {
            db: db.clone(),
            flushes,
            cache: Default::default(),
        },
        StateMachine {
            db,
            snapshot_lock: Default::default(),
        },
    ))
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("open() creates every column family")
}

fn get_json<T: serde::de::DeserializeOwned>(
    db: &DB,
    cf_name: &str,
    key: &str,
    subject: ErrorSubject<NodeId>,
) -> StorageResult<Option<T>> {
    let raw = db
        .get_cf(cf(db, cf_name), key)
        .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
    raw.map(|b| serde_json::from_slice(&b).map_err(|e| io_err(subject, ErrorVerb::Read, e)))
        .transpose()
}

/// The replicated log and the vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// The newest entries, contiguous up to the last one appended, so replication to the
    /// followers does not read and decode each entry back from RocksDB.
    cache: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, Entry<TypeConfig>>>>,
    /// Appends waiting for the WAL sync that makes them durable (see [`flusher`]).
    flushes: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// Entries kept in [`LogStore`]'s cache.
const LOG_CACHE: usize = 8192;

/// The log's group commit, on its own thread: appends are written to RocksDB (visible to
/// replication at once) without a sync; this thread syncs the WAL once for every append queued
/// meanwhile and only then tells openraft they are durable, in order. openraft counts the
/// leader's own copy towards the quorum only after that, so an entry is never committed on a
/// copy that could vanish; and the leader no longer waits for its own sync before it sends
/// the entry to the followers (the syncs run in parallel, as in etcd).
///
/// It holds the database weakly: the stores own it, and it closes when they are dropped.
fn flusher(db: std::sync::Weak<DB>, rx: std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let r = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the log store is closed".to_string()),
        };
        for cb in waiting {
            cb.log_io_completed(r.clone().map_err(std::io::Error::other));
        }
    }
}

impl LogStore {
    fn put_meta_synced<T: Serialize>(
        &self,
        key: &str,
        v: &T,
        subject: ErrorSubject<NodeId>,
    ) -> StorageResult<()> {
        let bytes =
            serde_json::to_vec(v).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let mut b = WriteBatch::default();
        b.put_cf(cf(&self.db, CF_META), key, bytes);
        self.db
            .write_opt(b, &synced())
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        {
            let cache = self.cache.lock().expect("log cache lock");
            if cache
                .first_key_value()
                .is_some_and(|(first, _)| *first <= start)
            {
                return Ok(cache.range(range).map(|(_, e)| e.clone()).collect());
            }
        }
        let from = index_key(start);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let index = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                io_err(
                    ErrorSubject::Logs,
                    ErrorVerb::Read,
                    std::io::Error::other("bad log key"),
                )
            })?);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> = bincode::deserialize(&v)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> =
            get_json(&self.db, CF_META, "last_purged", ErrorSubject::Store)?;
        let last = match self
            .db
            .iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End)
            .next()
        {
            Some(item) => {
                let (_, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                let e: Entry<TypeConfig> = bincode::deserialize(&v)
                    .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta_synced("vote", vote, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        get_json(&self.db, CF_META, "vote", ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not synced: it only lets a restarted member apply up to it without waiting for a
        // leader; losing the latest value costs nothing but that. The next synced write (an
        // append's WAL sync) makes it durable anyway.
        let bytes = serde_json::to_vec(&committed)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.db
            .put_cf(cf(&self.db, CF_META), "committed", bytes)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(
            get_json::<Option<LogId<NodeId>>>(&self.db, CF_META, "committed", ErrorSubject::Store)?
                .flatten(),
        )
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // One batch, written now and synced by the flusher thread, which then calls back:
        // openraft treats the entries as durable only from the callback on.
        let mut b = WriteBatch::default();
        let mut appended = Vec::new();
        for e in entries {
            let v = bincode::serialize(&e)
                .map_err(|err| io_err(ErrorSubject::Logs, ErrorVerb::Write, err))?;
            b.put_cf(cf(&self.db, CF_LOG), index_key(e.log_id.index), v);
            appended.push(e);
        }
        self.db
            .write(b)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        {
            let mut cache = self.cache.lock().expect("log cache lock");
            for e in appended {
                // Appends follow the last entry (after a truncate if they replace a tail), so
                // the cache stays contiguous; a gap would mean it no longer is: start over.
                if let Some((last, _)) = cache.last_key_value()
                    && *last + 1 != e.log_id.index
                {
                    cache.clear();
                }
                cache.insert(e.log_id.index, e);
            }
            while cache.len() > LOG_CACHE {
                cache.pop_first();
            }
        }
        self.flushes.send(callback).map_err(|_| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other("the log sync thread stopped"),
            )
        })
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.cache
            .lock()
            .expect("log cache lock")
            .retain(|i, _| *i < log_id.index);
        let mut b = WriteBatch::default();
        b.delete_range_cf(
            cf(&self.db, CF_LOG),
            index_key(log_id.index),
            index_key(u64::MAX),
        );
        b.delete_cf(cf(&self.db, CF_LOG), index_key(u64::MAX));
        self.db
            .write_opt(b, &synced())
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.cache
            .lock()
            .expect("log cache lock")
            .retain(|i, _| *i > log_id.index);
        // Record what is purged first: entries at or below it are ignored from then on, so a
        // crash in the middle of the delete leaves nothing inconsistent.
        self.put_meta_synced("last_purged", &log_id, ErrorSubject::Store)?;
        self.db
            .delete_range_cf(
                cf(&self.db, CF_LOG),
                index_key(0),
                index_key(log_id.index.saturating_add(1)),
            )
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

/// The snapshot as stored and shipped: its meta and every key-value pair.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    version: u32,
    meta: SnapshotMeta<NodeId, Member>,
    #[serde(with = "hexser::pairs")]
    pairs: Pairs,
}

/// The key-value state machine.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    /// Taken to store a snapshot (built or installed), so an older build finishing late never
    /// replaces a newer snapshot.
    snapshot_lock: Arc<std::sync::Mutex<()>>,
}

/// Snapshots installed from a leader since start (a member that was away catching up).
pub static SNAPSHOTS_INSTALLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The log id of the stored snapshot, if any.
fn stored_snapshot_id(db: &DB) -> StorageResult<Option<LogId<NodeId>>> {
    let raw = db
        .get_cf(cf(db, CF_SM_META), "snapshot")
        .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
    let Some(bytes) = raw else { return Ok(None) };
    let file: SnapshotFile = bincode::deserialize(&bytes)
        .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
    Ok(file.meta.last_log_id)
}

/// A frozen copy of the state machine, taken where openraft serialises it with `apply`.
pub struct SnapshotBuilder {
    db: Arc<DB>,
    lock: Arc<std::sync::Mutex<()>>,
    /// The frozen copy, or why it could not be taken.
    frozen: StorageResult<(AppliedState, Pairs)>,
}

impl StateMachine {
    /// Reads a key of the state machine (a local, possibly stale read).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error> {
        self.db.get_cf(cf(&self.db, CF_SM), key)
    }

    /// One key's value and every pair under each prefix, all read from one RocksDB snapshot
    /// (a single point of the state machine, whatever applies meanwhile).
    pub fn consistent_read(
        &self,
        key: &[u8],
        prefixes: &[&[u8]],
    ) -> Result<(Option<Vec<u8>>, Vec<Pairs>), rocksdb::Error> {
        let snap = self.db.snapshot();
        let sm = cf(&self.db, CF_SM);
        let value = snap.get_cf(sm, key)?;
        let mut out = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            let mut pairs = Vec::new();
            for item in snap.iterator_cf(sm, IteratorMode::From(prefix, Direction::Forward)) {
                let (k, v) = item?;
                if !k.starts_with(prefix) {
                    break;
                }
                pairs.push((k.to_vec(), v.to_vec()));
            }
            out.push(pairs);
        }
        Ok((value, out))
    }

    /// Visits pairs in key order from `from` (inclusive); the visitor steps, seeks or stops.
    pub fn walk(
        &self,
        from: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> Walk,
    ) -> Result<(), rocksdb::Error> {
        let mut it = self.db.raw_iterator_cf(cf(&self.db, CF_SM));
        it.seek(from);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            match visit(k, v) {
                Walk::Next => it.next(),
                Walk::SeekTo(to) => it.seek(&to),
                Walk::Stop => break,
            }
        }
        it.status()
    }

    /// Key-value pairs whose key starts with `prefix`, in key order, after `start_after`.
    pub fn scan(
        &self,
        prefix: &[u8],
        start_after: &[u8],
        limit: usize,
    ) -> Result<Pairs, rocksdb::Error> {
        let mut from = prefix.to_vec();
        if start_after > prefix {
            from = start_after.to_vec();
            from.push(0);
        }
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            cf(&self.db, CF_SM),
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// A key's value as the commands applied so far in this call left it.
    fn read_through(&self, pending: &Pending, key: &[u8]) -> StorageResult<Option<Vec<u8>>> {
        match pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => self
                .db
                .get_cf(cf(&self.db, CF_SM), key)
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e)),
        }
    }

    /// The index and current value of the first check that does not hold.
    fn first_failed(
        &self,
        pending: &Pending,
        checks: &[(Vec<u8>, Check)],
    ) -> StorageResult<Option<(u32, Option<Vec<u8>>)>> {
        for (i, (key, check)) in checks.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if let Check::PrefixEmpty = check {
                if let Some(k) = self.first_under(pending, key)? {
                    return Ok(Some((i, Some(k))));
                }
                continue;
            }
            let current = self.read_through(pending, key)?;
            let holds = match check {
                Check::Absent => current.is_none(),
                Check::Exists => current.is_some(),
                Check::Equals(v) => current.as_deref() == Some(v.as_slice()),
                Check::PrefixEmpty => unreachable!("handled above"),
            };
            if !holds {
                return Ok(Some((i, current)));
            }
        }
        Ok(None)
    }

    /// Some live key under `prefix`, counting this call's pending writes, if there is one.
    fn first_under(&self, pending: &Pending, prefix: &[u8]) -> StorageResult<Option<Vec<u8>>> {
        if let Some((k, _)) = pending
            .iter()
            .find(|(k, v)| v.is_some() && k.starts_with(prefix))
        {
            return Ok(Some(k.clone()));
        }
        let iter = self.db.iterator_cf(
            cf(&self.db, CF_SM),
            IteratorMode::From(prefix, Direction::Forward),
        );
        for item in iter {
            let (k, _) =
                item.map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            if !k.starts_with(prefix) {
                break;
            }
            // Deleted earlier in this call: look further.
            if matches!(pending.get(k.as_ref()), Some(None)) {
                continue;
            }
            return Ok(Some(k.to_vec()));
        }
        Ok(None)
    }

    fn applied(&self) -> StorageResult<AppliedState> {
        let applied = get_json::<Option<LogId<NodeId>>>(
            &self.db,
            CF_SM_META,
            "applied",
            ErrorSubject::StateMachine,
        )?
        .flatten();
        let membership = get_json(
            &self.db,
            CF_SM_META,
            "membership",
            ErrorSubject::StateMachine,
        )?
        .unwrap_or_default();
        Ok((applied, membership))
    }

    fn all_pairs(&self) -> StorageResult<Pairs> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf(&self.db, CF_SM), IteratorMode::Start)
        {
            let (k, v) =
                item.map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let frozen = std::mem::replace(&mut self.frozen, Ok(Default::default()));
        let ((applied, membership), pairs) = frozen?;
        let snapshot_id = match applied {
            Some(id) => format!("{}-{}", id.leader_id, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let subject = || ErrorSubject::Snapshot(Some(meta.signature()));
        let file = SnapshotFile {
            version: 1,
            meta: meta.clone(),
            pairs,
        };
        let bytes =
            bincode::serialize(&file).map_err(|e| io_err(subject(), ErrorVerb::Write, e))?;
        // Built concurrently with apply and installs: store it only if nothing newer is stored.
        let _g = self.lock.lock().expect("snapshot lock");
        if stored_snapshot_id(&self.db)? <= applied {
            let mut b = WriteBatch::default();
            b.put_cf(cf(&self.db, CF_SM_META), "snapshot", &bytes);
            self.db
                .write_opt(b, &synced())
                .map_err(|e| io_err(subject(), ErrorVerb::Write, e))?;
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<BatchResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let sm = cf(&self.db, CF_SM);
        let mut b = WriteBatch::default();
        // Values written earlier in this call, which the batch does not show to reads yet.
        let mut pending = Pending::default();
        let mut results = Vec::new();
        let mut applied = None;
        let mut membership = None;
        for entry in entries {
            applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => results.push(BatchResult::default()),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    results.push(BatchResult::default());
                }
                EntryPayload::Normal(batch) => {
                    let mut out = Vec::with_capacity(batch.commands.len());
                    for c in batch.commands {
                        out.push(match c {
                            // The audit log is append-only.
                            Command::Put { key, .. }
                            | Command::Delete { key }
                            | Command::CompareAndSet { key, .. }
                                if key.starts_with(audit::PREFIX) =>
                            {
                                audit_refused()
                            }
                            Command::Txn { ops, .. }
                                if ops.iter().any(|op| match op {
                                    Op::Put { key, .. } | Op::Delete { key } => {
                                        key.starts_with(audit::PREFIX)
                                    }
                                }) =>
                            {
                                audit_refused()
                            }
                            Command::AuditAppend { record } => {
                                let seq = match self.read_through(&pending, audit::NEXT)? {
                                    Some(v) if v.len() == 8 => {
                                        u64::from_be_bytes(v.try_into().expect("8 bytes"))
                                    }
                                    _ => 1,
                                };
                                let prev = self
                                    .read_through(&pending, audit::HEAD)?
                                    .map(|v| String::from_utf8_lossy(&v).to_string())
                                    .unwrap_or_default();
                                let mut r = AuditRecord::decode(&record[..]).unwrap_or_else(|e| {
                                    AuditRecord {
                                        method: "?".into(),
                                        message: format!("unreadable audit record: {e}"),
                                        ..Default::default()
                                    }
                                });
                                r.seq = seq;
                                r.prev_hash = prev;
                                r.hash = audit::chain_hash(&r);
                                let head = r.hash.clone().into_bytes();
                                stage(
                                    &mut b,
                                    sm,
                                    &mut pending,
                                    audit::record_key(seq),
                                    Some(r.encode_to_vec()),
                                );
                                stage(
                                    &mut b,
                                    sm,
                                    &mut pending,
                                    audit::NEXT.to_vec(),
                                    Some((seq + 1).to_be_bytes().to_vec()),
                                );
                                stage(&mut b, sm, &mut pending, audit::HEAD.to_vec(), Some(head));
                                CommandResult::Done
                            }
                            Command::Put { key, value } => {
                                stage(&mut b, sm, &mut pending, key, Some(value));
                                CommandResult::Done
                            }
                            Command::Delete { key } => {
                                stage(&mut b, sm, &mut pending, key, None);
                                CommandResult::Done
                            }
                            Command::CompareAndSet { key, expected, new } => {
                                let current = self.read_through(&pending, &key)?;
                                if current != expected {
                                    CommandResult::Conflict { current }
                                } else {
                                    stage(&mut b, sm, &mut pending, key, new);
                                    CommandResult::Done
                                }
                            }
                            Command::Txn { checks, ops } => {
                                match self.first_failed(&pending, &checks)? {
                                    Some((check, current)) => {
                                        CommandResult::Failed { check, current }
                                    }
                                    None => {
                                        for op in ops {
                                            match op {
                                                Op::Put { key, value } => stage(
                                                    &mut b,
                                                    sm,
                                                    &mut pending,
                                                    key,
                                                    Some(value),
                                                ),
                                                Op::Delete { key } => {
                                                    stage(&mut b, sm, &mut pending, key, None)
                                                }
                                            }
                                        }
                                        CommandResult::Done
                                    }
                                }
                            }
                        });
                    }
                    results.push(BatchResult { results: out });
                }
            }
        }
        let meta = cf(&self.db, CF_SM_META);
        if let Some(a) = applied {
            let v = serde_json::to_vec(&Some(a))
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
            b.put_cf(meta, "applied", v);
        }
        if let Some(m) = membership {
            let v = serde_json::to_vec(&m)
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
            b.put_cf(meta, "membership", v);
        }
        // Not synced: the log is durable, and a state machine that lost its tail is re-applied
        // from the log up to the committed index on restart.
        self.db
            .write(b)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Called in order with `apply`, so this copy is one consistent point of the state
        // machine. Metadata is small; a checkpoint-based snapshot replaces this when it is not.
        let frozen = self
            .applied()
            .and_then(|a| self.all_pairs().map(|p| (a, p)));
        SnapshotBuilder {
            db: self.db.clone(),
            lock: self.snapshot_lock.clone(),
            frozen,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let subject = || ErrorSubject::Snapshot(Some(meta.signature()));
        let bytes = snapshot.into_inner();
        let file: SnapshotFile =
            bincode::deserialize(&bytes).map_err(|e| io_err(subject(), ErrorVerb::Read, e))?;
        let sm = cf(&self.db, CF_SM);
        let sm_meta = cf(&self.db, CF_SM_META);
        // Replace everything in one synced batch.
        let mut b = WriteBatch::default();
        for item in self.db.iterator_cf(sm, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| io_err(subject(), ErrorVerb::Read, e))?;
            b.delete_cf(sm, k);
        }
        for (k, v) in &file.pairs {
            b.put_cf(sm, k, v);
        }
        let applied = serde_json::to_vec(&meta.last_log_id)
            .map_err(|e| io_err(subject(), ErrorVerb::Write, e))?;
        let membership = serde_json::to_vec(&meta.last_membership)
            .map_err(|e| io_err(subject(), ErrorVerb::Write, e))?;
        b.put_cf(sm_meta, "applied", applied);
        b.put_cf(sm_meta, "membership", membership);
        // Keep it as the current snapshot, with the meta openraft gave (it names this install).
        let stored = SnapshotFile {
            version: 1,
            meta: meta.clone(),
            pairs: file.pairs,
        };
        let stored =
            bincode::serialize(&stored).map_err(|e| io_err(subject(), ErrorVerb::Write, e))?;
        b.put_cf(sm_meta, "snapshot", stored);
        let _g = self.snapshot_lock.lock().expect("snapshot lock");
        self.db
            .write_opt(b, &synced())
            .map_err(|e| io_err(subject(), ErrorVerb::Write, e))?;
        SNAPSHOTS_INSTALLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let raw = self
            .db
            .get_cf(cf(&self.db, CF_SM_META), "snapshot")
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        let Some(bytes) = raw else { return Ok(None) };
        let file: SnapshotFile = bincode::deserialize(&bytes)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().expect("a temp dir");
            let (log, sm) = open(dir.path()).expect("rocksdb opens");
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage conformance cases against our RocksDB stores.
    #[test]
    fn passes_openraft_storage_suite() {
        Suite::test_all(Builder).expect("storage suite");
    }

    #[tokio::test]
    async fn commands_apply_in_order_with_compare_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut sm) = open(dir.path()).unwrap();
        let id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 0), i);
        let batch = Batch {
            commands: vec![
                Command::Put {
                    key: b"a".to_vec(),
                    value: b"1".to_vec(),
                },
                Command::CompareAndSet {
                    key: b"a".to_vec(),
                    expected: Some(b"1".to_vec()),
                    new: Some(b"2".to_vec()),
                },
                Command::CompareAndSet {
                    key: b"a".to_vec(),
                    expected: Some(b"1".to_vec()),
                    new: None,
                },
                Command::CompareAndSet {
                    key: b"b".to_vec(),
                    expected: None,
                    new: Some(b"x".to_vec()),
                },
                Command::Delete {
                    key: b"zz".to_vec(),
                },
            ],
        };
        let r = sm
            .apply(vec![
                Entry {
                    log_id: id(1),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: id(2),
                    payload: EntryPayload::Normal(batch),
                },
            ])
            .await
            .unwrap();
        assert_eq!(r.len(), 2, "one result per entry");
        assert_eq!(
            r[1].results,
            vec![
                CommandResult::Done,
                CommandResult::Done,
                CommandResult::Conflict {
                    current: Some(b"2".to_vec())
                },
                CommandResult::Done,
                CommandResult::Done,
            ]
        );
        assert_eq!(sm.get(b"a").unwrap(), Some(b"2".to_vec()));
        assert_eq!(sm.scan(b"", b"", 10).unwrap().len(), 2);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(id(2)));
        // The state survives a reopen, and a snapshot carries it to another member.
        drop((log, sm));
        let (_log, mut sm) = open(dir.path()).unwrap();
        assert_eq!(sm.get(b"b").unwrap(), Some(b"x".to_vec()));
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let other = tempfile::tempdir().unwrap();
        let (_l2, mut sm2) = open(other.path()).unwrap();
        sm2.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(sm2.get(b"a").unwrap(), Some(b"2".to_vec()));
        assert_eq!(sm2.applied_state().await.unwrap().0, Some(id(2)));
    }

    #[tokio::test]
    async fn the_audit_log_is_append_only_and_chained() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = open(dir.path()).unwrap();
        let id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 0), i);
        let rec = |m: &str| Command::AuditAppend {
            record: AuditRecord {
                method: m.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let key1 = audit::record_key(1);
        let batch = Batch {
            commands: vec![
                rec("A"),
                rec("B"),
                // Every other way to write under audit/ is refused.
                Command::Put {
                    key: key1.clone(),
                    value: b"forged".to_vec(),
                },
                Command::Delete { key: key1.clone() },
                Command::CompareAndSet {
                    key: audit::NEXT.to_vec(),
                    expected: None,
                    new: None,
                },
                Command::Txn {
                    checks: vec![],
                    ops: vec![Op::Delete { key: key1.clone() }],
                },
            ],
        };
        let r = sm
            .apply(vec![Entry {
                log_id: id(1),
                payload: EntryPayload::Normal(batch),
            }])
            .await
            .unwrap();
        let refused = CommandResult::Failed {
            check: u32::MAX,
            current: None,
        };
        assert_eq!(
            r[0].results,
            vec![
                CommandResult::Done,
                CommandResult::Done,
                refused.clone(),
                refused.clone(),
                refused.clone(),
                refused,
            ]
        );
        let records: Vec<AuditRecord> = sm
            .scan(audit::RECORDS, b"", 10)
            .unwrap()
            .iter()
            .map(|(_, v)| AuditRecord::decode(&v[..]).unwrap())
            .collect();
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].seq, records[1].seq), (1, 2));
        assert_eq!(records[0].method, "A");
        assert_eq!(audit::verify_chain("", &records), Ok(()));
    }
}
