//! The audit log's hash chain, as metad writes it and `sov audit verify` checks it.

use prost::Message;
use sov_proto::metad::AuditRecord;

/// The chain hash of a record: blake3 of its encoding with `hash` empty (`prev_hash` set).
pub fn chain_hash(r: &AuditRecord) -> String {
    let mut r = r.clone();
    r.hash.clear();
    blake3::hash(&r.encode_to_vec()).to_hex().to_string()
}

/// Checks a run of records, oldest first: each hash right and linked to the one before
/// (`prev` is the hash before the first; empty for the start of the log). Returns the first
/// broken sequence number.
pub fn verify_chain(prev: &str, records: &[AuditRecord]) -> Result<(), u64> {
    let mut prev = prev.to_string();
    for r in records {
        if r.prev_hash != prev || chain_hash(r) != r.hash {
            return Err(r.seq);
        }
        prev = r.hash.clone();
    }
    Ok(())
}
