//! Bitrot and compaction, end to end: flipped bytes are refused and reported (by reads and by
//! scrub), a rewrite heals them, and compaction frees garbage without losing live chunks.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use sov_testkit::{Storaged, TestDir, http_get, metric_value};
use tonic::Code;

fn segments(disk: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(disk.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Flips one byte at `offset` of the first segment file.
fn flip(disk: &Path, offset: u64) {
    let seg = &segments(disk)[0];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(seg)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, offset).unwrap();
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_are_refused_reported_and_healed() {
    let dir = TestDir::new("bitrot");
    let disk = dir.path().join("disk");
    // Scrub off at first, so we know who finds what.
    let mut node =
        Storaged::start(dir.path(), std::slice::from_ref(&disk), &["--no-scrub"]).unwrap();
    let mut c = node.client().await.unwrap();
    // Records are laid out back to back: 56-byte header, id, data.
    let a = pattern(1, 10_000);
    let b = pattern(2, 10_000);
    let cc = pattern(3, 10_000);
    put(&mut c, "rot/a", &a).await.unwrap();
    put(&mut c, "rot/b", &b).await.unwrap();
    put(&mut c, "rot/c", &cc).await.unwrap();
    let rec = |i: u64| i * (56 + 5 + 10_000);
    flip(&disk, rec(0) + 56 + 5 + 1234); // inside a's data
    flip(&disk, rec(2) + 56 + 5 + 9999); // last byte of c's data

    // A read of a rotten chunk is an error, never the bytes.
    let e = get(&mut c, "rot/a").await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("blake3 mismatch"), "{}", e.message());
    assert_eq!(get(&mut c, "rot/b").await.unwrap(), b);
    let found = corrupt_ids(&mut c).await;
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id.as_str(), found[0].found_by.as_str()),
        ("rot/a", "read")
    );
    let m = http_get(&node.metrics_url()).unwrap();
    assert_eq!(
        metric_value(
            &m,
            "storaged_corrupt_chunks_found_total",
            "found_by=\"read\""
        ),
        Some(1.0)
    );

    // Scrub finds the one nobody read.
    node.terminate(Duration::from_secs(30)).unwrap();
    let mut node = Storaged::start(
        dir.path(),
        std::slice::from_ref(&disk),
        &["--scrub-rate", "0", "--scrub-interval", "200ms"],
    )
    .unwrap();
    let mut c = node.client().await.unwrap();
    let url = node.metrics_url();
    wait_for("scrub to report rot/c", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            corrupt_ids(&mut c)
                .await
                .iter()
                .any(|x| x.id == "rot/c" && x.found_by == "scrub")
        }
    })
    .await;
    let m = http_get(&url).unwrap();
    assert!(
        metric_value(
            &m,
            "storaged_corrupt_chunks_found_total",
            "found_by=\"scrub\""
        )
        .unwrap()
            >= 1.0
    );
    assert!(metric_value(&m, "storaged_scrub_checked_chunks_total", "").unwrap() >= 3.0);
    let info = node_info(&mut c).await;
    assert_eq!(info.disks[0].corrupt_chunks, 2, "{info:?}");

    // Repair rewrites the chunk; the mark goes and the bytes are right again.
    put(&mut c, "rot/a", &a).await.unwrap();
    put(&mut c, "rot/c", &cc).await.unwrap();
    assert_eq!(get(&mut c, "rot/a").await.unwrap(), a);
    assert_eq!(get(&mut c, "rot/c").await.unwrap(), cc);
    assert!(corrupt_ids(&mut c).await.is_empty());
    node.terminate(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_frees_garbage_and_keeps_live_chunks() {
    let dir = TestDir::new("compaction");
    let disk = dir.path().join("disk");
    let args = [
        "--segment-size",
        "1MiB",
        "--max-chunk-size",
        "512KiB",
        "--garbage-ratio",
        "0.5",
        "--compaction-interval",
        "100ms",
        "--no-scrub",
    ];
    let mut node = Storaged::start(dir.path(), std::slice::from_ref(&disk), &args).unwrap();
    let mut c = node.client().await.unwrap();
    for i in 0..60u64 {
        put(&mut c, &format!("k/{i:02}"), &pattern(i, 100_000))
            .await
            .unwrap();
    }
    let before = segments(&disk).len();
    assert!(before >= 6, "{before} segments");
    // Delete five of every six chunks, and overwrite one.
    for i in (0..60u64).filter(|i| i % 6 != 0) {
        delete(&mut c, &format!("k/{i:02}")).await.unwrap();
    }
    put(&mut c, "k/00", &pattern(1000, 50_000)).await.unwrap();
    let url = node.metrics_url();
    wait_for("compaction", Duration::from_secs(60), || {
        let url = url.clone();
        let disk = disk.clone();
        async move {
            let m = http_get(&url).unwrap();
            metric_value(&m, "storaged_compaction_segments_total", "").unwrap_or(0.0) >= 4.0
                && segments(&disk).len() < before
        }
    })
    .await;
    let m = http_get(&url).unwrap();
    assert!(metric_value(&m, "storaged_compaction_reclaimed_bytes_total", "").unwrap() > 1e6);
    let check = |c: Client| async move {
        let mut c = c;
        assert_eq!(get(&mut c, "k/00").await.unwrap(), pattern(1000, 50_000));
        for i in 1..60u64 {
            let r = get(&mut c, &format!("k/{i:02}")).await;
            if i % 6 == 0 {
                assert_eq!(r.unwrap(), pattern(i, 100_000), "k/{i:02}");
            } else {
                assert_eq!(r.unwrap_err().code(), Code::NotFound, "k/{i:02}");
            }
        }
    };
    check(c.clone()).await;
    // Replay after compaction neither loses nor resurrects anything.
    node.kill9();
    node.restart().unwrap();
    check(node.client().await.unwrap()).await;
}
