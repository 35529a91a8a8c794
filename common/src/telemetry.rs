//! Telemetry: `tracing` logs configured from `RUST_LOG`, and the `/metrics` HTTP endpoint that
//! serves a Prometheus registry in the classic text format (what `promtool check metrics` reads).

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Starts `tracing` logging to stderr; `RUST_LOG` picks levels, `info` by default.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Encodes every metric of `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("encoding gathered metrics into a Vec cannot fail");
    String::from_utf8(buf).expect("the text encoder writes UTF-8")
}

/// Serves `GET /metrics` (and `GET /health`) on `listener` until shutdown.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        encode(&registry),
                    )
                        .into_response()
                }
            }),
        )
        .route("/health", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

/// Binds a TCP listener, with an error that names the address.
pub async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    use anyhow::Context;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_with_help_and_type() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("sov_test_events_total", "Events seen.").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc_by(3);
        let text = encode(&registry);
        assert!(text.contains("# HELP sov_test_events_total Events seen."));
        assert!(text.contains("# TYPE sov_test_events_total counter"));
        assert!(text.contains("sov_test_events_total 3"));
    }
}
