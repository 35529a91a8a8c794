//! Erasure-coded stripes: a sealed chunk cut into `k` data shards plus `m` parity shards
//! (Reed-Solomon, `reed-solomon-simd`), each stored with a 48-byte header that carries what a
//! storage node needs to rebuild a shard without the object's manifest. A stored format.
//!
//! Header: magic `sovS`, version 1, codec, k, m, shard index, 3 reserved bytes, the sealed
//! chunk's length (u32 LE) and its blake3. Shard bodies are `shard_len(sealed_len, k)` bytes:
//! a multiple of 64, at least 64; the sealed chunk is zero-padded to `k` bodies.

/// Bytes before a shard's body.
pub const HEADER_LEN: usize = 48;
const MAGIC: &[u8; 4] = b"sovS";
const VERSION: u8 = 1;
/// Codec 1: reed-solomon-simd 3.x (Leopard-style GF(2^16)). Parity bytes depend on the codec,
/// so it is recorded in every shard.
pub const CODEC_RS_SIMD: u8 = 1;

/// Why a stripe could not be made or read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeError {
    #[error("profile {k}+{m} is not usable: {reason}")]
    Profile { k: usize, m: usize, reason: String },
    #[error("shard {index}: {reason}")]
    BadShard { index: usize, reason: String },
    #[error("only {have} of the {need} shards needed are readable")]
    TooFewShards { have: usize, need: usize },
    #[error("the rebuilt chunk does not match its checksum")]
    ChecksumMismatch,
}

/// Body length of each shard for a sealed chunk of `sealed_len` bytes.
pub fn shard_len(sealed_len: usize, k: usize) -> usize {
    let per = sealed_len.div_ceil(k.max(1));
    per.div_ceil(64).max(1) * 64
}

/// What every shard of one stripe says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub codec: u8,
    pub k: u8,
    pub m: u8,
    pub index: u8,
    pub sealed_len: u32,
    pub blake3: [u8; 32],
}

impl Header {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, self.codec, self.k, self.m, self.index, 0, 0, 0]);
        out.extend_from_slice(&self.sealed_len.to_le_bytes());
        out.extend_from_slice(&self.blake3);
    }

    /// Reads the header of a stored shard and checks its body length.
    pub fn parse(stored: &[u8]) -> Result<Header, String> {
        if stored.len() < HEADER_LEN {
            return Err(format!("{} bytes, shorter than a header", stored.len()));
        }
        if &stored[..4] != MAGIC {
            return Err("no shard magic".into());
        }
        if stored[4] != VERSION {
            return Err(format!("unknown shard version {}", stored[4]));
        }
        let h = Header {
            codec: stored[5],
            k: stored[6],
            m: stored[7],
            index: stored[8],
            sealed_len: u32::from_le_bytes(stored[12..16].try_into().expect("4 bytes")),
            blake3: stored[16..48].try_into().expect("32 bytes"),
        };
        if h.codec != CODEC_RS_SIMD {
            return Err(format!("unknown codec {}", h.codec));
        }
        if h.k == 0 || h.m == 0 || h.index >= h.k.saturating_add(h.m) {
            return Err(format!("bad profile {}+{} or index {}", h.k, h.m, h.index));
        }
        let want = shard_len(h.sealed_len as usize, h.k as usize);
        if stored.len() - HEADER_LEN != want {
            return Err(format!(
                "body is {} bytes, the header implies {want}",
                stored.len() - HEADER_LEN
            ));
        }
        Ok(h)
    }
}

fn check_profile(k: usize, m: usize) -> Result<(), StripeError> {
    let bad = |reason: &str| StripeError::Profile {
        k,
        m,
        reason: reason.into(),
    };
    if k == 0 || m == 0 {
        return Err(bad("k and m must be at least 1"));
    }
    if k + m > 255 {
        return Err(bad("at most 255 shards"));
    }
    Ok(())
}

