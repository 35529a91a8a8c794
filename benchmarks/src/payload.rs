//! Benchmark data: one pseudo-random buffer per writer, stamped per operation so that no two
//! writes carry the same bytes.

/// Bytes at the start of a buffer that [`stamp`] overwrites.
pub const STAMP_LEN: usize = 16;

/// A buffer of `size` pseudo-random bytes derived from `seed`.
pub fn random_buffer(size: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size];
    // blake3's extendable output is a fast pseudo-random stream (SIMD code even in debug
    // builds), far quicker than rand's generators when filling hundreds of MiB unoptimised.
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"sov-bench payload");
    hasher.update(&seed.to_le_bytes());
    hasher.update(&rand::random::<u64>().to_le_bytes());
    hasher.finalize_xof().fill(&mut buf);
    buf
}

/// Makes `buf` unique to (`round`, `op`) by overwriting its first [`STAMP_LEN`] bytes.
pub fn stamp(buf: &mut [u8], round: u32, op: u64) {
    buf[..8].copy_from_slice(&op.to_le_bytes());
    buf[8..12].copy_from_slice(&round.to_le_bytes());
    buf[12..STAMP_LEN].copy_from_slice(b"sovb");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_differ_per_op_and_keep_the_rest() {
        let base = random_buffer(4096, 7);
        let (mut a, mut b) = (base.clone(), base.clone());
        stamp(&mut a, 0, 1);
        stamp(&mut b, 0, 2);
        assert_ne!(a, b);
        assert_eq!(a[STAMP_LEN..], base[STAMP_LEN..]);
    }

    #[test]
    fn buffers_are_not_constant() {
        let a = random_buffer(1 << 20, 1);
        assert_eq!(a.len(), 1 << 20);
        assert!(a.iter().any(|&x| x != a[0]));
    }
}
