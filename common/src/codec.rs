//! The chunk codec: client-side AES-256-GCM sealing and blake3 checksums of chunks.
//!
//! Every chunk is sealed by the client before it leaves it; storage nodes only ever see
//! and keep the sealed ("stored") bytes. Format version 1 of the stored bytes:
//!
//! ```text
//! byte 0      format version (1)
//! bytes 1..13 96-bit GCM nonce
//! bytes 13..  AES-256-GCM ciphertext, then the 16-byte tag
//! ```
//!
//! The GCM associated data is `b"sov-chunk-v1\0"` followed by the caller's `aad` (the chunk
//! id), so a chunk served under another id fails to open. The blake3 checksum covers the
//! whole stored bytes, so a storage node or a scrub can verify a chunk without the key.
//!
//! Changing this layout means a new format version, never a reinterpretation of version 1.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use rand::RngCore;
use rand::rngs::OsRng;

/// The format version written by [`seal`] and the only one [`open`] accepts.
const VERSION_1: u8 = 1;
/// Domain separation for the AAD, so these keys and ciphertexts cannot be confused with
/// another use of AES-GCM (or a later format version).
const AAD_PREFIX_V1: &[u8] = b"sov-chunk-v1\0";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Offset of the ciphertext in the stored bytes.
const HEADER_LEN: usize = 1 + NONCE_LEN;

/// Bytes a sealed chunk adds to its plaintext: version byte, nonce and GCM tag.
pub const OVERHEAD: usize = 1 + 12 + 16;

/// A 256-bit chunk encryption key.
///
/// `Debug` never prints the key bytes. The bytes are not wiped on drop (no `zeroize`).
#[derive(Clone)]
pub struct ChunkKey([u8; 32]);

impl ChunkKey {
    /// Wraps existing key material.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Draws a fresh key from the operating system's random number generator.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The raw key material, for callers that wrap and persist keys.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.0))
    }
}

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

/// A sealed chunk: the bytes a storage node stores, and their blake3 checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    /// The stored bytes: version, nonce, ciphertext and tag.
    pub bytes: Vec<u8>,
    /// blake3 of `bytes`.
    pub blake3: [u8; 32],
}

/// Why a stored chunk could not be verified or opened.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The stored bytes do not have the expected blake3 checksum.
    #[error("checksum mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// Expected blake3, hex.
        expected: String,
        /// blake3 of the bytes given, hex.
        actual: String,
    },
    /// The stored bytes carry a format version this code does not know.
    #[error("unsupported chunk format version {0}")]
    UnsupportedVersion(u8),
    /// The stored bytes are too short to hold a header and a tag.
    #[error("truncated chunk: {len} bytes")]
    Truncated {
        /// Length of the stored bytes.
        len: usize,
    },
    /// GCM authentication failed: wrong key, wrong aad, or tampered bytes.
    #[error("authentication failed")]
    AuthenticationFailed,
}

/// Seals `plaintext` under `key` with a random nonce, binding it to `aad` (the chunk id).
///
/// Random 96-bit nonces are safe for up to about 2^32 seals under one key.
pub fn seal(key: &ChunkKey, aad: &[u8], plaintext: &[u8]) -> SealedChunk {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    seal_with_nonce(key, aad, plaintext, nonce)
}

/// Seals `plaintext` with a caller-chosen nonce.
///
/// For known-answer tests and callers with counter nonces. The caller must never use
/// one nonce twice under the same key: that breaks both confidentiality and integrity.
pub fn seal_with_nonce(
    key: &ChunkKey,
    aad: &[u8],
    plaintext: &[u8],
    nonce: [u8; 12],
) -> SealedChunk {
    let mut bytes = Vec::with_capacity(plaintext.len() + OVERHEAD);
    bytes.push(VERSION_1);
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(plaintext);
    let tag = key
        .cipher()
        .encrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &full_aad(aad),
            &mut bytes[HEADER_LEN..],
        )
        .expect("AES-GCM only refuses plaintexts over 64 GiB, larger than any chunk");
    bytes.extend_from_slice(&tag);
    let blake3 = *blake3::hash(&bytes).as_bytes();
    SealedChunk { bytes, blake3 }
}

