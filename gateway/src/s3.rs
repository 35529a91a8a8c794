//! The S3 operations, over sov-client (data) and metad (buckets, the object index, uploads).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use md5::Digest;
use prost::Message;
use s3s::checksum::ChecksumHasher;
use s3s::crypto::{Checksum as _, Crc32, Crc32c, Crc64Nvme, Sha1, Sha256};
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use sov_client::manifest;
use sov_client::meta::MetaClient;
use sov_client::{Client, PutOptions, Written};
use sov_proto::metad as pb;
use tokio::io::AsyncRead;
use tonic::Code;

use crate::auth::{Authz, Need};
use crate::body::{self, Hashing};
use crate::errors::{client_err, meta_err};

/// Largest single PUT or part (S3's).
const MAX_PUT: i64 = 5 << 30;
/// Smallest part of a multipart upload but the last (S3's).
const MIN_PART: u64 = 5 << 20;

/// Which pool each storage class writes to.
#[derive(Debug, Clone)]
pub struct Pools {
    pub standard: String,
    pub infrequent: String,
    pub archive: String,
}

/// The gateway's S3 implementation.
pub struct Gateway {
    pub client: Client,
    pub meta: MetaClient,
    pub authz: Arc<Authz>,
    pub pools: Pools,
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms))
}

fn unix_secs(t: &Timestamp) -> i64 {
    time::OffsetDateTime::from(t.clone()).unix_timestamp()
}

fn strong(e: &str) -> ETag {
    ETag::Strong(e.to_string())
}

fn who<T>(req: &S3Request<T>) -> Option<String> {
    req.credentials.as_ref().map(|c| c.access_key.clone())
}

fn sse() -> Option<ServerSideEncryption> {
    Some(ServerSideEncryption::from_static(
        ServerSideEncryption::AES256,
    ))
}

/// `encoding-type=url`: keys and prefixes percent-encoded (slashes kept).
fn enc(s: &str, url: bool) -> String {
    if url {
        urlencoding::encode(s).replace("%2F", "/")
    } else {
        s.to_string()
    }
}

fn is_url(e: &Option<EncodingType>) -> bool {
    e.as_ref().is_some_and(|e| e.as_str() == EncodingType::URL)
}

/// The checksum the client asked for: from a header value or the trailer's algorithm.
fn hasher_for(alg: Option<&str>) -> ChecksumHasher {
    let mut h = ChecksumHasher::default();
    match alg {
        Some("CRC32") => h.crc32 = Some(Crc32::new()),
        Some("CRC32C") => h.crc32c = Some(Crc32c::new()),
        Some("CRC64NVME") => h.crc64nvme = Some(Crc64Nvme::new()),
        Some("SHA1") => h.sha1 = Some(Sha1::new()),
        Some("SHA256") => h.sha256 = Some(Sha256::new()),
        _ => {}
    }
    h
}

/// What a body was checked against.
struct Expect {
    content_md5: Option<String>,
    /// (algorithm, base64 value) given in a header; or the algorithm of a trailer.
    algorithm: Option<String>,
    value: Option<String>,
}

impl Expect {
    /// Nothing to check (copies: the source was verified on read).
    fn none() -> Expect {
        Expect {
            content_md5: None,
            algorithm: None,
            value: None,
        }
    }
}

/// The checks a body must pass, from an input with S3's checksum fields (PutObject, UploadPart).
macro_rules! expect_of {
    ($i:expr) => {
        expectations(
            &$i.content_md5,
            &$i.checksum_algorithm,
            [
                ("CRC32", &$i.checksum_crc32),
                ("CRC32C", &$i.checksum_crc32c),
                ("CRC64NVME", &$i.checksum_crc64nvme),
                ("SHA1", &$i.checksum_sha1),
                ("SHA256", &$i.checksum_sha256),
            ],
        )
    };
}

fn expectations(
    content_md5: &Option<String>,
    algorithm: &Option<ChecksumAlgorithm>,
    sums: [(&str, &Option<String>); 5],
) -> Expect {
    let given = sums.iter().find(|(_, v)| v.is_some());
    Expect {
        content_md5: content_md5.clone(),
        algorithm: given
            .map(|(a, _)| a.to_string())
            .or_else(|| algorithm.as_ref().map(|a| a.as_str().to_string())),
        value: given.and_then(|(_, v)| (*v).clone()),
    }
}

/// The checks a body passed or failed, and what was computed.
struct Checked {
    md5_hex: String,
    /// The computed checksum for the requested algorithm (base64), if any.
    sum: Option<(String, String)>,
}

fn computed(h: ChecksumHasher, alg: &str) -> Option<String> {
    let c = h.finalize();
    match alg {
        "CRC32" => c.checksum_crc32,
        "CRC32C" => c.checksum_crc32c,
        "CRC64NVME" => c.checksum_crc64nvme,
        "SHA1" => c.checksum_sha1,
        "SHA256" => c.checksum_sha256,
        _ => None,
    }
}

