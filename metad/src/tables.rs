//! The tables on top of the state machine's ordered map: key layout, validation of names, and
//! the object listing. Pure functions of their arguments (and a state machine to read), so
//! they are tested without a cluster.
//!
//! Key layout (each table a key range, ready to be split by range later):
//! `map/epoch` (u64, big-endian), `node/<id>` (Node), `pool/<name>` (Pool),
//! `meta/next_pool_id` (u64), `bucket/<name>` (Bucket), `obj/<bucket>/<key>` (ObjectVersion),
//! `akey/<access key id>` and `dkey/<id>` (JSON records holding sealed secrets), `vol/<name>`
//! (Volume). Protobuf
//! records are the generated `sov.metad.v1` messages.

use serde::{Deserialize, Serialize};
use sov_proto::metad::ObjectVersion;

use crate::store::{StateMachine, Walk};

pub const EPOCH_KEY: &[u8] = b"map/epoch";
pub const NEXT_POOL_ID_KEY: &[u8] = b"meta/next_pool_id";
pub const NODE_PREFIX: &[u8] = b"node/";
pub const POOL_PREFIX: &[u8] = b"pool/";
pub const BUCKET_PREFIX: &[u8] = b"bucket/";
pub const AKEY_PREFIX: &[u8] = b"akey/";
pub const DKEY_PREFIX: &[u8] = b"dkey/";
pub const TOMB_PREFIX: &[u8] = b"tomb/";
pub const UPLOAD_PREFIX: &[u8] = b"upl/";
pub const PART_PREFIX: &[u8] = b"part/";
pub const VOLUME_PREFIX: &[u8] = b"vol/";

/// S3's limit on object key length, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest object record (manifest and metadata included): Raft entries stay small enough to
/// replicate within a heartbeat interval.
pub const MAX_RECORD: usize = 1 << 20;
/// Largest page of a listing.
pub const MAX_LIST: usize = 1000;

fn key(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn node_key(id: &str) -> Vec<u8> {
    key(NODE_PREFIX, id)
}
pub fn pool_key(name: &str) -> Vec<u8> {
    key(POOL_PREFIX, name)
}
pub fn bucket_key(name: &str) -> Vec<u8> {
    key(BUCKET_PREFIX, name)
}
pub fn akey_key(id: &str) -> Vec<u8> {
    key(AKEY_PREFIX, id)
}
/// `upl/<bucket>/<key>\0<upload id>`: uploads of a bucket sort by key, then by upload id
/// (which starts with the creation time). Keys hold no NUL.
pub fn upload_key(bucket: &str, key: &str, id: &str) -> Vec<u8> {
    [
        UPLOAD_PREFIX,
        bucket.as_bytes(),
        b"/",
        key.as_bytes(),
        b"\0",
        id.as_bytes(),
    ]
    .concat()
}

pub fn uploads_prefix(bucket: &str) -> Vec<u8> {
    [UPLOAD_PREFIX, bucket.as_bytes(), b"/"].concat()
}

/// `part/<upload id>/<part number, 5 digits>`.
pub fn part_key(upload: &str, n: u32) -> Vec<u8> {
    [PART_PREFIX, format!("{upload}/{n:05}").as_bytes()].concat()
}

pub fn parts_prefix(upload: &str) -> Vec<u8> {
    [PART_PREFIX, upload.as_bytes(), b"/"].concat()
}

/// `vol/<name>`: a block volume with its snapshots, lease and attachment.
pub fn volume_key(name: &str) -> Vec<u8> {
    key(VOLUME_PREFIX, name)
}

pub fn tomb_key(id: &str) -> Vec<u8> {
    [TOMB_PREFIX, id.as_bytes()].concat()
}

pub fn dkey_key(id: &str) -> Vec<u8> {
    key(DKEY_PREFIX, id)
}

/// Where a bucket's objects start: `obj/<bucket>/`. Bucket names hold no `/`, so no bucket's
/// range overlaps another's.
pub fn objects_prefix(bucket: &str) -> Vec<u8> {
    let mut k = b"obj/".to_vec();
    k.extend_from_slice(bucket.as_bytes());
    k.push(b'/');
    k
}

pub fn object_key(bucket: &str, object: &str) -> Vec<u8> {
    let mut k = objects_prefix(bucket);
    k.extend_from_slice(object.as_bytes());
    k
}

pub fn encode_u64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

pub fn decode_u64(b: Option<&[u8]>) -> u64 {
    b.and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Checks S3's bucket naming rules; the error says which rule is broken.
pub fn validate_bucket_name(name: &str) -> Result<(), String> {
    let len = name.len();
    if !(3..=63).contains(&len) {
        return Err(format!(
            "bucket name must be 3 to 63 characters long, {name:?} has {len}"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Err(format!(
            "bucket name may hold only lowercase letters, digits, '-' and '.', {name:?} has {c:?}"
        ));
    }
    let b = name.as_bytes();
    if !b[0].is_ascii_alphanumeric() || !b[len - 1].is_ascii_alphanumeric() {
        return Err(format!(
            "bucket name must begin and end with a letter or digit: {name:?}"
        ));
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return Err(format!(
            "bucket name must not have '..', '.-' or '-.': {name:?}"
        ));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("bucket name must not be an IP address: {name:?}"));
    }
    for p in ["xn--", "sthree-", "amzn-s3-demo-"] {
        if name.starts_with(p) {
            return Err(format!("bucket name must not start with {p:?}: {name:?}"));
        }
    }
    for s in ["-s3alias", "--ol-s3", ".mrap", "--x-s3"] {
        if name.ends_with(s) {
            return Err(format!("bucket name must not end with {s:?}: {name:?}"));
        }
    }
    Ok(())
}

/// Checks an object key: 1 to 1024 bytes of UTF-8 (the proto string guarantees UTF-8).
pub fn validate_object_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("object key must not be empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "object key is {} bytes, the limit is {MAX_KEY_LEN}",
            key.len()
        ));
    }
    if key.contains('\0') {
        return Err("object key must not contain NUL".into());
    }
    Ok(())
}

