//! storaged's Prometheus metrics, registered once and shared by the service, the disks and the
//! workers.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric storaged exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub received_bytes: IntCounter,
    pub sent_bytes: IntCounter,
    pub disk_capacity: IntGaugeVec,
    pub disk_used: IntGaugeVec,
    pub disk_free: IntGaugeVec,
    pub disk_live: IntGaugeVec,
    pub disk_segment_bytes: IntGaugeVec,
    pub disk_chunks: IntGaugeVec,
    pub disk_healthy: IntGaugeVec,
    pub corrupt_found: IntCounterVec,
    pub scrub_chunks: IntCounterVec,
    pub scrub_bytes: IntCounterVec,
    pub scrub_passes: IntCounterVec,
    pub compaction_segments: IntCounterVec,
    pub compaction_reclaimed: IntCounterVec,
    pub compaction_relocated: IntCounterVec,
    pub syncs: IntCounterVec,
    pub group_commit_ops: Histogram,
    pub recovery_truncated: IntCounterVec,
    pub io_engine: IntGaugeVec,
    pub map_epoch: IntGauge,
    pub stale_epoch: IntCounter,
    pub repair_chunks: IntCounterVec,
    pub repair_bytes: IntCounter,
    pub repair_passes: IntCounter,
    pub repair_pgs: IntGaugeVec,
    pub repair_missing: IntGauge,
    pub repair_unrecoverable: IntGauge,
    pub tombstone_deletes: IntCounter,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let latency_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        Metrics {
            requests: counter_vec(
                &r,
                "storaged_requests_total",
                "gRPC requests handled, by operation and result code.",
                &["op", "code"],
            ),
            request_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "storaged_request_duration_seconds",
                        "gRPC request latency by operation.",
                    )
                    .buckets(latency_buckets),
                    &["op"],
                )
                .expect("valid metric"),
            ),
            received_bytes: reg(
                &r,
                IntCounter::new(
                    "storaged_received_bytes_total",
                    "Chunk payload bytes received by Put.",
                )
                .expect("valid metric"),
            ),
            sent_bytes: reg(
                &r,
                IntCounter::new(
                    "storaged_sent_bytes_total",
                    "Chunk payload bytes sent by Get.",
                )
                .expect("valid metric"),
            ),
            disk_capacity: gauge_vec(
                &r,
                "storaged_disk_capacity_bytes",
                "Size of the filesystem holding the disk.",
                &["disk"],
            ),
            disk_used: gauge_vec(
                &r,
                "storaged_disk_used_bytes",
                "Bytes used on the filesystem holding the disk.",
                &["disk"],
            ),
            disk_free: gauge_vec(
                &r,
                "storaged_disk_free_bytes",
                "Bytes available on the filesystem holding the disk.",
                &["disk"],
            ),
            disk_live: gauge_vec(
                &r,
                "storaged_disk_live_bytes",
                "Bytes of segment records that hold live chunks.",
                &["disk"],
            ),
            disk_segment_bytes: gauge_vec(
                &r,
                "storaged_disk_segment_bytes",
                "Bytes in segment files, live or garbage.",
                &["disk"],
            ),
            disk_chunks: gauge_vec(
                &r,
                "storaged_disk_chunks",
                "Live chunks on the disk.",
                &["disk"],
            ),
            disk_healthy: gauge_vec(
                &r,
                "storaged_disk_healthy",
                "1 when the disk takes writes, 0 when it is full or failed.",
                &["disk"],
            ),
            corrupt_found: counter_vec(
                &r,
                "storaged_corrupt_chunks_found_total",
                "Chunks that failed verification, by who found them (read, scrub, recovery).",
                &["disk", "found_by"],
            ),
            scrub_chunks: counter_vec(
                &r,
                "storaged_scrub_checked_chunks_total",
                "Chunks read and verified by scrub.",
                &["disk"],
            ),
            scrub_bytes: counter_vec(
                &r,
                "storaged_scrub_checked_bytes_total",
                "Bytes read and verified by scrub.",
                &["disk"],
            ),
            scrub_passes: counter_vec(
                &r,
                "storaged_scrub_passes_total",
                "Completed scrub passes over a disk.",
                &["disk"],
            ),
            compaction_segments: counter_vec(
                &r,
                "storaged_compaction_segments_total",
                "Segments rewritten and removed by compaction.",
                &["disk"],
            ),
            compaction_reclaimed: counter_vec(
                &r,
                "storaged_compaction_reclaimed_bytes_total",
                "Garbage bytes freed by compaction.",
                &["disk"],
            ),
            compaction_relocated: counter_vec(
                &r,
                "storaged_compaction_relocated_bytes_total",
                "Live bytes copied by compaction.",
                &["disk"],
            ),
            syncs: counter_vec(
                &r,
                "storaged_syncs_total",
                "fdatasync calls on segment files (one per group commit and segment).",
                &["disk"],
            ),
            group_commit_ops: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "storaged_group_commit_ops",
                        "Writes made durable by one group commit.",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                )
                .expect("valid metric"),
            ),
            recovery_truncated: counter_vec(
                &r,
                "storaged_recovery_truncated_bytes_total",
                "Torn bytes cut from segment tails at start-up.",
                &["disk"],
            ),
            io_engine: gauge_vec(
                &r,
                "storaged_io_engine_info",
                "The disk I/O engine in use (value 1).",
                &["engine"],
            ),
            map_epoch: reg(
                &r,
                IntGauge::new(
                    "storaged_map_epoch",
                    "Cluster map epoch this node knows (0 without metad).",
                )
                .expect("valid metric"),
            ),
            stale_epoch: reg(
                &r,
                IntCounter::new(
                    "storaged_stale_epoch_total",
                    "Puts refused because the writer's map was older than this node's.",
                )
                .expect("valid metric"),
            ),
            repair_chunks: counter_vec(
                &r,
                "storaged_repair_chunks_total",
                "Pieces written or removed by the recovery worker: copy (from a peer), rebuild \
                 (erasure decode), heal (replacing a corrupt one), stray (deleted, held elsewhere).",
                &["kind"],
            ),
            repair_bytes: reg(
                &r,
                IntCounter::new(
                    "storaged_repair_bytes_total",
                    "Bytes pulled from peers by the recovery worker.",
                )
                .expect("valid metric"),
            ),
            repair_passes: reg(
                &r,
                IntCounter::new(
                    "storaged_repair_passes_total",
                    "Completed recovery passes over every placement group.",
                )
                .expect("valid metric"),
            ),
            repair_pgs: gauge_vec(
                &r,
                "storaged_repair_pass_pgs",
                "Placement groups of the running recovery pass: done and total.",
                &["state"],
            ),
            repair_missing: reg(
                &r,
                IntGauge::new(
                    "storaged_repair_missing",
                    "Pieces this node lacked in its last finished recovery pass.",
                )
                .expect("valid metric"),
            ),
            repair_unrecoverable: reg(
                &r,
                IntGauge::new(
                    "storaged_repair_unrecoverable",
                    "Pieces the last recovery pass could not get from any peer.",
                )
                .expect("valid metric"),
            ),
            tombstone_deletes: reg(
                &r,
                IntCounter::new(
                    "storaged_tombstone_deletes_total",
                    "Chunks freed because their object version was deleted or replaced.",
                )
                .expect("valid metric"),
            ),
            registry: r,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
