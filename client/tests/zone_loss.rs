//! The durable data path against real processes: metad and six storage nodes in three zones,
//! a replicated{3} pool and an ec{4,2} pool. A whole zone is killed: everything stays readable
//! (degraded), replicated writes go on, erasure-coded writes fail cleanly until the zone's nodes
//! are `out`; then redundancy is restored without anyone acting, the zone comes back, backfills,
//! and its strays go. Every acknowledged write is read back at every step.

mod common;

use std::time::Duration;

use common::{Ledger, MIB, two_pools, wait_clean};
use sov_client::ClientError;
use sov_testkit::TestDir;

const SIZES: &[(&str, usize)] = &[
    ("empty", 0),
    ("one", 1),
    ("4k", 4096),
    ("4m1", 4 * MIB + 1),
    ("100m", 100 * MIB),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_is_lost_and_comes_back_without_losing_a_write() {
    let dir = TestDir::new("zone-loss");
    let (mut cl, c) = two_pools(&dir, &[], 16).await;
    let mut l = Ledger::default();
    for b in ["rep3", "ec42"] {
        for (name, len) in SIZES {
            let r = l.put(&c, b, name, *len).await.expect("healthy write");
            assert_eq!(
                r.degraded_chunks, 0,
                "{b}/{name} degraded on a healthy cluster"
            );
        }
    }
    println!("healthy: {} writes checked", l.verify(&c).await);
    let check = wait_clean(&c, Duration::from_secs(60)).await;
    println!("{check}");

    // Lose zone z3 (two of six nodes) at once.
    for i in cl.zone("z3") {
        cl.nodes[i].kill9();
    }
    println!(
        "zone z3 killed: {} writes read back degraded",
        l.verify(&c).await
    );
    // Replicated writes go on (2 of 3 copies, recorded degraded); erasure-coded ones cannot
    // reach min_size k+1 = 5 of 6 and fail cleanly.
    let r = l
        .put(&c, "rep3", "during-1", 5 * MIB)
        .await
        .expect("degraded write");
    assert!(r.degraded_chunks > 0, "a write without z3 must be degraded");
    match l.put(&c, "ec42", "during-1", 5 * MIB).await {
        Err(ClientError::Unavailable(m)) => println!("ec write refused as expected: {m}"),
        other => panic!("ec{{4,2}} write with 4 of 6 nodes: {other:?}"),
    }
    // The zone's nodes go out; acting sets move to the four survivors.
    let z3: Vec<String> = cl.zone("z3").iter().map(|&i| cl.ids[i].clone()).collect();
    cl.wait_map(Duration::from_secs(30), "z3 out", |m| {
        z3.iter()
            .all(|id| m.nodes.iter().any(|n| &n.id == id && n.state == "out"))
    })
    .await
    .unwrap();
    for b in ["rep3", "ec42"] {
        l.put(&c, b, "after-out-1", 9 * MIB)
            .await
            .expect("write after out");
        l.put(&c, b, "after-out-small", 10)
            .await
            .expect("write after out");
    }
    let check = wait_clean(&c, Duration::from_secs(240)).await;
    println!("redundancy restored on 4 nodes:\n{check}");
    println!("after out: {} writes read back", l.verify(&c).await);

    // The zone returns with its old data: it backfills, and what moved back is not kept twice.
    for i in cl.zone("z3") {
        cl.nodes[i].restart().expect("restart");
    }
    let all = cl.ids.clone();
    cl.wait_map(Duration::from_secs(30), "all up", |m| {
        all.iter()
            .all(|id| m.nodes.iter().any(|n| &n.id == id && n.state == "up"))
    })
    .await
    .unwrap();
    l.put(&c, "ec42", "after-return", 3 * MIB)
        .await
        .expect("write after return");
    let check = wait_clean(&c, Duration::from_secs(240)).await;
    println!("zone back:\n{check}");
    for p in &check.pools {
        assert_eq!(p.undersized_pgs, 0, "{p:?}");
    }
    let n = l.verify(&c).await;
    println!(
        "checked {n} acknowledged objects ({} acknowledged writes), none lost",
        l.writes
    );
}
