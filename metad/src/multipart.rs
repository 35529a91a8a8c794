//! Multipart uploads in the object index: an upload record, one record per part (each with the
//! manifest of its data), and completion that turns the listed parts into one object whose
//! manifest is theirs (no data is copied). Parts left out, replaced or aborted are tombstoned,
//! so storage nodes free their data; uploads left incomplete for `upload_expiry` are aborted.
//!
//! Errors carry the S3 code first (`NoSuchUpload: ...`) for the gateway to map.

use md5::{Digest, Md5};
use prost::Message;
use sov_proto::manifest::Manifest;
use sov_proto::metad::*;
use tonic::Status;

use crate::core::unix_ms;
use crate::service::{MetadService, RMW_TRIES, decode, version_id};
use crate::store::{Check, Op};
use crate::tables;

/// A part as stored: its key, its raw value and the part.
type PartRecord = (Vec<u8>, Vec<u8>, Part);

/// Highest part number (S3's).
pub const MAX_PART_NUMBER: u32 = 10_000;

fn no_such_upload(id: &str) -> Status {
    Status::not_found(format!("NoSuchUpload: no such upload: {id}"))
}

fn check_names(bucket: &str, key: &str) -> Result<(), Status> {
    tables::validate_bucket_name(bucket).map_err(Status::invalid_argument)?;
    tables::validate_object_key(key).map_err(Status::invalid_argument)
}

/// An ETag as clients send it: quotes and case do not matter.
fn bare_etag(e: &str) -> String {
    e.trim().trim_matches('"').to_ascii_lowercase()
}

impl MetadService {
    fn read_upload(&self, bucket: &str, key: &str, id: &str) -> Result<(Vec<u8>, Upload), Status> {
        let raw = self
            .get(&tables::upload_key(bucket, key, id))?
            .ok_or_else(|| no_such_upload(id))?;
        let u = decode("upload", &raw)?;
        Ok((raw, u))
    }

    /// Every part record of an upload, in part order: (key, raw value, part).
    fn read_parts(&self, id: &str) -> Result<Vec<PartRecord>, Status> {
        self.scan(&tables::parts_prefix(id))?
            .into_iter()
            .map(|(k, v)| {
                let p = decode("part", &v)?;
                Ok((k, v, p))
            })
            .collect()
    }

    pub(crate) async fn create_upload(&self, r: CreateUploadRequest) -> Result<Upload, Status> {
        let mut u = r
            .upload
            .ok_or_else(|| Status::invalid_argument("CreateUpload needs an upload"))?;
        check_names(&u.bucket, &u.key)?;
        u.upload_id = version_id();
        u.created_unix_ms = unix_ms();
        let key = tables::upload_key(&u.bucket, &u.key, &u.upload_id);
        let failed = self
            .txn(
                vec![
                    (tables::bucket_key(&u.bucket), Check::Exists),
                    (key.clone(), Check::Absent),
                ],
                vec![Op::Put {
                    key,
                    value: u.encode_to_vec(),
                }],
            )
            .await?;
        match failed {
            None => Ok(u),
            Some((0, _)) => Err(Status::not_found(format!("no such bucket: {}", u.bucket))),
            Some(_) => Err(Status::aborted("upload id collision; retry")),
        }
    }

    pub(crate) async fn get_upload(&self, r: GetUploadRequest) -> Result<Upload, Status> {
        check_names(&r.bucket, &r.key)?;
        self.core.linearize().await?;
        Ok(self.read_upload(&r.bucket, &r.key, &r.upload_id)?.1)
    }