/// Verifies and decrypts stored bytes, returning the plaintext.
///
/// Checks, in order: the blake3 checksum, the format version, the length, then GCM
/// authentication against `key` and `aad`.
pub fn open(
    key: &ChunkKey,
    aad: &[u8],
    stored: &[u8],
    expected_blake3: &[u8; 32],
) -> Result<Vec<u8>, CodecError> {
    verify(stored, expected_blake3)?;
    let Some(&version) = stored.first() else {
        return Err(CodecError::Truncated { len: 0 });
    };
    if version != VERSION_1 {
        return Err(CodecError::UnsupportedVersion(version));
    }
    if stored.len() < OVERHEAD {
        return Err(CodecError::Truncated { len: stored.len() });
    }
    let nonce = Nonce::from_slice(&stored[1..HEADER_LEN]);
    let (ciphertext, tag) = stored[HEADER_LEN..].split_at(stored.len() - HEADER_LEN - TAG_LEN);
    let mut plaintext = ciphertext.to_vec();
    key.cipher()
        .decrypt_in_place_detached(nonce, &full_aad(aad), &mut plaintext, Tag::from_slice(tag))
        .map_err(|_| CodecError::AuthenticationFailed)?;
    Ok(plaintext)
}

/// Checks that `stored` has the blake3 checksum `expected_blake3`.
///
/// Needs no key: this is what a storage node does on write and what a scrub does on read.
pub fn verify(stored: &[u8], expected_blake3: &[u8; 32]) -> Result<(), CodecError> {
    let actual = blake3::hash(stored);
    let expected = blake3::Hash::from_bytes(*expected_blake3);
    if actual != expected {
        return Err(CodecError::ChecksumMismatch {
            expected: expected.to_hex().to_string(),
            actual: actual.to_hex().to_string(),
        });
    }
    Ok(())
}

