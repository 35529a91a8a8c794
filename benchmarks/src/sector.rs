//! `sov-bench sector-crypto`: the two ways to seal a 4 KiB volume sector, measured on one
//! core. AES-256-GCM (what volumes use: counter nonce, 16-byte tag kept in the extent's
//! metadata) against AES-256-XTS (tweak = sector number, no expansion) followed by blake3 over
//! the ciphertext (32 bytes of integrity data per sector). Both directions: seal, and
//! open-with-verification. Every opened sector is compared with the original.

use std::time::{Duration, Instant};

use aes::Aes256;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use anyhow::ensure;
use clap::Args as ClapArgs;
use rand::RngCore;

const SECTOR: usize = 4096;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Shorter run (for the smoke test).
    #[arg(long)]
    quick: bool,
    /// Also write the results file for `sov-bench report` here.
    #[arg(long)]
    results: Option<std::path::PathBuf>,
}

/// AES-256-XTS over one whole sector (a multiple of 16 bytes: no ciphertext stealing).
struct Xts {
    data: Aes256,
    tweak: Aes256,
}

/// Multiplies a tweak by x in GF(2^128) (little-endian, as XTS defines it).
fn times_x(t: &mut [u8; 16]) {
    let carry = t[15] >> 7;
    for i in (1..16).rev() {
        t[i] = (t[i] << 1) | (t[i - 1] >> 7);
    }
    t[0] <<= 1;
    if carry == 1 {
        t[0] ^= 0x87;
    }
}

impl Xts {
    fn new(key: &[u8; 64]) -> Xts {
        Xts {
            data: Aes256::new(GenericArray::from_slice(&key[..32])),
            tweak: Aes256::new(GenericArray::from_slice(&key[32..])),
        }
    }

