//! The per-disk chunk index in RocksDB: where each chunk's record lives, the recovery
//! checkpoint, the scrub cursor and the chunks found corrupt.
//!
//! Keys (every value starts with a format version byte):
//! - `c/<id>`       → [`Location`]
//! - `x/<id>`       → [`CorruptRecord`] (JSON)
//! - `m/checkpoint` → segment and offset up to which every record is reflected in the index
//! - `m/scrub`      → scrub passes and the id where the current pass stands

use std::path::Path;
use std::sync::Arc;

use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

use crate::record::HEADER_LEN;

const INDEX_VERSION: u8 = 1;
const CHUNK: &[u8] = b"c/";
const CORRUPT: &[u8] = b"x/";
const CHECKPOINT: &[u8] = b"m/checkpoint";
const SCRUB: &[u8] = b"m/scrub";

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("index entry {key} is malformed: {reason}")]
    Malformed { key: String, reason: String },
}

/// Where a chunk's record is, and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub id_len: u16,
    pub data_len: u64,
    pub blake3: [u8; 32],
}

impl Location {
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.id_len as u64 + self.data_len
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(59);
        v.push(INDEX_VERSION);
        v.extend_from_slice(&self.segment.to_le_bytes());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.id_len.to_le_bytes());
        v.extend_from_slice(&self.data_len.to_le_bytes());
        v.extend_from_slice(&self.blake3);
        v
    }

    fn decode(key: &[u8], v: &[u8]) -> Result<Location, IndexError> {
        let bad = |reason: &str| IndexError::Malformed {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_string(),
        };
        if v.len() != 59 {
            return Err(bad("wrong length"));
        }
        if v[0] != INDEX_VERSION {
            return Err(bad("unknown version"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        let mut blake3 = [0u8; 32];
        blake3.copy_from_slice(&v[27..59]);
        Ok(Location {
            segment: u64_at(1),
            offset: u64_at(9),
            id_len: u16::from_le_bytes([v[17], v[18]]),
            data_len: u64_at(19),
            blake3,
        })
    }
}

/// A chunk that failed verification and has not been rewritten since.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CorruptRecord {
    pub reason: String,
    pub found_at: u64,
    pub found_by: String,
}

/// Where scrub stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubState {
    pub passes: u64,
    pub checked_in_pass: u64,
    /// Last id checked in the current pass; empty at the start of a pass.
    pub cursor: String,
}

/// One change, applied atomically with others in a [`IndexBatch`].
#[derive(Default)]
pub struct IndexBatch {
    batch: WriteBatch,
}

impl IndexBatch {
    pub fn put(&mut self, id: &str, loc: &Location) {
        self.batch.put(key(CHUNK, id), loc.encode());
        self.batch.delete(key(CORRUPT, id));
    }

    /// A compaction copy: the chunk moves, a corrupt mark (if any) stays.
    pub fn relocate(&mut self, id: &str, loc: &Location) {
        self.batch.put(key(CHUNK, id), loc.encode());
    }

    pub fn delete(&mut self, id: &str) {
        self.batch.delete(key(CHUNK, id));
        self.batch.delete(key(CORRUPT, id));
    }