    pub(crate) async fn put_part(&self, r: PutPartRequest) -> Result<PutPartResponse, Status> {
        check_names(&r.bucket, &r.key)?;
        let mut part = r
            .part
            .ok_or_else(|| Status::invalid_argument("PutPart needs a part"))?;
        if part.part_number == 0 || part.part_number > MAX_PART_NUMBER {
            return Err(Status::invalid_argument(format!(
                "InvalidArgument: part number must be 1 to {MAX_PART_NUMBER}"
            )));
        }
        part.modified_unix_ms = unix_ms();
        let pkey = tables::part_key(&r.upload_id, part.part_number);
        let ukey = tables::upload_key(&r.bucket, &r.key, &r.upload_id);
        for _ in 0..RMW_TRIES {
            let (uraw, mut u) = match self.read_upload(&r.bucket, &r.key, &r.upload_id) {
                Ok(v) => v,
                Err(e) => {
                    // A negative answer from local state: confirm it is current.
                    self.core.linearize().await?;
                    self.read_upload(&r.bucket, &r.key, &r.upload_id)
                        .map_err(|_| e)?
                }
            };
            let cur = self.get(&pkey)?;
            let mut ops = vec![Op::Put {
                key: pkey.clone(),
                value: part.encode_to_vec(),
            }];
            if let Some(old) = &cur {
                let old: Part = decode("part", old)?;
                ops.extend(self.tombstones(&old.manifest)?);
            }
            // Every part change moves the upload's version, so completion sees it.
            u.parts_version += 1;
            ops.push(Op::Put {
                key: ukey.clone(),
                value: u.encode_to_vec(),
            });
            let failed = self
                .txn(
                    vec![
                        (ukey.clone(), Check::Equals(uraw)),
                        (
                            pkey.clone(),
                            match cur {
                                Some(c) => Check::Equals(c),
                                None => Check::Absent,
                            },
                        ),
                    ],
                    ops,
                )
                .await?;
            if failed.is_none() {
                part.manifest = Default::default();
                return Ok(PutPartResponse { part: Some(part) });
            }
        }
        Err(Status::aborted("the upload kept changing; retry"))
    }

    pub(crate) async fn list_parts(
        &self,
        r: ListPartsRequest,
    ) -> Result<ListPartsResponse, Status> {
        check_names(&r.bucket, &r.key)?;
        self.core.linearize().await?;
        let (_, u) = self.read_upload(&r.bucket, &r.key, &r.upload_id)?;
        let max = match r.max_parts {
            0 => 1000,
            n => n.min(1000),
        } as usize;
        let mut parts: Vec<Part> = self
            .read_parts(&r.upload_id)?
            .into_iter()
            .map(|(_, _, mut p)| {
                p.manifest = Default::default();
                p
            })
            .filter(|p| p.part_number > r.part_number_marker)
            .collect();
        let truncated = parts.len() > max;
        parts.truncate(max);
        let next = if truncated {
            parts.last().map(|p| p.part_number).unwrap_or(0)
        } else {
            0
        };
        Ok(ListPartsResponse {
            upload: Some(u),
            parts,
            truncated,
            next_part_number_marker: next,
        })
    }

    pub(crate) async fn list_uploads(
        &self,
        r: ListUploadsRequest,
    ) -> Result<ListUploadsResponse, Status> {
        tables::validate_bucket_name(&r.bucket).map_err(Status::invalid_argument)?;
        self.core.linearize().await?;
        if !self.bucket_exists(&r.bucket)? {
            return Err(Status::not_found(format!("no such bucket: {}", r.bucket)));
        }
        let max = match r.max_uploads {
            0 => 1000,
            n => n.min(1000),
        } as usize;
        let mut uploads = Vec::new();
        for (_, v) in self.scan(&tables::uploads_prefix(&r.bucket))? {
            let u: Upload = decode("upload", &v)?;
            if !u.key.starts_with(&r.prefix) {
                continue;
            }
            let after_marker = if r.key_marker.is_empty() {
                true
            } else if r.upload_id_marker.is_empty() {
                u.key > r.key_marker
            } else {
                (u.key.as_str(), u.upload_id.as_str())
                    > (r.key_marker.as_str(), r.upload_id_marker.as_str())
            };
            if after_marker {
                uploads.push(u);
            }
        }
        uploads.sort_by(|a, b| (&a.key, &a.upload_id).cmp(&(&b.key, &b.upload_id)));
        let truncated = uploads.len() > max;
        uploads.truncate(max);
        let (nk, nu) = match uploads.last() {
            Some(u) if truncated => (u.key.clone(), u.upload_id.clone()),
            _ => (String::new(), String::new()),
        };
        Ok(ListUploadsResponse {
            uploads,
            truncated,
            next_key_marker: nk,
            next_upload_id_marker: nu,
        })
    }

