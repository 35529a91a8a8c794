//! Real S3 clients over HTTPS (the cluster CA's certificate, checked by every client) against a
//! cluster started by `sov up` (metad, three storaged in three zones, the gateway, all talking
//! mutual TLS), as real processes on loopback: the aws cli (mb, cp with a 100 MiB
//! multipart upload both ways, sync both ways, ls with prefixes, rm --recursive, presign then a
//! plain HTTP GET) and a boto3 suite of every operation with its error codes. `sov up` is then
//! stopped and started again on the same directory, and the data is still there.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sov_testkit::{Process, TestDir, bin_path, free_port, free_port_range, http_get, metric_value};

struct Up {
    proc: Process,
    endpoint: String,
    access_key: String,
    secret_key: String,
    metad: String,
    gateway_metrics: String,
    /// The cluster CA certificate (what S3 clients trust).
    ca_bundle: String,
    /// The operator's TLS folder (for `sov`).
    tls_dir: String,
}

fn start_up(data: &Path, ports: &[String]) -> Up {
    try_start_up(data, ports).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `sov up`; `Err` with its log when it exits before writing cluster.json.
fn try_start_up(data: &Path, ports: &[String]) -> Result<Up, String> {
    let cluster = data.join("cluster.json");
    let _ = std::fs::remove_file(&cluster);
    let mut args: Vec<String> = vec!["up".into(), "--data".into(), data.display().to_string()];
    args.extend(ports.iter().cloned());
    // Debug logs everywhere (the libraries' own chatter aside): the test checks that no
    // secret shows up in them.
    let env = [(
        "RUST_LOG".to_string(),
        "debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info,tonic=info".to_string(),
    )];
    let mut proc = Process::spawn_env(
        "sov-up",
        &bin_path("sov"),
        &args,
        &env,
        &data.with_extension("log"),
    )
    .expect("start sov up");
    let deadline = Instant::now() + Duration::from_secs(120);
    let v: serde_json::Value = loop {
        if let Ok(raw) = std::fs::read(&cluster)
            && let Ok(v) = serde_json::from_slice(&raw)
        {
            break v;
        }
        if let Some(s) = proc.try_wait() {
            return Err(format!("sov up exited ({s}): {}", proc.log_tail(40)));
        }
        assert!(
            Instant::now() < deadline,
            "sov up did not come up: {}",
            proc.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    // The gateway's /metrics is on the port given with --gateway-metrics-port.
    let gw_port = ports
        .iter()
        .position(|p| p == "--gateway-metrics-port")
        .map(|i| ports[i + 1].clone())
        .expect("a --gateway-metrics-port");
    let gateway_metrics = v["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str())
        .find(|m| m.contains(&format!(":{gw_port}/")))
        .unwrap_or_default()
        .to_string();
    Ok(Up {
        proc,
        endpoint: s("s3_endpoint"),
        access_key: s("access_key"),
        secret_key: s("secret_key"),
        metad: v["metad_endpoints"][0]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        gateway_metrics,
        ca_bundle: s("ca_bundle"),
        tls_dir: s("tls_dir"),
    })
}

/// GET over HTTPS trusting only `ca` (python's ssl, as no other client is at hand).
fn https_get(url: &str, ca: &str) -> Result<String, String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import ssl,sys,urllib.request as u; \
             c=ssl.create_default_context(cafile=sys.argv[2]); \
             sys.stdout.write(u.urlopen(sys.argv[1], context=c, timeout=30).read().decode())",
            url,
            ca,
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

impl Up {
    /// `python3 -m awscli <args> --endpoint-url ...`; panics with its output on failure.
    fn aws(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .args(["-m", "awscli"])
            .args(args)
            .args(["--endpoint-url", &self.endpoint])
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CA_BUNDLE", &self.ca_bundle)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .expect("run the aws cli");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "aws {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

fn write_tree(root: &Path) {
    for (p, body) in [
        ("a/x.txt", "x".repeat(10)),
        ("a/b/y.txt", "y".repeat(5000)),
        ("z.bin", "z".repeat(70_000)),
        ("dir with space/ü.txt", "unicode".to_string()),
    ] {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, body).unwrap();
    }
}

fn same_tree(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trees differ: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn aws_cli_and_boto3_against_sov_up() {
    let dir = TestDir::new("s3-clients");
    let fresh_ports = || -> Vec<String> {
        vec![
            "--metad-port".into(),
            free_port().to_string(),
            "--metad-metrics-port".into(),
            free_port().to_string(),
            "--storaged-base-port".into(),
            free_port_range(3).to_string(),
            "--metrics-base-port".into(),
            free_port_range(3).to_string(),
            "--s3-port".into(),
            free_port().to_string(),
            "--gateway-metrics-port".into(),
            free_port().to_string(),
            "--nbd-port".into(),
            free_port().to_string(),
            "--vhost-blk-metrics-port".into(),
            free_port().to_string(),
        ]
    };
    // A port picked free can be taken by another test's daemon before `sov up` binds it:
    // then start again on other ports (and a new folder: metad remembers its address).
    let (data, ports, mut up) = (1..=3)
        .find_map(|attempt| {
            let data = dir.path().join(format!("cluster-{attempt}"));
            let ports = fresh_ports();
            match try_start_up(&data, &ports) {
                Ok(up) => Some((data, ports, up)),
                Err(e) if e.contains("Address already in use") && attempt < 3 => None,
                Err(e) => panic!("{e}"),
            }
        })
        .expect("sov up started");
    assert!(up.endpoint.starts_with("https://"), "{}", up.endpoint);
    // Plain HTTP to the HTTPS endpoint gets no S3 answer.
    let plain = up.endpoint.replacen("https://", "http://", 1);
    if let Ok(body) = http_get(&format!("{plain}/")) {
        assert!(!body.contains("ListAllMyBucketsResult"), "{body}");
    }
    // A client that does not trust the cluster CA refuses the gateway.
    let untrusted = Command::new("python3")
        .args([
            "-c",
            "import sys,urllib.request as u; u.urlopen(sys.argv[1], timeout=30)",
        ])
        .arg(format!("{}/", up.endpoint))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("CERTIFICATE_VERIFY_FAILED"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );

    // aws cli.
    up.aws(&["s3", "mb", "s3://cli"]);
    let big = dir.path().join("big.bin");
    let mut bytes = vec![0u8; 100 << 20];
    blake3::Hasher::new()
        .update(b"big")
        .finalize_xof()
        .fill(&mut bytes);
    std::fs::write(&big, &bytes).unwrap();
    up.aws(&["s3", "cp", big.to_str().unwrap(), "s3://cli/big.bin"]);
    let head = up.aws(&[
        "s3api",
        "head-object",
        "--bucket",
        "cli",
        "--key",
        "big.bin",
    ]);
    assert!(
        head.contains("-"),
        "a 100 MiB cp is a multipart upload: {head}"
    );
    assert!(head.contains("AES256"), "{head}");
    let back = dir.path().join("big.back");
    up.aws(&["s3", "cp", "s3://cli/big.bin", back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "100 MiB round trip differs"
    );
    let tree = dir.path().join("tree");
    write_tree(&tree);
    up.aws(&["s3", "sync", tree.to_str().unwrap(), "s3://cli/tree"]);
    let tree2 = dir.path().join("tree2");
    up.aws(&["s3", "sync", "s3://cli/tree", tree2.to_str().unwrap()]);
    same_tree(&tree, &tree2);
    let ls = up.aws(&["s3", "ls", "s3://cli/tree/a/"]);
    assert!(ls.contains("PRE b/") && ls.contains("x.txt"), "{ls}");
    let ls = up.aws(&["s3", "ls", "s3://cli/tree/", "--recursive"]);
    assert_eq!(ls.lines().count(), 4, "{ls}");
    let url = up.aws(&[
        "s3",
        "presign",
        "s3://cli/tree/a/x.txt",
        "--expires-in",
        "120",
    ]);
    assert!(url.starts_with("https://"), "{url}");
    let body = https_get(url.trim(), &up.ca_bundle).expect("presigned GET");
    assert_eq!(body, "x".repeat(10));
    up.aws(&["s3", "rm", "--recursive", "s3://cli/tree"]);
    let ls = up.aws(&["s3", "ls", "s3://cli/", "--recursive"]);
    assert_eq!(ls.lines().count(), 1, "only big.bin is left: {ls}");
    println!("aws cli: mb, cp 100 MiB both ways, sync both ways, ls, presign, rm --recursive");

    // rclone: copy a tree up and check it byte for byte (MD5 against our ETags, then size).
    let rclone = |args: &[&str]| {
        let out = Command::new("rclone")
            .args(args)
            .env("RCLONE_CONFIG", "/dev/null")
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("AWS_PROFILE")
            .env("RCLONE_CONFIG_SOV_TYPE", "s3")
            .env("RCLONE_CONFIG_SOV_PROVIDER", "Other")
            .env("RCLONE_CONFIG_SOV_ENDPOINT", &up.endpoint)
            .env("RCLONE_CONFIG_SOV_ACCESS_KEY_ID", &up.access_key)
            .env("RCLONE_CONFIG_SOV_SECRET_ACCESS_KEY", &up.secret_key)
            .env("RCLONE_CONFIG_SOV_FORCE_PATH_STYLE", "true")
            .output()
            .expect("run rclone");
        assert!(
            out.status.success(),
            "rclone {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ca_cert = format!("--ca-cert={}", up.ca_bundle);
    let rclone = |args: &[&str]| {
        let mut all = vec![ca_cert.as_str()];
        all.extend_from_slice(args);
        rclone(&all)
    };
    rclone(&["mkdir", "sov:rclone"]);
    rclone(&["copy", tree.to_str().unwrap(), "sov:rclone/tree"]);
    rclone(&["check", tree.to_str().unwrap(), "sov:rclone/tree"]);
    rclone(&[
        "check",
        "--download",
        tree.to_str().unwrap(),
        "sov:rclone/tree",
    ]);
    println!("rclone: copy, check, check --download");

    // s3cmd: mb, put, get, ls.
    let host = up.endpoint.trim_start_matches("https://").to_string();
    let s3cmd = |args: &[&str]| {
        let out = Command::new("s3cmd")
            .args([
                "-c",
                "/dev/null",
                "--ssl",
                &format!("--ca-certs={}", up.ca_bundle),
                &format!("--host={host}"),
                &format!("--host-bucket={host}"),
                &format!("--access_key={}", up.access_key),
                &format!("--secret_key={}", up.secret_key),
                "--region=us-east-1",
            ])
            .args(args)
            .output()
            .expect("run s3cmd");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "s3cmd {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    s3cmd(&["mb", "s3://s3cmd"]);
    let z = tree.join("z.bin");
    s3cmd(&["put", z.to_str().unwrap(), "s3://s3cmd/z.bin"]);
    let got = dir.path().join("z.s3cmd");
    s3cmd(&["get", "s3://s3cmd/z.bin", got.to_str().unwrap()]);
    assert!(std::fs::read(&got).unwrap() == std::fs::read(&z).unwrap());
    let ls = s3cmd(&["ls", "s3://s3cmd/"]);
    assert!(ls.contains("s3://s3cmd/z.bin"), "{ls}");
    println!("s3cmd: mb, put, get, ls");

    // A second gateway beside the first: stateless, it serves the same objects. Its
    // certificate comes from `sov cert issue` with the cluster's CA.
    let gw2_tls = dir.path().join("gw2-tls");
    let out = Command::new(bin_path("sov"))
        .args(["cert", "issue", "--role", "gateway", "--name", "gateway-2"])
        .args(["--dns", "127.0.0.1", "--out"])
        .arg(&gw2_tls)
        .arg("--ca")
        .arg(data.join("pki"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ready = dir.path().join("gw2-ready.json");
    let mut gw2 = Process::spawn(
        "gateway-2",
        &bin_path("gateway-s3"),
        &[
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--metad".into(),
            up.metad.clone(),
            "--tls-dir".into(),
            gw2_tls.display().to_string(),
            "--https-cert".into(),
            gw2_tls.join("cert.pem").display().to_string(),
            "--https-key".into(),
            gw2_tls.join("key.pem").display().to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
        ],
        &dir.path().join("gw2.log"),
    )
    .expect("start a second gateway");
    let r: serde_json::Value =
        sov_testkit::wait_ready(&mut gw2, &ready, Duration::from_secs(60)).expect("gateway 2");
    let second = Up {
        proc: gw2,
        endpoint: format!("https://{}", r["listen"].as_str().unwrap()),
        access_key: up.access_key.clone(),
        secret_key: up.secret_key.clone(),
        metad: up.metad.clone(),
        gateway_metrics: String::new(),
        ca_bundle: up.ca_bundle.clone(),
        tls_dir: up.tls_dir.clone(),
    };
    let got = dir.path().join("z.gw2");
    second.aws(&["s3", "cp", "s3://s3cmd/z.bin", got.to_str().unwrap()]);
    assert!(std::fs::read(&got).unwrap() == std::fs::read(&z).unwrap());
    second.aws(&["s3", "cp", got.to_str().unwrap(), "s3://s3cmd/from-gw2"]);
    let ls = up.aws(&["s3", "ls", "s3://s3cmd/"]);
    assert!(ls.contains("from-gw2"), "{ls}");
    drop(second);
    println!("a second gateway serves the same objects");

    // Plain HTTP is refused off loopback.
    let out = Command::new(bin_path("gateway-s3"))
        .args(["--listen", "0.0.0.0:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--metad", &up.metad, "--insecure-http", "--tls-dir"])
        .arg(&gw2_tls)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only allowed on loopback"), "{err}");

    // boto3.
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/boto3_suite.py");
    let out = Command::new("python3")
        .arg(&suite)
        .env("S3_ENDPOINT", &up.endpoint)
        .env("AWS_ACCESS_KEY_ID", &up.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &up.secret_key)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_CA_BUNDLE", &up.ca_bundle)
        .env("SOV_TLS_DIR", &up.tls_dir)
        .env("SOV_BIN", bin_path("sov"))
        .env("SOV_METAD", &up.metad)
        .output()
        .expect("run the boto3 suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "boto3 suite failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", stdout.lines().last().unwrap_or_default());

    // Metrics name operations and error codes.
    let m = http_get(&up.gateway_metrics).expect("gateway metrics");
    assert!(metric_value(&m, "gateway_requests_total", "op=\"PutObject\"").unwrap_or(0.0) > 0.0);
    assert!(metric_value(&m, "gateway_requests_total", "code=\"NoSuchKey\"").unwrap_or(0.0) > 0.0);

    // Restart on the same directory: same keys, data intact.
    up.proc
        .terminate(Duration::from_secs(60))
        .expect("stop sov up");
    let first_output = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    let up2 = start_up(&data, &ports);
    assert_eq!(up2.access_key, up.access_key);
    let back2 = dir.path().join("big.back2");
    up2.aws(&["s3", "cp", "s3://cli/big.bin", back2.to_str().unwrap()]);
    assert!(
        std::fs::read(&back2).unwrap() == bytes,
        "data lost across a restart"
    );
    println!("restarted on the same directory; 100 MiB object intact");

    // No secret in any log of the run (debug level), in /metrics, or in what `sov up` printed
    // the second time: not the root S3 secret, not the master key, not a data key.
    let master = std::fs::read_to_string(data.join("master.key")).unwrap();
    let mut secrets = vec![up.secret_key.clone(), master.trim().to_string()];
    // The data key of bucket `cli`, fetched as the operator.
    sov_common::tls::install(sov_common::tls::Transport::Tls(
        sov_common::tls::TlsContext::load(Path::new(&up2.tls_dir)).unwrap(),
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data_key = rt.block_on(async {
        use sov_proto::metad::{GetBucketRequest, GetDataKeyRequest};
        let mut admin = sov_proto::metad::metad_client::MetadClient::new(sov_common::tls::channel(
            tonic::transport::Channel::from_shared(format!("http://{}", up2.metad)).unwrap(),
            sov_common::tls::Role::Metad,
        ));
        let b = admin
            .get_bucket(GetBucketRequest {
                name: "cli".into(),
                consistency: 0,
            })
            .await
            .unwrap()
            .into_inner();
        admin
            .get_data_key(GetDataKeyRequest { id: b.data_key_id })
            .await
            .unwrap()
            .into_inner()
            .key
    });
    assert_eq!(data_key.len(), 32);
    secrets.push(hex::encode(&data_key));
    let mut texts: Vec<(String, String)> = walk(&data)
        .into_iter()
        .filter(|e| e.extension().is_some_and(|x| x == "log"))
        .map(|e| {
            let t = String::from_utf8_lossy(&std::fs::read(&e).unwrap()).to_string();
            (e.display().to_string(), t)
        })
        .collect();
    // The first start made the root key and printed its secret, once; the second prints none.
    assert_eq!(first_output.matches(up.secret_key.as_str()).count(), 1);
    let all_output = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    texts.push((
        "the second sov up's output".into(),
        all_output[first_output.len()..].to_string(),
    ));
    texts.push((
        "gateway /metrics".into(),
        http_get(&up2.gateway_metrics).unwrap_or_default(),
    ));
    let total: usize = texts.iter().map(|(_, t)| t.len()).sum();
    assert!(total > 10_000, "too little logged to judge: {total} bytes");
    let names = ["the root S3 secret", "the master key", "a data key"];
    for (i, s) in secrets.iter().enumerate() {
        assert!(s.len() >= 16, "{} is too short to look for", names[i]);
        for (file, t) in &texts {
            assert!(!t.contains(s.as_str()), "{} is in {file}", names[i]);
        }
    }
    println!("no secret in {total} bytes of debug logs and metrics");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