/// Cuts a sealed chunk into `k + m` stored shards (header and body each), index order.
pub fn encode(k: usize, m: usize, sealed: &[u8]) -> Result<Vec<Vec<u8>>, StripeError> {
    check_profile(k, m)?;
    let sealed_len = u32::try_from(sealed.len()).map_err(|_| StripeError::Profile {
        k,
        m,
        reason: "a chunk over 4 GiB".into(),
    })?;
    let len = shard_len(sealed.len(), k);
    let data: Vec<Vec<u8>> = (0..k)
        .map(|i| {
            let mut body = vec![0u8; len];
            let from = (i * len).min(sealed.len());
            let to = ((i + 1) * len).min(sealed.len());
            body[..to - from].copy_from_slice(&sealed[from..to]);
            body
        })
        .collect();
    let parity = reed_solomon_simd::encode(k, m, &data).map_err(|e| StripeError::Profile {
        k,
        m,
        reason: e.to_string(),
    })?;
    let blake3 = *blake3::hash(sealed).as_bytes();
    Ok(data
        .iter()
        .chain(parity.iter())
        .enumerate()
        .map(|(i, body)| {
            let mut out = Vec::with_capacity(HEADER_LEN + len);
            Header {
                codec: CODEC_RS_SIMD,
                k: k as u8,
                m: m as u8,
                index: i as u8,
                sealed_len,
                blake3,
            }
            .write(&mut out);
            out.extend_from_slice(body);
            out
        })
        .collect())
}

/// The sealed chunk back from any `k` good shards (`shards[i]` is stored shard `i`, or `None`
/// if missing). Shards whose header disagrees with the majority's are treated as missing; the
/// result is checked against the blake3 in the headers, and when it does not match and there
/// are shards to spare, the decode is retried leaving each shard out in turn (one rotten body
/// is found and skipped).
pub fn decode(k: usize, m: usize, shards: &[Option<&[u8]>]) -> Result<Vec<u8>, StripeError> {
    check_profile(k, m)?;
    match decode_once(k, m, shards) {
        Err(StripeError::ChecksumMismatch) => {
            let present = shards.iter().filter(|s| s.is_some()).count();
            if present <= k {
                return Err(StripeError::ChecksumMismatch);
            }
            for skip in 0..shards.len() {
                if shards[skip].is_none() {
                    continue;
                }
                let mut fewer = shards.to_vec();
                fewer[skip] = None;
                if let Ok(sealed) = decode_once(k, m, &fewer) {
                    return Ok(sealed);
                }
            }
            Err(StripeError::ChecksumMismatch)
        }
        other => other,
    }
}

fn decode_once(k: usize, m: usize, shards: &[Option<&[u8]>]) -> Result<Vec<u8>, StripeError> {
    let mut headers = Vec::new();
    for (i, s) in shards.iter().enumerate().take(k + m) {
        if let Some(s) = s
            && let Ok(h) = Header::parse(s)
            && usize::from(h.index) == i
            && usize::from(h.k) == k
            && usize::from(h.m) == m
        {
            headers.push((i, h));
        }
    }
    // The stripe's identity: the (length, checksum) most shards agree on.
    let mut best: Option<((u32, [u8; 32]), usize)> = None;
    for (_, h) in &headers {
        let key = (h.sealed_len, h.blake3);
        let n = headers
            .iter()
            .filter(|(_, o)| (o.sealed_len, o.blake3) == key)
            .count();
        if best.is_none_or(|(_, bn)| n > bn) {
            best = Some((key, n));
        }
    }
    let Some(((sealed_len, blake3), have)) = best else {
        return Err(StripeError::TooFewShards { have: 0, need: k });
    };
    if have < k {
        return Err(StripeError::TooFewShards { have, need: k });
    }
    let good: Vec<usize> = headers
        .iter()
        .filter(|(_, h)| (h.sealed_len, h.blake3) == (sealed_len, blake3))
        .map(|(i, _)| *i)
        .collect();
    let body = |i: usize| &shards[i].expect("a good shard is present")[HEADER_LEN..];
    let mut data: Vec<Option<Vec<u8>>> = (0..k)
        .map(|i| good.contains(&i).then(|| body(i).to_vec()))
        .collect();
    if data.iter().any(Option::is_none) {
        let originals = good.iter().filter(|i| **i < k).map(|&i| (i, body(i)));
        let recovery = good.iter().filter(|i| **i >= k).map(|&i| (i - k, body(i)));
        let restored = reed_solomon_simd::decode(k, m, originals, recovery).map_err(|e| {
            StripeError::BadShard {
                index: 0,
                reason: e.to_string(),
            }
        })?;
        for (i, b) in restored {
            if i < k {
                data[i] = Some(b);
            }
        }
    }
    let mut sealed = Vec::with_capacity(k * shard_len(sealed_len as usize, k));
    for d in data {
        sealed.extend_from_slice(&d.ok_or(StripeError::TooFewShards { have, need: k })?);
    }
    sealed.truncate(sealed_len as usize);
    if *blake3::hash(&sealed).as_bytes() != blake3 {
        return Err(StripeError::ChecksumMismatch);
    }
    Ok(sealed)
}

