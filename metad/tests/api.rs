//! metad's API as real processes: tables, keys, bad input, storage node liveness, and the
//! `sov` commands for members, nodes and pools.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use metad::client::{Client, MetaClient};
use sov_common::tls::Role;
use sov_proto::metad::*;
use sov_testkit::{Metad, Storaged, TestDir, bin_path, free_port};
use tonic::Code;

fn key_file(dir: &Path) -> String {
    let p = dir.join("master.key");
    std::fs::write(&p, "11".repeat(32)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

fn single(dir: &Path, extra: &[&str]) -> Metad {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Metad::start(
        &dir.join("metad"),
        1,
        &format!("127.0.0.1:{}", free_port()),
        &extra,
    )
    .expect("start metad")
}

async fn ready_client(m: &Metad) -> Client {
    let c = MetaClient::new(std::slice::from_ref(&m.addr)).unwrap();
    // A single member elects itself; wait for it.
    c.call(|mut c| async move { c.list_members(ListMembersRequest {}).await })
        .await
        .expect("metad answers");
    m.client().unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

fn fake_node(id: &str, zone: &str) -> Node {
    Node {
        id: id.into(),
        addr: format!("127.0.0.1:{}", 7000 + id.len()),
        zone: zone.into(),
        disks: vec![Disk {
            path: "/d1".into(),
            capacity_bytes: 1 << 40,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn ec(k: u32, m: u32) -> Option<Redundancy> {
    Some(Redundancy {
        kind: Some(redundancy::Kind::Ec(ErasureCoded { k, m })),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_and_bad_input() {
    let dir = TestDir::new("metad-api");
    let kf = key_file(dir.path());
    let m = single(dir.path(), &["--master-key-file", &kf]);
    let mut c = ready_client(&m).await;

    // Buckets: S3 names only, no duplicates, delete only when empty.
    for bad in ["ab", "Bad", "a_b", "-ab", "192.168.0.1", "a..b"] {
        let (code, msg) = code(
            c.create_bucket(CreateBucketRequest {
                name: bad.into(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{bad}: {msg}");
        assert!(msg.contains("bucket name"), "{msg}");
    }
    let b = c
        .create_bucket(CreateBucketRequest {
            name: "photos".into(),
            owner: "alice".into(),
            pool: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.owner, "alice");
    let (code_, msg) = code(
        c.create_bucket(CreateBucketRequest {
            name: "photos".into(),
            owner: "bob".into(),
            pool: String::new(),
        })
        .await,
    );
    assert_eq!(code_, Code::AlreadyExists);
    assert!(msg.contains("alice"), "{msg}");
    let (code_, msg) = code(
        c.create_bucket(CreateBucketRequest {
            name: "nopool".into(),
            owner: "bob".into(),
            pool: "missing".into(),
        })
        .await,
    );
    assert_eq!(code_, Code::NotFound, "{msg}");

    // Unknown bucket everywhere.
    let (code_, msg) = code(
        c.get_bucket(GetBucketRequest {
            name: "nosuch".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(
        (code_, msg.as_str()),
        (Code::NotFound, "no such bucket: nosuch")
    );
    let obj = |b: &str, k: &str| ObjectVersion {
        bucket: b.into(),
        key: k.into(),
        size: 3,
        ..Default::default()
    };
    let (code_, _) = code(
        c.put_object(PutObjectRequest {
            object: Some(obj("nosuch", "k")),
            expected_version_id: None,
        })
        .await,
    );
    assert_eq!(code_, Code::NotFound);
    let (code_, _) = code(
        c.list_objects(ListObjectsRequest {
            bucket: "nosuch".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::NotFound);
    // Oversized and empty keys, missing object, absurd page size.
    let (code_, msg) = code(
        c.put_object(PutObjectRequest {
            object: Some(obj("photos", &"k".repeat(1025))),
            expected_version_id: None,
        })
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument);
    assert!(msg.contains("1024"), "{msg}");
    let (code_, _) = code(
        c.put_object(PutObjectRequest {
            object: Some(obj("photos", "")),
            expected_version_id: None,
        })
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument);
    let (code_, _) = code(c.put_object(PutObjectRequest::default()).await);
    assert_eq!(code_, Code::InvalidArgument);
    let (code_, _) = code(
        c.list_objects(ListObjectsRequest {
            bucket: "photos".into(),
            max_keys: 5000,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument);

    // The object index: put replaces and reports the old version, conditional puts, get,
    // list with a delimiter, delete.
    let first = c
        .put_object(PutObjectRequest {
            object: Some(obj("photos", "2024/a.jpg")),
            expected_version_id: Some(String::new()),
        })
        .await
        .unwrap()
        .into_inner();
    let v1 = first.object.unwrap().version_id;
    assert!(first.replaced.is_none());
    let (code_, _) = code(
        c.put_object(PutObjectRequest {
            object: Some(obj("photos", "2024/a.jpg")),
            expected_version_id: Some(String::new()),
        })
        .await,
    );
    assert_eq!(
        code_,
        Code::FailedPrecondition,
        "if-absent put over an object"
    );
    let second = c
        .put_object(PutObjectRequest {
            object: Some(obj("photos", "2024/a.jpg")),
            expected_version_id: Some(v1.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.replaced.unwrap().version_id, v1);
    let v2 = second.object.unwrap().version_id;
    assert_ne!(v1, v2);
    for k in ["2024/b.jpg", "2025/c.jpg", "top.txt", "zürich.txt"] {
        c.put_object(PutObjectRequest {
            object: Some(obj("photos", k)),
            expected_version_id: None,
        })
        .await
        .unwrap();
    }
    let got = c
        .get_object(GetObjectRequest {
            bucket: "photos".into(),
            key: "2024/a.jpg".into(),
            consistency: Consistency::Linearizable as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.version_id, v2);
    let (code_, msg) = code(
        c.get_object(GetObjectRequest {
            bucket: "photos".into(),
            key: "nope".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!((code_, msg.as_str()), (Code::NotFound, "no such key: nope"));
    let l = c
        .list_objects(ListObjectsRequest {
            bucket: "photos".into(),
            delimiter: "/".into(),
            max_keys: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.common_prefixes, ["2024/", "2025/"]);
    assert!(l.truncated);
    let l = c
        .list_objects(ListObjectsRequest {
            bucket: "photos".into(),
            delimiter: "/".into(),
            start_after: l.next_start_after,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<_> = l.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["top.txt", "zürich.txt"]);
    assert!(l.common_prefixes.is_empty() && !l.truncated);

    // A bucket with objects cannot go; an empty one can.
    let (code_, msg) = code(
        c.delete_bucket(DeleteBucketRequest {
            name: "photos".into(),
        })
        .await,
    );
    assert_eq!(code_, Code::FailedPrecondition);
    assert!(msg.contains("not empty"), "{msg}");
    let d = c
        .delete_object(DeleteObjectRequest {
            bucket: "photos".into(),
            key: "top.txt".into(),
            expected_version_id: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted.unwrap().key, "top.txt");
    let d = c
        .delete_object(DeleteObjectRequest {
            bucket: "photos".into(),
            key: "top.txt".into(),
            expected_version_id: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.deleted.is_none(), "deleting an absent key is a no-op");
    c.create_bucket(CreateBucketRequest {
        name: "empty".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_bucket(DeleteBucketRequest {
        name: "empty".into(),
    })
    .await
    .unwrap();
    let buckets = c
        .list_buckets(ListBucketsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert_eq!(
        buckets.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        ["photos"]
    );

    // Access keys: the secret comes back; it is not stored in the clear.
    let k = c
        .create_access_key(CreateAccessKeyRequest {
            name: "ci".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = k.key.unwrap().access_key_id;
    assert_eq!(k.secret_access_key.len(), 40);
    let again = c
        .get_access_key(GetAccessKeyRequest {
            access_key_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.secret_access_key, k.secret_access_key);
    let listed = c
        .list_access_keys(ListAccessKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 1);
    let dk = c
        .create_data_key(CreateDataKeyRequest {
            purpose: "bucket:photos".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dk.key.len(), 32);
    let dk2 = c
        .get_data_key(GetDataKeyRequest { id: dk.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dk2.key, dk.key);
    let (code_, _) = code(
        c.get_data_key(GetDataKeyRequest {
            id: "nosuch".into(),
        })
        .await,
    );
    assert_eq!(code_, Code::NotFound);
    c.delete_access_key(DeleteAccessKeyRequest {
        access_key_id: id.clone(),
    })
    .await
    .unwrap();
    let (code_, _) = code(
        c.get_access_key(GetAccessKeyRequest {
            access_key_id: id,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::NotFound);

    // Pools are checked against the cluster: EC 4+2 on three nodes is refused, with why.
    for (i, z) in ["z1", "z2", "z3"].iter().enumerate() {
        c.register_node(RegisterNodeRequest {
            node: Some(fake_node(&format!("n{i}"), z)),
        })
        .await
        .unwrap();
    }
    let (code_, msg) = code(
        c.create_pool(CreatePoolRequest {
            name: "wide".into(),
            redundancy: ec(4, 2),
            tier: "archive".into(),
            pg_count: 0,
        })
        .await,
    );
    assert_eq!(code_, Code::FailedPrecondition);
    assert!(
        msg.contains("needs 6 nodes") && msg.contains("3 eligible"),
        "{msg}"
    );
    let (code_, _) = code(
        c.create_pool(CreatePoolRequest {
            name: "noredundancy".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument);
    let (code_, msg) = code(
        c.create_pool(CreatePoolRequest {
            name: "badtier".into(),
            redundancy: ec(2, 1),
            tier: "fast".into(),
            pg_count: 0,
        })
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument, "{msg}");
    let p = c
        .create_pool(CreatePoolRequest {
            name: "ec21".into(),
            redundancy: ec(2, 1),
            tier: "standard".into(),
            pg_count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let pool = p.pool.unwrap();
    assert!(pool.pg_count >= 32 && pool.pg_count.is_power_of_two());
    assert_eq!(pool.id, 1);

    // A heartbeat reporting a failed disk takes the node's capacity (and weight) out of
    // placement, with a new epoch; a working disk brings it back.
    let node_of =
        |map: &ClusterMap, id: &str| map.nodes.iter().find(|n| n.id == id).cloned().unwrap();
    let before = c
        .get_cluster_map(GetClusterMapRequest::default())
        .await
        .unwrap()
        .into_inner();
    let hb = |health: &str| HeartbeatRequest {
        node_id: "n0".into(),
        disks: vec![Disk {
            path: "/d1".into(),
            capacity_bytes: 1 << 40,
            used_bytes: 5,
            health: health.into(),
        }],
    };
    let e1 = c.heartbeat(hb("failed")).await.unwrap().into_inner().epoch;
    assert!(e1 > before.epoch);
    let map = c
        .get_cluster_map(GetClusterMapRequest::default())
        .await
        .unwrap()
        .into_inner();
    let n0 = node_of(&map, "n0");
    assert_eq!((n0.capacity_bytes, n0.weight), (0, 0), "{n0:?}");
    let e2 = c.heartbeat(hb("ok")).await.unwrap().into_inner().epoch;
    assert!(e2 > e1);
    let map = c
        .get_cluster_map(GetClusterMapRequest::default())
        .await
        .unwrap()
        .into_inner();
    let n0 = node_of(&map, "n0");
    assert_eq!((n0.capacity_bytes, n0.weight), (1 << 40, 1 << 40));
    assert_eq!(n0.disks[0].used_bytes, 5, "live usage from the heartbeat");
    let e3 = c.heartbeat(hb("ok")).await.unwrap().into_inner().epoch;
    assert_eq!(e3, e2, "an unchanged heartbeat changes nothing");

    // Garbage on the Raft port is refused, not a crash (sent with a member's certificate,
    // as only members may call Raft).
    let member = sov_testkit::pki()
        .issue(Role::Metad, None, "metad-9", &dir.path().join("m9-tls"))
        .unwrap();
    let ep = tonic::transport::Channel::from_shared(format!("http://{}", m.addr)).unwrap();
    let ch = sov_common::tls::connect_with(
        ep,
        Role::Metad,
        sov_common::tls::Transport::Tls(sov_common::tls::TlsContext::load(&member).unwrap()),
    )
    .await
    .unwrap();
    let mut raft = sov_proto::metad::raft_client::RaftClient::new(ch);
    let r = raft
        .append_entries(RaftPayload {
            data: b"{not json".to_vec().into(),
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
    // Still serving.
    c.list_buckets(ListBucketsRequest::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_need_a_private_master_key() {
    let dir = TestDir::new("metad-nokey");
    let m = single(dir.path(), &[]);
    let mut c = ready_client(&m).await;
    let (code_, msg) = code(
        c.create_access_key(CreateAccessKeyRequest {
            name: "x".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, Code::FailedPrecondition);
    assert!(msg.contains("master key"), "{msg}");

    // A world-readable key file is refused at start.
    let p = dir.path().join("open.key");
    std::fs::write(&p, "22".repeat(32)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(bin_path("metad"))
        .args([
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .arg("--master-key-file")
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

async fn node_state(c: &mut Client, id: &str) -> (String, u64) {
    let map = c
        .get_cluster_map(GetClusterMapRequest::default())
        .await
        .unwrap()
        .into_inner();
    let state = map
        .nodes
        .iter()
        .find(|n| n.id == id)
        .map(|n| n.state.clone())
        .unwrap_or_default();
    (state, map.epoch)
}

async fn wait_state(c: &mut Client, id: &str, want: &str, timeout: Duration) -> (u64, Duration) {
    let t = Instant::now();
    loop {
        let (state, epoch) = node_state(c, id).await;
        if state == want {
            return (epoch, t.elapsed());
        }
        assert!(
            t.elapsed() < timeout,
            "node {id} is {state:?}, not {want:?}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_storaged_goes_down_then_out_and_comes_back_up() {
    let dir = TestDir::new("metad-liveness");
    let m = single(
        dir.path(),
        &[
            "--node-heartbeat-interval",
            "200ms",
            "--down-after",
            "2s",
            "--out-after",
            "4s",
        ],
    );
    let mut c = ready_client(&m).await;
    let disk = dir.path().join("disk");
    let s = Storaged::start(
        &dir.path().join("storaged"),
        &[disk],
        &["--metad", &m.addr, "--zone", "z1", "--node-id", "s1"],
    )
    .expect("start storaged");
    let (e_up, _) = wait_state(&mut c, "s1", "up", Duration::from_secs(20)).await;
    let map = c
        .get_cluster_map(GetClusterMapRequest::default())
        .await
        .unwrap()
        .into_inner();
    let n = map.nodes.iter().find(|n| n.id == "s1").unwrap();
    assert_eq!(n.zone, "z1");
    assert_eq!(n.addr, s.addr());
    assert!(n.capacity_bytes > 0 && n.weight == n.capacity_bytes);
    assert_eq!(n.disks.len(), 1);

    s.proc.stop();
    let (e_down, after) = wait_state(&mut c, "s1", "down", Duration::from_secs(10)).await;
    assert!(e_down > e_up, "epoch did not advance on down");
    assert!(
        after >= Duration::from_millis(500),
        "down too early: {after:?}"
    );
    let (e_out, _) = wait_state(&mut c, "s1", "out", Duration::from_secs(10)).await;
    assert!(e_out > e_down, "epoch did not advance on out");
    s.proc.cont();
    let (e_back, _) = wait_state(&mut c, "s1", "up", Duration::from_secs(10)).await;
    assert!(e_back > e_out, "epoch did not advance on return");

    // The CLI shows it.
    let out = Command::new(bin_path("sov"))
        .envs(sov_testkit::pki().cli_env())
        .args(["--output", "json", "node", "list", "--metad", &m.addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = v["nodes"].as_array().expect("nodes array");
    let s1 = nodes.iter().find(|n| n["id"] == "s1").expect("s1 listed");
    assert_eq!(s1["state"], "up", "{v}");
    assert_eq!(s1["zone"], "z1", "{v}");
}

fn sov(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(bin_path("sov"))
        .envs(sov_testkit::pki().cli_env())
        .arg("--output")
        .arg("json")
        .args(args)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn voters(v: &serde_json::Value) -> Vec<u64> {
    let mut ids: Vec<u64> = v["members"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter(|m| m["role"] == "voter")
        .filter_map(|m| m["id"].as_u64())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_pools_from_the_cli() {
    let dir = TestDir::new("metad-cli");
    let m1 = single(dir.path(), &[]);
    ready_client(&m1).await;
    let join = |id: u64| {
        Metad::start(
            &dir.path().join(format!("metad-{id}")),
            id,
            &format!("127.0.0.1:{}", free_port()),
            &["--join".to_string()],
        )
        .expect("start joining member")
    };
    let m2 = join(2);
    let m3 = join(3);
    let (rc, v, err) = sov(&[
        "metad", "add", "--id", "2", "--addr", &m2.addr, "--metad", &m1.addr,
    ]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(voters(&v), [1, 2]);
    let (rc, v, err) = sov(&[
        "metad", "add", "--id", "3", "--addr", &m3.addr, "--metad", &m2.addr,
    ]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(voters(&v), [1, 2, 3]);
    let (rc, _, err) = sov(&[
        "metad", "add", "--id", "3", "--addr", &m3.addr, "--metad", &m1.addr,
    ]);
    assert_eq!(rc, 2, "adding a voter twice: {err}");

    // Data written now survives the removal of the first member.
    let all = format!("{},{},{}", m1.addr, m2.addr, m3.addr);
    let c = MetaClient::new(&metad::client::parse_addrs(&all)).unwrap();
    for (i, z) in ["z1", "z2", "z3"].iter().enumerate() {
        let req = RegisterNodeRequest {
            node: Some(fake_node(&format!("node-{i}"), z)),
        };
        c.call(|mut c| {
            let req = req.clone();
            async move { c.register_node(req).await }
        })
        .await
        .unwrap();
    }
    let (rc, v, err) = sov(&[
        "pool",
        "create",
        "rep3",
        "--redundancy",
        "replicated:3",
        "--tier",
        "performance",
        "--metad",
        &all,
    ]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(v["pool"]["name"], "rep3", "{v}");
    let (rc, _, err) = sov(&[
        "pool",
        "create",
        "wide",
        "--redundancy",
        "ec:4+2",
        "--metad",
        &all,
    ]);
    assert_eq!(rc, 2, "impossible pool accepted");
    assert!(err.contains("needs 6 nodes"), "{err}");
    let (rc, _, err) = sov(&[
        "pool",
        "create",
        "bad",
        "--redundancy",
        "mirror",
        "--metad",
        &all,
    ]);
    assert_eq!(rc, 2, "{err}");

    let (rc, v, err) = sov(&["metad", "remove", "--id", "1", "--metad", &m2.addr]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(voters(&v), [2, 3]);
    let rest = format!("{},{}", m2.addr, m3.addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (rc, v, err) = sov(&["pool", "list", "--metad", &rest]);
        if rc == 0 {
            assert!(v.to_string().contains("rep3"), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "pool list after removal: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (rc, v, err) = sov(&["cluster", "status", "--metad", &rest]);
    assert_eq!(rc, 0, "{err}");
    let text = v.to_string();
    assert!(text.contains("\"epoch\""), "{text}");
    let (rc, _, _) = sov(&["metad", "members", "--metad", "127.0.0.1:1"]);
    assert_eq!(rc, 5, "an unreachable metad is UNAVAILABLE (exit 5)");
}
