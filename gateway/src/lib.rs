//! gateway-s3: an S3 endpoint on `s3s` over sov-client (objects sealed, placed and verified by
//! the data path) and metad (buckets, the object index, multipart uploads, access keys).
//! Stateless: any number can run side by side against one cluster.
//!
//! Module map: [`auth`] (SigV4 secrets and per-bucket permissions), [`s3`] (the operations),
//! [`body`] (hashing request bodies, streaming responses), [`errors`] (metad and data-path
//! errors as S3 codes), [`metrics`].

pub mod auth;
pub mod body;
pub mod errors;
pub mod metrics;
pub mod s3;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::service::{S3Service, S3ServiceBuilder};
use sov_client::meta::MetaClient;
use sov_client::{Client, ClientConfig};
use sov_common::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::auth::{Access, Auth, Authz};
use crate::metrics::Metrics;
use crate::s3::{Gateway, Pools};

/// How the gateway is set up.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub metad: Vec<String>,
    pub pools: Pools,
    /// Reads prefer storage nodes in this zone.
    pub zone: Option<String>,
    /// HTTPS for S3 clients; `None` serves plain HTTP (only on loopback, see `main`).
    pub https: Option<Arc<rustls::ServerConfig>>,
}

/// What a started gateway tells whoever waits for it (`--ready-file`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub pid: u32,
}

/// The S3 service: `s3s` over [`Gateway`], with SigV4 secrets and permissions from metad.
pub fn s3_service(client: Client, meta: MetaClient, pools: Pools) -> S3Service {
    let authz = Authz::new(meta.clone());
    let gw = Gateway {
        client,
        meta,
        authz: authz.clone(),
        pools,
    };
    let mut b = S3ServiceBuilder::new(gw);
    b.set_auth(Auth(authz.clone()));
    b.set_access(Access(authz));
    b.build()
}

/// An HTTP/1.1 request with `Expect: 100-continue` and an empty body. The answer to it is the
/// final status without a `100 Continue` first (there is no body to ask for), which is right,
/// but botocore (boto3, the aws cli) keeps that status for the next request on the connection
/// and then waits for its read timeout: found by chaos/, where a 0-byte PUT followed by any
/// PUT with a body stalled 30 s. Such a response closes the connection instead.
fn expects_continue_without_body<B>(req: &http::Request<B>) -> bool {
    req.version() == http::Version::HTTP_11
        && req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        && req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
}

/// Serves one client connection (HTTP/1.1 or HTTP/2) until it closes.
pub async fn serve_connection<IO>(io: IO, svc: S3Service, metrics: Metrics)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let svc = svc.clone();
        let metrics = metrics.clone();
        let close = expects_continue_without_body(&req);
        async move {
            let mut resp = metrics::serve(&svc, &metrics, req).await;
            if close && let Ok(r) = resp.as_mut() {
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            resp
        }
    });
    if let Err(e) = ConnBuilder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Serves S3 on `s3` and `/metrics` on `metrics` until `shutdown`.
pub async fn run(
    cfg: GatewayConfig,
    s3: TcpListener,
    metrics_listener: TcpListener,
    mut shutdown: Shutdown,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let meta = MetaClient::new(&cfg.metad).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let crl_task = tokio::spawn(sov_client::meta::keep_crl_current(meta.clone()));
    let client = Client::with_meta(
        meta.clone(),
        ClientConfig {
            zone: cfg.zone.clone(),
            ..Default::default()
        },
    );
    let svc = s3_service(client, meta, cfg.pools.clone());
    let metrics = Metrics::new();
    let listen = s3.local_addr()?;
    let metrics_listen = metrics_listener.local_addr()?;
    let (mstop, msd) = sov_common::shutdown::channel();
    let metrics_task = tokio::spawn(sov_common::telemetry::serve_metrics(
        metrics_listener,
        metrics.registry.clone(),
        msd,
    ));
    tracing::info!(%listen, metrics = %metrics_listen, "gateway-s3 serving");
    if let Some(path) = ready_file {
        sov_common::daemon::write_ready_file(
            &path,
            &Ready {
                listen,
                metrics_listen,
                pid: std::process::id(),
            },
        )?;
    }
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            r = s3.accept() => r.context("accepting a connection")?,
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        match &cfg.https {
            None => {
                conns.spawn(serve_connection(stream, svc.clone(), metrics.clone()));
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                let (svc, metrics) = (svc.clone(), metrics.clone());
                conns.spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => serve_connection(tls, svc, metrics).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
        while conns.try_join_next().is_some() {}
    }
    // Let requests in flight finish for a while.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !conns.is_empty() && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(200), conns.join_next()).await;
    }
    conns.abort_all();
    crl_task.abort();
    mstop.trigger();
    let _ = metrics_task.await;
    tracing::info!("gateway-s3 stopped");
    Ok(())
}