/// Checks a storage node id: like [`validate_name`], and `:` is allowed too (storaged's
/// default id is `host:port`).
pub fn validate_node_id(id: &str) -> Result<(), String> {
    validate_name("node id", &id.replace(':', "_"))
        .map_err(|e| e.replace(&id.replace(':', "_"), id))
}

/// Checks a pool, zone or key name: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{what} must be 1 to 64 characters, got {name:?}"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} may hold only letters, digits, '.', '_' and '-', {name:?} has {c:?}"
        ));
    }
    Ok(())
}

/// The smallest byte string greater than every string that starts with `p`, or `None` when
/// there is none (all bytes 0xff).
pub fn prefix_successor(p: &[u8]) -> Option<Vec<u8>> {
    let mut v = p.to_vec();
    while let Some(last) = v.pop() {
        if last < 0xff {
            v.push(last + 1);
            return Some(v);
        }
    }
    None
}

/// One page of a bucket listing.
#[derive(Debug, Default, PartialEq)]
pub struct Listing {
    pub objects: Vec<ObjectVersion>,
    pub common_prefixes: Vec<String>,
    pub truncated: bool,
    /// The last key or common prefix returned: pass it as `start_after` for the next page.
    pub next_start_after: String,
}

/// Lists a bucket in key order: keys under `prefix` after `start_after`; with a delimiter,
/// keys that hold it after the prefix roll up into one common prefix each (returned once, and
/// only when it sorts after `start_after`). Keys and common prefixes both count towards
/// `max_keys`.
pub fn list_objects(
    sm: &StateMachine,
    bucket: &str,
    prefix: &str,
    delimiter: &str,
    start_after: &str,
    max_keys: usize,
) -> Result<Listing, String> {
    let max_keys = max_keys.clamp(1, MAX_LIST);
    let base = objects_prefix(bucket);
    let mut from = base.clone();
    if start_after >= prefix {
        from.extend_from_slice(start_after.as_bytes());
        from.push(0);
    } else {
        from.extend_from_slice(prefix.as_bytes());
    }
    let mut out = Listing::default();
    let mut decode_error = None;
    let mut count = 0usize;
    sm.walk(&from, |k, v| {
        let Some(rel) = k.strip_prefix(base.as_slice()) else {
            return Walk::Stop;
        };
        if !rel.starts_with(prefix.as_bytes()) {
            return Walk::Stop;
        }
        // Keys are stored from proto strings, so they are UTF-8.
        let rel = String::from_utf8_lossy(rel);
        if !delimiter.is_empty()
            && let Some(pos) = rel[prefix.len()..].find(delimiter)
        {
            {
                let cp = &rel[..prefix.len() + pos + delimiter.len()];
                let mut past = base.clone();
                past.extend_from_slice(cp.as_bytes());
                let next = prefix_successor(&past);
                if cp > start_after {
                    if count == max_keys {
                        out.truncated = true;
                        return Walk::Stop;
                    }
                    count += 1;
                    out.common_prefixes.push(cp.to_string());
                    out.next_start_after = cp.to_string();
                }
                return match next {
                    Some(n) => Walk::SeekTo(n),
                    None => Walk::Stop,
                };
            }
        }
        if count == max_keys {
            out.truncated = true;
            return Walk::Stop;
        }
        match <ObjectVersion as prost::Message>::decode(v) {
            Ok(mut o) => {
                o.manifest = Default::default();
                out.objects.push(o);
            }
            Err(e) => {
                decode_error = Some(format!("object record {rel:?} is unreadable: {e}"));
                return Walk::Stop;
            }
        }
        count += 1;
        out.next_start_after = rel.into_owned();
        Walk::Next
    })
    .map_err(|e| format!("reading the object index: {e}"))?;
    if let Some(e) = decode_error {
        return Err(e);
    }
    if !out.truncated {
        out.next_start_after.clear();
    }
    Ok(out)
}

/// The published CRL (DER) and its number (8 bytes, big-endian).
pub const CRL: &[u8] = b"tls/crl";
pub const CRL_NUMBER: &[u8] = b"tls/crl_number";