fn check_body<R>(
    h: Hashing<R>,
    exp: &Expect,
    trailers: Option<http::HeaderMap>,
) -> S3Result<Checked> {
    let md5 = h.md5.clone().finalize();
    if let Some(want) = &exp.content_md5 {
        let raw = B64
            .decode(want.trim())
            .ok()
            .filter(|r| r.len() == 16)
            .ok_or_else(|| {
                s3_error!(
                    InvalidDigest,
                    "The Content-MD5 you specified was not valid."
                )
            })?;
        if raw[..] != md5[..] {
            return Err(s3_error!(
                BadDigest,
                "The Content-MD5 you specified did not match what we received."
            ));
        }
    }
    let mut sum = None;
    if let Some(alg) = &exp.algorithm {
        let got = computed(h.sums, alg);
        let want = exp.value.clone().or_else(|| {
            trailers.as_ref().and_then(|t| {
                t.get(format!("x-amz-checksum-{}", alg.to_ascii_lowercase()))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
        });
        if let (Some(want), Some(got)) = (&want, &got)
            && want.trim() != got
        {
            return Err(s3_error!(
                BadDigest,
                "The {alg} you specified did not match the calculated checksum."
            ));
        }
        sum = got.map(|g| (alg.clone(), g));
    }
    Ok(Checked {
        md5_hex: hex::encode(md5),
        sum,
    })
}

fn put_checksums(sum: &Option<(String, String)>) -> [Option<String>; 5] {
    let mut out = [None, None, None, None, None];
    if let Some((alg, v)) = sum {
        let i = match alg.as_str() {
            "CRC32" => 0,
            "CRC32C" => 1,
            "CRC64NVME" => 2,
            "SHA1" => 3,
            _ => 4,
        };
        out[i] = Some(v.clone());
    }
    out
}

impl Gateway {
    async fn bucket(&self, name: &str) -> S3Result<pb::Bucket> {
        self.authz
            .bucket(name)
            .await?
            .ok_or_else(|| s3_error!(NoSuchBucket, "The specified bucket does not exist"))
    }

    /// The pool and storage class for a write.
    fn placement(
        &self,
        class: Option<&StorageClass>,
        b: &pb::Bucket,
    ) -> S3Result<(String, String)> {
        let class = class.map(|c| c.as_str().to_string()).unwrap_or_default();
        let pool = match class.as_str() {
            "" | "STANDARD" | "REDUCED_REDUNDANCY" => {
                if b.pool.is_empty() {
                    self.pools.standard.clone()
                } else {
                    b.pool.clone()
                }
            }
            "STANDARD_IA" | "ONEZONE_IA" | "INTELLIGENT_TIERING" => self.pools.infrequent.clone(),
            "GLACIER" | "DEEP_ARCHIVE" | "GLACIER_IR" => self.pools.archive.clone(),
            other => {
                return Err(s3_error!(
                    InvalidStorageClass,
                    "The storage class you specified is not valid: {other}"
                ));
            }
        };
        let class = if class.is_empty() {
            "STANDARD".to_string()
        } else {
            class
        };
        Ok((pool, class))
    }

    /// Writes a body into `pool` under the bucket's key, checked against `exp`.
    async fn write<R: AsyncRead + Unpin + Send>(
        &self,
        pool: &str,
        b: &pb::Bucket,
        body: R,
        exp: &Expect,
        declared: Option<i64>,
        trailers: Option<&s3s::TrailingHeaders>,
    ) -> S3Result<(Written, Checked)> {
        let mut h = Hashing::new(body, hasher_for(exp.algorithm.as_deref()));
        let w = self
            .client
            .write_data(pool, &b.data_key_id, &mut h)
            .await
            .map_err(client_err)?;
        let fail = |e: S3Error| {
            self.client.discard(&w.manifest);
            Err(e)
        };
        if let Some(d) = declared
            && d >= 0
            && d as u64 != h.len
        {
            return fail(s3_error!(
                IncompleteBody,
                "You did not provide the number of bytes specified by the Content-Length HTTP header."
            ));
        }
        let trailers = trailers.and_then(|t| t.take());
        match check_body(h, exp, trailers) {
            Ok(c) => Ok((w, c)),
            Err(e) => fail(e),
        }
    }

    async fn head(&self, bucket: &str, key: &str) -> S3Result<pb::ObjectVersion> {
        self.client
            .head_object(bucket, key)
            .await
            .map_err(client_err)
    }

    async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: &str,
        start_after: &str,
        max_keys: i32,
    ) -> S3Result<pb::ListObjectsResponse> {
        if max_keys == 0 {
            self.bucket(bucket).await?;
            return Ok(pb::ListObjectsResponse::default());
        }
        let req = pb::ListObjectsRequest {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            delimiter: delimiter.to_string(),
            start_after: start_after.to_string(),
            max_keys: max_keys.clamp(1, 1000) as u32,
            consistency: 0,
        };
        self.meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.list_objects(req).await }
            })
            .await
            .map_err(meta_err)
    }

    async fn upload(&self, bucket: &str, key: &str, id: &str) -> S3Result<pb::Upload> {
        let req = pb::GetUploadRequest {
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id: id.to_string(),
        };
        self.meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_upload(req).await }
            })
            .await
            .map_err(meta_err)
    }

    /// Reads a copy source (checking read permission) with an optional range.
    async fn copy_source(
        &self,
        caller: Option<&str>,
        src: &CopySource,
        range: Option<(u64, u64)>,
        conds: CopyConds<'_>,
    ) -> S3Result<(pb::ObjectVersion, sov_client::ObjectReader)> {
        let CopySource::Bucket { bucket, key, .. } = src else {
            return Err(s3_error!(
                NotImplemented,
                "only bucket copy sources are supported"
            ));
        };
        self.authz.allow(caller, bucket, Need::Read).await?;
        let v = self.head(bucket, key).await?;
        check_copy_conditions(&v, &conds)?;
        let m = manifest::decode(&v.manifest).map_err(|e| s3_error!(InternalError, "{e}"))?;
        check_copy_range(range, v.size)?;
        let r = self.client.reader(m, range).await.map_err(client_err)?;
        Ok((v, r))
    }

    async fn commit_part(&self, u: &pb::Upload, n: i32, w: Written, md5_hex: &str) -> S3Result<()> {
        let req = pb::PutPartRequest {
            bucket: u.bucket.clone(),
            key: u.key.clone(),
            upload_id: u.upload_id.clone(),
            part: Some(pb::Part {
                part_number: n as u32,
                size: w.manifest.size,
                etag: md5_hex.to_string(),
                modified_unix_ms: 0,
                manifest: w.manifest.encode_to_vec().into(),
            }),
        };
        let r = self
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.put_part(req).await }
            })
            .await;
        if let Err(s) = r {
            if s.code() != Code::Unknown {
                self.client.discard(&w.manifest);
            }
            return Err(meta_err(s));
        }
        Ok(())
    }
}