    pub(crate) async fn complete_upload(
        &self,
        r: CompleteUploadRequest,
    ) -> Result<PutObjectResponse, Status> {
        check_names(&r.bucket, &r.key)?;
        if r.parts.is_empty() {
            return Err(Status::invalid_argument(
                "MalformedXML: a completion lists at least one part",
            ));
        }
        for w in r.parts.windows(2) {
            if w[1].part_number <= w[0].part_number {
                return Err(Status::invalid_argument(
                    "InvalidPartOrder: parts must be listed in ascending order of part number",
                ));
            }
        }
        let okey = tables::object_key(&r.bucket, &r.key);
        let ukey = tables::upload_key(&r.bucket, &r.key, &r.upload_id);
        for _ in 0..RMW_TRIES {
            let (uraw, u) = match self.read_upload(&r.bucket, &r.key, &r.upload_id) {
                Ok(v) => v,
                Err(e) => {
                    self.core.linearize().await?;
                    self.read_upload(&r.bucket, &r.key, &r.upload_id)
                        .map_err(|_| e)?
                }
            };
            let stored = self.read_parts(&r.upload_id)?;
            let mut manifests = Vec::new();
            let mut md5s = Md5::new();
            let mut size = 0u64;
            let last = r.parts.len() - 1;
            for (i, want) in r.parts.iter().enumerate() {
                let Some((_, _, p)) = stored
                    .iter()
                    .find(|(_, _, p)| p.part_number == want.part_number)
                else {
                    return Err(Status::invalid_argument(format!(
                        "InvalidPart: part {} was not uploaded",
                        want.part_number
                    )));
                };
                if bare_etag(&want.etag) != bare_etag(&p.etag) {
                    return Err(Status::invalid_argument(format!(
                        "InvalidPart: part {} has ETag {}, not {}",
                        want.part_number, p.etag, want.etag
                    )));
                }
                if i < last && p.size < r.min_part_size {
                    return Err(Status::invalid_argument(format!(
                        "EntityTooSmall: part {} is {} bytes, the minimum is {}",
                        p.part_number, p.size, r.min_part_size
                    )));
                }
                let raw = hex::decode(bare_etag(&p.etag)).map_err(|_| {
                    Status::internal(format!("part {} has a malformed ETag", p.part_number))
                })?;
                md5s.update(&raw);
                size += p.size;
                let m = Manifest::decode(p.manifest.as_ref())
                    .map_err(|e| Status::internal(format!("part manifest: {e}")))?;
                if m.size > 0 {
                    manifests.push(m);
                }
            }
            let whole = Manifest {
                format: 1,
                size,
                parts: manifests,
                ..Default::default()
            };
            let obj = ObjectVersion {
                bucket: r.bucket.clone(),
                key: r.key.clone(),
                version_id: version_id(),
                size,
                etag: format!("{}-{}", hex::encode(md5s.finalize()), r.parts.len()),
                modified_unix_ms: unix_ms(),
                pool: u.pool.clone(),
                storage_class: u.storage_class.clone(),
                content_type: u.content_type.clone(),
                user_metadata: u.user_metadata.clone(),
                manifest: whole.encode_to_vec().into(),
            };
            let value = obj.encode_to_vec();
            if value.len() > tables::MAX_RECORD {
                return Err(Status::invalid_argument(
                    "the completed object's record is too large",
                ));
            }
            let cur = self.get(&okey)?;
            let replaced = cur
                .as_deref()
                .map(|c| decode::<ObjectVersion>("object", c))
                .transpose()?;
            let mut ops = vec![Op::Put {
                key: okey.clone(),
                value,
            }];
            if let Some(old) = &replaced {
                ops.extend(self.tombstones(&old.manifest)?);
            }
            ops.push(Op::Delete { key: ukey.clone() });
            for (k, _, p) in &stored {
                ops.push(Op::Delete { key: k.clone() });
                if !r.parts.iter().any(|w| w.part_number == p.part_number) {
                    ops.extend(self.tombstones(&p.manifest)?);
                }
            }
            let failed = self
                .txn(
                    vec![
                        (tables::bucket_key(&r.bucket), Check::Exists),
                        (ukey.clone(), Check::Equals(uraw)),
                        (
                            okey.clone(),
                            match cur {
                                Some(c) => Check::Equals(c),
                                None => Check::Absent,
                            },
                        ),
                    ],
                    ops,
                )
                .await?;
            match failed {
                None => {
                    let mut obj = obj;
                    obj.manifest = Default::default();
                    return Ok(PutObjectResponse {
                        object: Some(obj),
                        replaced,
                    });
                }
                Some((0, _)) => {
                    return Err(Status::not_found(format!("no such bucket: {}", r.bucket)));
                }
                Some(_) => continue,
            }
        }
        Err(Status::aborted("the upload kept changing; retry"))
    }

