//! The fuzz targets of sov: one function per target, each the whole body of a libFuzzer
//! target in `fuzz/` (`cargo fuzz run <name>`) and replayed over `fuzz/corpus/<name>/` and
//! `fuzz/regressions/<name>/` by this crate's tests. Every function takes any bytes and must
//! never panic; where the code under test promises something (a round trip, an answer for
//! every request, a server that still serves the next client), the function asserts it, so a
//! broken promise is a crash too.
//!
//! Each target reaches what a stranger's bytes reach in production: the NBD server and the
//! vhost-user-blk backend of vhost-blk, storaged's on-disk formats (segment records, extent
//! metadata, the fence file) and its recovery scan, the shard header and manifest formats, the
//! TOML config files and their units, and the S3 gateway (what it parses beyond `s3s`, and raw
//! HTTP through the whole service). See `docs/fuzzing.md`.

mod config;
mod nbd;
mod rt;
mod s3;
mod storage;
mod vhost;

pub use config::config_files;
pub use nbd::{nbd_session, nbd_transmission};
pub use s3::{s3_http, s3_request};
pub use storage::{chunk_record, extent_meta, segment_recovery};
pub use vhost::{vhost_user_messages, virtio_descriptors};

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `fuzz/fuzz_targets/*.rs` and of the corpus folders).
pub const TARGETS: &[(&str, Target)] = &[
    ("nbd_session", nbd_session),
    ("nbd_transmission", nbd_transmission),
    ("vhost_user_messages", vhost_user_messages),
    ("virtio_descriptors", virtio_descriptors),
    ("chunk_record", chunk_record),
    ("segment_recovery", segment_recovery),
    ("extent_meta", extent_meta),
    ("config_files", config_files),
    ("s3_request", s3_request),
    ("s3_http", s3_http),
];