struct CopyConds<'a> {
    if_match: &'a Option<ETagCondition>,
    if_none_match: &'a Option<ETagCondition>,
    if_modified_since: &'a Option<Timestamp>,
    if_unmodified_since: &'a Option<Timestamp>,
}

fn etag_matches(c: &ETagCondition, etag: &str) -> bool {
    c.is_any() || c.as_etag().is_some_and(|e| e.value() == etag)
}

fn check_copy_conditions(v: &pb::ObjectVersion, c: &CopyConds<'_>) -> S3Result<()> {
    let secs = (v.modified_unix_ms / 1000) as i64;
    let failed = || {
        s3_error!(
            PreconditionFailed,
            "At least one of the pre-conditions you specified did not hold"
        )
    };
    if let Some(m) = c.if_match
        && !etag_matches(m, &v.etag)
    {
        return Err(failed());
    }
    if let Some(m) = c.if_none_match
        && etag_matches(m, &v.etag)
    {
        return Err(failed());
    }
    if c.if_match.is_none()
        && let Some(t) = c.if_unmodified_since
        && secs > unix_secs(t)
    {
        return Err(failed());
    }
    if c.if_none_match.is_none()
        && let Some(t) = c.if_modified_since
        && secs <= unix_secs(t)
    {
        return Err(failed());
    }
    Ok(())
}

/// GET/HEAD conditions (RFC 7232 order): 412 or 304.
fn check_read_conditions(
    v: &pb::ObjectVersion,
    if_match: &Option<ETagCondition>,
    if_none_match: &Option<ETagCondition>,
    if_modified_since: &Option<Timestamp>,
    if_unmodified_since: &Option<Timestamp>,
) -> S3Result<()> {
    let secs = (v.modified_unix_ms / 1000) as i64;
    if let Some(m) = if_match {
        if !etag_matches(m, &v.etag) {
            return Err(s3_error!(
                PreconditionFailed,
                "At least one of the pre-conditions you specified did not hold"
            ));
        }
    } else if let Some(t) = if_unmodified_since
        && secs > unix_secs(t)
    {
        return Err(s3_error!(
            PreconditionFailed,
            "At least one of the pre-conditions you specified did not hold"
        ));
    }
    let not_modified = || {
        let mut e = S3Error::new(S3ErrorCode::NotModified);
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", v.etag)) {
            h.insert(http::header::ETAG, v);
        }
        e.set_headers(h);
        e
    };
    if let Some(m) = if_none_match {
        if etag_matches(m, &v.etag) {
            return Err(not_modified());
        }
    } else if let Some(t) = if_modified_since
        && secs <= unix_secs(t)
    {
        return Err(not_modified());
    }
    Ok(())
}

/// `x-amz-copy-source-range` (`bytes=first-last`, both inclusive) as `[first, last + 1)`.
fn copy_source_range(header: Option<&str>) -> S3Result<Option<(u64, u64)>> {
    let Some(header) = header else {
        return Ok(None);
    };
    let bad = || {
        s3_error!(
            InvalidArgument,
            "The x-amz-copy-source-range value must be of the form bytes=first-last"
        )
    };
    match Range::parse(header).map_err(|_| bad())? {
        Range::Int {
            first,
            last: Some(last),
        } if last >= first => Ok(Some((first, last + 1))),
        _ => Err(bad()),
    }
}

/// Refuses a copy source range that is not inside the source object.
fn check_copy_range(range: Option<(u64, u64)>, size: u64) -> S3Result<()> {
    if let Some((s, e)) = range
        && (s > e || e > size)
    {
        return Err(s3_error!(
            InvalidRange,
            "The requested range is not satisfiable"
        ));
    }
    Ok(())
}

/// The bytes `[start, end)` a Range asks of an object of `size`, and the Content-Range to
/// answer with (none for the whole object or an empty range).
fn byte_range(range: &Option<Range>, size: u64) -> S3Result<(u64, u64, Option<String>)> {
    let Some(r) = range else {
        return Ok((0, size, None));
    };
    let r = r.check(size)?;
    let cr = (r.start < r.end).then(|| format!("bytes {}-{}/{}", r.start, r.end - 1, size));
    Ok((r.start, r.end, cr))
}

