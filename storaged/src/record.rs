//! The on-disk record format of segment files (format version 1).
//!
//! A segment is a sequence of records, appended and never rewritten in place:
//!
//! ```text
//! 0..4    magic  b"SOVR"
//! 4       format version (1)
//! 5       kind (1 = put, 2 = tombstone)
//! 6..8    id length, u16 little-endian
//! 8..16   data length, u64 little-endian
//! 16..48  blake3 of the data
//! 48..56  header check: the first 8 bytes of blake3(bytes 0..48 ++ id)
//! 56..    id bytes, then data bytes
//! ```
//!
//! The header check tells a torn or rotten header from a good one, so recovery can find the
//! end of the valid data; the data blake3 is verified on every read.

/// Bytes before the id.
pub const HEADER_LEN: usize = 56;
const MAGIC: [u8; 4] = *b"SOVR";
/// The only format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// What a record says about its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The chunk's bytes.
    Put = 1,
    /// The chunk was deleted.
    Tombstone = 2,
}

/// A parsed, check-verified record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: RecordKind,
    pub id_len: usize,
    pub data_len: u64,
    pub blake3: [u8; 32],
}

impl Header {
    /// Length of the whole record: header, id and data. Saturates: a header is parsed before
    /// its check is verified, and a rotten data length must read as "past the end", not
    /// overflow.
    pub fn record_len(&self) -> u64 {
        (HEADER_LEN as u64 + self.id_len as u64).saturating_add(self.data_len)
    }
}

/// Why bytes are not a valid record header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("short header ({0} bytes)")]
    Short(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported record format version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("header check mismatch")]
    BadCheck,
}

/// Builds the header and id bytes of a record (the data follows them on disk).
pub fn encode_head(kind: RecordKind, id: &[u8], data_len: u64, blake3: &[u8; 32]) -> Vec<u8> {
    assert!(
        id.len() <= u16::MAX as usize,
        "ids are validated to be short"
    );
    let mut head = Vec::with_capacity(HEADER_LEN + id.len());
    head.extend_from_slice(&MAGIC);
    head.push(FORMAT_VERSION);
    head.push(kind as u8);
    head.extend_from_slice(&(id.len() as u16).to_le_bytes());
    head.extend_from_slice(&data_len.to_le_bytes());
    head.extend_from_slice(blake3);
    let check = header_check(&head[..48], id);
    head.extend_from_slice(&check);
    head.extend_from_slice(id);
    head
}

/// A whole put record (header, id, data) as the writer lays it out, in one buffer: for tests
/// and seed files (the writer itself sends the header and the data as separate buffers).
pub fn encode_put(id: &[u8], data: &[u8]) -> Vec<u8> {
    let mut r = encode_head(
        RecordKind::Put,
        id,
        data.len() as u64,
        blake3::hash(data).as_bytes(),
    );
    r.extend_from_slice(data);
    r
}

fn header_check(fixed: &[u8], id: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(fixed);
    h.update(id);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// Parses the fixed part of a header; the check needs the id too, see [`verify_check`].
pub fn parse_fixed(buf: &[u8]) -> Result<Header, RecordError> {
    if buf.len() < HEADER_LEN {
        return Err(RecordError::Short(buf.len()));
    }
    if buf[0..4] != MAGIC {
        return Err(RecordError::BadMagic);
    }
    if buf[4] != FORMAT_VERSION {
        return Err(RecordError::UnsupportedVersion(buf[4]));
    }
    let kind = match buf[5] {
        1 => RecordKind::Put,
        2 => RecordKind::Tombstone,
        k => return Err(RecordError::UnknownKind(k)),
    };
    let id_len = u16::from_le_bytes([buf[6], buf[7]]) as usize;
    let data_len = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let mut blake3 = [0u8; 32];
    blake3.copy_from_slice(&buf[16..48]);
    Ok(Header {
        kind,
        id_len,
        data_len,
        blake3,
    })
}

/// Checks the header check over the fixed part and the id.
pub fn verify_check(fixed: &[u8], id: &[u8]) -> Result<(), RecordError> {
    if fixed.len() < HEADER_LEN {
        return Err(RecordError::Short(fixed.len()));
    }
    if header_check(&fixed[..48], id)[..] != fixed[48..56] {
        return Err(RecordError::BadCheck);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_every_flipped_header_byte() {
        let data = b"hello";
        let hash = *blake3::hash(data).as_bytes();
        let head = encode_head(RecordKind::Put, b"chunk-1", data.len() as u64, &hash);
        assert_eq!(head.len(), HEADER_LEN + 7);
        let h = parse_fixed(&head).unwrap();
        assert_eq!(h.kind, RecordKind::Put);
        assert_eq!(h.id_len, 7);
        assert_eq!(h.data_len, 5);
        assert_eq!(h.blake3, hash);
        verify_check(&head, &head[HEADER_LEN..]).unwrap();
        assert_eq!(h.record_len(), (HEADER_LEN + 7 + 5) as u64);
        for i in 0..head.len() {
            let mut bad = head.clone();
            bad[i] ^= 0x40;
            let ok = parse_fixed(&bad)
                .and_then(|h| {
                    verify_check(&bad, &bad[HEADER_LEN..HEADER_LEN + h.id_len.min(7)]).map(|_| h)
                })
                .is_ok();
            assert!(!ok, "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn a_rotten_data_length_does_not_overflow() {
        let mut head = encode_head(RecordKind::Put, b"x", 1, &[0; 32]);
        head[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse_fixed(&head).unwrap().record_len(), u64::MAX);
    }

    #[test]
    fn rejects_short_and_foreign_bytes() {
        assert_eq!(parse_fixed(&[0u8; 10]), Err(RecordError::Short(10)));
        assert_eq!(parse_fixed(&[0u8; 64]), Err(RecordError::BadMagic));
        let mut head = encode_head(RecordKind::Tombstone, b"x", 0, &[0; 32]);
        head[4] = 9;
        assert_eq!(parse_fixed(&head), Err(RecordError::UnsupportedVersion(9)));
    }
}
