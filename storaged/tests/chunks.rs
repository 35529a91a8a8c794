//! End-to-end chunk API tests against the real storaged binary, on both I/O engines.

mod common;

use common::*;
use sov_proto::storaged as pb;
use sov_testkit::{Storaged, TestDir, http_get, metric_value};
use std::time::Duration;
use tonic::Code;

async fn exercise(engine: &str) {
    let dir = TestDir::new(&format!("chunks-{engine}"));
    let disks = [dir.path().join("d1"), dir.path().join("d2")];
    let mut node = Storaged::start(
        dir.path(),
        &disks,
        &[
            "--io-engine",
            engine,
            "--segment-size",
            "2MiB",
            "--max-chunk-size",
            "1MiB",
        ],
    )
    .expect("storaged starts");
    assert_eq!(node.ready.io_engine, engine);
    let mut c = node.client().await.unwrap();

    // Sizes around the frame and segment boundaries, including empty chunks.
    let sizes = [0usize, 1, 4096, 65_536, (1 << 20) - 1, 1 << 20];
    for (i, &len) in sizes.iter().enumerate() {
        let data = pattern(i as u64, len);
        let r = put(&mut c, &format!("obj/{i:03}"), &data).await.unwrap();
        assert_eq!(r.length, len as u64);
        assert_eq!(&r.blake3[..], blake3::hash(&data).as_bytes());
        let got = get(&mut c, &format!("obj/{i:03}")).await.unwrap();
        assert!(
            got == data,
            "obj/{i:03}: got {} bytes, want {}",
            got.len(),
            data.len()
        );
    }
    // Enough chunks to seal several 2 MiB segments and use both disks.
    for i in 0..40u64 {
        put(&mut c, &format!("bulk/{i:03}"), &pattern(100 + i, 200_000))
            .await
            .unwrap();
    }
    let info = node_info(&mut c).await;
    assert_eq!(info.disks.len(), 2);
    assert!(
        info.disks.iter().all(|d| d.chunks > 0),
        "both disks used: {info:?}"
    );
    assert_eq!(info.disks.iter().map(|d| d.chunks).sum::<u64>(), 46);
    assert_eq!(info.health, "ok");
    assert_eq!(info.io_engine, engine);

    // Ranges.
    let data = pattern(3, 65_536);
    let (i, part) = get_range(&mut c, "obj/003", 1000, 5000).await.unwrap();
    assert!(part == data[1000..6000]);
    assert_eq!(
        (i.range_offset, i.range_length, i.length),
        (1000, 5000, 65_536)
    );
    let (_, tail) = get_range(&mut c, "obj/003", 65_000, 0).await.unwrap();
    assert!(tail == data[65_000..]);
    let e = get_range(&mut c, "obj/003", 65_000, 1000)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    // Overwrite, stat, delete.
    put(&mut c, "obj/001", b"new").await.unwrap();
    assert_eq!(get(&mut c, "obj/001").await.unwrap(), b"new");
    let st = c
        .stat(pb::StatRequest {
            id: "obj/001".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.length, 3);
    delete(&mut c, "obj/001").await.unwrap();
    assert_eq!(
        get(&mut c, "obj/001").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        delete(&mut c, "obj/001").await.unwrap_err().code(),
        Code::NotFound
    );

    // Listing by prefix, page by page, in key order.
    let mut seen = Vec::new();
    let mut start_after = String::new();
    loop {
        let page = c
            .list(pb::ListRequest {
                prefix: "bulk/".into(),
                start_after: start_after.clone(),
                limit: 7,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 7);
        seen.extend(page.entries.into_iter().map(|e| e.id));
        if page.next_start_after.is_empty() {
            break;
        }
        start_after = page.next_start_after;
    }
    let want: Vec<String> = (0..40).map(|i| format!("bulk/{i:03}")).collect();
    assert_eq!(seen, want);

    // Everything survives a clean restart.
    let status = node.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    node.restart().unwrap();
    let mut c = node.client().await.unwrap();
    for i in 0..40u64 {
        assert_eq!(
            get(&mut c, &format!("bulk/{i:03}")).await.unwrap(),
            pattern(100 + i, 200_000)
        );
    }
    assert_eq!(
        get(&mut c, "obj/001").await.unwrap_err().code(),
        Code::NotFound
    );

    // Metrics are served and count what happened.
    let m = http_get(&node.metrics_url()).unwrap();
    for name in [
        "storaged_requests_total",
        "storaged_request_duration_seconds_bucket",
        "storaged_disk_free_bytes",
        "storaged_disk_used_bytes",
        "storaged_corrupt_chunks_found_total",
        "storaged_compaction_segments_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert!(metric_value(&m, "storaged_requests_total", "op=\"get\"").unwrap() >= 40.0);
    assert_eq!(
        metric_value(
            &m,
            "storaged_io_engine_info",
            &format!("engine=\"{engine}\"")
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_api_on_io_uring() {
    exercise("io_uring").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_api_on_pread() {
    exercise("pread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_syncs() {
    let dir = TestDir::new("group-commit");
    let node = Storaged::start(dir.path(), &[dir.path().join("d")], &["--no-scrub"]).unwrap();
    let c = node.client().await.unwrap();
    let tasks: Vec<_> = (0..32u64)
        .map(|t| {
            let mut c = c.clone();
            tokio::spawn(async move {
                for i in 0..10u64 {
                    put(&mut c, &format!("g/{t}/{i}"), &pattern(t * 100 + i, 4096))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let m = http_get(&node.metrics_url()).unwrap();
    let syncs = metric_value(&m, "storaged_syncs_total", "").unwrap();
    // 320 acknowledged writes; group commit must have shared fdatasyncs between them.
    assert!(syncs < 320.0, "{syncs} syncs for 320 concurrent writes");
    assert!(syncs >= 1.0);
    let mut c = c.clone();
    for t in 0..32u64 {
        for i in 0..10u64 {
            assert_eq!(
                get(&mut c, &format!("g/{t}/{i}")).await.unwrap(),
                pattern(t * 100 + i, 4096)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_engine_falls_back_to_pread_when_io_uring_is_refused() {
    let dir = TestDir::new("fallback");
    let auto = Storaged::start(dir.path(), &[dir.path().join("a")], &["--no-scrub"]).unwrap();
    assert_eq!(auto.ready.io_engine, "io_uring", "this kernel has io_uring");
    let node = Storaged::start_env(
        &dir.path().join("b"),
        &[dir.path().join("b/disk")],
        &["--no-scrub", "--io-engine", "auto"],
        &[("SOV_FAILPOINT_NO_IO_URING", "1")],
    )
    .unwrap();
    assert_eq!(node.ready.io_engine, "pread");
    assert!(node.proc.log_tail(50).contains("io_uring unavailable"));
    let mut c = node.client().await.unwrap();
    put(&mut c, "x", &pattern(1, 100_000)).await.unwrap();
    assert!(get(&mut c, "x").await.unwrap() == pattern(1, 100_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_any_size_make_the_same_chunk() {
    let dir = TestDir::new("frames");
    let node = Storaged::start(dir.path(), &[dir.path().join("d")], &["--no-scrub"]).unwrap();
    let mut c = node.client().await.unwrap();
    let data = pattern(5, 300_000);
    // 3000 frames of 100 bytes (joined on the node), 3 uneven frames (kept apart), empty frames.
    for (id, frame) in [("tiny", 100usize), ("uneven", 123_457), ("whole", 300_000)] {
        let mut msgs = put_msgs(id, &[]);
        if let Some(pb::put_request::Msg::Header(h)) = &mut msgs[0].msg {
            h.length = data.len() as u64;
        }
        msgs.truncate(1);
        for part in data.chunks(frame) {
            msgs.push(pb::PutRequest {
                msg: Some(pb::put_request::Msg::Data(bytes::Bytes::new())),
            });
            msgs.push(pb::PutRequest {
                msg: Some(pb::put_request::Msg::Data(bytes::Bytes::copy_from_slice(
                    part,
                ))),
            });
        }
        let r = c.put(tokio_stream::iter(msgs)).await.unwrap().into_inner();
        assert_eq!(&r.blake3[..], blake3::hash(&data).as_bytes());
        assert!(get(&mut c, id).await.unwrap() == data, "{id}");
    }
}
