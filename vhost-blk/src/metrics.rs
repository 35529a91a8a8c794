//! vhost-blk's Prometheus metrics.

use prometheus::{
    CounterVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub bytes: IntCounterVec,
    pub qos_wait: CounterVec,
    pub exports: IntGauge,
    pub attach: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "vhost_blk_requests_total",
                "Block requests served, by operation and result.",
            ),
            &["op", "result"],
        )
        .expect("valid metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "vhost_blk_request_seconds",
                "Block request latency, by operation (after QoS waits).",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new("vhost_blk_bytes_total", "Bytes read, written or zeroed."),
            &["op"],
        )
        .expect("valid metric");
        let qos_wait = CounterVec::new(
            Opts::new(
                "vhost_blk_qos_wait_seconds_total",
                "Time requests waited for the volume's QoS limits.",
            ),
            &["volume"],
        )
        .expect("valid metric");
        let exports =
            IntGauge::new("vhost_blk_exports", "Volumes exported now.").expect("valid metric");
        let attach = IntCounterVec::new(
            Opts::new(
                "vhost_blk_attach_total",
                "Attach and detach steps taken, by step and result.",
            ),
            &["step", "result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(bytes.clone()),
            Box::new(qos_wait.clone()),
            Box::new(exports.clone()),
            Box::new(attach.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for op in ["read", "write", "write_zeroes", "trim", "flush"] {
            for r in ["ok", "error"] {
                requests.with_label_values(&[op, r]);
            }
            bytes.with_label_values(&[op]);
        }
        for step in ["attach", "detach"] {
            for r in ["ok", "error"] {
                attach.with_label_values(&[step, r]);
            }
        }
        Metrics {
            registry,
            requests,
            request_seconds,
            bytes,
            qos_wait,
            exports,
            attach,
        }
    }
}