    fn tweaks(&self, sector: u64) -> Vec<[u8; 16]> {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&sector.to_le_bytes());
        let mut b = GenericArray::clone_from_slice(&t);
        self.tweak.encrypt_block(&mut b);
        let mut t: [u8; 16] = b.into();
        let mut out = Vec::with_capacity(SECTOR / 16);
        for _ in 0..SECTOR / 16 {
            out.push(t);
            times_x(&mut t);
        }
        out
    }

    fn apply(&self, sector: u64, buf: &mut [u8], encrypt: bool) {
        let tweaks = self.tweaks(sector);
        let mut blocks: Vec<GenericArray<u8, _>> = buf
            .chunks_exact(16)
            .zip(&tweaks)
            .map(|(c, t)| {
                let mut b = GenericArray::clone_from_slice(c);
                for (x, y) in b.iter_mut().zip(t) {
                    *x ^= y;
                }
                b
            })
            .collect();
        if encrypt {
            self.data.encrypt_blocks(&mut blocks);
        } else {
            self.data.decrypt_blocks(&mut blocks);
        }
        for ((c, b), t) in buf.chunks_exact_mut(16).zip(&blocks).zip(&tweaks) {
            for i in 0..16 {
                c[i] = b[i] ^ t[i];
            }
        }
    }
}

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let sectors = if a.quick { 2_000 } else { 100_000 };
    let mut rng = rand::thread_rng();
    let mut plain = vec![0u8; SECTOR * 64];
    rng.fill_bytes(&mut plain);
    let mut gk = [0u8; 32];
    rng.fill_bytes(&mut gk);
    let gcm = Aes256Gcm::new_from_slice(&gk).map_err(|_| anyhow::anyhow!("bad key length"))?;
    let mut xk = [0u8; 64];
    rng.fill_bytes(&mut xk);
    let xts = Xts::new(&xk);

    // GCM: seal with a counter nonce, then open and verify.
    let mut sealed = Vec::with_capacity(sectors);
    let t0 = Instant::now();
    for i in 0..sectors {
        let src = &plain[(i % 64) * SECTOR..(i % 64 + 1) * SECTOR];
        let mut buf = src.to_vec();
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = gcm
            .encrypt_in_place_detached(Nonce::from_slice(&n), b"aad", &mut buf)
            .map_err(|_| anyhow::anyhow!("gcm seal"))?;
        sealed.push((buf, tag));
    }
    let gcm_seal = t0.elapsed();
    let t0 = Instant::now();
    for (i, (buf, tag)) in sealed.iter_mut().enumerate() {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_be_bytes());
        gcm.decrypt_in_place_detached(Nonce::from_slice(&n), b"aad", buf, Tag::from_slice(tag))
            .map_err(|_| anyhow::anyhow!("gcm open failed"))?;
    }
    let gcm_open = t0.elapsed();
    for (i, (buf, _)) in sealed.iter().enumerate() {
        ensure!(
            buf[..] == plain[(i % 64) * SECTOR..(i % 64 + 1) * SECTOR],
            "gcm round trip"
        );
    }

    // XTS + blake3: seal (encrypt, hash), then open (hash check, decrypt).
    let mut sealed = Vec::with_capacity(sectors);
    let t0 = Instant::now();
    for i in 0..sectors {
        let mut buf = plain[(i % 64) * SECTOR..(i % 64 + 1) * SECTOR].to_vec();
        xts.apply(i as u64, &mut buf, true);
        let h = blake3::hash(&buf);
        sealed.push((buf, h));
    }
    let xts_seal = t0.elapsed();
    let t0 = Instant::now();
    for (i, (buf, h)) in sealed.iter_mut().enumerate() {
        ensure!(blake3::hash(buf) == *h, "xts: blake3 mismatch");
        xts.apply(i as u64, buf, false);
    }
    let xts_open = t0.elapsed();
    for (i, (buf, _)) in sealed.iter().enumerate() {
        ensure!(
            buf[..] == plain[(i % 64) * SECTOR..(i % 64 + 1) * SECTOR],
            "xts round trip"
        );
    }

    let bytes = sectors * SECTOR;
    let rows = [
        ("seal", mib_s(bytes, gcm_seal), mib_s(bytes, xts_seal)),
        (
            "open + verify",
            mib_s(bytes, gcm_open),
            mib_s(bytes, xts_open),
        ),
    ];
    let mut md = String::new();
    crate::tee!(
        md,
        "4 KiB sector sealing, one thread, {sectors} sectors, MiB/s\n"
    );
    crate::tee!(
        md,
        "| op | AES-256-GCM (16 B tag) | AES-256-XTS + blake3 (32 B hash) | GCM / XTS+blake3 |"
    );
    crate::tee!(md, "|---|---:|---:|---:|");
    for (op, g, x) in rows {
        crate::tee!(md, "| {op} | {g:.0} | {x:.0} | {:.2} |", g / x);
    }
    let tables = crate::results::tables_from_markdown(&md);
    let mut res = crate::results::BenchResult {
        bench: "sector-crypto".into(),
        title: "Volume sector sealing: AES-256-GCM (ours) against AES-256-XTS + blake3".into(),
        command: format!(
            "cargo build --release -p sov-bench && target/release/sov-bench sector-crypto{}",
            if a.quick { " --quick" } else { "" }
        ),
        setup: format!(
            "{sectors} sectors of 4 KiB sealed and opened (with verification) on one core, by \
             the AEAD volumes use and by the XTS-plus-hash alternative."
        ),
        ..Default::default()
    };
    if let Some(t) = tables.first() {
        res.headline.push(t.headline(
            0,
            "4 KiB sector seal",
            "AES-256-GCM (16 B tag)",
            "AES-256-XTS + blake3 (32 B hash)",
            "AES-256-XTS + blake3",
            "MiB/s",
        ));
    }
    res.tables = tables;
    res.write_to(a.results.as_deref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xts_round_trips_and_depends_on_the_sector() {
        let x = Xts::new(&[7u8; 64]);
        let plain = vec![0x42u8; SECTOR];
        let mut a = plain.clone();
        x.apply(1, &mut a, true);
        let mut b = plain.clone();
        x.apply(2, &mut b, true);
        assert_ne!(a, plain);
        assert_ne!(a, b, "the tweak changes the ciphertext");
        // Equal plaintext blocks within a sector encrypt differently.
        assert_ne!(a[..16], a[16..32]);
        x.apply(1, &mut a, false);
        assert_eq!(a, plain);
    }
}
