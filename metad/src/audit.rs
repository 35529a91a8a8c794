//! The audit log: an append-only, hash-chained list of every admin action and every refused
//! call, kept in the Raft state machine (so every member holds it and snapshots carry it).
//!
//! Records are written only by [`crate::store::Command::AuditAppend`], whose apply numbers them
//! and links each to the one before (`prev_hash`, `hash`); apply refuses every other write to
//! the `audit/` keys. Who a caller is comes from its verified certificate ([`Origin`]); a
//! member forwarding a call to the leader passes the original caller on in `x-sov-origin`,
//! which the leader believes only from another member.

use sov_common::tls::{PeerInfo, Role};
use sov_proto::metad::AuditRecord;
use tonic::Request;

/// Every audit key starts with this; nothing but `AuditAppend` may write under it.
pub const PREFIX: &[u8] = b"audit/";
/// `audit/r/<seq as 16 hex digits>`: the records.
pub const RECORDS: &[u8] = b"audit/r/";
/// The next sequence number (8 bytes, big-endian).
pub const NEXT: &[u8] = b"audit/next";
/// The hash of the newest record (hex).
pub const HEAD: &[u8] = b"audit/head";

/// The metadata key that carries the original caller through a forward.
pub const ORIGIN_HEADER: &str = "x-sov-origin";

pub fn record_key(seq: u64) -> Vec<u8> {
    let mut k = RECORDS.to_vec();
    k.extend_from_slice(format!("{seq:016x}").as_bytes());
    k
}

pub use sov_client::audit::{chain_hash, verify_chain};

/// Who made a call, as the audit log names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// `role:name`, or `anonymous` (a plaintext test cluster).
    pub principal: String,
    /// `cert:<serial>`, or `none`.
    pub auth: String,
    /// The caller's address.
    pub from: String,
}

impl Origin {
    pub fn of_peer(peer: Option<&PeerInfo>) -> Origin {
        let from = peer
            .and_then(|p| p.remote)
            .map(|a| a.to_string())
            .unwrap_or_default();
        match peer.and_then(|p| p.identity.as_ref().map(|i| (i, &p.serial))) {
            Some((id, serial)) => Origin {
                principal: format!("{}:{}", id.role, id.name),
                auth: format!("cert:{}", sov_common::pki::hex_of(serial)),
                from,
            },
            None => Origin {
                principal: "anonymous".into(),
                auth: "none".into(),
                from,
            },
        }
    }

    /// The caller of `req`: the forwarded original when a member passed it on, else the peer.
    pub fn of<T>(req: &Request<T>) -> Origin {
        let peer = req.extensions().get::<PeerInfo>();
        let from_member = peer
            .and_then(|p| p.identity.as_ref())
            .is_none_or(|id| id.role == Role::Metad);
        if from_member
            && let Some(o) = req
                .metadata()
                .get(ORIGIN_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(Origin::parse)
        {
            return o;
        }
        Origin::of_peer(peer)
    }

    /// The header form: `principal|auth|from` (none of them holds a `|`).
    pub fn header(&self) -> String {
        format!("{}|{}|{}", self.principal, self.auth, self.from)
    }

    fn parse(s: &str) -> Option<Origin> {
        let mut p = s.splitn(3, '|');
        Some(Origin {
            principal: p.next()?.to_string(),
            auth: p.next()?.to_string(),
            from: p.next()?.to_string(),
        })
    }
}

/// A gRPC code as the audit log writes it.
pub fn code_name(c: tonic::Code) -> String {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
    .to_string()
}

/// A record of a call (numbered and chained when applied).
pub fn record(
    origin: &Origin,
    method: &str,
    target: &str,
    result: Result<(), &tonic::Status>,
) -> AuditRecord {
    let (code, message) = match result {
        Ok(()) => ("OK".to_string(), String::new()),
        Err(s) => (code_name(s.code()), s.message().to_string()),
    };
    AuditRecord {
        unix_ms: crate::core::unix_ms(),
        principal: origin.principal.clone(),
        auth: origin.auth.clone(),
        from: origin.from.clone(),
        method: method.to_string(),
        target: target.to_string(),
        code,
        message,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_or_dropped_record_breaks_the_chain() {
        let mut prev = String::new();
        let mut log = Vec::new();
        for i in 1..=3 {
            let mut r = AuditRecord {
                seq: i,
                method: format!("M{i}"),
                prev_hash: prev.clone(),
                ..Default::default()
            };
            r.hash = chain_hash(&r);
            prev = r.hash.clone();
            log.push(r);
        }
        assert_eq!(verify_chain("", &log), Ok(()));
        let mut changed = log.clone();
        changed[1].code = "OK".into();
        assert_eq!(verify_chain("", &changed), Err(2));
        let dropped = vec![log[0].clone(), log[2].clone()];
        assert_eq!(verify_chain("", &dropped), Err(3));
    }

    #[test]
    fn origins_round_trip_through_the_header() {
        let o = Origin {
            principal: "admin:alice".into(),
            auth: "cert:0a".into(),
            from: "127.0.0.1:5".into(),
        };
        assert_eq!(Origin::parse(&o.header()), Some(o));
    }
}
