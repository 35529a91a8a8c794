//! storaged's configuration: a TOML file (unknown fields rejected) whose values flags override.

use std::path::PathBuf;

use serde::Deserialize;
use sov_common::config::ConfigError;
use sov_common::units::{ByteSize, HumanDuration, Rate};

/// Which I/O engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IoEngineChoice {
    /// io_uring if the kernel allows it, else pread/pwrite threads.
    Auto,
    /// io_uring; start-up fails without it.
    #[value(name = "io_uring", alias = "uring")]
    IoUring,
    /// pread/pwrite on a thread pool.
    Pread,
}

/// Scrub settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubConfig {
    /// Run the scrub worker at all.
    pub enabled: bool,
    /// Read rate per disk ("0" = unlimited).
    pub rate: Rate,
    /// Pause between two passes over a disk.
    pub interval: HumanDuration,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            enabled: true,
            rate: Rate(64 << 20),
            interval: HumanDuration(std::time::Duration::from_secs(24 * 3600)),
        }
    }
}

/// Compaction settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// Run the compaction worker at all.
    pub enabled: bool,
    /// Share of a sealed segment that must be garbage before it is rewritten, in (0, 1].
    pub garbage_ratio: f64,
    /// How often to look for a segment to compact when none qualified.
    pub interval: HumanDuration,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            enabled: true,
            garbage_ratio: 0.5,
            interval: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

/// Recovery settings: pulling what this node's placement groups lack, deleting strays,
/// freeing tombstoned data. Runs only with `metad` set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Run the recovery worker at all.
    pub enabled: bool,
    /// Bytes per second pulled from peers ("0" = unlimited).
    pub rate: Rate,
    /// Pause between passes when nothing changed (an epoch change starts one at once).
    pub interval: HumanDuration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            enabled: true,
            rate: Rate(128 << 20),
            interval: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

/// The whole configuration of one storaged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoragedConfig {
    /// gRPC API address (port 0 picks a free port).
    pub listen: String,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: String,
    /// Directories, one per disk, each on the filesystem it stands for.
    pub disks: Vec<PathBuf>,
    /// Name of this node; defaults to the host name and the listen port.
    pub node_id: Option<String>,
    /// Availability zone of this node.
    pub zone: String,
    /// metad members to register with and heartbeat to (`host:port`); empty: standalone.
    pub metad: Vec<String>,
    /// Address metad hands out for this node; defaults to the bound listen address.
    pub advertise: Option<String>,
    /// TLS directory (`ca.pem`, `cert.pem`, `key.pem`, `crl.der`) with a `storaged`
    /// certificate whose name is this node's id and whose zone is its zone.
    pub tls_dir: Option<PathBuf>,
    /// Serve and dial without TLS; refused unless every address is loopback.
    pub insecure_plaintext: bool,
    /// Disk I/O engine.
    pub io_engine: IoEngineChoice,
    /// Largest chunk accepted.
    pub max_chunk_size: ByteSize,
    /// Size at which a segment file is sealed.
    pub segment_size: ByteSize,
    /// Free space kept back on each disk for the index and for deletes.
    pub reserved_space: ByteSize,
    /// Most bytes written by one group commit.
    pub max_batch: ByteSize,
    /// Most bytes of chunk data held in memory by Puts being received.
    pub put_memory: ByteSize,
    /// A Put stream that sends nothing for this long is aborted.
    pub request_idle_timeout: HumanDuration,
    /// How long SIGTERM waits for requests in flight.
    pub drain_timeout: HumanDuration,
    pub scrub: ScrubConfig,
    pub compaction: CompactionConfig,
    pub recovery: RecoveryConfig,
}

impl Default for StoragedConfig {
    fn default() -> Self {
        StoragedConfig {
            listen: "127.0.0.1:7100".into(),
            metrics_listen: "127.0.0.1:9100".into(),
            disks: Vec::new(),
            node_id: None,
            zone: "default".into(),
            metad: Vec::new(),
            advertise: None,
            tls_dir: None,
            insecure_plaintext: false,
            io_engine: IoEngineChoice::Auto,
            max_chunk_size: ByteSize(16 << 20),
            segment_size: ByteSize(256 << 20),
            reserved_space: ByteSize(64 << 20),
            max_batch: ByteSize(64 << 20),
            put_memory: ByteSize(512 << 20),
            request_idle_timeout: HumanDuration(std::time::Duration::from_secs(30)),
            drain_timeout: HumanDuration(std::time::Duration::from_secs(30)),
            scrub: ScrubConfig::default(),
            compaction: CompactionConfig::default(),
            recovery: RecoveryConfig::default(),
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl StoragedConfig {
    /// Checks values that parse but cannot work; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.disks.is_empty() {
            return Err(invalid(
                "disks",
                "at least one disk is needed (--disk PATH)",
            ));
        }
        let max = self.max_chunk_size.0;
        if max == 0 || max > 1 << 30 {
            return Err(invalid("max_chunk_size", "must be between 1B and 1GiB"));
        }
        if self.segment_size.0 < max + 4096 {
            return Err(invalid(
                "segment_size",
                "must exceed max_chunk_size by at least 4KiB",
            ));
        }
        if self.max_batch.0 == 0 {
            return Err(invalid("max_batch", "must be positive"));
        }
        if self.put_memory.0 < max {
            return Err(invalid("put_memory", "must be at least max_chunk_size"));
        }
        let r = self.compaction.garbage_ratio;
        if !(r > 0.0 && r <= 1.0) {
            return Err(invalid("compaction.garbage_ratio", "must be in (0, 1]"));
        }
        if self.zone.is_empty() {
            return Err(invalid("zone", "must not be empty"));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.disks {
            if !seen.insert(d) {
                return Err(invalid("disks", format!("{} is listed twice", d.display())));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file_with_human_units() {
        let c: StoragedConfig = sov_common::config::parse_toml(
            r#"
            listen = "0.0.0.0:7100"
            disks = ["/a", "/b"]
            zone = "eu-1a"
            io_engine = "pread"
            max_chunk_size = "8MiB"
            segment_size = "128MiB"
            [scrub]
            rate = "10MiB/s"
            interval = "1h"
            [compaction]
            garbage_ratio = 0.3
            "#,
        )
        .unwrap();
        assert_eq!(c.max_chunk_size.0, 8 << 20);
        assert_eq!(c.io_engine, IoEngineChoice::Pread);
        assert_eq!(c.scrub.rate.0, 10 << 20);
        c.validate().unwrap();
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let err = sov_common::config::parse_toml::<StoragedConfig>("disk = [\"/a\"]").unwrap_err();
        assert!(err.contains("disk"), "{err}");
        let err =
            sov_common::config::parse_toml::<StoragedConfig>("[scrub]\nspeed = 1").unwrap_err();
        assert!(err.contains("speed"), "{err}");
        let c = StoragedConfig::default();
        assert!(c.validate().unwrap_err().to_string().contains("disks"));
        let c = StoragedConfig {
            disks: vec!["/a".into()],
            segment_size: ByteSize(1 << 20),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("segment_size")
        );
    }
}