fn class_of(v: &pb::ObjectVersion) -> String {
    if v.storage_class.is_empty() {
        "STANDARD".into()
    } else {
        v.storage_class.clone()
    }
}

fn content_type_of(v: &pb::ObjectVersion) -> String {
    if v.content_type.is_empty() {
        "binary/octet-stream".into()
    } else {
        v.content_type.clone()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let caller = who(&req).unwrap_or_default();
        let owner = if self.authz.is_admin(&caller).await? {
            String::new()
        } else {
            caller.clone()
        };
        let r = self
            .meta
            .call(|mut c| {
                let owner = owner.clone();
                async move {
                    c.list_buckets(pb::ListBucketsRequest {
                        owner,
                        consistency: 0,
                    })
                    .await
                }
            })
            .await
            .map_err(meta_err)?;
        let buckets = r
            .buckets
            .into_iter()
            .map(|b| Bucket {
                name: Some(b.name),
                creation_date: Some(ts(b.created_unix_ms)),
                bucket_region: None,
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(Owner {
                id: Some(caller.clone()),
                display_name: Some(caller),
            }),
            ..Default::default()
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let caller = who(&req).unwrap_or_default();
        let name = req.input.bucket.clone();
        let r = self
            .meta
            .call(|mut c| {
                let (name, owner) = (name.clone(), caller.clone());
                async move {
                    c.create_bucket(pb::CreateBucketRequest {
                        name,
                        owner,
                        pool: String::new(),
                    })
                    .await
                }
            })
            .await;
        self.authz.forget(&name);
        match r {
            Ok(_) => Ok(S3Response::new(CreateBucketOutput {
                location: Some(format!("/{name}")),
            })),
            Err(s) if s.code() == Code::AlreadyExists => {
                if s.message().contains(&format!("(owner {caller:?})")) {
                    Err(s3_error!(
                        BucketAlreadyOwnedByYou,
                        "Your previous request to create the named bucket succeeded and you already own it."
                    ))
                } else {
                    Err(s3_error!(
                        BucketAlreadyExists,
                        "The requested bucket name is not available."
                    ))
                }
            }
            Err(s) => Err(meta_err(s)),
        }
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.bucket(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.bucket(&req.input.bucket).await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let name = req.input.bucket.clone();
        let r = self
            .meta
            .call(|mut c| {
                let name = name.clone();
                async move { c.delete_bucket(pb::DeleteBucketRequest { name }).await }
            })
            .await;
        self.authz.forget(&name);
        match r {
            Ok(_) => Ok(S3Response::new(DeleteBucketOutput {})),
            Err(s) if s.code() == Code::FailedPrecondition => Err(s3_error!(
                BucketNotEmpty,
                "The bucket you tried to delete is not empty"
            )),
            Err(s) => Err(meta_err(s)),
        }
    }

    async fn put_object(
        &self,
        mut req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let i = &mut req.input;
        if i.content_length.is_some_and(|l| l > MAX_PUT) {
            return Err(s3_error!(
                EntityTooLarge,
                "Your proposed upload exceeds the maximum allowed object size."
            ));
        }
        let b = self.bucket(&i.bucket).await?;
        let (pool, class) = self.placement(i.storage_class.as_ref(), &b)?;
        let mut expected_version_id = None;
        if let Some(c) = &i.if_none_match
            && c.is_any()
        {
            expected_version_id = Some(String::new());
        }
        if let Some(c) = &i.if_match {
            match self.client.head_object(&i.bucket, &i.key).await {
                Ok(v) if etag_matches(c, &v.etag) => expected_version_id = Some(v.version_id),
                Ok(_) => {
                    return Err(s3_error!(
                        PreconditionFailed,
                        "At least one of the pre-conditions you specified did not hold"
                    ));
                }
                Err(e) if e.is_not_found() => {
                    return Err(s3_error!(NoSuchKey, "The specified key does not exist."));
                }
                Err(e) => return Err(client_err(e)),
            }
        }
        let exp = expect_of!(i);
        let body = i
            .body
            .take()
            .ok_or_else(|| s3_error!(IncompleteBody, "no body"))?;
        let (w, checked) = self
            .write(
                &pool,
                &b,
                body::reader(body),
                &exp,
                i.content_length,
                req.trailing_headers.as_ref(),
            )
            .await?;
        let i = &req.input;
        let opts = PutOptions {
            pool: Some(pool.clone()),
            content_type: i.content_type.clone().unwrap_or_default(),
            storage_class: class,
            etag: Some(checked.md5_hex.clone()),
            user_metadata: i.metadata.clone().unwrap_or_default(),
            expected_version_id,
        };
        let r = self
            .client
            .commit(&i.bucket, &i.key, &pool, w, opts)
            .await
            .map_err(|e| match e {
                sov_client::ClientError::Meta(s) if s.code() == Code::FailedPrecondition => {
                    s3_error!(
                        PreconditionFailed,
                        "At least one of the pre-conditions you specified did not hold"
                    )
                }
                e => client_err(e),
            })?;
        let [c32, c32c, c64, s1, s256] = put_checksums(&checked.sum);
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(strong(&r.object.etag)),
            server_side_encryption: sse(),
            checksum_crc32: c32,
            checksum_crc32c: c32c,
            checksum_crc64nvme: c64,
            checksum_sha1: s1,
            checksum_sha256: s256,
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let i = &req.input;
        let v = self.head(&i.bucket, &i.key).await?;
        check_read_conditions(
            &v,
            &i.if_match,
            &i.if_none_match,
            &i.if_modified_since,
            &i.if_unmodified_since,
        )?;
        let (start, end, content_range) = byte_range(&i.range, v.size)?;
        let m = manifest::decode(&v.manifest).map_err(|e| s3_error!(InternalError, "{e}"))?;
        let reader = self
            .client
            .reader(m, Some((start, end)))
            .await
            .map_err(client_err)?;
        Ok(S3Response::new(GetObjectOutput {
            body: Some(body::response(reader)),
            content_length: Some((end - start) as i64),
            content_range,
            content_type: Some(content_type_of(&v)),
            e_tag: Some(strong(&v.etag)),
            last_modified: Some(ts(v.modified_unix_ms)),
            metadata: Some(v.user_metadata.clone()),
            accept_ranges: Some("bytes".into()),
            storage_class: Some(StorageClass::from(class_of(&v))),
            server_side_encryption: sse(),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let i = &req.input;
        let v = self.head(&i.bucket, &i.key).await?;
        check_read_conditions(
            &v,
            &i.if_match,
            &i.if_none_match,
            &i.if_modified_since,
            &i.if_unmodified_since,
        )?;
        let (start, end, content_range) = byte_range(&i.range, v.size)?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some((end - start) as i64),
            content_range,
            content_type: Some(content_type_of(&v)),
            e_tag: Some(strong(&v.etag)),
            last_modified: Some(ts(v.modified_unix_ms)),
            metadata: Some(v.user_metadata.clone()),
            accept_ranges: Some("bytes".into()),
            storage_class: Some(StorageClass::from(class_of(&v))),
            server_side_encryption: sse(),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let i = &req.input;
        self.bucket(&i.bucket).await?;
        self.client
            .delete_object(&i.bucket, &i.key)
            .await
            .map_err(client_err)?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let i = &req.input;
        self.bucket(&i.bucket).await?;
        let quiet = i.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for o in &i.delete.objects {
            match self.client.delete_object(&i.bucket, &o.key).await {
                Ok(_) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(o.key.clone()),
                            ..Default::default()
                        });
                    }
                }
                Err(e) => {
                    let e = client_err(e);
                    errors.push(Error {
                        code: Some(e.code().as_str().to_string()),
                        key: Some(o.key.clone()),
                        message: e.message().map(str::to_string),
                        version_id: None,
                    });
                }
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: if errors.is_empty() {
                None
            } else {
                Some(errors)
            },
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let caller = who(&req);
        let i = &req.input;
        let b = self.bucket(&i.bucket).await?;
        let replace = i
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        if let CopySource::Bucket { bucket, key, .. } = &i.copy_source
            && **bucket == *i.bucket
            && **key == *i.key
            && !replace
            && i.storage_class.is_none()
        {
            return Err(s3_error!(
                InvalidRequest,
                "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes."
            ));
        }
        let conds = CopyConds {
            if_match: &i.copy_source_if_match,
            if_none_match: &i.copy_source_if_none_match,
            if_modified_since: &i.copy_source_if_modified_since,
            if_unmodified_since: &i.copy_source_if_unmodified_since,
        };
        let (src, reader) = self
            .copy_source(caller.as_deref(), &i.copy_source, None, conds)
            .await?;
        let (pool, class) = self.placement(i.storage_class.as_ref(), &b)?;
        let exp = Expect::none();
        let (w, checked) = self
            .write(
                &pool,
                &b,
                body::object_reader(reader),
                &exp,
                Some(src.size as i64),
                None,
            )
            .await?;
        let (content_type, user_metadata) = if replace {
            (
                i.content_type.clone().unwrap_or_default(),
                i.metadata.clone().unwrap_or_default(),
            )
        } else {
            (src.content_type.clone(), src.user_metadata.clone())
        };
        // The copy is one part: its ETag is the MD5 of its bytes.
        let etag = checked.md5_hex.clone();
        let opts = PutOptions {
            pool: Some(pool.clone()),
            content_type,
            storage_class: class,
            etag: Some(etag),
            user_metadata,
            expected_version_id: None,
        };
        let r = self
            .client
            .commit(&i.bucket, &i.key, &pool, w, opts)
            .await
            .map_err(client_err)?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(strong(&r.object.etag)),
                last_modified: Some(ts(r.object.modified_unix_ms)),
                ..Default::default()
            }),
            server_side_encryption: sse(),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let i = &req.input;
        let url = is_url(&i.encoding_type);
        let max = i.max_keys.unwrap_or(1000);
        let prefix = i.prefix.clone().unwrap_or_default();
        let delimiter = i.delimiter.clone().unwrap_or_default();
        let marker = i.marker.clone().unwrap_or_default();
        let r = self
            .list(&i.bucket, &prefix, &delimiter, &marker, max)
            .await?;
        let contents = r.objects.iter().map(|o| object_entry(o, url)).collect();
        let common: Vec<CommonPrefix> = r
            .common_prefixes
            .iter()
            .map(|p| CommonPrefix {
                prefix: Some(enc(p, url)),
            })
            .collect();
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(i.bucket.clone()),
            prefix: Some(enc(&prefix, url)),
            delimiter: i.delimiter.as_ref().map(|d| enc(d, url)),
            marker: Some(enc(&marker, url)),
            next_marker: (r.truncated && !delimiter.is_empty())
                .then(|| enc(&r.next_start_after, url)),
            max_keys: Some(max),
            is_truncated: Some(r.truncated),
            contents: Some(contents),
            common_prefixes: Some(common),
            encoding_type: i.encoding_type.clone(),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let i = &req.input;
        let url = is_url(&i.encoding_type);
        let max = i.max_keys.unwrap_or(1000);
        let prefix = i.prefix.clone().unwrap_or_default();
        let delimiter = i.delimiter.clone().unwrap_or_default();
        let start = match &i.continuation_token {
            Some(t) => String::from_utf8(hex::decode(t).map_err(|_| {
                s3_error!(
                    InvalidArgument,
                    "The continuation token provided is incorrect"
                )
            })?)
            .map_err(|_| {
                s3_error!(
                    InvalidArgument,
                    "The continuation token provided is incorrect"
                )
            })?,
            None => i.start_after.clone().unwrap_or_default(),
        };
        let r = self
            .list(&i.bucket, &prefix, &delimiter, &start, max)
            .await?;
        let contents: Vec<Object> = r.objects.iter().map(|o| object_entry(o, url)).collect();
        let common: Vec<CommonPrefix> = r
            .common_prefixes
            .iter()
            .map(|p| CommonPrefix {
                prefix: Some(enc(p, url)),
            })
            .collect();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(i.bucket.clone()),
            prefix: Some(enc(&prefix, url)),
            delimiter: i.delimiter.as_ref().map(|d| enc(d, url)),
            max_keys: Some(max),
            key_count: Some((contents.len() + common.len()) as i32),
            is_truncated: Some(r.truncated),
            continuation_token: i.continuation_token.clone(),
            next_continuation_token: r.truncated.then(|| hex::encode(&r.next_start_after)),
            start_after: i.start_after.as_ref().map(|s| enc(s, url)),
            contents: Some(contents),
            common_prefixes: Some(common),
            encoding_type: i.encoding_type.clone(),
            ..Default::default()
        }))
    }

    async fn list_object_versions(
        &self,
        req: S3Request<ListObjectVersionsInput>,
    ) -> S3Result<S3Response<ListObjectVersionsOutput>> {
        let i = &req.input;
        let url = is_url(&i.encoding_type);
        let max = i.max_keys.unwrap_or(1000);
        let prefix = i.prefix.clone().unwrap_or_default();
        let delimiter = i.delimiter.clone().unwrap_or_default();
        let marker = i.key_marker.clone().unwrap_or_default();
        let r = self
            .list(&i.bucket, &prefix, &delimiter, &marker, max)
            .await?;
        let versions = r
            .objects
            .iter()
            .map(|o| ObjectVersion {
                key: Some(enc(&o.key, url)),
                version_id: Some("null".into()),
                is_latest: Some(true),
                e_tag: Some(strong(&o.etag)),
                last_modified: Some(ts(o.modified_unix_ms)),
                size: Some(o.size as i64),
                storage_class: Some(ObjectVersionStorageClass::from(class_of(o))),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListObjectVersionsOutput {
            name: Some(i.bucket.clone()),
            prefix: Some(enc(&prefix, url)),
            delimiter: i.delimiter.as_ref().map(|d| enc(d, url)),
            key_marker: Some(enc(&marker, url)),
            max_keys: Some(max),
            is_truncated: Some(r.truncated),
            next_key_marker: r.truncated.then(|| enc(&r.next_start_after, url)),
            next_version_id_marker: r.truncated.then(|| "null".to_string()),
            versions: Some(versions),
            common_prefixes: Some(
                r.common_prefixes
                    .iter()
                    .map(|p| CommonPrefix {
                        prefix: Some(enc(p, url)),
                    })
                    .collect(),
            ),
            encoding_type: i.encoding_type.clone(),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let i = &req.input;
        let b = self.bucket(&i.bucket).await?;
        let (pool, class) = self.placement(i.storage_class.as_ref(), &b)?;
        let up = pb::Upload {
            bucket: i.bucket.clone(),
            key: i.key.clone(),
            pool,
            storage_class: class,
            content_type: i.content_type.clone().unwrap_or_default(),
            user_metadata: i.metadata.clone().unwrap_or_default(),
            owner: who(&req).unwrap_or_default(),
            ..Default::default()
        };
        let u = self
            .meta
            .call(|mut c| {
                let up = up.clone();
                async move {
                    c.create_upload(pb::CreateUploadRequest { upload: Some(up) })
                        .await
                }
            })
            .await
            .map_err(meta_err)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(i.bucket.clone()),
            key: Some(i.key.clone()),
            upload_id: Some(u.upload_id),
            server_side_encryption: sse(),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        mut req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let i = &mut req.input;
        if !(1..=10_000).contains(&i.part_number) {
            return Err(s3_error!(
                InvalidArgument,
                "Part number must be an integer between 1 and 10000, inclusive"
            ));
        }
        if i.content_length.is_some_and(|l| l > MAX_PUT) {
            return Err(s3_error!(
                EntityTooLarge,
                "Your proposed upload exceeds the maximum allowed object size."
            ));
        }
        let u = self.upload(&i.bucket, &i.key, &i.upload_id).await?;
        let b = self.bucket(&i.bucket).await?;
        let exp = expect_of!(i);
        let body = i
            .body
            .take()
            .ok_or_else(|| s3_error!(IncompleteBody, "no body"))?;
        let (w, checked) = self
            .write(
                &u.pool,
                &b,
                body::reader(body),
                &exp,
                i.content_length,
                req.trailing_headers.as_ref(),
            )
            .await?;
        self.commit_part(&u, req.input.part_number, w, &checked.md5_hex)
            .await?;
        let [c32, c32c, c64, s1, s256] = put_checksums(&checked.sum);
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(strong(&checked.md5_hex)),
            server_side_encryption: sse(),
            checksum_crc32: c32,
            checksum_crc32c: c32c,
            checksum_crc64nvme: c64,
            checksum_sha1: s1,
            checksum_sha256: s256,
            ..Default::default()
        }))
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let caller = who(&req);
        let i = &req.input;
        if !(1..=10_000).contains(&i.part_number) {
            return Err(s3_error!(
                InvalidArgument,
                "Part number must be an integer between 1 and 10000, inclusive"
            ));
        }
        let u = self.upload(&i.bucket, &i.key, &i.upload_id).await?;
        let b = self.bucket(&i.bucket).await?;
        let range = copy_source_range(i.copy_source_range.as_deref())?;
        let conds = CopyConds {
            if_match: &i.copy_source_if_match,
            if_none_match: &i.copy_source_if_none_match,
            if_modified_since: &i.copy_source_if_modified_since,
            if_unmodified_since: &i.copy_source_if_unmodified_since,
        };
        let (src, reader) = self
            .copy_source(caller.as_deref(), &i.copy_source, range, conds)
            .await?;
        let len = range.map(|(s, e)| e - s).unwrap_or(src.size);
        let exp = Expect::none();
        let (w, checked) = self
            .write(
                &u.pool,
                &b,
                body::object_reader(reader),
                &exp,
                Some(len as i64),
                None,
            )
            .await?;
        self.commit_part(&u, i.part_number, w, &checked.md5_hex)
            .await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(strong(&checked.md5_hex)),
                last_modified: Some(ts(now_ms())),
                ..Default::default()
            }),
            server_side_encryption: sse(),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let i = &req.input;
        let parts: Vec<pb::CompletedPart> = i
            .multipart_upload
            .as_ref()
            .and_then(|m| m.parts.as_ref())
            .map(|ps| {
                ps.iter()
                    .map(|p| pb::CompletedPart {
                        part_number: p.part_number.unwrap_or(0).max(0) as u32,
                        etag: p
                            .e_tag
                            .as_ref()
                            .map(|e| e.value().to_string())
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let req_pb = pb::CompleteUploadRequest {
            bucket: i.bucket.clone(),
            key: i.key.clone(),
            upload_id: i.upload_id.clone(),
            parts,
            min_part_size: MIN_PART,
        };
        let r = self
            .meta
            .call(|mut c| {
                let req = req_pb.clone();
                async move { c.complete_upload(req).await }
            })
            .await
            .map_err(meta_err)?;
        let o = r.object.unwrap_or_default();
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(i.bucket.clone()),
            key: Some(i.key.clone()),
            location: Some(format!("/{}/{}", i.bucket, i.key)),
            e_tag: Some(strong(&o.etag)),
            server_side_encryption: sse(),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let i = &req.input;
        let r = pb::AbortUploadRequest {
            bucket: i.bucket.clone(),
            key: i.key.clone(),
            upload_id: i.upload_id.clone(),
        };
        self.meta
            .call(|mut c| {
                let r = r.clone();
                async move { c.abort_upload(r).await }
            })
            .await
            .map_err(meta_err)?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let i = &req.input;
        let r = pb::ListPartsRequest {
            bucket: i.bucket.clone(),
            key: i.key.clone(),
            upload_id: i.upload_id.clone(),
            part_number_marker: i.part_number_marker.map(|m| m.max(0) as u32).unwrap_or(0),
            max_parts: i.max_parts.unwrap_or(1000).clamp(1, 1000) as u32,
        };
        let l = self
            .meta
            .call(|mut c| {
                let r = r.clone();
                async move { c.list_parts(r).await }
            })
            .await
            .map_err(meta_err)?;
        let u = l.upload.unwrap_or_default();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(i.bucket.clone()),
            key: Some(i.key.clone()),
            upload_id: Some(i.upload_id.clone()),
            parts: Some(
                l.parts
                    .iter()
                    .map(|p| Part {
                        part_number: Some(p.part_number as i32),
                        e_tag: Some(strong(&p.etag)),
                        size: Some(p.size as i64),
                        last_modified: Some(ts(p.modified_unix_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            is_truncated: Some(l.truncated),
            max_parts: Some(r.max_parts as i32),
            part_number_marker: i.part_number_marker,
            next_part_number_marker: l.truncated.then_some(l.next_part_number_marker as i32),
            storage_class: Some(StorageClass::from(if u.storage_class.is_empty() {
                "STANDARD".to_string()
            } else {
                u.storage_class.clone()
            })),
            initiator: Some(Initiator {
                id: Some(u.owner.clone()),
                display_name: Some(u.owner.clone()),
            }),
            owner: Some(Owner {
                id: Some(u.owner.clone()),
                display_name: Some(u.owner),
            }),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let i = &req.input;
        let url = is_url(&i.encoding_type);
        let r = pb::ListUploadsRequest {
            bucket: i.bucket.clone(),
            prefix: i.prefix.clone().unwrap_or_default(),
            key_marker: i.key_marker.clone().unwrap_or_default(),
            upload_id_marker: i.upload_id_marker.clone().unwrap_or_default(),
            max_uploads: i.max_uploads.unwrap_or(1000).clamp(1, 1000) as u32,
        };
        let l = self
            .meta
            .call(|mut c| {
                let r = r.clone();
                async move { c.list_uploads(r).await }
            })
            .await
            .map_err(meta_err)?;
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(i.bucket.clone()),
            prefix: i.prefix.as_ref().map(|p| enc(p, url)),
            key_marker: i.key_marker.as_ref().map(|k| enc(k, url)),
            upload_id_marker: i.upload_id_marker.clone(),
            next_key_marker: l.truncated.then(|| enc(&l.next_key_marker, url)),
            next_upload_id_marker: l.truncated.then(|| l.next_upload_id_marker.clone()),
            max_uploads: Some(r.max_uploads as i32),
            is_truncated: Some(l.truncated),
            uploads: Some(
                l.uploads
                    .iter()
                    .map(|u| MultipartUpload {
                        key: Some(enc(&u.key, url)),
                        upload_id: Some(u.upload_id.clone()),
                        initiated: Some(ts(u.created_unix_ms)),
                        storage_class: Some(StorageClass::from(u.storage_class.clone())),
                        initiator: Some(Initiator {
                            id: Some(u.owner.clone()),
                            display_name: Some(u.owner.clone()),
                        }),
                        owner: Some(Owner {
                            id: Some(u.owner.clone()),
                            display_name: Some(u.owner.clone()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            encoding_type: i.encoding_type.clone(),
            ..Default::default()
        }))
    }
}

fn object_entry(o: &pb::ObjectVersion, url: bool) -> Object {
    Object {
        key: Some(enc(&o.key, url)),
        size: Some(o.size as i64),
        e_tag: Some(strong(&o.etag)),
        last_modified: Some(ts(o.modified_unix_ms)),
        storage_class: Some(ObjectStorageClass::from(class_of(o))),
        ..Default::default()
    }
}

/// Entry points for the fuzz targets (`sov-fuzz-targets`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// `[start, end)` and the Content-Range a GET or HEAD with `range` answers for `size`.
    pub fn byte_range(range: &Option<Range>, size: u64) -> S3Result<(u64, u64, Option<String>)> {
        super::byte_range(range, size)
    }

    /// UploadPartCopy's source range, checked against a source object of `size`.
    pub fn copy_source_range(header: Option<&str>, size: u64) -> S3Result<Option<(u64, u64)>> {
        let r = super::copy_source_range(header)?;
        super::check_copy_range(r, size)?;
        Ok(r)
    }

    /// Key and prefix encoding of listings (`encoding-type=url` when `url`).
    pub fn enc(s: &str, url: bool) -> String {
        super::enc(s, url)
    }

    /// What a PutObject or UploadPart body is checked against, from its checksum headers.
    pub struct Checks {
        pub content_md5: Option<String>,
        pub algorithm: Option<ChecksumAlgorithm>,
        /// CRC32, CRC32C, CRC64NVME, SHA1, SHA256, as in the request's headers.
        pub sums: [Option<String>; 5],
        pub trailers: Option<http::HeaderMap>,
    }

    /// Hashes `body` as a PutObject would and checks it: the MD5 hex (the ETag) and the
    /// checksum recorded (algorithm, base64 value), or the S3 error.
    pub fn check_body(body: &[u8], c: Checks) -> S3Result<(String, Option<(String, String)>)> {
        let [c32, c32c, c64, s1, s256] = &c.sums;
        let exp = expectations(
            &c.content_md5,
            &c.algorithm,
            [
                ("CRC32", c32),
                ("CRC32C", c32c),
                ("CRC64NVME", c64),
                ("SHA1", s1),
                ("SHA256", s256),
            ],
        );
        let mut h = Hashing::new(body, hasher_for(exp.algorithm.as_deref()));
        let mut sink = Vec::new();
        futures::executor::block_on(tokio::io::AsyncReadExt::read_to_end(&mut h, &mut sink))
            .map_err(|e| s3_error!(InternalError, "{e}"))?;
        let checked = super::check_body(h, &exp, c.trailers)?;
        Ok((checked.md5_hex, checked.sum))
    }

    /// GET/HEAD conditions against an object with `etag` modified at `modified_unix_ms`.
    pub fn check_read_conditions(
        etag: &str,
        modified_unix_ms: u64,
        if_match: &Option<ETagCondition>,
        if_none_match: &Option<ETagCondition>,
        if_modified_since: &Option<Timestamp>,
        if_unmodified_since: &Option<Timestamp>,
    ) -> S3Result<()> {
        let v = pb::ObjectVersion {
            etag: etag.to_string(),
            modified_unix_ms,
            ..Default::default()
        };
        super::check_read_conditions(
            &v,
            if_match,
            if_none_match,
            if_modified_since,
            if_unmodified_since,
        )?;
        super::check_copy_conditions(
            &v,
            &CopyConds {
                if_match,
                if_none_match,
                if_modified_since,
                if_unmodified_since,
            },
        )
    }
}
