//! The map changing under load (real processes): a node added while clients write takes its
//! share and nothing is stored twice; a node restarted in the middle of a slow recovery pass
//! resumes it and the pass completes.

mod common;

use std::time::{Duration, Instant};

use common::{Ledger, MIB, client, two_pools, wait_clean};
use sov_testkit::{DataCluster, TestDir, http_get, metric_value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_during_writes_takes_its_share() {
    let dir = TestDir::new("grow");
    let (mut cl, c) = two_pools(&dir, &[], 16).await;
    let mut l = Ledger::default();
    for i in 0..6 {
        l.put(&c, "rep3", &format!("pre-{i}"), MIB + i)
            .await
            .unwrap();
        l.put(&c, "ec42", &format!("pre-{i}"), MIB + i)
            .await
            .unwrap();
    }
    // Writes go on while n7 joins zone z1.
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut l = Ledger::default();
            for i in 0..40 {
                let b = if i % 2 == 0 { "rep3" } else { "ec42" };
                l.put(&c, b, &format!("during-{i}"), 300_000 + i)
                    .await
                    .unwrap_or_else(|e| panic!("write {i} during the change: {e}"));
            }
            l
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n7 = cl.add_node("z1", &[]).expect("n7");
    cl.wait_map(Duration::from_secs(30), "n7 up", |m| {
        m.nodes.iter().any(|n| n.id == "n7" && n.state == "up")
    })
    .await
    .unwrap();
    let during = writer.await.expect("writer");
    l.acked.extend(during.acked);
    l.writes += during.writes;
    let check = wait_clean(&c, Duration::from_secs(120)).await;
    println!("{check}");
    let m = http_get(&cl.nodes[n7].metrics_url()).unwrap();
    let chunks = metric_value(&m, "storaged_disk_chunks", "").unwrap_or(0.0);
    assert!(chunks > 0.0, "n7 took no data");
    let stale: f64 = cl
        .nodes
        .iter()
        .filter_map(|n| http_get(&n.metrics_url()).ok())
        .filter_map(|t| metric_value(&t, "storaged_stale_epoch_total", ""))
        .sum();
    println!("n7 holds {chunks} pieces; {stale} puts refused as stale and retried");
    println!(
        "checked {} objects, {} acknowledged writes",
        l.verify(&c).await,
        l.writes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_its_recovery_pass() {
    let dir = TestDir::new("resume");
    // Slow pulls (1 MiB/s per node) so the pass is still running when n1 restarts.
    let mut cl = DataCluster::start(dir.path(), 3, 2, &[], &["--recovery-rate", "1MiB/s"])
        .await
        .expect("cluster");
    cl.pool_and_bucket("rep3", "replicated:3", 32)
        .await
        .unwrap();
    let c = client(&cl);
    let mut l = Ledger::default();
    // Lose n6 first; the writes land on the rest, recorded degraded.
    cl.nodes[5].kill9();
    for i in 0..12 {
        l.put(&c, "rep3", &format!("o{i}"), MIB).await.unwrap();
    }
    // n6 comes back empty-handed: it must pull ~its share of 12 MiB at 1 MiB/s.
    std::fs::remove_dir_all(&cl.nodes[5].disks[0]).unwrap();
    std::fs::create_dir_all(&cl.nodes[5].disks[0]).unwrap();
    cl.nodes[5].restart().expect("restart n6");
    let log = cl.nodes[5].work.join("storaged.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = http_get(&cl.nodes[5].metrics_url()).unwrap_or_default();
        let done = metric_value(&m, "storaged_repair_pass_pgs", "done").unwrap_or(0.0);
        let pulled = metric_value(&m, "storaged_repair_chunks_total", "copy").unwrap_or(0.0);
        if done >= 2.0 && pulled >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "n6's pass did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Same addresses, back within down_after: the map (and so the epoch) does not change, which
    // is what lets the pass resume where it stopped.
    let (port, mport) = (
        cl.nodes[5].ready.listen.port(),
        cl.nodes[5].ready.metrics_listen.port(),
    );
    cl.nodes[5]
        .restart_with(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ])
        .expect("restart n6 mid-pass");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("resuming the recovery pass")
    {
        assert!(Instant::now() < deadline, "n6 did not resume its pass");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_clean(&c, Duration::from_secs(120)).await;
    println!("resumed and clean; checked {} writes", l.verify(&c).await);
}
