//! metad as real processes: a 3-member cluster under load while its leader is killed again and
//! again, a frozen majority, and a member that comes back and catches up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metad::client::MetaClient;
use sov_proto::metad::*;
use sov_testkit::{MetadCluster, TestDir};
use tonic::Code;

fn object(bucket: &str, key: &str) -> ObjectVersion {
    ObjectVersion {
        bucket: bucket.into(),
        key: key.into(),
        size: 4096,
        etag: "0123456789abcdef0123456789abcdef".into(),
        manifest: vec![7u8; 64].into(),
        ..Default::default()
    }
}

async fn put(c: &MetaClient, bucket: &str, key: &str) -> Result<PutObjectResponse, tonic::Status> {
    let req = PutObjectRequest {
        object: Some(object(bucket, key)),
        expected_version_id: None,
    };
    c.call(|mut m| {
        let req = req.clone();
        async move { m.put_object(req).await }
    })
    .await
}

async fn create_bucket(c: &MetaClient, name: &str) {
    let req = CreateBucketRequest {
        name: name.into(),
        owner: "tester".into(),
        pool: String::new(),
    };
    c.call(|mut m| {
        let req = req.clone();
        async move { m.create_bucket(req).await }
    })
    .await
    .expect("create bucket");
}

/// Every key of a bucket with its version id, through `client` (paging by 1000).
async fn list_all(
    client: &mut metad::client::Client,
    bucket: &str,
    consistency: Consistency,
) -> Result<BTreeMap<String, String>, tonic::Status> {
    let mut out = BTreeMap::new();
    let mut after = String::new();
    loop {
        let r = client
            .list_objects(ListObjectsRequest {
                bucket: bucket.into(),
                start_after: after.clone(),
                max_keys: 1000,
                consistency: consistency as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        for o in r.objects {
            out.insert(o.key, o.version_id);
        }
        if !r.truncated {
            return Ok(out);
        }
        after = r.next_start_after;
    }
}

/// Waits until every live member has applied what the leader has.
async fn wait_caught_up(cluster: &MetadCluster, live: &[usize], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut applied = Vec::new();
        for &i in live {
            applied.push(cluster.members[i].status().await.map(|s| s.applied_index));
        }
        let max = applied.iter().flatten().max().copied().unwrap_or(0);
        if applied.iter().all(|a| *a == Some(max)) && max > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members did not catch up within {timeout:?}: {applied:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kills_lose_no_acknowledged_write() {
    let dir = TestDir::new("metad-leader-kill");
    // Small snapshot interval and log tail, so a member that was away catches up by snapshot.
    let mut cluster = MetadCluster::start(
        dir.path(),
        3,
        &["--snapshot-logs", "60", "--keep-logs", "5"],
    )
    .expect("start cluster");
    let addrs = cluster.addr_list();
    let client = MetaClient::new(&metad::client::parse_addrs(&addrs)).unwrap();
    cluster
        .leader(Duration::from_secs(30))
        .await
        .expect("first leader");
    create_bucket(&client, "load").await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Default::default();
    let errors = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..16 {
        let (stop, acked, errors, client) =
            (stop.clone(), acked.clone(), errors.clone(), client.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w:02}/{n:06}");
                n += 1;
                match put(&client, "load", &key).await {
                    Ok(r) => {
                        let v = r.object.expect("object in reply").version_id;
                        acked.lock().unwrap().insert(key, v);
                    }
                    // Outcome unknown (the leader died mid-write): not acknowledged.
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let mut failovers = Vec::new();
    let mut killed = Vec::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = cluster.leader(Duration::from_secs(30)).await.unwrap();
        let before = acked.lock().unwrap().len();
        assert!(
            before > 0,
            "round {round}: no write acknowledged before the kill"
        );
        let last_at_kill = cluster.members[leader]
            .status()
            .await
            .map(|s| s.last_log_index)
            .unwrap_or(0);
        cluster.members[leader].proc.kill9();
        killed.push(leader);
        let killed_at = Instant::now();
        // Service is back when writes are acknowledged again.
        let acked_at_kill = acked.lock().unwrap().len();
        loop {
            if acked.lock().unwrap().len() > acked_at_kill + 16 {
                break;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(30),
                "round {round}: no write acknowledged within 30s of killing the leader"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = killed_at.elapsed();
        let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        let new_leader = cluster
            .leader_among(&others, Duration::from_secs(10))
            .await
            .unwrap();
        failovers.push(took);
        println!(
            "round {round}: killed member {} (leader); writes acknowledged again after {:?}, \
             member {} leads",
            leader + 1,
            took,
            new_leader + 1
        );
        // Let the others run on without it until a snapshot covers more than it has and the
        // log before that is purged, so it must catch up by snapshot (at least 3 s; by
        // entries, not time, so a slow machine does not make this pass by luck or fail).
        let away = Instant::now();
        loop {
            let snap = cluster.members[new_leader]
                .status()
                .await
                .map(|s| s.snapshot_index)
                .unwrap_or(0);
            if away.elapsed() >= Duration::from_secs(3) && snap > last_at_kill + 80 {
                break;
            }
            assert!(
                away.elapsed() < Duration::from_secs(90),
                "round {round}: no snapshot past index {last_at_kill} within 90 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster.members[leader]
            .restart()
            .expect("restart killed member");
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "acknowledged writes: {}, failed or unknown: {errors}, failovers: {failovers:?}",
        acked.len()
    );
    assert!(
        acked.len() > 200,
        "too few writes to mean anything: {}",
        acked.len()
    );
    for f in &failovers {
        assert!(*f < Duration::from_secs(20), "failover took {f:?}");
    }

    // Every member, the restarted ones too, holds every acknowledged write.
    wait_caught_up(&cluster, &[0, 1, 2], Duration::from_secs(60)).await;
    for m in &cluster.members {
        let mut c = m.client().unwrap();
        for consistency in [Consistency::Linearizable, Consistency::Stale] {
            let listed = list_all(&mut c, "load", consistency).await.unwrap();
            let missing: Vec<_> = acked
                .iter()
                .filter(|(k, v)| listed.get(*k) != Some(*v))
                .take(5)
                .collect();
            assert!(
                missing.is_empty(),
                "member {} ({consistency:?}) lacks acknowledged writes, e.g. {missing:?}",
                m.id
            );
        }
    }
    // The log stayed bounded (snapshots were taken), and every member that was killed and
    // came back caught up by installing a snapshot from the leader.
    for m in &cluster.members {
        let s = m.status().await.expect("status");
        assert!(
            s.snapshot_index > 0,
            "member {} never took or installed a snapshot",
            m.id
        );
    }
    for i in killed
        .iter()
        .copied()
        .collect::<std::collections::BTreeSet<usize>>()
    {
        let m = &cluster.members[i];
        let text = sov_testkit::http_get(&m.metrics_url()).unwrap();
        let installed =
            sov_testkit::metric_value(&text, "metad_raft_snapshots_installed", "").unwrap_or(0.0);
        println!(
            "member {} installed {installed} snapshot(s) after its restart",
            m.id
        );
        assert!(
            installed >= 1.0,
            "member {} came back after its log was purged but caught up without a snapshot",
            m.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_majority_stops_commits_and_a_frozen_leader_is_replaced() {
    let dir = TestDir::new("metad-freeze");
    let cluster = MetadCluster::start(dir.path(), 3, &[]).expect("start cluster");
    let all = MetaClient::new(&metad::client::parse_addrs(&cluster.addr_list())).unwrap();
    let leader = cluster.leader(Duration::from_secs(30)).await.unwrap();
    create_bucket(&all, "frozen").await;

    // Freeze both followers: the leader alone cannot commit, and says so in bounded time.
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &f in &followers {
        cluster.members[f].proc.stop();
    }
    let alone = MetaClient::new(&[cluster.members[leader].addr.clone()])
        .unwrap()
        .with_retry_for(Duration::ZERO);
    let t = Instant::now();
    let r = put(&alone, "frozen", "lonely").await;
    let err = r.expect_err("a leader without a quorum committed a write");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Unavailable),
        "unexpected status {err:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    let mut lc = cluster.members[leader].client().unwrap();
    let read = lc
        .get_bucket(GetBucketRequest {
            name: "frozen".into(),
            consistency: Consistency::Linearizable as i32,
        })
        .await;
    assert!(
        read.is_err(),
        "a linearizable read succeeded without a quorum"
    );
    for &f in &followers {
        cluster.members[f].proc.cont();
    }
    put(&all, "frozen", "after-thaw")
        .await
        .expect("write after the majority returned");

    // Freeze the leader: the other two elect a new one and go on.
    let leader = cluster.leader(Duration::from_secs(30)).await.unwrap();
    cluster.members[leader].proc.stop();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let t = Instant::now();
    let majority = MetaClient::new(
        &others
            .iter()
            .map(|i| cluster.members[*i].addr.clone())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    // A write forwarded to the frozen leader comes back "outcome unknown" once the followers
    // give up on it; a client then writes again (an unconditional put may be repeated).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match put(&majority, "frozen", "while-leader-frozen").await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unknown && Instant::now() < deadline => {
                assert!(e.message().contains("outcome unknown"), "{e:?}");
            }
            Err(e) => panic!("the majority did not go on: {e:?}"),
        }
    }
    let new_leader = cluster
        .leader_among(&others, Duration::from_secs(10))
        .await
        .unwrap();
    println!(
        "leader {} frozen; member {} leads, write acknowledged after {:?}",
        leader + 1,
        new_leader + 1,
        t.elapsed()
    );
    cluster.members[leader].proc.cont();
    // The old leader steps down and serves the new write (forwarded, linearizable).
    let mut old = cluster.members[leader].client().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = old
            .get_object(GetObjectRequest {
                bucket: "frozen".into(),
                key: "while-leader-frozen".into(),
                consistency: Consistency::Linearizable as i32,
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert_ne!(e.code(), Code::NotFound, "write lost: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("old leader never served the new write: {e:?}"),
        }
    }
    // What the lone leader could not commit is not there as acknowledged data; it may have
    // been committed later by the new leader (Raft may keep it), which is allowed: it was
    // never acknowledged.
    let s = cluster.members[leader].status().await.unwrap();
    assert_ne!(s.role, "leader", "the old leader did not step down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_members_survive_losing_two() {
    let dir = TestDir::new("metad-five");
    let mut cluster = MetadCluster::start(dir.path(), 5, &[]).expect("start cluster");
    let client = MetaClient::new(&metad::client::parse_addrs(&cluster.addr_list())).unwrap();
    let leader = cluster.leader(Duration::from_secs(30)).await.unwrap();
    create_bucket(&client, "five").await;
    put(&client, "five", "before")
        .await
        .expect("write with five members");
    // The client follows the leader hint: after the first answers, nothing is forwarded.
    for i in 0..50 {
        put(&client, "five", &format!("hinted-{i}")).await.unwrap();
    }
    let forwarded: f64 = cluster
        .members
        .iter()
        .map(|m| {
            let text = sov_testkit::http_get(&m.metrics_url()).unwrap();
            sov_testkit::metric_value(&text, "metad_forwarded_total", "").unwrap_or(0.0)
        })
        .sum();
    assert!(
        forwarded <= 3.0,
        "{forwarded} of 52 requests were forwarded"
    );

    // Lose the leader and one follower: three of five still make a majority.
    let follower = (0..5).find(|i| *i != leader).unwrap();
    cluster.members[leader].proc.kill9();
    cluster.members[follower].proc.kill9();
    let t = Instant::now();
    let deadline = t + Duration::from_secs(30);
    loop {
        match put(&client, "five", "after").await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert!(
                    matches!(
                        e.code(),
                        Code::Unknown | Code::Unavailable | Code::DeadlineExceeded
                    ),
                    "{e:?}"
                );
            }
            Err(e) => panic!("three of five members did not go on: {e:?}"),
        }
    }
    println!(
        "five members, two killed: writes acknowledged again after {:?}",
        t.elapsed()
    );
    let mut c = cluster.members[(0..5).find(|i| *i != leader && *i != follower).unwrap()]
        .client()
        .unwrap();
    let listed = list_all(&mut c, "five", Consistency::Linearizable)
        .await
        .unwrap();
    assert!(listed.contains_key("before") && listed.contains_key("after"));
}
