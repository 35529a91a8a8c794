//! Hostile and unlucky input: a full disk, unknown ids, oversized and truncated streams,
//! garbage on the port, stalled clients, bad configs, and SIGTERM with a request in flight.
//! Every case gets a clear error; the node keeps serving.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use sov_proto::storaged as pb;
use sov_testkit::{Storaged, TestDir};
use tonic::Code;

/// A small tmpfs mounted for the test (needs root, as `make test` runs), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (the full-disk test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_writes_cleanly_and_keeps_serving_reads() {
    let dir = TestDir::new("full");
    let mnt = dir.path().join("mnt");
    let _fs = Tmpfs::mount(&mnt, "40m");
    let mut node = Storaged::start(
        dir.path(),
        &[mnt.join("disk")],
        &[
            "--reserved-space",
            "4MiB",
            "--segment-size",
            "4MiB",
            "--max-chunk-size",
            "1MiB",
            "--garbage-ratio",
            "0.5",
            "--compaction-interval",
            "100ms",
            "--no-scrub",
        ],
    )
    .unwrap();
    let mut c = node.client().await.unwrap();
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..200u64 {
        match put(&mut c, &format!("f/{i:03}"), &pattern(i, 1 << 20)).await {
            Ok(_) => acked.push(i),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let e = refusal.expect("a 40 MiB disk fills before 200 MiB are written");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("full"), "{}", e.message());
    assert!(acked.len() >= 20, "only {} chunks fit", acked.len());
    // Still refused, still clean, and small writes too once there is no room.
    let e = put(&mut c, "f/again", &pattern(999, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    // Everything acknowledged reads back.
    for &i in &acked {
        assert_eq!(
            get(&mut c, &format!("f/{i:03}")).await.unwrap(),
            pattern(i, 1 << 20)
        );
    }
    let info = node_info(&mut c).await;
    assert_eq!(info.disks[0].health, "full", "{info:?}");
    assert_eq!(info.health, "degraded");
    // Deleting makes room again: tombstones fit in the reserve, compaction frees segments.
    for &i in &acked[..acked.len() / 2] {
        delete(&mut c, &format!("f/{i:03}")).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match put(&mut c, "f/after", &pattern(7, 1 << 20)).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(Instant::now() < deadline, "space never came back");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    for &i in &acked[acked.len() / 2..] {
        assert_eq!(
            get(&mut c, &format!("f/{i:03}")).await.unwrap(),
            pattern(i, 1 << 20)
        );
    }
    // A restart on the nearly full disk recovers.
    node.terminate(Duration::from_secs(30)).unwrap();
    node.restart().unwrap();
    let mut c = node.client().await.unwrap();
    assert_eq!(get(&mut c, "f/after").await.unwrap(), pattern(7, 1 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let dir = TestDir::new("bad-input");
    let cfg = dir.path().join("storaged.toml");
    std::fs::write(
        &cfg,
        "max_chunk_size = \"1MiB\"\nrequest_idle_timeout = \"1s\"\n[scrub]\nenabled = false\n",
    )
    .unwrap();
    let node = Storaged::start(
        dir.path(),
        &[dir.path().join("d")],
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    let mut c = node.client().await.unwrap();

    // Unknown ids.
    assert_eq!(
        get(&mut c, "nope").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        delete(&mut c, "nope").await.unwrap_err().code(),
        Code::NotFound
    );
    let e = c
        .stat(pb::StatRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("nope"));

    // Bad ids.
    for id in ["", "with space", "ctl\u{1}", &"x".repeat(513)] {
        let e = put(&mut c, id, b"x").await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{id:?}: {e:?}");
        assert!(e.message().contains("invalid chunk id"), "{}", e.message());
    }

    // Oversized: declared, and smuggled past the declaration.
    let e = put(&mut c, "big", &vec![0u8; (1 << 20) + 1])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("exceeds the limit"), "{}", e.message());
    let mut msgs = put_msgs("liar", &[1u8; 100]);
    msgs.push(pb::PutRequest {
        msg: Some(pb::put_request::Msg::Data(Bytes::from_static(b"extra"))),
    });
    let e = c.put(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("more than the declared"),
        "{}",
        e.message()
    );

    // Truncated stream: fewer bytes than declared, then the end.
    let mut msgs = put_msgs("short", &[1u8; 1000]);
    if let Some(pb::put_request::Msg::Header(h)) = &mut msgs[0].msg {
        h.length = 5000;
    }
    let e = c.put(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("truncated"), "{}", e.message());
    assert_eq!(
        get(&mut c, "short").await.unwrap_err().code(),
        Code::NotFound
    );

    // Data before the header; an empty stream; a wrong expected checksum.
    let e = c
        .put(tokio_stream::iter(vec![pb::PutRequest {
            msg: Some(pb::put_request::Msg::Data(Bytes::from_static(b"x"))),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .put(tokio_stream::iter(Vec::<pb::PutRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut msgs = put_msgs("sum", b"abc");
    if let Some(pb::put_request::Msg::Header(h)) = &mut msgs[0].msg {
        h.expected_blake3 = Bytes::copy_from_slice(blake3::hash(b"abd").as_bytes());
    }
    let e = c.put(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("expected_blake3"));

    // A list page that is too large.
    let e = c
        .list(pb::ListRequest {
            prefix: String::new(),
            start_after: String::new(),
            limit: 1_000_000,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A client that sends a header and then stalls is cut off, not waited on forever.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PutRequest>(4);
    tx.send(put_msgs("stall", &[0u8; 10]).remove(0))
        .await
        .unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        c.put(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("the server gives up on an idle stream");
    let e = r.unwrap_err();
    assert!(e.message().contains("idle"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(tx);

    // Garbage on the port: the connection is closed, nothing hangs, the node still serves.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xffu8; 4096][..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x01\x00\x00\x00\x00\x00garbage"[..],
    ] {
        let mut s = std::net::TcpStream::connect(node.ready.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(junk);
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the server must close, not hang: {r:?}"
        );
    }
    put(&mut c, "still-alive", b"yes").await.unwrap();
    assert_eq!(get(&mut c, "still-alive").await.unwrap(), b"yes");
}

#[test]
fn bad_config_exits_with_a_one_line_reason() {
    let dir = TestDir::new("bad-config");
    let bin = sov_testkit::bin_path("storaged");
    let cfg = dir.path().join("c.toml");
    let cases: [(&str, &str); 3] = [
        (
            "disks = [\"/tmp/x\"]\nsegmentsize = \"1MiB\"\n",
            "segmentsize",
        ),
        ("disks = [\"/tmp/x\"]\nmax_chunk_size = \"4XB\"\n", "4XB"),
        ("disks = []\n", "disks"),
    ];
    for (text, needle) in cases {
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(&bin)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{needle} not named in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let out = Command::new(&bin)
        .args(["--disk", "/tmp/x", "--segment-size", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_put_in_flight() {
    let dir = TestDir::new("drain");
    let mut node = Storaged::start(dir.path(), &[dir.path().join("d")], &["--no-scrub"]).unwrap();
    let mut c = node.client().await.unwrap();
    let data = pattern(9, 300_000);
    let mut msgs = put_msgs("slow", &data);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PutRequest>(8);
    tx.send(msgs.remove(0)).await.unwrap();
    let call =
        tokio::spawn(async move { c.put(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = node.proc.pid().unwrap();
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let r = call.await.unwrap();
    assert!(
        r.is_ok(),
        "the put in flight completes during the drain: {r:?}"
    );
    let status = node.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status}");
    node.restart().unwrap();
    let mut c = node.client().await.unwrap();
    assert_eq!(get(&mut c, "slow").await.unwrap(), data);
}
