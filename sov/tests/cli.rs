//! The `sov` binary against real storaged processes: `debug chunk` round trips, exit codes,
//! and `sov up` starting and stopping a local cluster.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sov_testkit::{Storaged, TestDir, free_port, free_port_range, http_get};

/// `sov` as this test's operator (the test CA's admin certificate).
fn sov(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let tls = sov_testkit::pki().admin_dir().display().to_string();
    sov_tls(&tls, args, stdin)
}

/// `sov` with the operator certificate in `tls`.
fn sov_tls(tls: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sov"))
        .env("SOV_TLS_DIR", tls)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running sov");
    {
        let mut si = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            si.write_all(b).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

#[test]
fn debug_chunk_round_trip_and_exit_codes() {
    let dir = TestDir::new("cli");
    let disk = dir.path().join("disk");
    let node = Storaged::start(dir.path(), std::slice::from_ref(&disk), &["--no-scrub"]).unwrap();
    let addr = node.addr();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();

    let out = sov(&["debug", "chunk", "put", "--storaged", &addr], Some(&data));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout);
    assert_eq!(
        id,
        blake3::hash(&data).to_hex().to_string(),
        "content-addressed id"
    );

    let out = sov(&["debug", "chunk", "get", "--storaged", &addr, &id], None);
    assert!(out.status.success());
    assert_eq!(out.stdout, data);

    let out = sov(
        &[
            "debug",
            "chunk",
            "get",
            "--storaged",
            &addr,
            &id,
            "--offset",
            "10",
            "--length",
            "5",
        ],
        None,
    );
    assert_eq!(out.stdout, data[10..15]);

    let out = sov(
        &[
            "--output",
            "json",
            "debug",
            "chunk",
            "stat",
            "--storaged",
            &addr,
            &id,
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["length"], 300_000);

    let out = sov(
        &[
            "debug",
            "chunk",
            "put",
            "--storaged",
            &addr,
            "--id",
            "named/1",
        ],
        Some(b"hi"),
    );
    assert_eq!(text(&out.stdout), "named/1");
    let out = sov(
        &[
            "--output",
            "json",
            "debug",
            "chunk",
            "list",
            "--storaged",
            &addr,
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);

    let out = sov(
        &[
            "--output",
            "json",
            "debug",
            "node-info",
            "--storaged",
            &addr,
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["disks"][0]["chunks"], 2);

    // Missing chunk: exit 4 with the reason.
    let out = sov(
        &["debug", "chunk", "get", "--storaged", &addr, "nope"],
        None,
    );
    assert_eq!(out.status.code(), Some(4));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );

    // Rotten chunk: exit 3, reason on stderr, nothing on stdout.
    let seg = std::fs::read_dir(disk.join("segments"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    f.write_all_at(&[0x55], 56 + 64 + 1000).unwrap();
    let out = sov(&["debug", "chunk", "get", "--storaged", &addr, &id], None);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("failed verification"),
        "{}",
        text(&out.stderr)
    );
    let out = sov(
        &["--output", "json", "debug", "corrupt", "--storaged", &addr],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["id"], id.as_str());

    let out = sov(
        &["debug", "chunk", "delete", "--storaged", &addr, "named/1"],
        None,
    );
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("deleted named/1"));

    // Unreachable node: a clear message and a non-zero exit, not a hang.
    let out = sov(
        &["debug", "chunk", "stat", "--storaged", "127.0.0.1:1", "x"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach"),
        "{}",
        text(&out.stderr)
    );
}

/// `sov up` as a child: on drop, SIGTERM (sov up stops its daemons), then SIGKILL after 60 s.
struct UpGuard(Option<std::process::Child>);

impl UpGuard {
    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("running")
    }
}

impl Drop for UpGuard {
    fn drop(&mut self) {
        let Some(mut c) = self.0.take() else { return };
        if c.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn sov_up_starts_and_stops_a_cluster() {
    let dir = TestDir::new("up");
    let data = dir.path().join("data");
    // Free ports picked by binding them (not a fixed range that other tests' ephemeral
    // ports can take).
    let (storaged_base, metrics_base) = (free_port_range(3), free_port_range(3));
    let (gw_metrics, nbd_port) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_sov"))
        .args(["up", "--storage-nodes", "3", "--zones", "3", "--data"])
        .arg(&data)
        .args(["--storaged-base-port", &storaged_base.to_string()])
        .args(["--metrics-base-port", &metrics_base.to_string()])
        .args(["--metad-port", &free_port().to_string()])
        .args(["--metad-metrics-port", &free_port().to_string()])
        .args(["--s3-port", &free_port().to_string()])
        .args(["--gateway-metrics-port", &gw_metrics.to_string()])
        .args(["--nbd-port", &nbd_port.to_string()])
        .args(["--vhost-blk-metrics-port", &free_port().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stops the cluster however the test ends (a failed assertion included).
    let mut child = UpGuard(Some(child));
    let cluster = data.join("cluster.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cluster.exists() {
        if let Some(s) = child.child().try_wait().unwrap() {
            let out = child.0.take().unwrap().wait_with_output().unwrap();
            panic!("sov up exited {s}: {}", text(&out.stderr));
        }
        assert!(
            Instant::now() < deadline,
            "sov up did not write cluster.json"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cluster).unwrap()).unwrap();
    let procs = v["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 6);
    assert_eq!(procs[0]["name"], "metad-1");
    assert_eq!(procs[1]["name"], "storaged-1");
    assert_eq!(procs[3]["zone"], "zone-3");
    assert_eq!(procs[4]["name"], "gateway-s3");
    assert_eq!(procs[5]["name"], "vhost-blk-1");
    assert!(
        v["s3_endpoint"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:")
    );
    let tls = v["tls_dir"].as_str().unwrap().to_string();
    for secret in [
        format!("{tls}/key.pem"),
        format!("{}/pki/ca.key", data.display()),
        format!("{}/gateway-s3/tls/key.pem", data.display()),
    ] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&secret).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{secret} is readable by others");
    }
    assert!(!v["access_key"].as_str().unwrap().is_empty());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cluster).unwrap().permissions(),
    );
    assert_eq!(
        mode & 0o077,
        0,
        "cluster.json holds the root secret: owner only"
    );
    for url in v["metrics"].as_array().unwrap() {
        let url = url.as_str().unwrap();
        let m = http_get(url).unwrap();
        assert!(
            m.contains("storaged_disk_free_bytes")
                || m.contains("metad_raft_term")
                || m.contains("vhost_blk_requests_total")
                || url.ends_with(&format!(":{gw_metrics}/metrics")),
            "{url}"
        );
    }
    // Every storaged registered with metad and is up.
    let metad = v["metad_endpoints"][0].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = sov_tls(
            &tls,
            &["--output", "json", "node", "list", "--metad", &metad],
            None,
        );
        let listed: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let up = listed.to_string().matches("\"state\":\"up\"").count();
        if out.status.success() && up == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "storage nodes not all up in metad: {listed} {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let addr = v["storaged_endpoints"][0].as_str().unwrap().to_string();
    let out = sov_tls(
        &tls,
        &["debug", "chunk", "put", "--storaged", &addr, "--id", "up/1"],
        Some(b"x"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A volume in the default pool, attached over NBD and written with qemu-io.
    let out = sov_tls(
        &tls,
        &[
            "volume", "create", "vol", "--size", "16MiB", "--metad", &metad,
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sov_tls(
        &tls,
        &[
            "--output", "json", "volume", "attach", "vol", "--metad", &metad,
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let att: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uri = att["uri"].as_str().unwrap().to_string();
    assert_eq!(uri, format!("nbd://127.0.0.1:{nbd_port}/vol"));
    let io = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 64k",
            "-c",
            "read -P 0x42 0 64k",
            &uri,
        ])
        .output()
        .expect("qemu-io (make test installs qemu-utils)");
    assert!(
        io.status.success() && !text(&io.stdout).contains("fail"),
        "{}{}",
        text(&io.stdout),
        text(&io.stderr)
    );
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.child().id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.child().try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "sov up did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    for p in procs {
        let pid = p["pid"].as_u64().unwrap() as i32;
        // SAFETY: signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "{} still running after sov up stopped", p["name"]);
    }
}
