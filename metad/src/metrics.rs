//! metad's Prometheus metrics.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric metad exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub forwarded: IntCounterVec,
    pub read_rounds: IntCounter,
    pub batch_commands: Histogram,
    pub raft_term: IntGauge,
    pub raft_leader: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_last_log_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_snapshot_index: IntGauge,
    pub raft_members: IntGauge,
    pub snapshots_installed: IntGauge,
    pub cluster_epoch: IntGauge,
    pub nodes: IntGaugeVec,
    pub pools: IntGauge,
    pub audit_records: IntCounter,
    pub audit_failures: IntCounter,
    pub audit_dropped: IntCounter,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::new(name, help).expect("valid metric"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0,
        ];
        Metrics {
            audit_records: reg(
                &r,
                IntCounter::new(
                    "metad_audit_records_total",
                    "Audit records this member wrote (admin actions and refused calls).",
                )
                .expect("valid metric"),
            ),
            audit_failures: reg(
                &r,
                IntCounter::new(
                    "metad_audit_failures_total",
                    "Audit records that could not be written (no leader, shutting down).",
                )
                .expect("valid metric"),
            ),
            audit_dropped: reg(
                &r,
                IntCounter::new(
                    "metad_audit_refusals_dropped_total",
                    "Refused calls not recorded because too many came at once.",
                )
                .expect("valid metric"),
            ),
            requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "metad_requests_total",
                        "API requests by method and gRPC code.",
                    ),
                    &["method", "code"],
                )
                .expect("valid metric"),
            ),
            request_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "metad_request_duration_seconds",
                        "API request latency by method, forwarding included.",
                    )
                    .buckets(buckets),
                    &["method"],
                )
                .expect("valid metric"),
            ),
            forwarded: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "metad_forwarded_total",
                        "Requests this member passed on to the leader, by method.",
                    ),
                    &["method"],
                )
                .expect("valid metric"),
            ),
            read_rounds: reg(
                &r,
                IntCounter::new(
                    "metad_read_index_rounds_total",
                    "Read-index rounds run for linearizable reads (shared by concurrent reads).",
                )
                .expect("valid metric"),
            ),
            batch_commands: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "metad_proposal_batch_commands",
                        "Commands packed into one Raft log entry.",
                    )
                    .buckets(vec![
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            raft_term: gauge(&r, "metad_raft_term", "Current Raft term."),
            raft_leader: gauge(
                &r,
                "metad_raft_leader_id",
                "Id of the known leader (0: none).",
            ),
            raft_is_leader: gauge(&r, "metad_raft_is_leader", "1 on the leader."),
            raft_last_log_index: gauge(&r, "metad_raft_last_log_index", "Last log index."),
            raft_applied_index: gauge(&r, "metad_raft_applied_index", "Last applied index."),
            raft_snapshot_index: gauge(
                &r,
                "metad_raft_snapshot_index",
                "Last log index in the latest snapshot.",
            ),
            raft_members: gauge(&r, "metad_raft_voters", "Voting members."),
            snapshots_installed: gauge(
                &r,
                "metad_raft_snapshots_installed",
                "Snapshots installed from a leader since this process started.",
            ),
            cluster_epoch: gauge(&r, "metad_cluster_epoch", "Cluster map epoch."),
            nodes: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("metad_storage_nodes", "Storage nodes in the map, by state."),
                    &["state"],
                )
                .expect("valid metric"),
            ),
            pools: gauge(&r, "metad_pools", "Pools."),
            registry: r,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
