//! Who may do what: SigV4 secrets come from metad's access keys; each request's operation is
//! checked against the bucket's owner, its grants (read, write, owner) and whether it is
//! public. Admin keys may do anything. Lookups are cached for a few seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::{S3Result, s3_error};
use sov_client::meta::MetaClient;
use sov_proto::metad::{Bucket, GetAccessKeyRequest, GetBucketRequest};
use tonic::Code;

use crate::errors::meta_err;

/// How long a key or bucket lookup is reused.
const CACHE_FOR: Duration = Duration::from_secs(2);
/// S3's longest presigned URL life.
const MAX_PRESIGN_SECS: u64 = 7 * 24 * 3600;

/// What an operation needs on its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    Read,
    Write,
    Owner,
}

/// The permission an operation needs; `None` for operations on no particular bucket.
pub fn need(op: &str) -> Option<Need> {
    match op {
        "ListBuckets" | "CreateBucket" => None,
        "DeleteBucket"
        | "PutBucketAcl"
        | "PutBucketPolicy"
        | "DeleteBucketPolicy"
        | "PutBucketVersioning"
        | "PutBucketLifecycleConfiguration" => Some(Need::Owner),
        "GetObject"
        | "HeadObject"
        | "ListObjects"
        | "ListObjectsV2"
        | "ListObjectVersions"
        | "HeadBucket"
        | "GetBucketLocation"
        | "ListParts"
        | "ListMultipartUploads"
        | "GetObjectAcl"
        | "GetBucketAcl"
        | "GetBucketVersioning"
        | "GetObjectAttributes" => Some(Need::Read),
        _ => Some(Need::Write),
    }
}

fn level(p: &str) -> Option<Need> {
    match p {
        "read" => Some(Need::Read),
        "write" => Some(Need::Write),
        "owner" => Some(Need::Owner),
        _ => None,
    }
}

#[derive(Clone)]
struct KeyInfo {
    secret: String,
    admin: bool,
}

type Cache<T> = Mutex<HashMap<String, (Instant, Option<T>)>>;

/// Access keys and buckets from metad, cached briefly.
pub struct Authz {
    meta: MetaClient,
    keys: Cache<KeyInfo>,
    buckets: Cache<Bucket>,
}

fn cached<T: Clone>(c: &Cache<T>, k: &str) -> Option<Option<T>> {
    let m = c.lock().expect("cache lock");
    m.get(k)
        .filter(|(at, _)| at.elapsed() < CACHE_FOR)
        .map(|(_, v)| v.clone())
}

impl Authz {
    pub fn new(meta: MetaClient) -> Arc<Authz> {
        Arc::new(Authz {
            meta,
            keys: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    async fn key(&self, id: &str) -> S3Result<Option<KeyInfo>> {
        if let Some(v) = cached(&self.keys, id) {
            return Ok(v);
        }
        let req = GetAccessKeyRequest {
            access_key_id: id.to_string(),
            consistency: 0,
        };
        let r = self
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_access_key(req).await }
            })
            .await;
        let v = match r {
            Ok(k) => Some(KeyInfo {
                secret: k.secret_access_key,
                admin: k.key.is_some_and(|k| k.admin),
            }),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => return Err(meta_err(s)),
        };
        self.keys
            .lock()
            .expect("cache lock")
            .insert(id.to_string(), (Instant::now(), v.clone()));
        Ok(v)
    }

    /// Whether the key is an admin key.
    pub async fn is_admin(&self, id: &str) -> S3Result<bool> {
        Ok(self.key(id).await?.is_some_and(|k| k.admin))
    }

    /// The bucket, or None if it does not exist.
    pub async fn bucket(&self, name: &str) -> S3Result<Option<Bucket>> {
        if let Some(v) = cached(&self.buckets, name) {
            return Ok(v);
        }
        let req = GetBucketRequest {
            name: name.to_string(),
            consistency: 0,
        };
        let r = self
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_bucket(req).await }
            })
            .await;
        let v = match r {
            Ok(b) => Some(b),
            Err(s) if s.code() == Code::NotFound || s.code() == Code::InvalidArgument => None,
            Err(s) => return Err(meta_err(s)),
        };
        self.buckets
            .lock()
            .expect("cache lock")
            .insert(name.to_string(), (Instant::now(), v.clone()));
        Ok(v)
    }

    /// Forgets a bucket (after it was created, deleted or changed here).
    pub fn forget(&self, name: &str) {
        self.buckets.lock().expect("cache lock").remove(name);
    }

    /// Refuses unless `who` (None = anonymous) may do what `need` says to `bucket`. A bucket
    /// that does not exist passes for a signed caller (the operation then says NoSuchBucket).
    pub async fn allow(&self, who: Option<&str>, bucket: &str, need: Need) -> S3Result<()> {
        let b = self.bucket(bucket).await?;
        let Some(who) = who else {
            return match b {
                Some(b) if b.public_read && need == Need::Read => Ok(()),
                _ => Err(s3_error!(AccessDenied, "Access Denied")),
            };
        };
        if self.is_admin(who).await? {
            return Ok(());
        }
        let Some(b) = b else { return Ok(()) };
        if b.owner == who {
            return Ok(());
        }
        let granted = b
            .grants
            .iter()
            .filter(|g| g.access_key_id == who)
            .filter_map(|g| level(&g.permission))
            .max();
        if granted.is_some_and(|g| g >= need) || (need == Need::Read && b.public_read) {
            return Ok(());
        }
        Err(s3_error!(AccessDenied, "Access Denied"))
    }
}

/// SigV4 secrets from metad.
pub struct Auth(pub Arc<Authz>);

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.0.key(access_key).await? {
            Some(k) => Ok(SecretKey::from(k.secret)),
            None => Err(s3_error!(
                InvalidAccessKeyId,
                "The AWS Access Key Id you provided does not exist in our records."
            )),
        }
    }
}

/// The operation's name, for metrics (set by the access check, read by the server wrapper).
#[derive(Clone, Default)]
pub struct OpSlot(pub Arc<Mutex<Option<String>>>);

/// Per-request authorisation.
pub struct Access(pub Arc<Authz>);

#[async_trait::async_trait]
impl S3Access for Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let op = cx.s3_op().name().to_string();
        if let Some(slot) = cx.extensions_mut().get::<OpSlot>() {
            *slot.0.lock().expect("op slot") = Some(op.clone());
        }
        if let Some(q) = cx.uri().query()
            && let Some(exp) = q
                .split('&')
                .find_map(|kv| kv.strip_prefix("X-Amz-Expires="))
            && exp.parse::<u64>().map_or(true, |e| e > MAX_PRESIGN_SECS)
        {
            return Err(s3_error!(
                AccessDenied,
                "X-Amz-Expires must be a number of seconds up to 604800"
            ));
        }
        let who = cx.credentials().map(|c| c.access_key.clone());
        match (need(&op), cx.s3_path().get_bucket_name()) {
            (Some(n), Some(bucket)) => self.0.allow(who.as_deref(), bucket, n).await,
            _ if who.is_some() => Ok(()),
            _ => Err(s3_error!(AccessDenied, "Access Denied")),
        }
    }
}
