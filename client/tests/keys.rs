//! Master key rotation against real processes: objects in two buckets and an S3 access key
//! made under key K1; metad restarted with K2 as its key and K1 as an old one; `sov master-key
//! rotate` re-wraps every secret under K2; metad restarted with K2 alone; every object reads
//! back identical and the access key's secret is unchanged. A bucket's data key rotated: new
//! objects use the new key, old ones keep theirs. Started with K1 alone afterwards,
//! metad can open none of them (the wrapping really changed).

mod common;

use common::{client, payload};
use serde_json::Value;
use sov_client::PutOptions;
use sov_proto::metad::{CreateAccessKeyRequest, GetAccessKeyRequest, GetObjectRequest};
use sov_testkit::{DataCluster, TestDir, sov_ok};

fn master_key_status(metad: &str, verb: &str) -> Value {
    let out = sov_ok(&["--output", "json", "master-key", verb, "--metad", metad]);
    serde_json::from_str(&out).unwrap()
}

fn private_key_file(path: &std::path::Path, hex64: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, hex64).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotating_the_master_key_keeps_every_object_and_secret_readable() {
    let dir = TestDir::new("master-key");
    let mut cl = DataCluster::start(dir.path(), 3, 1, &[], &[])
        .await
        .unwrap();
    let k1 = dir.path().join("master.key"); // DataCluster's key
    let k2 = dir.path().join("master-2.key");
    private_key_file(&k2, &hex::encode(rand::random::<[u8; 32]>()));
    for b in ["rot-a", "rot-b"] {
        cl.pool_and_bucket(b, "replicated:3", 8).await.unwrap();
    }
    let c = client(&cl);
    let mut objects = Vec::new();
    for b in ["rot-a", "rot-b"] {
        for i in 0..10 {
            let key = format!("obj-{i}");
            let data = payload(&format!("{b}/{key}"), 1000 + i * 70_000);
            c.put_object(b, &key, &data[..], PutOptions::default())
                .await
                .unwrap();
            objects.push((b, key, data));
        }
    }
    let mut admin = cl.metad_client().unwrap();
    let made = admin
        .create_access_key(CreateAccessKeyRequest {
            name: "rotation".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key_id = made.key.unwrap().access_key_id;
    let before = master_key_status(&cl.metad.addr, "status");
    let k1_kid = before["current_kid"].as_str().unwrap().to_string();
    let secrets = before["records_by_kid"][&k1_kid].as_u64().unwrap();
    assert!(secrets >= 3, "two bucket keys and an access key: {before}");

    // K2 current, K1 still held: nothing re-wrapped yet, everything still opens.
    let (k1s, k2s) = (k1.display().to_string(), k2.display().to_string());
    cl.metad
        .restart_with(&["--master-key-file", &k2s, "--old-master-key-file", &k1s])
        .unwrap();
    let rotated = master_key_status(&cl.metad.addr, "rotate");
    let k2_kid = rotated["current_kid"].as_str().unwrap().to_string();
    assert_ne!(k1_kid, k2_kid);
    assert_eq!(rotated["rewrapped"].as_u64(), Some(secrets), "{rotated}");
    assert_eq!(
        rotated["records_by_kid"][&k2_kid].as_u64(),
        Some(secrets),
        "{rotated}"
    );
    assert!(
        rotated["records_by_kid"].get(&k1_kid).is_none(),
        "{rotated}"
    );
    // A second rotation has nothing left to do.
    let again = master_key_status(&cl.metad.addr, "rotate");
    assert_eq!(again["rewrapped"].as_u64(), Some(0), "{again}");

    // K2 alone: every object and the secret read back unchanged (a new client, so no data
    // key comes from a cache).
    cl.metad.restart_with(&["--master-key-file", &k2s]).unwrap();
    let c = client(&cl);
    for (b, key, data) in &objects {
        let (_, back) = c.read_all(b, key).await.unwrap();
        assert!(&back == data, "{b}/{key} changed across the rotation");
    }
    let mut admin = cl.metad_client().unwrap();
    let got = admin
        .get_access_key(GetAccessKeyRequest {
            access_key_id: key_id.clone(),
            consistency: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.secret_access_key, made.secret_access_key);

    // A bucket's data key rotated: new objects are sealed with the new key, old ones keep
    // theirs and read as before.
    let out = sov_ok(&[
        "--output",
        "json",
        "bucket",
        "rotate-key",
        "rot-a",
        "--metad",
        &cl.metad.addr,
    ]);
    let new_key = serde_json::from_str::<Value>(&out).unwrap()["data_key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let key_of = |raw: &[u8]| sov_client::manifest::decode(raw).unwrap().data_key_id;
    let old_obj = admin
        .get_object(GetObjectRequest {
            bucket: "rot-a".into(),
            key: "obj-0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(key_of(&old_obj.manifest), new_key);
    let c = client(&cl);
    let fresh = payload("after-rotation", 300_000);
    c.put_object("rot-a", "after", &fresh[..], PutOptions::default())
        .await
        .unwrap();
    let new_obj = admin
        .get_object(GetObjectRequest {
            bucket: "rot-a".into(),
            key: "after".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key_of(&new_obj.manifest), new_key);
    assert!(c.read_all("rot-a", "after").await.unwrap().1 == fresh);
    assert!(c.read_all("rot-a", "obj-0").await.unwrap().1 == objects[0].2);

    // K1 alone opens nothing any more.
    cl.metad.restart_with(&["--master-key-file", &k1s]).unwrap();
    let stale = master_key_status(&cl.metad.addr, "status");
    assert_eq!(
        stale["records_by_kid"]["unknown"].as_u64(),
        Some(secrets + 1),
        "{stale}"
    );
    let mut admin = cl.metad_client().unwrap();
    let e = admin
        .get_access_key(GetAccessKeyRequest {
            access_key_id: key_id,
            consistency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
}

/// A volume's key rotated between two attachments: sectors written before read with the old
/// key, sectors written after with the new one, across another attachment too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotating_a_volume_key_changes_it_for_new_writes_only() {
    use sov_client::volume::{OpenOptions, VolumeHandle};
    use sov_proto::metad::{CreateVolumeRequest, RotateVolumeKeyRequest};
    let dir = TestDir::new("volume-key");
    let cl = DataCluster::start(dir.path(), 3, 1, &[], &[])
        .await
        .unwrap();
    cl.pool_and_bucket("vols", "replicated:3", 8).await.unwrap();
    let mut admin = cl.metad_client().unwrap();
    let created = admin
        .create_volume(CreateVolumeRequest {
            name: "v1".into(),
            size: 16 << 20,
            pool: "vols".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let opts = || OpenOptions {
        holder: "keys-test".into(),
        lease_ttl: std::time::Duration::from_secs(10),
    };
    let (a, b) = (payload("before", 64 << 10), payload("after", 64 << 10));
    let h = VolumeHandle::open(client(&cl), "v1", opts()).await.unwrap();
    let first_epoch = h.lease_epoch();
    h.write(0, a.clone().into(), true).await.unwrap();
    h.close().await.unwrap();

    let v = admin
        .rotate_volume_key(RotateVolumeKeyRequest { name: "v1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(v.data_key_id, created.data_key_id);
    assert_eq!(v.key_from_epoch, first_epoch + 1);
    assert_eq!(v.older_keys.len(), 1);
    assert_eq!(v.older_keys[0].data_key_id, created.data_key_id);

    let h = VolumeHandle::open(client(&cl), "v1", opts()).await.unwrap();
    assert_eq!(h.lease_epoch(), first_epoch + 1);
    assert!(h.read(0, a.len() as u64).await.unwrap() == a[..]);
    h.write(1 << 20, b.clone().into(), true).await.unwrap();
    h.close().await.unwrap();
    let h = VolumeHandle::open(client(&cl), "v1", opts()).await.unwrap();
    assert!(h.read(0, a.len() as u64).await.unwrap() == a[..]);
    assert!(h.read(1 << 20, b.len() as u64).await.unwrap() == b[..]);
    h.close().await.unwrap();
}
