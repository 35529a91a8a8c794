//! `sov up`: starts a local cluster of real processes (a metad and storaged nodes spread over
//! zones, registered with it), writes `DATA/cluster.json`, and stops everything cleanly on
//! Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::{CliError, Output};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the cluster keeps its data and logs.
    #[arg(long, default_value = "sov-data")]
    data: PathBuf,
    /// Number of storaged processes.
    #[arg(long, default_value_t = 3)]
    storage_nodes: u32,
    /// Number of availability zones the nodes are spread over.
    #[arg(long, default_value_t = 3)]
    zones: u32,
    /// First storaged gRPC port; node i listens on base + i - 1.
    #[arg(long, default_value_t = 7100)]
    storaged_base_port: u16,
    /// metad's gRPC port.
    #[arg(long, default_value_t = 7400)]
    metad_port: u16,
    /// metad's /metrics port.
    #[arg(long, default_value_t = 9400)]
    metad_metrics_port: u16,
    /// First /metrics port; node i serves on base + i - 1.
    #[arg(long, default_value_t = 9100)]
    metrics_base_port: u16,
    /// metad members: 1 or 3 (ports metad-port, +1, +2).
    #[arg(long = "metad", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    metad_members: u32,
    /// The S3 endpoint's port.
    #[arg(long, default_value_t = 9000)]
    s3_port: u16,
    /// The gateway's /metrics port.
    #[arg(long, default_value_t = 9300)]
    gateway_metrics_port: u16,
    /// vhost-blk's NBD port (volumes are exported as nbd://127.0.0.1:PORT/NAME).
    #[arg(long, default_value_t = 10809)]
    nbd_port: u16,
    /// vhost-blk's /metrics port.
    #[arg(long, default_value_t = 9500)]
    vhost_blk_metrics_port: u16,
    /// Serve S3 over plain HTTP instead of HTTPS (the cluster is on loopback).
    #[arg(long)]
    insecure_http: bool,
}

/// The cluster CA of this local cluster (DATA/pki), made on first start.
fn cluster_ca(data: &std::path::Path) -> Result<sov_common::pki::Ca, CliError> {
    let dir = data.join("pki");
    let r = if dir.join("ca.key").exists() {
        sov_common::pki::Ca::open(&dir)
    } else {
        sov_common::pki::Ca::init(&dir)
    };
    r.map_err(|e| CliError::new(1, format!("cluster CA in {}: {e:#}", dir.display())))
}

/// The TLS directory `dir/tls` for one process: kept if it already holds a certificate for
/// this identity, else issued now. Returns its path.
fn tls_dir_for(
    ca: &sov_common::pki::Ca,
    (role, zone, name): (sov_common::tls::Role, Option<&str>, &str),
    extra_names: &[&str],
    dir: &std::path::Path,
) -> Result<PathBuf, CliError> {
    use sov_common::tls::{NodeIdentity, TlsContext};
    let tls = dir.join("tls");
    let id = NodeIdentity::new(role, zone, name).map_err(|e| CliError::new(1, format!("{e:#}")))?;
    let fail = |e: anyhow::Error| CliError::new(1, format!("certificate for {id}: {e:#}"));
    match TlsContext::load(&tls) {
        Ok(ctx) if ctx.identity() == &id => ca.copy_crl_into(&tls).map_err(fail)?,
        _ => {
            let req = sov_common::pki::CertRequest {
                identity: id.clone(),
                extra_names: extra_names.iter().map(|s| s.to_string()).collect(),
                validity_days: sov_common::pki::NODE_VALIDITY_DAYS,
            };
            ca.issue_into(&req, &tls).map_err(fail)?;
        }
    }
    Ok(tls)
}

struct Node {
    name: String,
    zone: String,
    child: Child,
    listen: String,
    metrics: String,
}

fn sibling_binary(name: &str) -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new(1, format!("cannot find the sov binary: {e}")))?;
    let p = exe
        .parent()
        .map(|d| d.join(name))
        .ok_or_else(|| CliError::new(1, "the sov binary has no directory"))?;
    if !p.exists() {
        return Err(CliError::new(
            1,
            format!(
                "{} not found next to sov; build the workspace first",
                p.display()
            ),
        ));
    }
    Ok(p)
}

