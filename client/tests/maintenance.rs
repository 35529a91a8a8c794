//! Scrub healing and deletes against real processes (metad + six storage nodes in three
//! zones): bytes flipped in segment files never reach a reader and are healed from peers;
//! data of deleted or replaced objects is freed on every node, including one that was down
//! when the delete happened.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Ledger, MIB, two_pools, wait_clean};
use rand::Rng;
use sov_client::manifest;
use sov_testkit::{DataCluster, TestDir, bin_path, http_get, metric_value};

/// Flips `n` random bytes in the largest segment file under `disk`; returns how many.
fn flip_bytes(disk: &Path, n: usize) -> usize {
    let seg = std::fs::read_dir(disk.join("segments"))
        .expect("segments dir")
        .filter_map(|e| e.ok())
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a segment file")
        .path();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .expect("open segment");
    let len = f.metadata().unwrap().len();
    let mut rng = rand::thread_rng();
    for _ in 0..n {
        let at = rng.gen_range(0..len);
        let mut b = [0u8];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        b[0] ^= 0xff;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&b).unwrap();
    }
    f.sync_all().unwrap();
    n
}

fn metric_sum(cl: &DataCluster, name: &str, labels: &str) -> f64 {
    cl.nodes
        .iter()
        .filter_map(|n| http_get(&n.metrics_url()).ok())
        .filter_map(|t| metric_value(&t, name, labels))
        .sum()
}

