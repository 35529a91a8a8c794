//! Per-operation metrics and the request id, around the s3s service: requests by operation and
//! result code (the S3 error code for errors), latency, bytes in and out.

use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use s3s::service::S3Service;

use crate::auth::OpSlot;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    seconds: HistogramVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_requests_total",
                "S3 requests by operation and result (OK or the S3 error code).",
            ),
            &["op", "code"],
        )
        .expect("valid metric");
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "gateway_request_duration_seconds",
                "S3 request latency until the response head, by operation.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        let bytes_in = IntCounterVec::new(
            Opts::new(
                "gateway_received_bytes_total",
                "Request body bytes by operation (Content-Length).",
            ),
            &["op"],
        )
        .expect("valid metric");
        let bytes_out = IntCounterVec::new(
            Opts::new(
                "gateway_sent_bytes_total",
                "Response body bytes by operation (Content-Length).",
            ),
            &["op"],
        )
        .expect("valid metric");
        for c in [&requests, &bytes_in, &bytes_out] {
            r.register(Box::new(c.clone())).expect("unique metric");
        }
        r.register(Box::new(seconds.clone()))
            .expect("unique metric");
        Metrics {
            registry: r,
            requests,
            seconds,
            bytes_in,
            bytes_out,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn content_length(h: &http::HeaderMap) -> u64 {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The `<Code>` of an S3 error body.
fn error_code(body: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(body).ok()?;
    let from = s.find("<Code>")? + 6;
    let to = from + s[from..].find("</Code>")?;
    Some(s[from..to].to_string())
}

/// Serves one request through s3s, with a request id and metrics.
pub async fn serve(
    svc: &S3Service,
    m: &Metrics,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<s3s::Body>, s3s::HttpError> {
    let start = Instant::now();
    let bytes_in = content_length(req.headers());
    let slot = OpSlot::default();
    let mut req = req.map(s3s::Body::from);
    req.extensions_mut().insert(slot.clone());
    let id = hex::encode(rand::random::<[u8; 8]>()).to_uppercase();
    let mut resp = svc.call(req).await?;
    if let Ok(v) = http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-amz-request-id", v.clone());
        resp.headers_mut().insert("x-amz-id-2", v);
    }
    let op = slot
        .0
        .lock()
        .expect("op slot")
        .take()
        .unwrap_or_else(|| "Unknown".to_string());
    let status = resp.status();
    let code = if status.is_success() {
        "OK".to_string()
    } else {
        resp.body()
            .bytes()
            .as_deref()
            .and_then(error_code)
            .unwrap_or_else(|| status.as_u16().to_string())
    };
    m.requests.with_label_values(&[&op, &code]).inc();
    m.seconds
        .with_label_values(&[&op])
        .observe(start.elapsed().as_secs_f64());
    m.bytes_in.with_label_values(&[&op]).inc_by(bytes_in);
    m.bytes_out
        .with_label_values(&[&op])
        .inc_by(content_length(resp.headers()));
    Ok(resp)
}
