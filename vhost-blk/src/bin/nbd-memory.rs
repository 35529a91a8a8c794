//! A test server: the in-memory exports of [`vhost_blk::mem`] over NBD, for protocol tests
//! with real clients that need no cluster.
//! Usage: nbd-memory <tcp-addr> <unix-socket-path>
use std::sync::Arc;

use vhost_blk::mem::MemExports;
use vhost_blk::nbd::NbdServer;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let sock = args.next().unwrap_or_else(|| "/tmp/nbd-memory.sock".into());
    let _ = std::fs::remove_file(&sock);
    let tcp = tokio::net::TcpListener::bind(&addr).await?;
    let unix = tokio::net::UnixListener::bind(&sock)?;
    eprintln!("listening on {} and {sock}", tcp.local_addr()?);
    let server = Arc::new(NbdServer::new(Arc::new(MemExports::standard())));
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut rx2 = stop_rx.clone();
    let t = tokio::spawn(server.clone().serve_tcp(tcp, async move {
        let _ = rx2.wait_for(|v| *v).await;
    }));
    let mut rx3 = stop_rx;
    let u = tokio::spawn(server.serve_unix(unix, async move {
        let _ = rx3.wait_for(|v| *v).await;
    }));
    ctrl_c.await;
    let _ = stop_tx.send(true);
    let _ = t.await;
    let _ = u.await;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