fn full_aad(aad: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(AAD_PREFIX_V1.len() + aad.len());
    full.extend_from_slice(AAD_PREFIX_V1);
    full.extend_from_slice(aad);
    full
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::{Aead, Payload};
    use proptest::prelude::*;

    fn counting<const N: usize>() -> [u8; N] {
        std::array::from_fn(|i| i as u8)
    }

    fn small_sealed() -> (ChunkKey, SealedChunk) {
        let key = ChunkKey::from_bytes(counting());
        let sealed = seal_with_nonce(&key, b"chunk-1", b"sovereign", counting());
        (key, sealed)
    }

    #[test]
    fn aes_256_gcm_spec_vectors() {
        // McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13 and 14.
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&[0u8; 32]));
        let nonce = Nonce::from_slice(&[0u8; 12]);
        let cases: [(&[u8], &str); 2] = [
            (&[], "530f8afbc74536b9a963b4f1c4cb738b"),
            (
                &[0u8; 16],
                "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919",
            ),
        ];
        for (plaintext, expected) in cases {
            let out = cipher
                .encrypt(
                    nonce,
                    Payload {
                        msg: plaintext,
                        aad: &[],
                    },
                )
                .expect("encrypt");
            assert_eq!(hex::encode(out), expected);
        }
    }

    #[test]
    fn blake3_of_empty_input() {
        assert_eq!(
            blake3::hash(b"").to_hex().as_str(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    // Format v1 of key 00..1f, nonce 00..0b, aad "chunk-1", plaintext "sovereign".
    // The stored bytes were cross-checked against Python's `cryptography` AESGCM.
    const KAT_STORED: &str =
        "01000102030405060708090a0b346da07eb780ab7ce3091810d26b37d6c93dabe84343afc0fc";
    const KAT_BLAKE3: &str = "f200d90256f6e7b4245eafa1603a4c33ef47c93dbf28466a7e3929e96ca56c49";

    #[test]
    fn format_v1_known_answer() {
        // Computed once and pinned: any change to the stored format must break this test.
        let (key, sealed) = small_sealed();
        assert_eq!(hex::encode(&sealed.bytes), KAT_STORED);
        assert_eq!(hex::encode(sealed.blake3), KAT_BLAKE3);
        let opened = open(&key, b"chunk-1", &sealed.bytes, &sealed.blake3).expect("open");
        assert_eq!(opened, b"sovereign");
    }

    #[test]
    fn stored_layout() {
        let (_, sealed) = small_sealed();
        assert_eq!(sealed.bytes.len(), b"sovereign".len() + OVERHEAD);
        assert_eq!(sealed.bytes[0], 1);
        assert_eq!(sealed.bytes[1..13], counting::<12>());
        assert_eq!(sealed.blake3, *blake3::hash(&sealed.bytes).as_bytes());
    }

    #[test]
    fn every_single_byte_flip_fails() {
        let (key, sealed) = small_sealed();
        for i in 0..sealed.bytes.len() {
            let mut tampered = sealed.bytes.clone();
            tampered[i] ^= 0x01;
            // Against the original checksum, as a storage node would see it.
            assert!(
                matches!(
                    open(&key, b"chunk-1", &tampered, &sealed.blake3),
                    Err(CodecError::ChecksumMismatch { .. })
                ),
                "byte {i}"
            );
            assert!(verify(&tampered, &sealed.blake3).is_err(), "byte {i}");
            // With a recomputed checksum, so the version check and GCM must catch it.
            let rehashed = *blake3::hash(&tampered).as_bytes();
            let err = open(&key, b"chunk-1", &tampered, &rehashed).expect_err("tampered");
            match i {
                0 => assert!(matches!(err, CodecError::UnsupportedVersion(0)), "{err:?}"),
                _ => assert!(
                    matches!(err, CodecError::AuthenticationFailed),
                    "byte {i}: {err:?}"
                ),
            }
        }
    }

    #[test]
    fn wrong_key_fails_authentication() {
        let (_, sealed) = small_sealed();
        let other = ChunkKey::generate();
        let rehashed = *blake3::hash(&sealed.bytes).as_bytes();
        assert!(matches!(
            open(&other, b"chunk-1", &sealed.bytes, &rehashed),
            Err(CodecError::AuthenticationFailed)
        ));
    }

    #[test]
    fn wrong_aad_fails_authentication() {
        let (key, sealed) = small_sealed();
        for aad in [&b"chunk-2"[..], b"", b"chunk-1\0", b"sov-chunk-v1\0chunk-1"] {
            assert!(
                matches!(
                    open(&key, aad, &sealed.bytes, &sealed.blake3),
                    Err(CodecError::AuthenticationFailed)
                ),
                "aad {aad:?}"
            );
        }
    }

    #[test]
    fn truncated_input_fails_without_panicking() {
        let (key, sealed) = small_sealed();
        for len in 0..sealed.bytes.len() {
            let short = &sealed.bytes[..len];
            assert!(matches!(
                open(&key, b"chunk-1", short, &sealed.blake3),
                Err(CodecError::ChecksumMismatch { .. })
            ));
            let rehashed = *blake3::hash(short).as_bytes();
            let err = open(&key, b"chunk-1", short, &rehashed).expect_err("truncated");
            if len < OVERHEAD {
                assert!(
                    matches!(err, CodecError::Truncated { len: l } if l == len),
                    "{err:?}"
                );
            } else {
                assert!(matches!(err, CodecError::AuthenticationFailed), "{err:?}");
            }
        }
    }

    #[test]
    fn unknown_version_fails() {
        let (key, sealed) = small_sealed();
        for version in [0u8, 2, 0xff] {
            let mut stored = sealed.bytes.clone();
            stored[0] = version;
            let rehashed = *blake3::hash(&stored).as_bytes();
            assert!(matches!(
                open(&key, b"chunk-1", &stored, &rehashed),
                Err(CodecError::UnsupportedVersion(v)) if v == version
            ));
        }
    }

    #[test]
    fn verify_accepts_good_and_names_both_checksums() {
        let (_, sealed) = small_sealed();
        verify(&sealed.bytes, &sealed.blake3).expect("good checksum");
        let err = verify(b"", &sealed.blake3).expect_err("bad checksum");
        let msg = err.to_string();
        assert!(msg.contains(&hex::encode(sealed.blake3)), "{msg}");
        assert!(
            msg.contains("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
            "{msg}"
        );
    }

    #[test]
    fn key_debug_hides_bytes() {
        let key = ChunkKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{key:?}"), "ChunkKey(..)");
        assert_eq!(format!("{key:#?}"), "ChunkKey(..)");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn seal_open_round_trips(
            plaintext in proptest::collection::vec(any::<u8>(), 0..64 * 1024),
            aad in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let key = ChunkKey::generate();
            let sealed = seal(&key, &aad, &plaintext);
            prop_assert_eq!(sealed.bytes.len(), plaintext.len() + OVERHEAD);
            let opened = open(&key, &aad, &sealed.bytes, &sealed.blake3).expect("open");
            prop_assert_eq!(opened, plaintext);
        }

        #[test]
        fn seals_of_same_plaintext_differ(
            plaintext in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let key = ChunkKey::generate();
            let a = seal(&key, b"id", &plaintext);
            let b = seal(&key, b"id", &plaintext);
            prop_assert_ne!(&a.bytes[1..13], &b.bytes[1..13]);
            prop_assert_ne!(&a.bytes, &b.bytes);
            prop_assert_ne!(a.blake3, b.blake3);
        }
    }
}
