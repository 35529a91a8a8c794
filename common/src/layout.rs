//! Chunk ids of objects: a stored format (storaged lists placement groups by their prefix), so
//! any change needs a new leading tag. See `docs/design/datapath-plan.md`.
//!
//! `o1/{pool:016x}/{pg:08x}/{uid}/{idx:08x}` for a replica of chunk `idx` of one object write
//! `uid` (32 lowercase hex digits), plus `.{shard:02x}` for an erasure-coded shard. The PG is
//! `pg_of("{uid}/{idx:08x}", pg_count)`, so one object spreads over all of a pool's PGs.

use std::fmt;

use crate::placement::pg_of;

/// One object write's unique id: 16 random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Uid(pub [u8; 16]);

impl Uid {
    pub fn random() -> Uid {
        Uid(rand::random())
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Where one chunk (or one shard of it) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkId {
    pub pool: u64,
    pub pg: u32,
    pub uid: Uid,
    pub index: u32,
    /// The shard index for erasure coding; `None` for a replica.
    pub shard: Option<u8>,
}

/// Why a string is not a chunk id of this format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a v1 object chunk id: {0:?}")]
pub struct BadChunkId(pub String);

impl ChunkId {
    /// The chunk `index` of object write `uid` in a pool with `pg_count` PGs.
    pub fn new(pool: u64, pg_count: u32, uid: Uid, index: u32, shard: Option<u8>) -> ChunkId {
        let pg = pg_of(format!("{uid}/{index:08x}").as_bytes(), pg_count);
        ChunkId {
            pool,
            pg,
            uid,
            index,
            shard,
        }
    }

    /// The id without the shard suffix: the AAD a chunk is sealed with, the same for all its
    /// shards.
    pub fn base(&self) -> String {
        format!(
            "o1/{:016x}/{:08x}/{}/{:08x}",
            self.pool, self.pg, self.uid, self.index
        )
    }

    /// The prefix that lists one placement group on a storage node.
    pub fn pg_prefix(pool: u64, pg: u32) -> String {
        format!("o1/{pool:016x}/{pg:08x}/")
    }

    /// Parses what [`fmt::Display`] writes.
    pub fn parse(s: &str) -> Result<ChunkId, BadChunkId> {
        let bad = || BadChunkId(s.to_string());
        let mut parts = s.split('/');
        if parts.next() != Some("o1") {
            return Err(bad());
        }
        fn hex_field<'a>(p: Option<&'a str>, len: usize, s: &str) -> Result<&'a str, BadChunkId> {
            p.filter(|p| {
                p.len() == len && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
            .ok_or_else(|| BadChunkId(s.to_string()))
        }
        let pool = u64::from_str_radix(hex_field(parts.next(), 16, s)?, 16).map_err(|_| bad())?;
        let pg = u32::from_str_radix(hex_field(parts.next(), 8, s)?, 16).map_err(|_| bad())?;
        let uid_hex = hex_field(parts.next(), 32, s)?;
        let mut uid = [0u8; 16];
        for (i, b) in uid.iter_mut().enumerate() {
            *b = u8::from_str_radix(&uid_hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let last = parts.next().ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        let (idx, shard) = match last.split_once('.') {
            Some((i, sh)) => (i, Some(hex_field(Some(sh), 2, s)?)),
            None => (last, None),
        };
        let index = u32::from_str_radix(hex_field(Some(idx), 8, s)?, 16).map_err(|_| bad())?;
        let shard = shard
            .map(|s| u8::from_str_radix(s, 16).map_err(|_| bad()))
            .transpose()?;
        Ok(ChunkId {
            pool,
            pg,
            uid: Uid(uid),
            index,
            shard,
        })
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base())?;
        if let Some(s) = self.shard {
            write!(f, ".{s:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answer() {
        let uid = Uid([0x9f; 16]);
        let id = ChunkId {
            pool: 2,
            pg: 42,
            uid,
            index: 3,
            shard: Some(4),
        };
        assert_eq!(
            id.to_string(),
            "o1/0000000000000002/0000002a/9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f/00000003.04"
        );
        assert_eq!(ChunkId::parse(&id.to_string()), Ok(id));
        assert!(id.to_string().starts_with(&ChunkId::pg_prefix(2, 42)));
        assert_eq!(id.to_string().len(), 73);
    }

    #[test]
    fn the_pg_follows_the_placement_hash() {
        let uid = Uid([1; 16]);
        let id = ChunkId::new(7, 128, uid, 5, None);
        assert_eq!(id.pg, pg_of(format!("{uid}/00000005").as_bytes(), 128));
        assert!(id.pg < 128);
    }

    #[test]
    fn refuses_what_it_did_not_write() {
        for bad in [
            "",
            "o2/0000000000000002/0000002a/9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f/00000003",
            "o1/2/0000002a/9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f/00000003",
            "o1/0000000000000002/0000002A/9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f/00000003",
            "o1/0000000000000002/0000002a/9f9f/00000003",
            "o1/0000000000000002/0000002a/9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f/00000003.4",
            "o1/0000000000000002/0000002a/9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f/00000003/x",
            "o1/0000000000000002/0000002a/9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f/+0000003",
            "o1/0000000000000002/0000002a/9f9f9f9f9f9f9f9f9f9f9f9f9f9f9fé/00000003",
        ] {
            assert!(ChunkId::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(
            pool in any::<u64>(), pg in any::<u32>(), uid in any::<[u8; 16]>(),
            index in any::<u32>(), shard in proptest::option::of(any::<u8>()),
        ) {
            let id = ChunkId { pool, pg, uid: Uid(uid), index, shard };
            prop_assert_eq!(ChunkId::parse(&id.to_string()), Ok(id));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,100}") {
            let _ = ChunkId::parse(&s);
        }
    }
}