/// Stops in reverse start order, in two waves: first the daemons that use the others (the
/// vhost-blk flushes and releases its volumes through metad and storaged, the gateway finishes
/// its requests), then storage nodes, and metad last.
fn stop_all(nodes: &mut [Node]) {
    nodes.reverse();
    let front = |n: &Node| n.name.starts_with("vhost-blk") || n.name.starts_with("gateway");
    stop_wave(nodes, front);
    stop_wave(nodes, |n| !front(n));
}

fn stop_wave(nodes: &mut [Node], pick: impl Fn(&Node) -> bool) {
    for n in nodes.iter().filter(|n| pick(n)) {
        // SAFETY: kill(2) on the pid of a child we started.
        unsafe {
            libc::kill(n.child.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes.iter_mut().filter(|n| pick(n)) {
        loop {
            match n.child.try_wait() {
                Ok(Some(s)) => {
                    eprintln!("{} stopped ({s})", n.name);
                    break;
                }
                _ if Instant::now() > deadline => {
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    eprintln!("{} killed after the stop timeout", n.name);
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A started daemon not yet known to serve.
struct Pending {
    index: usize,
    name: String,
    ready: PathBuf,
    log: PathBuf,
}

/// Starts one daemon with its log and ready file in `dir`.
fn spawn_daemon(
    nodes: &mut Vec<Node>,
    binary: &std::path::Path,
    (name, zone): (&str, &str),
    dir: &std::path::Path,
    (listen, metrics): (&str, &str),
    args: &[String],
) -> Result<Pending, CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::new(1, format!("cannot create {}: {e}", dir.display())))?;
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| CliError::new(1, format!("cannot create a log file: {e}")))?;
    let log2 = log
        .try_clone()
        .map_err(|e| CliError::new(1, e.to_string()))?;
    let child = Command::new(binary)
        .args(["--listen", listen, "--metrics-listen", metrics])
        .args(args)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| CliError::new(1, format!("cannot start {name}: {e}")))?;
    nodes.push(Node {
        name: name.to_string(),
        zone: zone.to_string(),
        child,
        listen: listen.to_string(),
        metrics: metrics.to_string(),
    });
    Ok(Pending {
        index: nodes.len() - 1,
        name: name.to_string(),
        ready,
        log: log_path,
    })
}

/// Waits until a started daemon serves; stops everything if it dies or takes over 60 s.
async fn wait_ready(nodes: &mut [Node], p: Pending) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if p.ready.exists() {
            return Ok(());
        }
        if let Ok(Some(s)) = nodes[p.index].child.try_wait() {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            stop_all(nodes);
            return Err(CliError::new(
                1,
                format!("{} exited ({s}):\n{}", p.name, log.trim_end()),
            ));
        }
        if Instant::now() > deadline {
            stop_all(nodes);
            return Err(CliError::new(
                1,
                format!("{} did not start within 60s", p.name),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts one daemon and waits until it serves.
async fn start_daemon(
    nodes: &mut Vec<Node>,
    binary: &std::path::Path,
    who: (&str, &str),
    dir: &std::path::Path,
    addrs: (&str, &str),
    args: &[String],
) -> Result<(), CliError> {
    let p = spawn_daemon(nodes, binary, who, dir, addrs, args)?;
    wait_ready(nodes, p).await
}

/// Writes a file readable by its owner only (it holds credentials).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), CliError> {
    sov_common::tls::write_private(path, bytes).map_err(|e| CliError::new(1, format!("{e:#}")))
}

/// Erasure-coded profile for `n` storage nodes: 4+2 from six nodes, 2+1 from three, else
/// as many copies as there are nodes.
fn ec_profile(n: u32) -> String {
    match n {
        6.. => "ec:4+2".into(),
        3..=5 => "ec:2+1".into(),
        n => format!("replicated:{n}"),
    }
}

/// After the storage nodes registered: the storage-class pools and the root key. Returns the
/// root key (from the environment, from an earlier start, or made now).
async fn setup(
    a: &UpArgs,
    data: &std::path::Path,
    metad: &str,
) -> Result<(String, String, bool), CliError> {
    use sov_client::meta::{MetaClient, parse_addrs};
    use sov_proto::metad as pb;
    let mc = MetaClient::new(&parse_addrs(metad))
        .map_err(|e| CliError::new(1, e.message().to_string()))?
        .with_retry_for(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = mc
            .call(|mut c| async move {
                c.get_cluster_map(pb::GetClusterMapRequest { consistency: 0 })
                    .await
            })
            .await
            .map_err(|e| CliError::new(1, e.message().to_string()))?;
        if m.nodes.iter().filter(|n| n.state == "up").count() >= a.storage_nodes as usize {
            break;
        }
        if Instant::now() > deadline {
            return Err(CliError::new(
                1,
                "storage nodes did not register within 60s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let n = a.storage_nodes;
    for (name, redundancy, tier) in [
        (
            "standard",
            format!("replicated:{}", n.min(3)),
            "performance",
        ),
        ("standard-ia", ec_profile(n), "standard"),
        ("archive", ec_profile(n), "archive"),
    ] {
        let kind =
            crate::cluster::parse_redundancy(&redundancy).map_err(|e| CliError::new(1, e))?;
        let req = pb::CreatePoolRequest {
            name: name.into(),
            redundancy: Some(kind),
            tier: tier.into(),
            pg_count: 0,
        };
        match mc
            .call(|mut c| {
                let req = req.clone();
                async move { c.create_pool(req).await }
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => {
                return Err(CliError::new(
                    1,
                    format!("creating pool {name}: {}", s.message()),
                ));
            }
        }
    }
    let saved = data.join("root-key.json");
    let (ak, sk, fresh) = match (
        std::env::var("SOV_ROOT_ACCESS_KEY"),
        std::env::var("SOV_ROOT_SECRET_KEY"),
    ) {
        (Ok(a), Ok(s)) if !a.is_empty() && !s.is_empty() => (a, s, false),
        _ => match std::fs::read(&saved)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            Some(v) => (
                v["access_key"].as_str().unwrap_or_default().to_string(),
                v["secret_key"].as_str().unwrap_or_default().to_string(),
                false,
            ),
            None => {
                let abc = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
                let id: String = (0..16)
                    .map(|_| abc[rand::random::<usize>() % abc.len()] as char)
                    .collect();
                let secret = hex::encode(rand::random::<[u8; 20]>());
                (format!("SOVROOT{id}"), secret, true)
            }
        },
    };
    let req = pb::CreateAccessKeyRequest {
        name: "root".into(),
        access_key_id: ak.clone(),
        secret_access_key: sk.clone(),
        admin: true,
    };
    match mc
        .call(|mut c| {
            let req = req.clone();
            async move { c.create_access_key(req).await }
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => {
            return Err(CliError::new(
                1,
                format!("creating the root key: {}", s.message()),
            ));
        }
    }
    write_private(
        &saved,
        &serde_json::to_vec_pretty(&serde_json::json!({"access_key": ak, "secret_key": sk}))
            .expect("plain JSON"),
    )?;
    Ok((ak, sk, fresh))
}

/// The cluster's master key file, created (random, mode 0600) on first start.
fn master_key(data: &std::path::Path) -> Result<PathBuf, CliError> {
    let path = data.join("master.key");
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        write_private(&path, format!("{}\n", hex::encode(key)).as_bytes())?;
    }
    Ok(path)
}

pub async fn run(a: UpArgs, out: Output) -> Result<(), CliError> {
    if a.storage_nodes == 0 || a.zones == 0 {
        return Err(CliError::new(
            2,
            "--storage-nodes and --zones must be at least 1",
        ));
    }
    let storaged = sibling_binary("storaged")?;
    let metad = sibling_binary("metad")?;
    std::fs::create_dir_all(&a.data)
        .map_err(|e| CliError::new(1, format!("cannot create {}: {e}", a.data.display())))?;
    let data = std::fs::canonicalize(&a.data)
        .map_err(|e| CliError::new(1, format!("{}: {e}", a.data.display())))?;
    let gateway = sibling_binary("gateway-s3")?;
    let vhost_blk = sibling_binary("vhost-blk")?;
    if a.metad_members == 2 {
        return Err(CliError::new(2, "--metad must be 1 or 3"));
    }
    let mut nodes: Vec<Node> = Vec::new();
    let key = master_key(&data)?;
    use sov_common::tls::Role;
    let ca = cluster_ca(&data)?;
    let client_tls = tls_dir_for(
        &ca,
        (Role::Admin, None, "sov-up"),
        &[],
        &data.join("client"),
    )?;
    sov_common::tls::install(sov_common::tls::Transport::Tls(
        sov_common::tls::TlsContext::load(&client_tls)
            .map_err(|e| CliError::new(1, format!("{e:#}")))?,
    ));
    let members: Vec<(u32, String)> = (1..=a.metad_members)
        .map(|i| (i, format!("127.0.0.1:{}", a.metad_port + i as u16 - 1)))
        .collect();
    let metad_list = members
        .iter()
        .map(|(_, addr)| addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let peers = members
        .iter()
        .map(|(i, addr)| format!("{i}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    // Members start together (each waits for the others to elect).
    let mut metad_ready = Vec::new();
    for (i, addr) in &members {
        let name = format!("metad-{i}");
        let dir = data.join(&name);
        let zone = format!("zone-{}", (i - 1) % a.zones + 1);
        let tls = tls_dir_for(&ca, (Role::Metad, Some(&zone), &name), &[], &dir)?;
        let mut args = vec![
            "--id".to_string(),
            i.to_string(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--master-key-file".into(),
            key.display().to_string(),
            "--tls-dir".into(),
            tls.display().to_string(),
        ];
        if members.len() > 1 {
            args.extend(["--peers".to_string(), peers.clone()]);
        }
        metad_ready.push(spawn_daemon(
            &mut nodes,
            &metad,
            (&name, &zone),
            &dir,
            (
                addr,
                &format!("127.0.0.1:{}", a.metad_metrics_port + *i as u16 - 1),
            ),
            &args,
        )?);
    }
    for r in metad_ready {
        wait_ready(&mut nodes, r).await?;
    }
    for i in 1..=a.storage_nodes {
        let name = format!("storaged-{i}");
        let zone = format!("zone-{}", (i - 1) % a.zones + 1);
        let dir = data.join(&name);
        let disk = dir.join("disk-1");
        std::fs::create_dir_all(&disk)
            .map_err(|e| CliError::new(1, format!("cannot create {}: {e}", disk.display())))?;
        let listen = format!("127.0.0.1:{}", a.storaged_base_port + i as u16 - 1);
        let metrics = format!("127.0.0.1:{}", a.metrics_base_port + i as u16 - 1);
        let tls = tls_dir_for(&ca, (Role::Storaged, Some(&zone), &name), &[], &dir)?;
        let args = vec![
            "--tls-dir".to_string(),
            tls.display().to_string(),
            "--node-id".into(),
            name.clone(),
            "--zone".into(),
            zone.clone(),
            "--disk".into(),
            disk.display().to_string(),
            "--metad".into(),
            metad_list.clone(),
        ];
        start_daemon(
            &mut nodes,
            &storaged,
            (&name, &zone),
            &dir,
            (&listen, &metrics),
            &args,
        )
        .await?;
    }
    let (access_key, secret_key, fresh_key) = match setup(&a, &data, &metad_list).await {
        Ok(k) => k,
        Err(e) => {
            stop_all(&mut nodes);
            return Err(e);
        }
    };
    let s3_listen = format!("127.0.0.1:{}", a.s3_port);
    let gw_tls = tls_dir_for(
        &ca,
        (Role::Gateway, Some("zone-1"), "gateway-s3"),
        &["localhost", "127.0.0.1"],
        &data.join("gateway-s3"),
    )?;
    let mut gw_args = vec![
        "--metad".to_string(),
        metad_list.clone(),
        "--tls-dir".into(),
        gw_tls.display().to_string(),
    ];
    if a.insecure_http {
        gw_args.push("--insecure-http".into());
    } else {
        gw_args.extend([
            "--https-cert".to_string(),
            gw_tls.join("cert.pem").display().to_string(),
            "--https-key".into(),
            gw_tls.join("key.pem").display().to_string(),
        ]);
    }
    start_daemon(
        &mut nodes,
        &gateway,
        ("gateway-s3", "zone-1"),
        &data.join("gateway-s3"),
        (&s3_listen, &format!("127.0.0.1:{}", a.gateway_metrics_port)),
        &gw_args,
    )
    .await?;
    let nbd_listen = format!("127.0.0.1:{}", a.nbd_port);
    let vb_tls = tls_dir_for(
        &ca,
        (Role::VhostBlk, Some("zone-1"), "vhost-blk-1"),
        &["localhost", "127.0.0.1"],
        &data.join("vhost-blk-1"),
    )?;
    start_daemon(
        &mut nodes,
        &vhost_blk,
        ("vhost-blk-1", "zone-1"),
        &data.join("vhost-blk-1"),
        (
            &nbd_listen,
            &format!("127.0.0.1:{}", a.vhost_blk_metrics_port),
        ),
        &[
            "--metad".to_string(),
            metad_list.clone(),
            "--id".into(),
            "vhost-blk-1".into(),
            "--data".into(),
            data.join("vhost-blk-1").display().to_string(),
            "--tls-dir".into(),
            vb_tls.display().to_string(),
        ],
    )
    .await?;
    let scheme = if a.insecure_http { "http" } else { "https" };
    let s3_endpoint = format!("{scheme}://{s3_listen}");
    let ca_bundle = ca.ca_pem_path();
    let cluster = serde_json::json!({
        "s3_endpoint": s3_endpoint,
        "ca_bundle": ca_bundle,
        "ca_dir": ca.dir(),
        "tls_dir": client_tls,
        "metad_endpoints": members.iter().map(|(_, a)| a.clone()).collect::<Vec<_>>(),
        "storaged_endpoints": nodes.iter().filter(|n| n.name.starts_with("storaged")).map(|n| n.listen.clone()).collect::<Vec<_>>(),
        "nbd_endpoint": format!("nbd://{nbd_listen}"),
        "access_key": access_key,
        "secret_key": secret_key,
        "metrics": nodes.iter().map(|n| format!("http://{}/metrics", n.metrics)).collect::<Vec<_>>(),
        "processes": nodes.iter().map(|n| serde_json::json!({
            "name": n.name, "pid": n.child.id(), "zone": n.zone, "listen": n.listen,
        })).collect::<Vec<_>>(),
    });
    let path = data.join("cluster.json");
    write_private(
        &path,
        &serde_json::to_vec_pretty(&cluster).expect("plain JSON"),
    )?;
    match out {
        Output::Json => {
            // The secret is shown once, when it is made; it stays in cluster.json (0600).
            let mut shown = cluster.clone();
            if !fresh_key {
                shown["secret_key"] = serde_json::json!(format!("(in {})", path.display()));
            }
            println!("{shown}")
        }
        Output::Text => {
            println!(
                "sov cluster up ({} metad, {} storage nodes, 1 S3 gateway, 1 vhost-blk); state in {}",
                members.len(),
                a.storage_nodes,
                path.display()
            );
            for n in &nodes {
                println!(
                    "  {} zone {} listen {} metrics http://{}/metrics",
                    n.name, n.zone, n.listen, n.metrics
                );
            }
            println!("S3 endpoint: {s3_endpoint}");
            println!("NBD exports: nbd://{nbd_listen}/VOLUME (sov volume attach VOLUME)");
            println!("  export SOV_TLS_DIR={}", client_tls.display());
            if !a.insecure_http {
                println!("  export AWS_CA_BUNDLE={}", ca_bundle.display());
            }
            println!("  AWS_ACCESS_KEY_ID={access_key}");
            if fresh_key {
                // Printed this once; it stays in root-key.json and cluster.json (mode 0600).
                println!("  AWS_SECRET_ACCESS_KEY={secret_key}");
            } else {
                println!(
                    "  AWS_SECRET_ACCESS_KEY in {} (shown when it was made)",
                    path.display()
                );
            }
            println!("Ctrl-C stops everything.");
        }
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| CliError::new(1, e.to_string()))?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = check.tick() => {
                for n in nodes.iter_mut() {
                    if let Ok(Some(s)) = n.child.try_wait() {
                        eprintln!("{} exited unexpectedly ({s}); see its log in {}", n.name, data.join(&n.name).display());
                    }
                }
            }
        }
    }
    eprintln!("stopping the cluster");
    stop_all(&mut nodes);
    Ok(())
}
