//! An object's manifest (`sov.manifest.v1.Manifest`, a stored format) and what derives from
//! it: the redundancy it was written with, its chunk count and lengths, and its chunk ids.

use prost::Message;
use sov_common::layout::{ChunkId, Uid};
use sov_common::placement::Redundancy;
pub use sov_proto::manifest::Manifest;

/// The only manifest format this code reads and writes.
pub const FORMAT: u32 = 1;

/// Decodes and checks a manifest.
pub fn decode(raw: &[u8]) -> Result<Manifest, String> {
    let m = Manifest::decode(raw).map_err(|e| format!("unreadable manifest: {e}"))?;
    check(&m)?;
    Ok(m)
}

/// Refuses a manifest this code cannot read correctly.
pub fn check(m: &Manifest) -> Result<(), String> {
    if m.format != FORMAT {
        return Err(format!("manifest format {} is not supported", m.format));
    }
    if !m.parts.is_empty() {
        let mut total = 0u64;
        for p in &m.parts {
            if !p.parts.is_empty() {
                return Err("a manifest part has parts of its own".into());
            }
            check(p)?;
            total = total
                .checked_add(p.size)
                .ok_or("manifest parts hold more than 2^64 bytes")?;
        }
        if total != m.size {
            return Err(format!(
                "manifest parts hold {total} bytes, the object {}",
                m.size
            ));
        }
        return Ok(());
    }
    if m.pg_count == 0 {
        return Err("manifest has no placement groups".into());
    }
    if m.uid.len() != 16 {
        return Err("manifest uid is not 16 bytes".into());
    }
    redundancy(m)?;
    if m.size > 0 && m.chunk_size == 0 {
        return Err("manifest has data but no chunk size".into());
    }
    // Checked: a size of 2^59 chunks would otherwise wrap to "no checksums needed" and make
    // every reader of this manifest walk 2^59 chunk ids.
    let n = chunk_count(m);
    if n.checked_mul(32) != Some(m.chunk_blake3.len() as u64) {
        return Err(format!(
            "manifest lists {} checksums for {n} chunks",
            m.chunk_blake3.len() / 32
        ));
    }
    Ok(())
}

/// The manifests that hold data: the parts of a composite object, else the manifest itself.
pub fn leaves(m: &Manifest) -> Vec<&Manifest> {
    if m.parts.is_empty() {
        vec![m]
    } else {
        m.parts.iter().collect()
    }
}

/// The redundancy the object was written with.
pub fn redundancy(m: &Manifest) -> Result<Redundancy, String> {
    let small = |v: u32| u8::try_from(v).map_err(|_| format!("manifest redundancy {v} too large"));
    if m.replicas > 0 {
        Ok(Redundancy::Replicated {
            size: small(m.replicas)?,
        })
    } else if m.ec_k > 0 && m.ec_m > 0 {
        Ok(Redundancy::Ec {
            k: small(m.ec_k)?,
            m: small(m.ec_m)?,
        })
    } else {
        Err("manifest has no redundancy".into())
    }
}

/// The object write's uid.
pub fn uid(m: &Manifest) -> Uid {
    let mut u = [0u8; 16];
    u.copy_from_slice(&m.uid[..16]);
    Uid(u)
}

/// Number of chunks.
pub fn chunk_count(m: &Manifest) -> u64 {
    if m.size == 0 || m.chunk_size == 0 {
        0
    } else {
        m.size.div_ceil(u64::from(m.chunk_size))
    }
}

/// Plaintext length of chunk `i`.
pub fn chunk_len(m: &Manifest, i: u64) -> u64 {
    let cs = u64::from(m.chunk_size);
    m.size.saturating_sub(i * cs).min(cs)
}

/// blake3 of sealed chunk `i`.
pub fn chunk_blake3(m: &Manifest, i: u64) -> [u8; 32] {
    let at = i as usize * 32;
    m.chunk_blake3[at..at + 32]
        .try_into()
        .expect("checked length")
}

