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

/// Stops in reverse start order: storage nodes first, metad last.
fn stop_all(nodes: &mut [Node]) {
    nodes.reverse();
    for n in nodes.iter() {
        // SAFETY: kill(2) on the pid of a child we started.
        unsafe {
            libc::kill(n.child.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes.iter_mut() {
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

/// Starts one daemon with its log and ready file in `dir`, and waits until it serves.
async fn start_daemon(
    nodes: &mut Vec<Node>,
    binary: &std::path::Path,
    (name, zone): (&str, &str),
    dir: &std::path::Path,
    (listen, metrics): (&str, &str),
    args: &[String],
) -> Result<(), CliError> {
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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ready.exists() {
            return Ok(());
        }
        let n = nodes.last_mut().expect("just pushed");
        if let Ok(Some(s)) = n.child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            nodes.pop();
            stop_all(nodes);
            return Err(CliError::new(
                1,
                format!("{name} exited ({s}):\n{}", log.trim_end()),
            ));
        }
        if Instant::now() > deadline {
            stop_all(nodes);
            return Err(CliError::new(1, format!("{name} did not start within 60s")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cluster's master key file, created (random, mode 0600) on first start.
fn master_key(data: &std::path::Path) -> Result<PathBuf, CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data.join("master.key");
    if path.exists() {
        return Ok(path);
    }
    let key: [u8; 32] = rand::random();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| CliError::new(1, format!("cannot create {}: {e}", path.display())))?;
    writeln!(f, "{}", hex::encode(key))
        .map_err(|e| CliError::new(1, format!("cannot write {}: {e}", path.display())))?;
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
    let mut nodes: Vec<Node> = Vec::new();
    let metad_listen = format!("127.0.0.1:{}", a.metad_port);
    let key = master_key(&data)?;
    let metad_dir = data.join("metad-1");
    start_daemon(
        &mut nodes,
        &metad,
        ("metad-1", "zone-1"),
        &metad_dir,
        (
            &metad_listen,
            &format!("127.0.0.1:{}", a.metad_metrics_port),
        ),
        &[
            "--id".into(),
            "1".into(),
            "--data-dir".into(),
            metad_dir.join("data").display().to_string(),
            "--master-key-file".into(),
            key.display().to_string(),
        ],
    )
    .await?;
    for i in 1..=a.storage_nodes {
        let name = format!("storaged-{i}");
        let zone = format!("zone-{}", (i - 1) % a.zones + 1);
        let dir = data.join(&name);
        let disk = dir.join("disk-1");
        std::fs::create_dir_all(&disk)
            .map_err(|e| CliError::new(1, format!("cannot create {}: {e}", disk.display())))?;
        let listen = format!("127.0.0.1:{}", a.storaged_base_port + i as u16 - 1);
        let metrics = format!("127.0.0.1:{}", a.metrics_base_port + i as u16 - 1);
        let args = vec![
            "--node-id".to_string(),
            name.clone(),
            "--zone".into(),
            zone.clone(),
            "--disk".into(),
            disk.display().to_string(),
            "--metad".into(),
            metad_listen.clone(),
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
    let cluster = serde_json::json!({
        "s3_endpoint": null,
        "metad_endpoints": [metad_listen],
        "storaged_endpoints": nodes.iter().filter(|n| n.name.starts_with("storaged")).map(|n| n.listen.clone()).collect::<Vec<_>>(),
        "metrics": nodes.iter().map(|n| format!("http://{}/metrics", n.metrics)).collect::<Vec<_>>(),
        "processes": nodes.iter().map(|n| serde_json::json!({
            "name": n.name, "pid": n.child.id(), "zone": n.zone, "listen": n.listen,
        })).collect::<Vec<_>>(),
    });
    let path = data.join("cluster.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&cluster).expect("plain JSON"),
    )
    .map_err(|e| CliError::new(1, format!("cannot write {}: {e}", path.display())))?;
    match out {
        Output::Json => println!("{cluster}"),
        Output::Text => {
            println!(
                "sov cluster up (1 metad, {} storage nodes); state in {}",
                a.storage_nodes,
                path.display()
            );
            for n in &nodes {
                println!(
                    "  {} zone {} grpc {} metrics http://{}/metrics",
                    n.name, n.zone, n.listen, n.metrics
                );
            }
            println!("S3 gateway: not part of the cluster yet. Ctrl-C stops everything.");
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
