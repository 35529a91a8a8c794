//! The chunk store of a node: its disks, which disk a chunk lives on, and the operations the
//! gRPC service exposes.

use std::sync::Arc;

use bytes::Bytes;

use crate::disk::{Disk, DiskStats};
use crate::error::StoreError;
use crate::index::{CorruptRecord, Location};

/// Longest chunk id, in bytes.
pub const MAX_ID_LEN: usize = 512;

/// Checks that an id is 1 to 512 printable ASCII characters without spaces.
pub fn validate_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::InvalidId("empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(StoreError::InvalidId(format!(
            "{} bytes long, at most {MAX_ID_LEN} allowed",
            id.len()
        )));
    }
    if let Some(c) = id.bytes().find(|b| !b.is_ascii_graphic()) {
        return Err(StoreError::InvalidId(format!(
            "byte 0x{c:02x} is not printable ASCII"
        )));
    }
    Ok(())
}

/// A listed chunk.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub loc: Location,
}

/// The disks of this node.
pub struct Store {
    disks: Vec<Arc<Disk>>,
    pub max_chunk_size: u64,
}

impl Store {
    pub fn new(disks: Vec<Arc<Disk>>, max_chunk_size: u64) -> Store {
        Store {
            disks,
            max_chunk_size,
        }
    }

    pub fn disks(&self) -> &[Arc<Disk>] {
        &self.disks
    }

    /// The disk that holds `id`, if any.
    fn find(&self, id: &str) -> Result<Option<&Arc<Disk>>, StoreError> {
        for d in &self.disks {
            if d.index().get(id)?.is_some() {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    /// Rendezvous choice among disks that are not failed. Free space does not enter the
    /// choice, so two concurrent first puts of one id always pick the same disk (otherwise the
    /// id could end up on two disks and a delete would only remove one copy); a full chosen disk
    /// answers "out of space".
    fn choose(&self, id: &str) -> Result<&Arc<Disk>, StoreError> {
        let score = |d: &Disk| {
            let mut h = blake3::Hasher::new();
            h.update(d.name().as_bytes());
            h.update(b"\0");
            h.update(id.as_bytes());
            u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
        };
        self.disks
            .iter()
            .filter(|d| !d.is_failed())
            .max_by_key(|d| score(d))
            .ok_or(StoreError::NoDisk)
    }

    pub async fn put(
        &self,
        id: String,
        data: Vec<Bytes>,
        blake3: [u8; 32],
    ) -> Result<(Location, String), StoreError> {
        validate_id(&id)?;
        let len = crate::disk::frames_len(&data);
        if len > self.max_chunk_size {
            return Err(StoreError::TooLarge {
                len,
                max: self.max_chunk_size,
            });
        }
        let disk = match self.find(&id)? {
            Some(d) => d,
            None => self.choose(&id)?,
        };
        let loc = disk.put(id, data, blake3).await?;
        Ok((loc, disk.name().to_string()))
    }

    /// Reads and verifies a chunk.
    pub async fn get(&self, id: &str) -> Result<(Location, String, Bytes), StoreError> {
        validate_id(id)?;
        // `Disk::read` looks the id up itself; asking each disk directly saves a second lookup.
        for disk in &self.disks {
            match disk.read(id, "read").await {
                Err(StoreError::NotFound(_)) => continue,
                r => return r.map(|(loc, data)| (loc, disk.name().to_string(), data)),
            }
        }
        Err(StoreError::NotFound(id.to_string()))
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        validate_id(id)?;
        let disk = self
            .find(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        disk.delete(id.to_string()).await
    }

    pub fn stat(&self, id: &str) -> Result<(Location, String), StoreError> {
        validate_id(id)?;
        for d in &self.disks {
            if let Some(loc) = d.index().get(id)? {
                return Ok((loc, d.name().to_string()));
            }
        }
        Err(StoreError::NotFound(id.to_string()))
    }

    /// One page of ids with `prefix` after `start_after`, merged across disks in id order.
    /// Returns the page and whether more follow.
    pub fn list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
    ) -> Result<(Vec<Listed>, bool), StoreError> {
        let mut all = Vec::new();
        for d in &self.disks {
            for (id, loc) in d.index().list(prefix, start_after, limit + 1)? {
                all.push(Listed { id, loc });
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.dedup_by(|a, b| a.id == b.id);
        let more = all.len() > limit;
        all.truncate(limit);
        Ok((all, more))
    }

    pub fn corrupt(&self) -> Result<Vec<(String, String, CorruptRecord)>, StoreError> {
        let mut out = Vec::new();
        for d in &self.disks {
            for (id, rec) in d.index().corrupt()? {
                out.push((id, d.name().to_string(), rec));
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> Vec<(String, DiskStats)> {
        self.disks
            .iter()
            .map(|d| (d.name().to_string(), d.stats()))
            .collect()
    }

    /// Stops every disk's writer after what is queued, and flushes the indexes.
    pub fn close(&self) {
        for d in &self.disks {
            d.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("pg/1/2/obj-0001").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("has space").is_err());
        assert!(validate_id("tab\t").is_err());
        assert!(validate_id("é").is_err());
        assert!(validate_id(&"a".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_id(&"a".repeat(MAX_ID_LEN + 1)).is_err());
    }
}