/// The id of chunk `i` (without a shard suffix).
pub fn chunk_id(m: &Manifest, i: u64) -> ChunkId {
    ChunkId::new(m.pool_id, m.pg_count, uid(m), i as u32, None)
}

/// Every stored id of the object: each chunk, or each shard of each chunk.
pub fn stored_ids(m: &Manifest) -> Vec<String> {
    if !m.parts.is_empty() {
        return m.parts.iter().flat_map(stored_ids).collect();
    }
    let shards = match redundancy(m) {
        Ok(Redundancy::Ec { k, m }) => usize::from(k) + usize::from(m),
        _ => 0,
    };
    let mut out = Vec::new();
    for i in 0..chunk_count(m) {
        let c = chunk_id(m, i);
        if shards == 0 {
            out.push(c.to_string());
        } else {
            for s in 0..shards {
                out.push(
                    ChunkId {
                        shard: Some(s as u8),
                        ..c
                    }
                    .to_string(),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(size: u64, replicas: u32) -> Manifest {
        let chunk_size = 4u32 << 20;
        let n = if size == 0 {
            0
        } else {
            size.div_ceil(u64::from(chunk_size))
        };
        Manifest {
            format: FORMAT,
            pool_id: 7,
            pg_count: 32,
            replicas,
            ec_k: if replicas == 0 { 4 } else { 0 },
            ec_m: if replicas == 0 { 2 } else { 0 },
            codec: u32::from(replicas == 0),
            data_key_id: "k".into(),
            uid: vec![9u8; 16].into(),
            size,
            chunk_size,
            chunk_blake3: vec![0u8; n as usize * 32].into(),
            parts: vec![],
        }
    }

    #[test]
    fn composite_manifests_are_their_parts() {
        let a = sample(5 << 20, 3);
        let b = sample(10, 0);
        let whole = Manifest {
            format: FORMAT,
            size: a.size + b.size,
            parts: vec![a.clone(), b.clone()],
            ..Default::default()
        };
        check(&whole).unwrap();
        assert_eq!(leaves(&whole).len(), 2);
        assert_eq!(stored_ids(&whole).len(), 2 + 6);
        let mut bad = whole.clone();
        bad.size += 1;
        assert!(check(&bad).is_err());
        let mut nested = whole.clone();
        nested.parts[0].parts = vec![b];
        assert!(check(&nested).is_err());
    }

    #[test]
    fn chunks_and_ids_derive_from_the_manifest() {
        let m = sample((4 << 20) + 1, 3);
        check(&m).unwrap();
        assert_eq!(chunk_count(&m), 2);
        assert_eq!(chunk_len(&m, 0), 4 << 20);
        assert_eq!(chunk_len(&m, 1), 1);
        assert_eq!(stored_ids(&m).len(), 2);
        let e = sample(1, 0);
        assert_eq!(stored_ids(&e).len(), 6);
        assert!(stored_ids(&e)[5].ends_with(".05"));
        assert_eq!(chunk_count(&sample(0, 3)), 0);
        let round = decode(&m.encode_to_vec()).unwrap();
        assert_eq!(round, m);
    }

    #[test]
    fn bad_manifests_are_refused() {
        let mut m = sample(10, 3);
        m.format = 2;
        assert!(check(&m).unwrap_err().contains("format 2"));
        let mut m = sample(10, 3);
        m.chunk_blake3 = vec![].into();
        assert!(check(&m).is_err());
        let mut m = sample(10, 0);
        m.ec_m = 0;
        assert!(check(&m).is_err());
        assert!(decode(b"\xff\xff").is_err());
        // 2^62 one-byte chunks: 32 × 2^62 checksum bytes wraps to 0 in a u64.
        let mut m = sample(0, 3);
        m.size = 1 << 62;
        m.chunk_size = 1;
        m.chunk_blake3 = vec![].into();
        assert!(check(&m).is_err());
    }
}
