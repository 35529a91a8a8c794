//! `sov-bench tls`: what mutual TLS costs the links between sov daemons, measured on loopback
//! in one process with the certificates and configurations the daemons use
//! (`sov_common::tls`, rustls on aws-lc-rs). One stream carrying bulk data, plain TCP against
//! mutual TLS 1.3; and full mutual-TLS handshakes, the hybrid post-quantum X25519MLKEM768 the
//! daemons negotiate against classic X25519. Every received byte count is checked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args as ClapArgs;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sov_common::pki::{Ca, CertRequest};
use sov_common::tls::{NodeIdentity, Role, TlsContext};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Shorter run (for the smoke test).
    #[arg(long)]
    quick: bool,
    /// Also write the results file for `sov-bench report` here.
    #[arg(long)]
    results: Option<std::path::PathBuf>,
}

const WRITE: usize = 256 << 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Reads exactly `total` bytes, then answers one byte.
async fn sink<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, total: usize) -> anyhow::Result<()> {
    let mut buf = vec![0u8; WRITE];
    let mut got = 0;
    while got < total {
        let n = s.read(&mut buf).await?;
        ensure!(n > 0, "the stream ended after {got} of {total} bytes");
        got += n;
    }
    ensure!(got == total, "received {got} bytes, sent {total}");
    s.write_all(b"k").await?;
    s.flush().await?;
    Ok(())
}

/// Sends `total` bytes and waits for the answer; the time of that, after any handshake.
async fn source<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    total: usize,
) -> anyhow::Result<Duration> {
    let data = vec![0x5au8; WRITE];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = WRITE.min(total - sent);
        s.write_all(&data[..n]).await?;
        sent += n;
    }
    s.flush().await?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await?;
    Ok(t.elapsed())
}

/// MiB/s of one loopback stream of `total` bytes, with TLS or without.
async fn stream(tls: Option<(&TlsContext, &TlsContext)>, total: usize) -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let acceptor = tls.map(|(s, _)| tokio_rustls::TlsAcceptor::from(s.server_config()));
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await?;
        tcp.set_nodelay(true)?;
        match acceptor {
            Some(a) => sink(a.accept(tcp).await?, total).await,
            None => sink(tcp, total).await,
        }
    });
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let took = match tls {
        Some((_, c)) => {
            let name = ServerName::try_from(Role::Storaged.dns_name())?;
            let s = tokio_rustls::TlsConnector::from(c.client_config())
                .connect(name, tcp)
                .await?;
            source(s, total).await?
        }
        None => source(tcp, total).await?,
    };
    server.await??;
    Ok(total as f64 / (1 << 20) as f64 / took.as_secs_f64())
}

/// Full mutual-TLS handshakes per second, one after the other, and the group they agreed on.
async fn handshakes(
    server: &TlsContext,
    client: Arc<ClientConfig>,
    n: usize,
) -> anyhow::Result<(f64, String)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
    let srv = tokio::spawn(async move {
        for _ in 0..n {
            let (tcp, _) = l.accept().await?;
            let mut s = acceptor.accept(tcp).await?;
            // One byte each way: the client's certificate has been checked by now.
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            s.write_all(&b).await?;
        }
        anyhow::Ok(())
    });
    let connector = tokio_rustls::TlsConnector::from(client);
    let mut group = String::new();
    let t = Instant::now();
    for _ in 0..n {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(Role::Storaged.dns_name())?;
        let mut s = connector.connect(name, tcp).await?;
        s.write_all(b"h").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        group = s
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_else(|| "none".into());
    }
    let took = t.elapsed();
    srv.await??;
    Ok((n as f64 / took.as_secs_f64(), group))
}

