//! Block volumes end to end, with real processes and real clients: metad and three storaged
//! (one per zone), a vhost-blk, the `sov` CLI, and qemu-io, qemu-img, nbdinfo, nbdcopy and fio
//! over NBD. Volumes are replicated{3} and encrypted.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sov_client::volume::{OpenOptions, VolumeHandle};
use sov_client::{Client, ClientConfig};
use sov_proto::metad as mpb;
use sov_proto::storaged as spb;
use sov_testkit::{DataCluster, TestDir, VhostBlk, bin_path};

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .envs(sov_testkit::pki().cli_env())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (make test installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ {cmd} {}\n{}", args.join(" "), text.trim_end());
    (out.status.success(), text)
}

fn must(cmd: &str, args: &[&str]) -> String {
    let (ok, text) = run(cmd, args);
    assert!(ok, "{cmd} {} failed:\n{text}", args.join(" "));
    text
}

/// qemu-io commands against a URI; fails on any verification or I/O error.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let text = must("qemu-io", &args);
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "qemu-io reported an error:\n{text}"
    );
    text
}

struct Sov {
    metad: String,
}

impl Sov {
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--metad", &self.metad]);
        let text = must(bin_path("sov").to_str().unwrap(), &all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    fn fails(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--metad", &self.metad]);
        let (ok, text) = run(bin_path("sov").to_str().unwrap(), &all);
        assert!(!ok, "sov {} should have failed", args.join(" "));
        text
    }

    fn attach(&self, name: &str) -> String {
        let v = self.json(&["volume", "attach", name, "--protocol", "nbd"]);
        assert_eq!(v["state"], "in-use");
        v["uri"].as_str().unwrap().to_string()
    }
}

async fn volume(cl: &DataCluster, name: &str) -> mpb::Volume {
    cl.metad_client()
        .unwrap()
        .get_volume(mpb::GetVolumeRequest {
            name: name.into(),
            consistency: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Per extent, the digests of its replicas on every node (node index → digest).
async fn replica_digests(
    cl: &DataCluster,
    volume_id: &str,
) -> std::collections::BTreeMap<u64, Vec<(usize, Vec<u8>)>> {
    let mut out: std::collections::BTreeMap<u64, Vec<(usize, Vec<u8>)>> = Default::default();
    for (i, n) in cl.nodes.iter().enumerate() {
        let ep = tonic::transport::Endpoint::from_shared(n.endpoint()).unwrap();
        let ch = sov_common::tls::connect(ep, sov_common::tls::Role::Storaged)
            .await
            .unwrap();
        let mut c = spb::extent_store_client::ExtentStoreClient::new(ch);
        let r = c
            .list_extents(spb::ListExtentsRequest {
                volume_id: volume_id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        for e in r.extents {
            out.entry(e.extent.unwrap().index)
                .or_default()
                .push((i, e.digest.to_vec()));
        }
    }
    out
}

/// Waits until every extent of the volume has three identical replicas.
async fn wait_converged(cl: &DataCluster, volume_id: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let d = replica_digests(cl, volume_id).await;
        let bad: Vec<u64> = d
            .iter()
            .filter(|(_, r)| r.len() != 3 || r.iter().any(|(_, x)| *x != r[0].1))
            .map(|(i, _)| *i)
            .collect();
        if !d.is_empty() && bad.is_empty() {
            eprintln!("{} extents, 3 identical replicas each", d.len());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas of extents {bad:?} still differ"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// metad and three storaged in three zones, with a replicated{3} pool `pool`.
async fn cluster_with_pool(dir: &TestDir, pool: &str, pg_count: u32) -> DataCluster {
    let cl = DataCluster::start(dir.path(), 3, 1, &[], &[])
        .await
        .expect("cluster");
    cl.metad_client()
        .unwrap()
        .create_pool(mpb::CreatePoolRequest {
            name: pool.into(),
            redundancy: Some(mpb::Redundancy {
                kind: Some(mpb::redundancy::Kind::Replicated(mpb::Replicated {
                    size: 3,
                })),
            }),
            tier: "standard".into(),
            pg_count,
        })
        .await
        .unwrap();
    cl
}

fn fio(uri: &str, extra: &[&str]) -> String {
    let uri_arg = format!("--uri={uri}");
    let mut args = vec![
        "--name=t",
        "--ioengine=nbd",
        uri_arg.as_str(),
        "--output-format=normal",
    ];
    args.extend_from_slice(extra);
    must("fio", &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volumes_over_nbd_with_real_clients() {
    let dir = TestDir::new("volumes-nbd");
    let mut cl = cluster_with_pool(&dir, "vols", 16).await;
    let mut vb = VhostBlk::start(&dir.path().join("vb1"), &cl.metad.addr, "vhost-blk-1", &[])
        .expect("vhost-blk");
    let sov = Sov {
        metad: cl.metad.addr.clone(),
    };

    // Create and attach; the CLI prints the NBD URI.
    let v = sov.json(&[
        "volume",
        "create",
        "v1",
        "--size",
        "64MiB",
        "--pool",
        "vols",
        "--tier",
        "performance",
    ]);
    assert_eq!(v["state"], "available");
    assert_eq!(v["size"], 64 * MIB);
    let volume_id = v["id"].as_str().unwrap().to_string();
    let uri = sov.attach("v1");
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/v1"),
        "{uri}"
    );
    let size = must("nbdinfo", &["--size", &uri]);
    assert_eq!(size.trim(), (64 * MIB).to_string());
    let listen = uri.trim_end_matches("/v1").to_string();
    let list = must("nbdinfo", &["--list", &listen]);
    assert!(list.contains("v1"), "{list}");
    // An export that does not exist is refused cleanly.
    let (ok, text) = run("nbdinfo", &[&format!("{listen}/nope")]);
    assert!(!ok && !text.contains("panick"), "{text}");

    // Write-then-verify patterns, unaligned writes, zeroes, discard, flush.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0x11 513 1000",
            "read -P 0x11 513 1000",
            "read -P 0xab 0 513",
            "read -P 0xab 1513 2583",
            "write -z 1M 1M",
            "read -P 0 1M 1M",
            "write -P 0xcd 2M 1M",
            "discard 2M 1M",
            "read -P 0 2M 1M",
            "write -P 0x77 4190208 8192",
            "read -P 0x77 4190208 8192",
            "flush",
        ],
    );
    // Past the end: an error, not a crash; the export keeps serving.
    let (ok, text) = run("qemu-io", &["-f", "raw", "-c", "read 67104768 8192", &uri]);
    assert!(
        !ok || text.contains("error") || text.contains("Input/output") || text.contains("Invalid"),
        "{text}"
    );
    qemu_io(&uri, &["read -P 0xab 0 512"]);

    // fio random read/write with checksums, through libnbd.
    let out = fio(
        &uri,
        &[
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--offset=32M",
            "--verify=crc32c",
            "--do_verify=1",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");

    // nbdcopy out and compare with qemu-img.
    let raw = dir.path().join("v1.raw");
    must("nbdcopy", &[&uri, raw.to_str().unwrap()]);
    let cmp = must(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    let info = must("qemu-img", &["info", "-f", "raw", &uri]);
    assert!(info.contains("64 MiB"), "{info}");
    // qemu-img convert both ways: the volume out to a file, and a file into the volume.
    let conv = dir.path().join("v1-convert.raw");
    must(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            conv.to_str().unwrap(),
        ],
    );
    let cmp = must(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            conv.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    let src = dir.path().join("src.raw");
    let mut pattern = vec![0u8; 64 * MIB as usize];
    for (i, b) in pattern
        .iter_mut()
        .enumerate()
        .skip(24 * MIB as usize)
        .take(MIB as usize)
    {
        *b = (i % 251) as u8;
    }
    std::fs::write(&src, &pattern).unwrap();
    must(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    let cmp = must(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    // Several connections at once (the export offers multi-conn).
    let raw4 = dir.path().join("v1-4conn.raw");
    must(
        "nbdcopy",
        &["--connections=4", &uri, raw4.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(&raw4).unwrap(), pattern);
    qemu_io(&uri, &["write -P 0xab 0 1M", "flush"]);

    // Storage never holds the plaintext: 0xab sectors are encrypted on every node.
    let plain = vec![0xabu8; 4096];
    for n in &cl.nodes {
        let ext = n.disks[0]
            .join("extents")
            .join(&volume_id)
            .join("00000000.dat");
        let bytes = std::fs::read(&ext).expect("extent file");
        assert!(
            !bytes.windows(4096).step_by(4096).any(|w| w == plain),
            "plaintext on {}",
            ext.display()
        );
    }

    // Snapshot consistency: A, snapshot, B. The snapshot (through a clone) reads A.
    qemu_io(&uri, &["write -P 0xa1 8M 1M", "flush"]);
    let s = sov.json(&["volume", "snapshot", "v1", "--name", "s1"]);
    assert_eq!(s["id"], 1);
    qemu_io(&uri, &["write -P 0xb2 8M 512k", "flush"]);
    sov.json(&["volume", "clone", "v1", "--snapshot", "s1", "--name", "c1"]);
    let curi = sov.attach("c1");
    qemu_io(&curi, &["read -P 0xa1 8M 1M", "read -P 0xab 0 512"]);
    qemu_io(&uri, &["read -P 0xb2 8M 512k", "read -P 0xa1 8704k 512k"]);
    // The clone's first write copies the extent up; the parent is untouched.
    qemu_io(
        &curi,
        &[
            "write -P 0xc3 8M 4k",
            "read -P 0xc3 8M 4k",
            "read -P 0xa1 8196k 1020k",
        ],
    );
    qemu_io(&uri, &["read -P 0xb2 8M 512k"]);
    // A snapshot with a clone cannot go; the volume cannot be deleted while attached.
    let e = sov.fails(&["volume", "delete-snapshot", "v1", "--name", "s1"]);
    assert!(e.contains("clone"), "{e}");
    let e = sov.fails(&["volume", "delete", "v1"]);
    assert!(e.contains("detach"), "{e}");

    // Online resize: new connections see the new size, and the new space works.
    sov.json(&["volume", "resize", "v1", "--size", "128MiB"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = must("nbdinfo", &["--size", &uri]);
        if s.trim() == (128 * MIB).to_string() {
            break;
        }
        assert!(Instant::now() < deadline, "the export did not grow");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    qemu_io(
        &uri,
        &[
            "write -P 0x5e 100M 1M",
            "read -P 0x5e 100M 1M",
            "read -P 0xab 0 512",
        ],
    );

    // Lease: nobody else may open the volume while vhost-blk holds it.
    let client = Client::new(
        std::slice::from_ref(&cl.metad.addr),
        ClientConfig::default(),
    )
    .unwrap();
    let intruder = VolumeHandle::open(
        client.clone(),
        "v1",
        OpenOptions {
            holder: "intruder".into(),
            lease_ttl: Duration::from_secs(5),
        },
    )
    .await;
    let e = intruder
        .err()
        .expect("a second writer is refused")
        .to_string();
    assert!(e.contains("exported by vhost-blk-1"), "{e}");

    // A storaged killed during writes: I/O goes on, and the replica is repaired afterwards.
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            fio(
                &uri,
                &[
                    "--rw=randwrite",
                    "--bs=16k",
                    "--iodepth=8",
                    "--size=8M",
                    "--offset=40M",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--time_based=0",
                ],
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cl.nodes[2].kill9();
    let out = writer.join().expect("fio with a node down");
    assert!(out.contains("err= 0"), "{out}");
    // Once the node is `out` it leaves the placement groups: writes then go to two members
    // only, and the node must not be trusted when it returns.
    let gone = cl.ids[2].clone();
    cl.wait_map(Duration::from_secs(30), "n3 out", |m| {
        m.nodes.iter().any(|n| n.id == gone && n.state == "out")
    })
    .await
    .unwrap();
    qemu_io(
        &uri,
        &["write -P 0x6f 48M 2M", "flush", "read -P 0x6f 48M 2M"],
    );
    cl.nodes[2].restart().unwrap();
    wait_converged(&cl, &volume_id, Duration::from_secs(60)).await;
    qemu_io(&uri, &["read -P 0x6f 48M 2M", "read -P 0xab 0 512"]);

    // kill -9 of vhost-blk during writes: what was flushed before is there after re-attach.
    qemu_io(&uri, &["write -P 0x3c 56M 4M", "flush"]);
    let bg = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            run(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x99 60M 4M",
                    "-c",
                    "write -P 0x98 70M 4M",
                    &uri,
                ],
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let epoch_before = volume(&cl, "v1").await.lease.unwrap().epoch;
    vb.restart().unwrap();
    let _ = bg.join();
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = volume(&cl, "v1").await;
        if v.state == "in-use" && v.lease.as_ref().unwrap().epoch > epoch_before {
            break v;
        }
        assert!(Instant::now() < deadline, "v1 not re-attached: {v:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let uri = v.attachment.unwrap().uri;
    qemu_io(
        &uri,
        &[
            "read -P 0x3c 56M 4M",
            "read -P 0x6f 48M 2M",
            "read -P 0xab 0 512",
        ],
    );
    // The replicas of whatever the killed writer left half-done agree.
    wait_converged(&cl, &volume_id, Duration::from_secs(30)).await;

    // Fencing: an old writer whose lease was taken over cannot write.
    sov.json(&["volume", "create", "v2", "--size", "8MiB", "--pool", "vols"]);
    let old = VolumeHandle::open(
        client.clone(),
        "v2",
        OpenOptions {
            holder: "old".into(),
            lease_ttl: Duration::from_millis(500),
        },
    )
    .await
    .unwrap();
    old.write(0, bytes::Bytes::from(vec![1u8; 4096]), true)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let new = VolumeHandle::open(
        client.clone(),
        "v2",
        OpenOptions {
            holder: "new".into(),
            lease_ttl: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    assert!(new.lease_epoch() > old.lease_epoch());
    let e = old
        .write(4096, bytes::Bytes::from(vec![2u8; 4096]), true)
        .await
        .expect_err("the fenced writer is refused");
    assert!(e.to_string().contains("fenced"), "{e}");
    assert_eq!(&new.read(0, 4096).await.unwrap()[..], &[1u8; 4096][..]);
    assert_eq!(&new.read(4096, 4096).await.unwrap()[..], &[0u8; 4096][..]);
    new.close().await.unwrap();

    // QoS: a volume limited to 100 IOPS gets about that, whatever fio asks for.
    sov.json(&[
        "volume", "create", "slow", "--size", "8MiB", "--pool", "vols", "--iops", "100",
    ]);
    let suri = sov.attach("slow");
    let out = must(
        "fio",
        &[
            "--name=q",
            "--ioengine=nbd",
            &format!("--uri={suri}"),
            "--rw=randread",
            "--bs=4k",
            "--iodepth=8",
            "--size=8M",
            "--time_based",
            "--runtime=3",
            "--output-format=json",
        ],
    );
    let j: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let iops = j["jobs"][0]["read"]["iops"].as_f64().unwrap();
    // One second of burst, then 100 a second: about 133 over 3 s.
    assert!(
        (40.0..=180.0).contains(&iops),
        "QoS of 100 IOPS gave {iops}"
    );
    sov.json(&["volume", "detach", "slow"]);

    // Metrics.
    let m = sov_testkit::http_get(&vb.metrics_url()).unwrap();
    assert!(m.contains("vhost_blk_requests_total"), "{m}");
    assert!(m.contains("vhost_blk_exports 2"), "{m}");

    // Detach, then delete: the clone, the snapshot, the volume; the extents go from every node.
    sov.json(&["volume", "detach", "c1"]);
    sov.json(&["volume", "detach", "v1"]);
    let (ok, _) = run("nbdinfo", &[&uri]);
    assert!(!ok, "a detached volume is no longer exported");
    sov.json(&["volume", "delete", "c1"]);
    sov.json(&["volume", "delete-snapshot", "v1", "--name", "s1"]);
    sov.json(&["volume", "delete", "v1"]);
    let e = sov.fails(&["volume", "show", "v1"]);
    assert!(e.contains("no such volume"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replica_digests(&cl, &volume_id).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "extents of a deleted volume remain"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!Path::new(&cl.nodes[0].disks[0].join("extents").join(&volume_id)).exists());
}

/// Client credentials as GnuTLS (qemu, libnbd) reads them: `ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`, from a TLS folder `sov cert issue` made (and the CA to trust).
fn gnutls_creds(tls: &std::path::Path, ca: &std::path::Path, out: &std::path::Path) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(ca, out.join("ca-cert.pem")).unwrap();
    std::fs::copy(tls.join("cert.pem"), out.join("client-cert.pem")).unwrap();
    std::fs::copy(tls.join("key.pem"), out.join("client-key.pem")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbd_over_tls_with_qemu_and_libnbd() {
    use sov_common::tls::{NodeIdentity, Role};
    let dir = TestDir::new("volumes-nbd-tls");
    let cl = cluster_with_pool(&dir, "vols", 8).await;
    let _vb = VhostBlk::start(
        &dir.path().join("vb1"),
        &cl.metad.addr,
        "vhost-blk-1",
        &["--nbd-tls", "required"],
    )
    .expect("vhost-blk");
    let sov = Sov {
        metad: cl.metad.addr.clone(),
    };
    sov.json(&[
        "volume", "create", "tv", "--size", "16MiB", "--pool", "vols",
    ]);
    let uri = sov.attach("tv");
    let hostport = uri
        .trim_start_matches("nbd://")
        .trim_end_matches("/tv")
        .to_string();
    let (host, port) = hostport.rsplit_once(':').unwrap();

    // A plain client is refused before any export name or data crosses the wire.
    let (ok, text) = run("nbdinfo", &["--size", &uri]);
    assert!(!ok, "a plain NBD client was served: {text}");

    // libnbd and qemu with a certificate of the cluster CA.
    let pki = sov_testkit::pki();
    let user = pki
        .issue(Role::Admin, None, "nbd-user", &dir.path().join("nbd-user"))
        .unwrap();
    let creds = dir.path().join("gnutls");
    gnutls_creds(&user, &pki.ca().ca_pem_path(), &creds);
    let tls_uri = format!("nbds://{hostport}/tv?tls-certificates={}", creds.display());
    let size = must("nbdinfo", &["--size", &tls_uri]);
    assert_eq!(size.trim(), (16 * MIB).to_string());
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        creds.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export=tv,tls-creds=tls0"
    );
    let text = must(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &image,
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "read -P 0x5a 0 1M",
        ],
    );
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "{text}"
    );

    // A client certificate from another CA is refused (it trusts our CA, we do not trust its).
    let other = sov_common::pki::Ca::init(&dir.path().join("other-ca")).unwrap();
    let forged = dir.path().join("forged-tls");
    other
        .issue_into(
            &sov_common::pki::CertRequest::node(
                NodeIdentity::new(Role::Admin, None, "mallory").unwrap(),
            ),
            &forged,
        )
        .unwrap();
    let forged_creds = dir.path().join("gnutls-forged");
    gnutls_creds(&forged, &pki.ca().ca_pem_path(), &forged_creds);
    let forged_uri = format!(
        "nbds://{hostport}/tv?tls-certificates={}",
        forged_creds.display()
    );
    let (ok, text) = run("nbdinfo", &["--size", &forged_uri]);
    assert!(
        !ok,
        "a client with another CA's certificate was served: {text}"
    );
}

fn yes_pattern(word: &str, len: usize) -> Vec<u8> {
    format!("{word}\n").bytes().cycle().take(len).collect()
}

/// A Linux guest (QEMU, TCG) writes, reads, discards and zeroes a real volume through
/// vhost-user-blk with two queues; then the volume, read back over NBD, holds what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_linux_guest_uses_a_volume_over_vhost_user() {
    let dir = TestDir::new("volumes-guest");
    let cl = cluster_with_pool(&dir, "standard", 8).await;
    let _vb = VhostBlk::start(&dir.path().join("vb1"), &cl.metad.addr, "vhost-blk-1", &[])
        .expect("vhost-blk");
    let sov = Sov {
        metad: cl.metad.addr.clone(),
    };
    sov.json(&[
        "volume",
        "create",
        "g1",
        "--size",
        "64MiB",
        "--tier",
        "performance",
    ]);

    // What the guest expects to find at 32 MiB, written over NBD first.
    let uri = sov.attach("g1");
    let prefill = yes_pattern("SOVPREFILL", MIB as usize);
    let pf = dir.path().join("prefill");
    std::fs::write(&pf, &prefill).unwrap();
    qemu_io(
        &uri,
        &[&format!("write -s {} 32M 1M", pf.display()), "flush"],
    );
    sov.json(&["volume", "detach", "g1"]);

    let v = sov.json(&["volume", "attach", "g1", "--protocol", "vhost-user"]);
    let socket = v["socket"].as_str().expect("a socket path").to_string();
    assert!(Path::new(&socket).exists(), "{socket}");

    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
    let kit = dir.path().join("guest-kit");
    must(
        guest.join("make-initramfs.sh").to_str().unwrap(),
        &[kit.to_str().unwrap()],
    );
    let start = Instant::now();
    let (ok, log) = run(
        guest.join("run-guest.sh").to_str().unwrap(),
        &[&socket, kit.to_str().unwrap()],
    );
    let log = log.replace('\r', "");
    eprintln!("guest run took {:?}", start.elapsed());
    assert!(ok, "the guest did not PASS:\n{log}");
    let result = log
        .lines()
        .find(|l| l.starts_with("SOV-GUEST-RESULT:"))
        .expect("a result line");
    assert!(result.contains("size=131072"), "{result}");
    assert!(result.contains("lbs=4096"), "{result}");
    assert!(result.contains("serial=g1"), "{result}");
    assert!(result.contains("discard=ok"), "{result}");

    // Back over NBD: every range the guest wrote, byte for byte.
    sov.json(&["volume", "detach", "g1"]);
    let uri = sov.attach("g1");
    let raw = dir.path().join("g1.raw");
    must("nbdcopy", &[&uri, raw.to_str().unwrap()]);
    let data = std::fs::read(&raw).unwrap();
    let m = MIB as usize;
    assert!(data[..m].iter().all(|&b| b == 0), "untouched range changed");
    assert!(
        data[m..5 * m] == yes_pattern("SOVPATTERN", 4 * m)[..],
        "pattern"
    );
    assert!(
        data[8 * m..10 * m] == yes_pattern("SOVCPU0", 2 * m)[..],
        "queue 0 writer"
    );
    assert!(
        data[12 * m..14 * m] == yes_pattern("SOVCPU1", 2 * m)[..],
        "queue 1 writer"
    );
    assert!(data[16 * m..17 * m].iter().all(|&b| b == 0), "discard");
    if result.contains("write_zeroes=ok") {
        assert!(data[20 * m..21 * m].iter().all(|&b| b == 0), "write zeroes");
    }
    assert!(data[32 * m..33 * m] == prefill[..], "prefill");
}

/// Nodes join, placement groups move (some entirely to the new nodes): at the next attach the
/// new members are filled from the nodes that hold the extents, and every byte reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extents_follow_their_placement_groups_to_new_nodes() {
    let dir = TestDir::new("volumes-grow");
    let mut cl = cluster_with_pool(&dir, "standard", 16).await;
    let _vb = VhostBlk::start(&dir.path().join("vb1"), &cl.metad.addr, "vhost-blk-1", &[])
        .expect("vhost-blk");
    let sov = Sov {
        metad: cl.metad.addr.clone(),
    };
    let v = sov.json(&["volume", "create", "m1", "--size", "64MiB"]);
    let volume_id = v["id"].as_str().unwrap().to_string();
    let uri = sov.attach("m1");
    qemu_io(&uri, &["write -P 0x5c 0 64M", "flush"]);
    sov.json(&["volume", "detach", "m1"]);

    for z in ["z1", "z2", "z3"] {
        cl.add_node(z, &[]).unwrap();
    }
    let want = cl.ids.clone();
    cl.wait_map(Duration::from_secs(60), "six nodes up", |m| {
        want.iter()
            .all(|id| m.nodes.iter().any(|n| &n.id == id && n.state == "up"))
    })
    .await
    .unwrap();

    let uri = sov.attach("m1");
    qemu_io(&uri, &["read -P 0x5c 0 64M"]);
    let mut moved = 0;
    for n in &cl.nodes[3..] {
        let d = n.disks[0].join("extents").join(&volume_id);
        moved += std::fs::read_dir(&d)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".meta"))
                    .count()
            })
            .unwrap_or(0);
    }
    eprintln!("{moved} extent replicas now on the new nodes");
    assert!(moved > 0, "no placement group moved to the new nodes");
    sov.json(&["volume", "detach", "m1"]);
}
