//! `sov up`: starts a local cluster of real processes (today: storaged nodes spread over
//! zones), writes `DATA/cluster.json`, and stops everything cleanly on Ctrl-C or SIGTERM.

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

fn stop_all(nodes: &mut [Node]) {
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

pub async fn run(a: UpArgs, out: Output) -> Result<(), CliError> {
    if a.storage_nodes == 0 || a.zones == 0 {
        return Err(CliError::new(
            2,
            "--storage-nodes and --zones must be at least 1",
        ));
    }
    let storaged = sibling_binary("storaged")?;
    std::fs::create_dir_all(&a.data)
        .map_err(|e| CliError::new(1, format!("cannot create {}: {e}", a.data.display())))?;
    let data = std::fs::canonicalize(&a.data)
        .map_err(|e| CliError::new(1, format!("{}: {e}", a.data.display())))?;
    let mut nodes: Vec<Node> = Vec::new();
    for i in 1..=a.storage_nodes {
        let name = format!("storaged-{i}");
        let zone = format!("zone-{}", (i - 1) % a.zones + 1);
        let dir = data.join(&name);
        let disk = dir.join("disk-1");
        std::fs::create_dir_all(&disk)
            .map_err(|e| CliError::new(1, format!("cannot create {}: {e}", disk.display())))?;
        let listen = format!("127.0.0.1:{}", a.storaged_base_port + i as u16 - 1);
        let metrics = format!("127.0.0.1:{}", a.metrics_base_port + i as u16 - 1);
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(dir.join("storaged.log"))
            .map_err(|e| CliError::new(1, format!("cannot create a log file: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| CliError::new(1, e.to_string()))?;
        let child = Command::new(&storaged)
            .args(["--listen", &listen, "--metrics-listen", &metrics])
            .args(["--node-id", &name, "--zone", &zone])
            .arg("--disk")
            .arg(&disk)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| CliError::new(1, format!("cannot start {name}: {e}")))?;
        nodes.push(Node {
            name,
            zone,
            child,
            listen,
            metrics,
        });
        // Wait until it serves, or report why it did not.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ready.exists() {
                break;
            }
            let n = nodes.last_mut().expect("just pushed");
            if let Ok(Some(s)) = n.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("storaged.log")).unwrap_or_default();
                let name = n.name.clone();
                nodes.pop();
                stop_all(&mut nodes);
                return Err(CliError::new(
                    1,
                    format!("{name} exited ({s}):\n{}", log.trim_end()),
                ));
            }
            if Instant::now() > deadline {
                stop_all(&mut nodes);
                return Err(CliError::new(1, "a storaged did not start within 60s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let cluster = serde_json::json!({
        "s3_endpoint": null,
        "metad_endpoints": [],
        "storaged_endpoints": nodes.iter().map(|n| n.listen.clone()).collect::<Vec<_>>(),
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
                "sov cluster up ({} storage nodes); state in {}",
                nodes.len(),
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