/// The client's configuration as the daemons build it, but with X25519 as its only group.
fn x25519_only(dir: &std::path::Path) -> anyhow::Result<Arc<ClientConfig>> {
    let p = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem"))? {
        roots.add(c?)?;
    }
    let chain =
        CertificateDer::pem_file_iter(dir.join("cert.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))?;
    let mut c = ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(c))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (total, hs, rounds) = if a.quick {
        (16 << 20, 20, 1)
    } else {
        (1 << 30, 300, 5)
    };
    let dir = tempfile::tempdir()?;
    let ca = Ca::init(&dir.path().join("ca"))?;
    let issue = |role, name: &str| -> anyhow::Result<std::sync::Arc<TlsContext>> {
        let d = dir.path().join(name);
        ca.issue_into(
            &CertRequest::node(NodeIdentity::new(role, Some("z1"), name)?),
            &d,
        )?;
        TlsContext::load(&d)
    };
    let server = issue(Role::Storaged, "storaged-1")?;
    let client = issue(Role::Gateway, "gateway-1")?;
    let classic = x25519_only(&dir.path().join("gateway-1"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (mut plain, mut tls, mut pq, mut x) = (vec![], vec![], vec![], vec![]);
    let (mut pq_group, mut x_group) = (String::new(), String::new());
    rt.block_on(async {
        for _ in 0..rounds {
            plain.push(stream(None, total).await.context("plain stream")?);
            tls.push(
                stream(Some((&server, &client)), total)
                    .await
                    .context("TLS stream")?,
            );
            let (r, g) = handshakes(&server, client.client_config(), hs).await?;
            pq.push(r);
            pq_group = g;
            let (r, g) = handshakes(&server, classic.clone(), hs).await?;
            x.push(r);
            x_group = g;
        }
        anyhow::Ok(())
    })?;
    ensure!(
        pq_group.contains("X25519MLKEM768"),
        "the daemons' configuration agreed on {pq_group}"
    );
    ensure!(
        x_group.contains("X25519") && !x_group.contains("MLKEM"),
        "{x_group}"
    );
    let (plain, tls, pq, x) = (median(plain), median(tls), median(pq), median(x));
    let mut md = String::new();
    crate::tee!(
        md,
        "One loopback stream, {} MiB in {} KiB writes, median of {rounds}, MiB/s\n",
        total >> 20,
        WRITE >> 10
    );
    crate::tee!(md, "| link | mutual TLS 1.3 | plain TCP | TLS / plain |");
    crate::tee!(md, "|---|---:|---:|---:|");
    crate::tee!(
        md,
        "| daemon to daemon | {tls:.0} | {plain:.0} | {:.2} |",
        tls / plain
    );
    crate::tee!(
        md,
        "\nFull mutual-TLS handshakes (ECDSA P-256 certificates, one after another), median of \
         {rounds}, handshakes/s\n"
    );
    crate::tee!(
        md,
        "| handshake | X25519MLKEM768 | X25519 | hybrid / classic |"
    );
    crate::tee!(md, "|---|---:|---:|---:|");
    crate::tee!(
        md,
        "| TLS 1.3, client certificate | {pq:.0} | {x:.0} | {:.2} |",
        pq / x
    );
    let tables = crate::results::tables_from_markdown(&md);
    let mut res = crate::results::BenchResult {
        bench: "tls".into(),
        title: "Mutual TLS between daemons: its cost on a stream and per handshake".into(),
        command: format!(
            "cargo build --release -p sov-bench && target/release/sov-bench tls{}",
            if a.quick { " --quick" } else { "" }
        ),
        setup: format!(
            "In one process on loopback, with sov_common::tls (rustls on aws-lc-rs, TLS 1.3, \
             the cipher suite both ends prefer) and certificates from sov_common::pki: one stream \
             of {} MiB, plain and TLS; {hs} handshakes with the daemons' key exchange \
             (agreed: {pq_group}) and with X25519 alone (agreed: {x_group}).",
            total >> 20
        ),
        ..Default::default()
    };
    if let Some(t) = tables.first() {
        res.headline.push(t.headline(
            0,
            "Loopback stream",
            "mutual TLS 1.3",
            "plain TCP",
            "plain TCP",
            "MiB/s",
        ));
    }
    if let Some(t) = tables.get(1) {
        res.headline.push(t.headline(
            0,
            "mTLS handshakes",
            "X25519MLKEM768",
            "X25519",
            "X25519 (classic)",
            "handshakes/s",
        ));
    }
    res.tables = tables;
    res.write_to(a.results.as_deref())?;
    Ok(())
}