    pub fn checkpoint(&mut self, segment: u64, offset: u64) {
        let mut v = vec![INDEX_VERSION];
        v.extend_from_slice(&segment.to_le_bytes());
        v.extend_from_slice(&offset.to_le_bytes());
        self.batch.put(CHECKPOINT, v);
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}

fn key(prefix: &[u8], id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + id.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The RocksDB index of one disk.
#[derive(Clone)]
pub struct Index {
    db: Arc<DB>,
}

impl Index {
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        opts.set_keep_log_file_num(4);
        opts.set_max_log_file_size(8 << 20);
        opts.set_write_buffer_size(16 << 20);
        let db = DB::open(&opts, path)?;
        Ok(Index { db: Arc::new(db) })
    }

    pub fn get(&self, id: &str) -> Result<Option<Location>, IndexError> {
        let k = key(CHUNK, id);
        match self.db.get_pinned(&k)? {
            Some(v) => Ok(Some(Location::decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    /// Applies a batch. Not synced: the segments are the durable truth and recovery replays
    /// them from the checkpoint, which moves in the same atomic batch.
    pub fn write(&self, batch: IndexBatch) -> Result<(), IndexError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(batch.batch, &wo)?;
        Ok(())
    }

    pub fn checkpoint(&self) -> Result<Option<(u64, u64)>, IndexError> {
        match self.db.get(CHECKPOINT)? {
            Some(v) if v.len() == 17 && v[0] == INDEX_VERSION => Ok(Some((
                u64::from_le_bytes(v[1..9].try_into().expect("8 bytes")),
                u64::from_le_bytes(v[9..17].try_into().expect("8 bytes")),
            ))),
            Some(_) => Err(IndexError::Malformed {
                key: "m/checkpoint".into(),
                reason: "bad value".into(),
            }),
            None => Ok(None),
        }
    }

    /// Chunks whose id starts with `prefix` and sorts after `start_after`, in id order.
    pub fn list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Location)>, IndexError> {
        let start = if start_after.as_bytes() >= prefix.as_bytes() {
            let mut k = key(CHUNK, start_after);
            k.push(0);
            k
        } else {
            key(CHUNK, prefix)
        };
        let full_prefix = key(CHUNK, prefix);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(&full_prefix) || out.len() >= limit {
                break;
            }
            let id = String::from_utf8_lossy(&k[CHUNK.len()..]).into_owned();
            out.push((id, Location::decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Every chunk entry, for start-up accounting. Calls `f` for each.
    pub fn for_each_chunk(&self, mut f: impl FnMut(&str, &Location)) -> Result<(), IndexError> {
        for item in self
            .db
            .iterator(IteratorMode::From(CHUNK, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(CHUNK) {
                break;
            }
            let id = String::from_utf8_lossy(&k[CHUNK.len()..]).into_owned();
            f(&id, &Location::decode(&k, &v)?);
        }
        Ok(())
    }

    pub fn record_corrupt(&self, id: &str, rec: &CorruptRecord) -> Result<(), IndexError> {
        let mut v = vec![INDEX_VERSION];
        v.extend_from_slice(&serde_json::to_vec(rec).expect("serialising a plain struct"));
        self.db.put(key(CORRUPT, id), v)?;
        Ok(())
    }

    pub fn clear_corrupt(&self, id: &str) -> Result<(), IndexError> {
        self.db.delete(key(CORRUPT, id))?;
        Ok(())
    }

    pub fn corrupt(&self) -> Result<Vec<(String, CorruptRecord)>, IndexError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(CORRUPT, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(CORRUPT) {
                break;
            }
            let id = String::from_utf8_lossy(&k[CORRUPT.len()..]).into_owned();
            let rec = v
                .split_first()
                .filter(|(ver, _)| **ver == INDEX_VERSION)
                .and_then(|(_, body)| serde_json::from_slice(body).ok())
                .ok_or_else(|| IndexError::Malformed {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: "bad corrupt record".into(),
                })?;
            out.push((id, rec));
        }
        Ok(out)
    }

    pub fn scrub_state(&self) -> Result<ScrubState, IndexError> {
        let Some(v) = self.db.get(SCRUB)? else {
            return Ok(ScrubState::default());
        };
        if v.len() < 17 || v[0] != INDEX_VERSION {
            return Ok(ScrubState::default());
        }
        Ok(ScrubState {
            passes: u64::from_le_bytes(v[1..9].try_into().expect("8 bytes")),
            checked_in_pass: u64::from_le_bytes(v[9..17].try_into().expect("8 bytes")),
            cursor: String::from_utf8_lossy(&v[17..]).into_owned(),
        })
    }

    pub fn set_scrub_state(&self, s: &ScrubState) -> Result<(), IndexError> {
        let mut v = vec![INDEX_VERSION];
        v.extend_from_slice(&s.passes.to_le_bytes());
        v.extend_from_slice(&s.checked_in_pass.to_le_bytes());
        v.extend_from_slice(s.cursor.as_bytes());
        self.db.put(SCRUB, v)?;
        Ok(())
    }

    /// Makes every write so far durable (the WAL is synced).
    pub fn sync(&self) -> Result<(), IndexError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Makes everything written so far durable (used on shutdown).
    pub fn flush(&self) -> Result<(), IndexError> {
        self.db.flush_wal(true)?;
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u64, offset: u64) -> Location {
        Location {
            segment,
            offset,
            id_len: 3,
            data_len: 10,
            blake3: [7; 32],
        }
    }

    #[test]
    fn puts_lists_and_deletes_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let mut b = IndexBatch::default();
        for id in ["b/2", "a/1", "b/1", "b/3", "c"] {
            b.put(id, &loc(1, id.len() as u64));
        }
        b.checkpoint(1, 500);
        idx.write(b).unwrap();
        assert_eq!(idx.checkpoint().unwrap(), Some((1, 500)));
        let ids = |v: Vec<(String, Location)>| v.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(ids(idx.list("b/", "", 10).unwrap()), ["b/1", "b/2", "b/3"]);
        assert_eq!(ids(idx.list("b/", "b/1", 1).unwrap()), ["b/2"]);
        assert_eq!(ids(idx.list("", "", 100).unwrap()).len(), 5);
        assert_eq!(idx.get("c").unwrap(), Some(loc(1, 1)));
        let mut b = IndexBatch::default();
        b.delete("c");
        idx.write(b).unwrap();
        assert_eq!(idx.get("c").unwrap(), None);
    }

    #[test]
    fn corrupt_records_and_scrub_state_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let idx = Index::open(dir.path()).unwrap();
            let rec = CorruptRecord {
                reason: "blake3 mismatch".into(),
                found_at: 5,
                found_by: "scrub".into(),
            };
            idx.record_corrupt("a", &rec).unwrap();
            idx.set_scrub_state(&ScrubState {
                passes: 2,
                checked_in_pass: 9,
                cursor: "k/1".into(),
            })
            .unwrap();
            idx.flush().unwrap();
        }
        let idx = Index::open(dir.path()).unwrap();
        assert_eq!(idx.corrupt().unwrap()[0].0, "a");
        assert_eq!(idx.scrub_state().unwrap().cursor, "k/1");
        // A put of the chunk clears the corrupt mark.
        let mut b = IndexBatch::default();
        b.put("a", &loc(1, 0));
        idx.write(b).unwrap();
        assert!(idx.corrupt().unwrap().is_empty());
    }
}
