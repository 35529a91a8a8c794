//! metad's configuration: a TOML file (unknown fields rejected) whose values flags override.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use sov_common::config::ConfigError;
use sov_common::units::HumanDuration;

use crate::store::NodeId;

fn d(ms: u64) -> HumanDuration {
    HumanDuration(Duration::from_millis(ms))
}

/// Raft timing and log retention.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat period.
    pub heartbeat_interval: HumanDuration,
    /// A follower that hears nothing for a random time in [min, max] starts an election.
    /// Generous by default: two busy cores miss 300 ms deadlines.
    pub election_timeout_min: HumanDuration,
    pub election_timeout_max: HumanDuration,
    /// Take a snapshot (and let the log be purged) after this many applied entries.
    pub snapshot_logs: u64,
    /// Entries kept in the log behind the snapshot, for followers slightly behind.
    pub keep_logs: u64,
    /// Longest a write waits for its commit before it fails with DEADLINE_EXCEEDED.
    pub write_timeout: HumanDuration,
    /// Most commands in one log entry.
    pub max_batch: usize,
    /// Log entries being replicated at once; more wait and join the next batch.
    pub max_inflight: usize,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_interval: d(250),
            election_timeout_min: d(1000),
            election_timeout_max: d(2000),
            snapshot_logs: 20_000,
            keep_logs: 1_000,
            write_timeout: d(5_000),
            max_batch: 4096,
            max_inflight: 1,
        }
    }
}

/// Storage node liveness.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// How often storaged heartbeats (told to it when it registers).
    pub heartbeat_interval: HumanDuration,
    /// Silent this long: `down` (I/O goes around it, no data moves).
    pub down_after: HumanDuration,
    /// Silent this long: `out` (its placement groups move to other nodes).
    pub out_after: HumanDuration,
    /// How long the data of a deleted or replaced object version stays on the storage nodes
    /// before they free it (reads that began before the delete finish meanwhile).
    pub delete_grace: HumanDuration,
    /// Multipart uploads not completed or aborted within this are aborted (their parts freed).
    pub upload_expiry: HumanDuration,
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            heartbeat_interval: d(1_000),
            down_after: d(10_000),
            out_after: d(600_000),
            delete_grace: d(60_000),
            upload_expiry: d(7 * 24 * 3600 * 1000),
        }
    }
}

/// The whole configuration of one metad member.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetadConfig {
    /// This member's id (> 0), unique in the cluster and never reused.
    pub id: NodeId,
    /// gRPC address (Raft between members, the API for everyone).
    pub listen: String,
    /// Address other members and clients use to reach this one; defaults to `listen`.
    pub advertise: Option<String>,
    /// Prometheus `/metrics` address.
    pub metrics_listen: String,
    /// Where the member's RocksDB lives.
    pub data_dir: PathBuf,
    /// The initial members as `id=host:port`, this one included. The member with the lowest id
    /// forms the cluster on first start. Empty: a single-member cluster, unless `join`.
    pub peers: Vec<String>,
    /// Start empty and wait to be added with `sov metad add`.
    pub join: bool,
    /// File holding the 32-byte master key (64 hex digits); it must not be readable by others.
    /// Without it, access keys and data keys are refused.
    pub master_key_file: Option<PathBuf>,
    /// Earlier master keys, still accepted for opening what they wrapped until `sov master-key
    /// rotate` has re-wrapped everything under the current one.
    pub old_master_key_files: Vec<PathBuf>,
    /// TLS directory (`ca.pem`, `cert.pem`, `key.pem`, `crl.der`) with a `metad` certificate:
    /// every connection to and from this member is mutual TLS.
    pub tls_dir: Option<PathBuf>,
    /// Serve and dial without TLS; refused unless every address is loopback.
    pub insecure_plaintext: bool,
    pub raft: RaftConfig,
    pub nodes: NodesConfig,
}

impl Default for MetadConfig {
    fn default() -> Self {
        MetadConfig {
            id: 1,
            listen: "127.0.0.1:7400".into(),
            advertise: None,
            metrics_listen: "127.0.0.1:9400".into(),
            data_dir: PathBuf::from("metad-data"),
            peers: Vec::new(),
            join: false,
            master_key_file: None,
            old_master_key_files: Vec::new(),
            tls_dir: None,
            insecure_plaintext: false,
            raft: RaftConfig::default(),
            nodes: NodesConfig::default(),
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses `id=host:port`.
pub fn parse_peer(s: &str) -> Result<(NodeId, String), ConfigError> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| invalid("peers", format!("{s:?} is not id=host:port")))?;
    let id: NodeId = id
        .trim()
        .parse()
        .map_err(|_| invalid("peers", format!("{s:?}: the id is not a number")))?;
    if id == 0 || addr.trim().is_empty() {
        return Err(invalid(
            "peers",
            format!("{s:?}: id must be > 0 and the address set"),
        ));
    }
    Ok((id, addr.trim().to_string()))
}

impl MetadConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(invalid("id", "must be greater than 0"));
        }
        let peers = self.parsed_peers()?;
        if !peers.is_empty() && !peers.iter().any(|(id, _)| *id == self.id) {
            return Err(invalid(
                "peers",
                format!("must include this member (id {})", self.id),
            ));
        }
        let r = &self.raft;
        // Checked: a heartbeat past half of Duration::MAX is refused, not a panic.
        if r.heartbeat_interval
            .0
            .checked_mul(2)
            .is_none_or(|twice| r.election_timeout_min.0 <= twice)
        {
            return Err(invalid(
                "raft.election_timeout_min",
                "must be more than twice the heartbeat interval",
            ));
        }
        if r.election_timeout_max.0 <= r.election_timeout_min.0 {
            return Err(invalid(
                "raft.election_timeout_max",
                "must be greater than election_timeout_min",
            ));
        }
        if r.snapshot_logs == 0 || r.max_batch == 0 || r.max_inflight == 0 {
            return Err(invalid(
                "raft",
                "snapshot_logs, max_batch and max_inflight must be at least 1",
            ));
        }
        if self.nodes.out_after.0 < self.nodes.down_after.0 {
            return Err(invalid(
                "nodes.out_after",
                "must not be shorter than down_after",
            ));
        }
        Ok(())
    }

    /// `peers`, parsed.
    pub fn parsed_peers(&self) -> Result<Vec<(NodeId, String)>, ConfigError> {
        self.peers.iter().map(|p| parse_peer(p)).collect()
    }

    /// The address others reach this member at.
    pub fn advertised(&self, bound: std::net::SocketAddr) -> String {
        self.advertise.clone().unwrap_or_else(|| bound.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_heartbeat_is_refused_not_a_panic() {
        let c: MetadConfig = sov_common::config::parse_toml(
            "[raft]\nheartbeat_interval = \"9300000000000000000s\"\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("election_timeout_min"), "{e}");
    }
}