/// Stored shard `index` rebuilt from the others (what recovery writes to a new member).
pub fn rebuild(
    k: usize,
    m: usize,
    shards: &[Option<&[u8]>],
    index: usize,
) -> Result<Vec<u8>, StripeError> {
    let sealed = decode(k, m, shards)?;
    let mut all = encode(k, m, &sealed)?;
    if index >= all.len() {
        return Err(StripeError::BadShard {
            index,
            reason: format!("the stripe has {} shards", all.len()),
        });
    }
    Ok(all.swap_remove(index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(shard_len(0, 4), 64);
        assert_eq!(shard_len(1, 4), 64);
        assert_eq!(shard_len(4 << 20, 4), 1 << 20);
        assert_eq!(shard_len((4 << 20) + 29, 4), (1 << 20) + 64);
        let shards = encode(4, 2, &data(1)).unwrap();
        assert_eq!(shards.len(), 6);
        assert!(shards.iter().all(|s| s.len() == HEADER_LEN + 64));
    }

    #[test]
    fn any_k_shards_give_the_chunk_back() {
        let sealed = data(100_003);
        let stored = encode(4, 2, &sealed).unwrap();
        // Every way of losing two of six.
        for a in 0..6 {
            for b in a + 1..6 {
                let view: Vec<Option<&[u8]>> = (0..6)
                    .map(|i| (i != a && i != b).then(|| stored[i].as_slice()))
                    .collect();
                assert_eq!(decode(4, 2, &view).unwrap(), sealed, "lost {a} and {b}");
                for lost in [a, b] {
                    assert_eq!(rebuild(4, 2, &view, lost).unwrap(), stored[lost]);
                }
            }
        }
        let three_lost: Vec<Option<&[u8]>> = (0..6)
            .map(|i| (i >= 3).then(|| stored[i].as_slice()))
            .collect();
        assert_eq!(
            decode(4, 2, &three_lost),
            Err(StripeError::TooFewShards { have: 3, need: 4 })
        );
    }

    #[test]
    fn a_rotten_shard_is_caught() {
        let sealed = data(10_000);
        let stored = encode(4, 2, &sealed).unwrap();
        // A flipped body byte: the checksum catches it and the spare shards route around it.
        let mut bad = stored[1].clone();
        bad[HEADER_LEN + 7] ^= 1;
        let view: Vec<Option<&[u8]>> = (0..6)
            .map(|i| {
                Some(if i == 1 {
                    bad.as_slice()
                } else {
                    stored[i].as_slice()
                })
            })
            .collect();
        assert_eq!(decode(4, 2, &view).unwrap(), sealed);
        // With no shard to spare it is an error, never wrong data.
        let view: Vec<Option<&[u8]>> = (0..6)
            .map(|i| match i {
                1 => Some(bad.as_slice()),
                4 | 5 => None,
                _ => Some(stored[i].as_slice()),
            })
            .collect();
        assert_eq!(decode(4, 2, &view), Err(StripeError::ChecksumMismatch));
        // Leave it out and the rest rebuild the chunk.
        let view: Vec<Option<&[u8]>> = (0..6)
            .map(|i| (i != 1).then(|| stored[i].as_slice()))
            .collect();
        assert_eq!(decode(4, 2, &view).unwrap(), sealed);
        // A damaged header makes the shard count as missing.
        let mut bad_header = stored[0].clone();
        bad_header[0] = b'x';
        assert!(Header::parse(&bad_header).is_err());
        let mut short = stored[0].clone();
        short.pop();
        assert!(Header::parse(&short).unwrap_err().contains("body"));
    }

    #[test]
    fn bad_profiles_are_refused() {
        assert!(encode(0, 2, b"x").is_err());
        assert!(encode(4, 0, b"x").is_err());
        assert!(encode(200, 100, b"x").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn round_trips_with_m_lost(len in 0usize..20_000, k in 1usize..9, m in 1usize..4, seed in any::<u64>()) {
            let sealed: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(seed | 1) as u8).collect();
            let stored = encode(k, m, &sealed).unwrap();
            let lost: Vec<usize> = (0..m).map(|j| ((seed as usize) + j * 7) % (k + m)).collect();
            let view: Vec<Option<&[u8]>> = (0..k + m)
                .map(|i| (!lost.contains(&i)).then(|| stored[i].as_slice()))
                .collect();
            prop_assert_eq!(decode(k, m, &view).unwrap(), sealed);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Header::parse(&bytes);
        }
    }
}