async fn corrupt_total(c: &sov_client::Client) -> usize {
    let view = c.map().refresh(0).await.unwrap();
    let mut n = 0;
    for node in view.up_nodes() {
        n += c.nodes().list_corrupt(&node.addr).await.unwrap().len();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_never_reach_a_reader_and_scrub_heals_them() {
    let dir = TestDir::new("bitrot");
    let (cl, c) = two_pools(&dir, &["--scrub-interval", "1s", "--scrub-rate", "0"], 8).await;
    let mut l = Ledger::default();
    for b in ["rep3", "ec42"] {
        for (i, len) in [1usize, 5000, 3 * MIB, 9 * MIB + 7].iter().enumerate() {
            l.put(&c, b, &format!("obj-{i}"), *len)
                .await
                .expect("write");
        }
    }
    // Storage nodes only ever see ciphertext: a recognisable plaintext is on no disk.
    let marker = b"sov-plaintext-marker-7f3a";
    let text: Vec<u8> = marker.iter().copied().cycle().take(3 * MIB).collect();
    for b in ["rep3", "ec42"] {
        c.put_object(b, "plain", &text[..], Default::default())
            .await
            .expect("write");
    }
    for n in &cl.nodes {
        for seg in std::fs::read_dir(n.disks[0].join("segments")).unwrap() {
            let bytes = std::fs::read(seg.unwrap().path()).unwrap();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "plaintext found on {}",
                n.disks[0].display()
            );
        }
    }
    wait_clean(&c, Duration::from_secs(60)).await;

    // Damage stays within what the pools survive: two nodes per round, so every stripe keeps
    // at least k = 4 good shards and every chunk a good copy.
    // Round 1: nobody reads; scrub finds the damage and recovery rewrites it from peers.
    // Scrub must have gone over all of both damaged disks (two passes more than at the flip:
    // one of them started after it) before the round ends, or damage it had not reached yet
    // would meet round 2's on the same chunk.
    let passes = |i: usize| {
        http_get(&cl.nodes[i].metrics_url())
            .ok()
            .and_then(|t| metric_value(&t, "storaged_scrub_passes_total", ""))
            .unwrap_or(0.0)
    };
    let mut flipped = 0;
    let mut scrubbed_after = Vec::new();
    for i in [0, 2] {
        scrubbed_after.push((i, passes(i) + 2.0));
        flipped += flip_bytes(&cl.nodes[i].disks[0], 6);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // Coverage first: what those passes found is then in the counts below.
        let covered = scrubbed_after.iter().all(|&(i, want)| passes(i) >= want);
        let found = metric_sum(&cl, "storaged_corrupt_chunks_found_total", "scrub");
        let healed = metric_sum(&cl, "storaged_repair_chunks_total", "heal");
        let open = corrupt_total(&c).await;
        if found > 0.0 && healed > 0.0 && open == 0 && covered {
            println!(
                "round 1: {flipped} bytes flipped, scrub found {found} bad chunks, recovery healed {healed}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scrub did not heal: found {found}, healed {healed}, still corrupt {open}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_clean(&c, Duration::from_secs(60)).await;
    println!("round 1: {} objects read back correct", l.verify(&c).await);

    // Round 2: readers come first; every byte they get is right, and the damage is healed.
    for i in [1, 5] {
        flip_bytes(&cl.nodes[i].disks[0], 6);
    }
    let n = l.verify(&c).await;
    println!("round 2: {n} objects read back correct over flipped bytes");
    let deadline = Instant::now() + Duration::from_secs(120);
    while corrupt_total(&c).await > 0 || metric_sum(&cl, "storaged_scrub_passes_total", "") < 12.0 {
        assert!(Instant::now() < deadline, "corrupt chunks left");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // One more full scrub everywhere after the heal: nothing bad is left on any disk.
    let passes = metric_sum(&cl, "storaged_scrub_passes_total", "");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_sum(&cl, "storaged_scrub_passes_total", "") < passes + 12.0 {
        assert!(Instant::now() < deadline, "scrub stalled");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        corrupt_total(&c).await,
        0,
        "scrub found damage left after healing"
    );
    wait_clean(&c, Duration::from_secs(60)).await;
    println!("checked {} acknowledged writes", l.writes);
}

/// Ids of an object's stored pieces.
async fn stored_ids(c: &sov_client::Client, bucket: &str, key: &str) -> Vec<String> {
    let v = c.head_object(bucket, key).await.expect("head");
    manifest::stored_ids(&manifest::decode(&v.manifest).expect("manifest"))
}

async fn holders(c: &sov_client::Client, ids: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let view = c.map().refresh(0).await.unwrap();
    for n in view.up_nodes() {
        for id in ids {
            if c.nodes().stat(&n.addr, id).await.is_ok() {
                out.insert(format!("{}:{id}", n.id));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_reach_a_node_that_was_down() {
    let dir = TestDir::new("deletes");
    let (mut cl, c) = two_pools(&dir, &[], 8).await;
    let mut l = Ledger::default();
    for b in ["rep3", "ec42"] {
        for k in ["keep", "gone", "over"] {
            l.put(&c, b, k, 2 * MIB + 3).await.expect("write");
        }
    }
    wait_clean(&c, Duration::from_secs(60)).await;
    let mut freed = Vec::new();
    for b in ["rep3", "ec42"] {
        for k in ["gone", "over"] {
            freed.extend(stored_ids(&c, b, k).await);
        }
    }
    assert!(!holders(&c, &freed).await.is_empty());

    // n1 is down while objects are deleted and overwritten.
    cl.nodes[0].kill9();
    for b in ["rep3", "ec42"] {
        l.delete(&c, b, "gone").await;
        l.put(&c, b, "over", 1000).await.expect("overwrite");
    }
    // The live nodes free their copies; the tombstones wait for n1 alone.
    let meta = c.meta().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = meta.all_tombstones().await.unwrap();
        assert_eq!(t.len(), 4, "one tombstone per deleted or replaced version");
        if t.iter().all(|t| t.pending == vec!["n1".to_string()]) {
            break;
        }
        assert!(Instant::now() < deadline, "live nodes did not free: {t:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        holders(&c, &freed).await.is_empty(),
        "live nodes still hold freed data"
    );

    // n1 returns with the old copies, frees them, and the tombstones go.
    cl.nodes[0].restart().expect("restart n1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = meta.all_tombstones().await.unwrap();
        if t.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "tombstones left: {t:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = holders(&c, &freed).await;
    assert!(left.is_empty(), "freed data still stored: {left:?}");
    wait_clean(&c, Duration::from_secs(60)).await;
    let freed_metric = metric_sum(&cl, "storaged_tombstone_deletes_total", "");
    assert!(
        freed_metric >= freed.len() as f64,
        "{freed_metric} < {}",
        freed.len()
    );
    println!(
        "{} pieces of deleted versions freed; checked {} objects",
        freed.len(),
        l.verify(&c).await
    );

    // The same through the CLI: put, get back byte for byte, rm, and the audit.
    let sov = |args: &[&str]| {
        let out = std::process::Command::new(bin_path("sov"))
            .envs(sov_testkit::pki().cli_env())
            .args(args)
            .args(["--metad", &cl.metad.addr])
            .output()
            .expect("run sov");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let src = dir.path().join("in.bin");
    let back = dir.path().join("out.bin");
    std::fs::write(&src, common::payload("cli", 5 * MIB + 11)).unwrap();
    let (code, out, err) = sov(&["object", "put", "ec42", "cli/file", src.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = sov(&["object", "get", "ec42", "cli/file", back.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "CLI round trip differs"
    );
    let (code, out, _) = sov(&["object", "ls", "ec42", "--prefix", "cli/"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("cli/file"), "{out}");
    let (code, _, err) = sov(&["object", "get", "ec42", "no/such"]);
    assert_eq!(code, Some(4), "a missing key is exit 4: {err}");
    let (code, out, err) = sov(&[
        "--output",
        "json",
        "repair",
        "status",
        "--wait",
        "--timeout",
        "60",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["deep"]["clean"], true, "{out}");
    assert_eq!(v["nodes"].as_array().map(|a| a.len()), Some(6), "{out}");
    let (code, _, err) = sov(&["object", "rm", "ec42", "cli/file"]);
    assert_eq!(code, Some(0), "{err}");
}