/// An access key as stored: the secret sealed under the master key, bound to the key id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessKeyRecord {
    pub version: u32,
    pub access_key_id: String,
    pub name: String,
    pub created_unix_ms: u64,
    /// `sov_common::codec` sealed bytes, hex.
    pub sealed_secret: String,
    /// blake3 of the sealed bytes, hex.
    pub sealed_blake3: String,
    /// May do anything to any bucket.
    #[serde(default)]
    pub admin: bool,
    /// The master key that seals the secret (`Core::kid`); empty in records from before
    /// key ids, which any held key is tried on.
    #[serde(default)]
    pub master_kid: String,
}

/// A data key as stored: wrapped (sealed) under the master key, bound to its id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataKeyRecord {
    pub version: u32,
    pub id: String,
    pub purpose: String,
    pub created_unix_ms: u64,
    pub wrapped: String,
    pub wrapped_blake3: String,
    /// The master key that wraps it (see `AccessKeyRecord::master_kid`).
    #[serde(default)]
    pub master_kid: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Batch, Command};
    use openraft::storage::RaftStateMachine;
    use openraft::{Entry, EntryPayload, LogId};

    #[test]
    fn bucket_names_follow_s3_rules() {
        for ok in ["abc", "my-bucket.logs", "a1b", "0-0", &"a".repeat(63)] {
            assert_eq!(validate_bucket_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            "Abc",
            "a_b",
            "-ab",
            "ab-",
            "a..b",
            "a.-b",
            "192.168.1.1",
            "xn--abc",
            "abc-s3alias",
            "ab/c",
            "",
        ] {
            assert!(validate_bucket_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            validate_bucket_name("a_b")
                .unwrap_err()
                .contains("lowercase letters")
        );
    }

    #[test]
    fn object_keys_are_bounded() {
        assert!(validate_object_key("").is_err());
        assert!(validate_object_key(&"k".repeat(1024)).is_ok());
        assert!(validate_object_key(&"k".repeat(1025)).is_err());
        // 1024 bytes, not characters.
        assert!(validate_object_key(&"é".repeat(513)).is_err());
    }

    #[test]
    fn successor_carries() {
        assert_eq!(prefix_successor(b"a/"), Some(b"a0".to_vec()));
        assert_eq!(prefix_successor(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
    }

    async fn sm_with(keys: &[&str]) -> (tempfile::TempDir, StateMachine) {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = crate::store::open(dir.path()).unwrap();
        let commands = keys
            .iter()
            .map(|k| Command::Put {
                key: object_key("b", k),
                value: prost::Message::encode_to_vec(&ObjectVersion {
                    bucket: "b".into(),
                    key: k.to_string(),
                    manifest: vec![1, 2, 3].into(),
                    ..Default::default()
                }),
            })
            .collect();
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Batch { commands }),
        };
        sm.apply([entry]).await.unwrap();
        (dir, sm)
    }

    fn names(l: &Listing) -> Vec<String> {
        l.objects.iter().map(|o| o.key.clone()).collect()
    }

    #[tokio::test]
    async fn listing_rolls_up_and_pages_without_repeats() {
        let keys = [
            "a.txt",
            "photos/2024/x.jpg",
            "photos/2024/y.jpg",
            "photos/2025/z.jpg",
            "photos/top.jpg",
            "zeta",
            "zürich",
        ];
        let (_d, sm) = sm_with(&keys).await;
        // Another bucket's keys never show up.
        let l = list_objects(&sm, "b", "", "", "", 1000).unwrap();
        assert_eq!(names(&l), keys);
        assert!(!l.truncated);
        assert!(l.objects.iter().all(|o| o.manifest.is_empty()));

        let l = list_objects(&sm, "b", "", "/", "", 1000).unwrap();
        assert_eq!(names(&l), ["a.txt", "zeta", "zürich"]);
        assert_eq!(l.common_prefixes, ["photos/"]);

        let l = list_objects(&sm, "b", "photos/", "/", "", 1000).unwrap();
        assert_eq!(names(&l), ["photos/top.jpg"]);
        assert_eq!(l.common_prefixes, ["photos/2024/", "photos/2025/"]);

        // Page by one through the delimited listing: every entry exactly once, in order.
        let mut seen = Vec::new();
        let mut after = String::new();
        loop {
            let l = list_objects(&sm, "b", "", "/", &after, 1).unwrap();
            seen.extend(names(&l));
            seen.extend(l.common_prefixes.clone());
            if !l.truncated {
                break;
            }
            after = l.next_start_after;
        }
        assert_eq!(seen, ["a.txt", "photos/", "zeta", "zürich"]);

        // start_after inside a rolled-up prefix skips that prefix.
        let l = list_objects(&sm, "b", "", "/", "photos/2024/x.jpg", 1000).unwrap();
        assert_eq!(names(&l), ["zeta", "zürich"]);
        assert!(l.common_prefixes.is_empty());

        let l = list_objects(&sm, "other", "", "", "", 1000).unwrap();
        assert_eq!(l, Listing::default());
    }
}
