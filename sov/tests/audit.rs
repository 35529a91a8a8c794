//! metad's audit log through `sov audit`: every admin action the test makes is there with who,
//! what, when, from where and the result, and so are a failed one and an unauthorised one; a
//! call that a follower forwards is recorded under the operator, not the member; `sov audit
//! verify` finds the hash chain intact.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sov_common::tls::{self, Role};
use sov_proto::metad::metad_client::MetadClient;
use sov_proto::metad::{CreateAccessKeyRequest, CreatePoolRequest, Redundancy, Replicated};
use sov_testkit::{DataCluster, MetadCluster, TestDir, pki};
use tonic::transport::Channel;

/// `sov ARGS --metad METAD` as this test's operator; (exit code, stdout, stderr).
fn sov(metad: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sov"))
        .envs(pki().cli_env())
        .args(args)
        .args(["--metad", metad])
        .output()
        .expect("run sov");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn ok(metad: &str, args: &[&str]) -> String {
    let (code, out, err) = sov(metad, args);
    assert_eq!(code, 0, "sov {args:?}: {err}");
    out
}

/// Every record, from `sov --output json audit` (one JSON object per line).
fn audit_log(metad: &str) -> Vec<Value> {
    ok(metad, &["--output", "json", "audit"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect()
}

fn find<'a>(log: &'a [Value], method: &str, target_has: &str) -> &'a Value {
    log.iter()
        .find(|r| r["method"] == method && r["target"].as_str().unwrap().contains(target_has))
        .unwrap_or_else(|| panic!("no {method} on {target_has:?} in the audit log: {log:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_action_and_every_refusal_is_in_the_audit_log() {
    let dir = TestDir::new("audit");
    let cl = DataCluster::start(dir.path(), 1, 1, &[], &[])
        .await
        .unwrap();
    let m = cl.metad.addr.clone();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    // Admin actions through the CLI, one of them failing.
    ok(
        &m,
        &["pool", "create", "p1", "--redundancy", "replicated:1"],
    );
    ok(&m, &["bucket", "create", "bucket-1", "--pool", "p1"]);
    let key: Value = serde_json::from_str(&ok(
        &m,
        &["--output", "json", "key", "create", "--name", "alice"],
    ))
    .unwrap();
    let key_id = key["access_key"].as_str().unwrap().to_string();
    let secret = key["secret_key"].as_str().unwrap().to_string();
    ok(&m, &["key", "delete", &key_id]);
    let (code, _, _) = sov(&m, &["bucket", "delete", "no-such-bucket"]);
    assert_ne!(code, 0, "deleting a missing bucket succeeded");

    // An unauthorised one: a gateway's certificate asking for an access key.
    let (gateway, _) = pki().peer(Role::Gateway, None, "gw-1").unwrap();
    let ep = Channel::from_shared(format!("http://{m}")).unwrap();
    let mut gw = MetadClient::new(tls::channel_with(ep, Role::Metad, gateway));
    let e = gw
        .create_access_key(CreateAccessKeyRequest {
            name: "sneaky".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // The refusal is written in the background: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = audit_log(&m);
        if log.iter().any(|r| r["code"] == "PERMISSION_DENIED") {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refusal never recorded: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    for (method, target) in [
        ("CreatePool", "pool p1"),
        ("CreateBucket", "bucket bucket-1"),
        ("CreateAccessKey", "alice"),
        ("DeleteAccessKey", key_id.as_str()),
    ] {
        let r = find(&log, method, target);
        assert_eq!(r["principal"], "admin:test", "{r}");
        assert_eq!(r["code"], "OK", "{r}");
        assert!(r["auth"].as_str().unwrap().starts_with("cert:"), "{r}");
        assert!(r["from"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
        assert!(r["unix_ms"].as_u64().unwrap() >= before, "{r}");
    }
    let failed = find(&log, "DeleteBucket", "no-such-bucket");
    assert_eq!(failed["code"], "NOT_FOUND", "{failed}");
    assert_eq!(failed["principal"], "admin:test");
    let refused = log
        .iter()
        .find(|r| r["code"] == "PERMISSION_DENIED")
        .unwrap();
    assert_eq!(refused["principal"], "gateway:gw-1", "{refused}");
    assert_eq!(refused["method"], "CreateAccessKey", "{refused}");
    // Sequence numbers count up from 1 with no gap.
    for (i, r) in log.iter().enumerate() {
        assert_eq!(r["seq"].as_u64(), Some(i as u64 + 1), "{r}");
    }
    // No secret in the log.
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.contains(&secret), "the S3 secret is in the audit log");

    let (code, out, err) = sov(&m, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{} records", log.len())), "{out}");
    // The table form shows the same records.
    let table = ok(&m, &["audit"]);
    assert!(
        table.contains("PERMISSION_DENIED") && table.contains("admin:test"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_admin_call_is_recorded_under_the_operator() {
    let dir = TestDir::new("audit-forward");
    let c = MetadCluster::start(dir.path(), 3, &[]).unwrap();
    let leader = c.leader(Duration::from_secs(30)).await.unwrap();
    let follower = (leader + 1) % 3;
    // To the follower, which passes it on to the leader.
    let mut f = c.members[follower].client().unwrap();
    let r = f
        .create_pool(CreatePoolRequest {
            name: "via-follower".into(),
            redundancy: Some(Redundancy {
                kind: Some(sov_proto::metad::redundancy::Kind::Replicated(Replicated {
                    size: 1,
                })),
            }),
            tier: "standard".into(),
            pg_count: 8,
        })
        .await;
    let log = audit_log(&c.members[follower].addr);
    let rec = find(&log, "CreatePool", "via-follower");
    assert_eq!(rec["principal"], "admin:test", "{rec}");
    match &r {
        Ok(_) => assert_eq!(rec["code"], "OK", "{rec}"),
        Err(e) => assert_ne!(rec["code"], "OK", "{rec} but the call failed: {e:?}"),
    }
    let (code, out, err) = sov(&c.members[leader].addr, &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
}
