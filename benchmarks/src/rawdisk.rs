//! The raw-disk baseline: the same bytes as the storaged run written with pwrite to one
//! appended file by `c` threads, with the same number of fdatasyncs spread evenly over the
//! run, and read back with pread by `c` threads.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::payload;

/// How many fdatasyncs are due once the `k`-th of `ops` writes (1-based) has completed, so
/// that `syncs` of them are spread evenly and the last write is always followed by one.
pub fn syncs_due(k: u64, ops: u64, syncs: u64) -> u64 {
    let at = |k: u64| (u128::from(k) * u128::from(syncs) / u128::from(ops)) as u64;
    at(k) - at(k - 1)
}

/// Writes `ops` records of `buffers[0].len()` bytes to a new `path` at distinct offsets, one
/// thread per buffer, issuing `syncs` fdatasyncs along the way. Returns the wall time.
pub fn put<B: AsRef<[u8]>>(
    path: &Path,
    buffers: &[B],
    ops: u64,
    syncs: u64,
    round: u32,
) -> anyhow::Result<Duration> {
    ensure!(ops > 0 && !buffers.is_empty(), "nothing to write");
    let size = buffers[0].as_ref().len() as u64;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // Each writer stamps its own copy; copied before the clock starts.
    let mut buffers: Vec<Vec<u8>> = buffers.iter().map(|b| b.as_ref().to_vec()).collect();
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let start = Instant::now();
    let results: Vec<std::thread::Result<anyhow::Result<()>>> = std::thread::scope(|s| {
        let handles: Vec<_> = buffers
            .iter_mut()
            .map(|buf| {
                let (file, next, done) = (&file, &next, &done);
                s.spawn(move || -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ops {
                            return Ok(());
                        }
                        payload::stamp(buf, round, i);
                        file.write_all_at(buf, i * size)
                            .with_context(|| format!("pwrite at {}", i * size))?;
                        let k = done.fetch_add(1, Ordering::AcqRel) + 1;
                        for _ in 0..syncs_due(k, ops, syncs) {
                            file.sync_data().context("fdatasync")?;
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let elapsed = start.elapsed();
    join_all(results)?;
    Ok(elapsed)
}

/// Reads the `ops` records of `size` bytes that [`put`] wrote, with `conc` threads.
pub fn get(path: &Path, size: u64, ops: u64, conc: usize) -> anyhow::Result<Duration> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    ensure!(
        len >= size * ops,
        "{} holds {len} bytes, expected {}",
        path.display(),
        size * ops
    );
    let mut buffers = vec![vec![0u8; size as usize]; conc];
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let results: Vec<std::thread::Result<anyhow::Result<()>>> = std::thread::scope(|s| {
        let handles: Vec<_> = buffers
            .iter_mut()
            .map(|buf| {
                let (file, next) = (&file, &next);
                s.spawn(move || -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ops {
                            return Ok(());
                        }
                        file.read_exact_at(buf, i * size)
                            .with_context(|| format!("pread of {size} bytes at {}", i * size))?;
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let elapsed = start.elapsed();
    join_all(results)?;
    Ok(elapsed)
}

fn join_all(results: Vec<std::thread::Result<anyhow::Result<()>>>) -> anyhow::Result<()> {
    for r in results {
        match r {
            Ok(r) => r?,
            Err(_) => bail!("a raw-disk thread panicked"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_exactly_the_requested_syncs() {
        for (ops, syncs) in [(1, 1), (10, 1), (10, 3), (10, 10), (10, 13), (20000, 777)] {
            let due: Vec<u64> = (1..=ops).map(|k| syncs_due(k, ops, syncs)).collect();
            assert_eq!(due.iter().sum::<u64>(), syncs, "ops {ops} syncs {syncs}");
            assert!(due[ops as usize - 1] >= 1, "the last write is synced");
            let most = due.iter().max().copied().unwrap_or(0);
            assert!(most <= syncs.div_ceil(ops), "evenly spread: {due:?}");
        }
    }

    #[test]
    fn one_sync_per_write_when_counts_match() {
        assert!((1..=64).all(|k| syncs_due(k, 64, 64) == 1));
    }

    #[test]
    fn writes_then_reads_back_every_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("raw");
        let buffers = vec![payload::random_buffer(4096, 1); 3];
        put(&path, &buffers, 10, 4, 0).expect("put");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 40960);
        get(&path, 4096, 10, 3).expect("get");
        assert!(
            get(&path, 4096, 11, 3).is_err(),
            "reading past the end fails"
        );
    }
}