    pub(crate) async fn abort_upload(&self, r: AbortUploadRequest) -> Result<(), Status> {
        check_names(&r.bucket, &r.key)?;
        for _ in 0..RMW_TRIES {
            let (uraw, _) = match self.read_upload(&r.bucket, &r.key, &r.upload_id) {
                Ok(v) => v,
                Err(e) => {
                    self.core.linearize().await?;
                    self.read_upload(&r.bucket, &r.key, &r.upload_id)
                        .map_err(|_| e)?
                }
            };
            if self
                .drop_upload(&r.bucket, &r.key, &r.upload_id, uraw)
                .await?
            {
                return Ok(());
            }
        }
        Err(Status::aborted("the upload kept changing; retry"))
    }

    /// Deletes an upload and its parts, tombstoning their data, if the upload record is still
    /// `uraw`. False when it changed meanwhile.
    async fn drop_upload(
        &self,
        bucket: &str,
        key: &str,
        id: &str,
        uraw: Vec<u8>,
    ) -> Result<bool, Status> {
        let ukey = tables::upload_key(bucket, key, id);
        let mut ops = vec![Op::Delete { key: ukey.clone() }];
        for (k, _, p) in self.read_parts(id)? {
            ops.push(Op::Delete { key: k });
            ops.extend(self.tombstones(&p.manifest)?);
        }
        Ok(self
            .txn(vec![(ukey, Check::Equals(uraw))], ops)
            .await?
            .is_none())
    }

    /// On the leader: aborts uploads older than `max_age` (S3's lifecycle rule for incomplete
    /// uploads, always on). Returns how many went.
    pub(crate) async fn expire_uploads(&self, max_age_ms: u64) -> Result<usize, Status> {
        let now = unix_ms();
        let mut n = 0;
        for (k, v) in self.scan(tables::UPLOAD_PREFIX)? {
            let u: Upload = decode("upload", &v)?;
            if now.saturating_sub(u.created_unix_ms) < max_age_ms {
                continue;
            }
            let _ = k;
            if self.drop_upload(&u.bucket, &u.key, &u.upload_id, v).await? {
                tracing::info!(bucket = %u.bucket, key = %u.key, upload = %u.upload_id, "incomplete upload expired");
                n += 1;
            }
        }
        Ok(n)
    }
}
