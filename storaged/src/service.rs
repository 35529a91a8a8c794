//! The gRPC `ChunkStore` service: request validation, streaming, admission control and
//! per-operation metrics over the [`Store`].

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use sov_proto::storaged as pb;
use sov_proto::storaged::chunk_store_server::ChunkStore;
use tokio::sync::Semaphore;

use tonic::{Request, Response, Status, Streaming};

use crate::cluster::Cluster;
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::store::{Store, validate_id};

/// Bytes per frame of a Get stream.
pub const FRAME: usize = 1 << 20;
/// Most frames a Put keeps apart; more are joined into one buffer.
const MAX_FRAMES: usize = 64;
/// Admission control counts Put memory in units of this many bytes.
const MEMORY_UNIT: u64 = 64 << 10;

/// Who this node is, for NodeInfo.
#[derive(Debug, Clone)]
pub struct NodeIdent {
    pub node_id: String,
    pub zone: String,
    pub io_engine: String,
}

/// The service state.
pub struct ChunkService {
    store: Arc<Store>,
    metrics: Metrics,
    put_memory: Arc<Semaphore>,
    put_memory_units: u64,
    idle_timeout: Duration,
    ident: NodeIdent,
    draining: Arc<AtomicBool>,
    cluster: Option<Arc<Cluster>>,
    recovery: Arc<Mutex<pb::RecoveryInfo>>,
}

impl ChunkService {
    pub fn new(
        store: Arc<Store>,
        metrics: Metrics,
        put_memory: u64,
        idle_timeout: Duration,
        ident: NodeIdent,
        draining: Arc<AtomicBool>,
    ) -> ChunkService {
        let units = put_memory
            .div_ceil(MEMORY_UNIT)
            .clamp(1, u64::from(u32::MAX).min(Semaphore::MAX_PERMITS as u64))
            as usize;
        ChunkService {
            store,
            metrics,
            put_memory: Arc::new(Semaphore::new(units)),
            put_memory_units: units as u64,
            idle_timeout,
            ident,
            draining,
            cluster: None,
            recovery: Arc::new(Mutex::new(pb::RecoveryInfo::default())),
        }
    }

    /// Checks the epoch of Puts against `cluster` and reports `recovery` in NodeInfo.
    pub fn with_cluster(
        mut self,
        cluster: Arc<Cluster>,
        recovery: Arc<Mutex<pb::RecoveryInfo>>,
    ) -> ChunkService {
        self.cluster = Some(cluster);
        self.recovery = recovery;
        self
    }

    /// Refuses a Put placed with an older map than this node's; fetches the map first when
    /// the writer's is newer.
    async fn check_epoch(&self, request: u64) -> Result<(), StoreError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        if request == 0 {
            return Ok(());
        }
        let node = c.epoch();
        if request < node {
            self.metrics.stale_epoch.inc();
            return Err(StoreError::StaleEpoch { request, node });
        }
        if request > node {
            // Bounded: a metad that does not answer must not hold the write.
            let _ = tokio::time::timeout(Duration::from_secs(2), c.refresh(request)).await;
        }
        Ok(())
    }

    fn record(&self, op: &str, start: Instant, code: &str) {
        self.metrics.requests.with_label_values(&[op, code]).inc();
        self.metrics
            .request_seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
    }

    // tonic::Status is what every handler returns; boxing it here would only move the cost.
    #[allow(clippy::result_large_err)]
    fn finish<T>(&self, op: &str, start: Instant, r: Result<T, StoreError>) -> Result<T, Status> {
        match r {
            Ok(v) => {
                self.record(op, start, "ok");
                Ok(v)
            }
            Err(e) => {
                self.record(op, start, e.code());
                Err(e.to_status())
            }
        }
    }

    async fn next_msg(
        &self,
        stream: &mut Streaming<pb::PutRequest>,
    ) -> Result<Option<pb::PutRequest>, StoreError> {
        match tokio::time::timeout(self.idle_timeout, stream.message()).await {
            Err(_) => Err(StoreError::InvalidArgument(format!(
                "put stream idle for {:?}; aborted",
                self.idle_timeout
            ))),
            Ok(Err(status)) => Err(StoreError::InvalidArgument(format!(
                "put stream broken: {}",
                status.message()
            ))),
            Ok(Ok(m)) => Ok(m),
        }
    }

    async fn do_put(
        &self,
        mut stream: Streaming<pb::PutRequest>,
    ) -> Result<pb::PutResponse, StoreError> {
        let header = match self.next_msg(&mut stream).await? {
            Some(pb::PutRequest {
                msg: Some(pb::put_request::Msg::Header(h)),
            }) => h,
            Some(_) => {
                return Err(StoreError::InvalidArgument(
                    "the first message of a put must be its header".into(),
                ));
            }
            None => return Err(StoreError::InvalidArgument("empty put stream".into())),
        };
        validate_id(&header.id)?;
        self.check_epoch(header.epoch).await?;
        let max = self.store.max_chunk_size;
        if header.length > max {
            return Err(StoreError::TooLarge {
                len: header.length,
                max,
            });
        }
        let expected: Option<[u8; 32]> = match header.expected_blake3.len() {
            0 => None,
            32 => Some(header.expected_blake3[..].try_into().expect("32 bytes")),
            n => {
                return Err(StoreError::InvalidArgument(format!(
                    "expected_blake3 must be 32 bytes, got {n}"
                )));
            }
        };
        // Never more than the whole budget, or a put as large as the budget would wait forever.
        let total = self.put_memory_units;
        let units = header.length.div_ceil(MEMORY_UNIT).clamp(1, total) as u32;
        let _permit = self
            .put_memory
            .acquire_many(units)
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        let length = header.length as usize;
        // Frames are kept as they arrived and written with one vectored write: no copy into a
        // fresh buffer (which also cost a page fault per 4 KiB of it).
        let mut frames: Vec<Bytes> = Vec::new();
        let mut received = 0usize;
        let mut hasher = blake3::Hasher::new();
        while let Some(msg) = self.next_msg(&mut stream).await? {
            match msg.msg {
                Some(pb::put_request::Msg::Data(d)) => {
                    if received + d.len() > length {
                        return Err(StoreError::InvalidArgument(format!(
                            "put stream carries more than the declared {length} bytes"
                        )));
                    }
                    hasher.update(&d);
                    received += d.len();
                    if !d.is_empty() {
                        frames.push(d);
                    }
                }
                _ => {
                    return Err(StoreError::InvalidArgument(
                        "only data may follow the header of a put".into(),
                    ));
                }
            }
        }
        if received < length {
            return Err(StoreError::InvalidArgument(format!(
                "truncated put stream: got {received} of {length} bytes"
            )));
        }
        // A client sending many tiny frames gets them joined, so a record stays a few iovecs.
        if frames.len() > MAX_FRAMES {
            let mut joined = BytesMut::with_capacity(length);
            for f in &frames {
                joined.extend_from_slice(f);
            }
            frames = vec![joined.freeze()];
        }
        let hash = *hasher.finalize().as_bytes();
        if let Some(e) = expected
            && e != hash
        {
            return Err(StoreError::InvalidArgument(format!(
                "data does not match expected_blake3 (expected {}, got {})",
                hex::encode(e),
                hex::encode(hash)
            )));
        }
        self.metrics.received_bytes.inc_by(length as u64);
        let (loc, disk) = self.store.put(header.id.clone(), frames, hash).await?;
        Ok(pb::PutResponse {
            id: header.id,
            length: loc.data_len,
            blake3: Bytes::copy_from_slice(&loc.blake3),
            disk,
        })
    }
}

fn info(id: &str, loc: &crate::index::Location, disk: &str, off: u64, len: u64) -> pb::ChunkInfo {
    pb::ChunkInfo {
        id: id.to_string(),
        length: loc.data_len,
        blake3: Bytes::copy_from_slice(&loc.blake3),
        disk: disk.to_string(),
        range_offset: off,
        range_length: len,
    }
}

type GetStream = Pin<Box<dyn Stream<Item = Result<pb::GetResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ChunkStore for ChunkService {
    #[tracing::instrument(skip_all)]
    async fn put(
        &self,
        request: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let start = Instant::now();
        let r = self.do_put(request.into_inner()).await;
        self.finish("put", start, r).map(Response::new)
    }

    type GetStream = GetStream;

    #[tracing::instrument(skip_all)]
    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<GetStream>, Status> {
        let start = Instant::now();
        let req = request.into_inner();
        let r = async {
            let (loc, disk, data) = self.store.get(&req.id).await?;
            let size = data.len() as u64;
            let len = if req.length == 0 {
                size.checked_sub(req.offset)
            } else {
                req.offset
                    .checked_add(req.length)
                    .filter(|end| *end <= size)
                    .map(|_| req.length)
            };
            let Some(len) = len else {
                return Err(StoreError::InvalidRange {
                    offset: req.offset,
                    length: req.length,
                    size,
                });
            };
            let body = data.slice(req.offset as usize..(req.offset + len) as usize);
            Ok((info(&req.id, &loc, &disk, req.offset, len), body))
        }
        .await;
        let (head, body) = self.finish("get", start, r)?;
        self.metrics.sent_bytes.inc_by(body.len() as u64);
        let mut msgs = vec![Ok(pb::GetResponse {
            msg: Some(pb::get_response::Msg::Info(head)),
        })];
        let mut at = 0;
        while at < body.len() {
            let end = (at + FRAME).min(body.len());
            msgs.push(Ok(pb::GetResponse {
                msg: Some(pb::get_response::Msg::Data(body.slice(at..end))),
            }));
            at = end;
        }
        Ok(Response::new(Box::pin(futures::stream::iter(msgs))))
    }

    #[tracing::instrument(skip_all)]
    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let start = Instant::now();
        let r = self.store.delete(&request.into_inner().id).await;
        self.finish("delete", start, r)
            .map(|_| Response::new(pb::DeleteResponse {}))
    }

    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::ChunkInfo>, Status> {
        let start = Instant::now();
        let id = request.into_inner().id;
        let r = self
            .store
            .stat(&id)
            .map(|(loc, disk)| info(&id, &loc, &disk, 0, loc.data_len));
        self.finish("stat", start, r).map(Response::new)
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let start = Instant::now();
        let req = request.into_inner();
        let r = (|| {
            if req.limit > 10_000 {
                return Err(StoreError::InvalidArgument(format!(
                    "limit {} is above 10000",
                    req.limit
                )));
            }
            let limit = if req.limit == 0 { 1000 } else { req.limit } as usize;
            let (page, more) = self.store.list(&req.prefix, &req.start_after, limit)?;
            let next = if more {
                page.last().map(|l| l.id.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::ListResponse {
                entries: page
                    .into_iter()
                    .map(|l| pb::ListEntry {
                        id: l.id,
                        length: l.loc.data_len,
                        blake3: Bytes::copy_from_slice(&l.loc.blake3),
                    })
                    .collect(),
                next_start_after: next,
            })
        })();
        self.finish("list", start, r).map(Response::new)
    }

    async fn list_corrupt(
        &self,
        _request: Request<pb::ListCorruptRequest>,
    ) -> Result<Response<pb::ListCorruptResponse>, Status> {
        let start = Instant::now();
        let r = self.store.corrupt().map(|v| pb::ListCorruptResponse {
            chunks: v
                .into_iter()
                .map(|(id, disk, rec)| pb::CorruptChunk {
                    id,
                    disk,
                    reason: rec.reason,
                    found_at: rec.found_at,
                    found_by: rec.found_by,
                })
                .collect(),
        });
        self.finish("list_corrupt", start, r).map(Response::new)
    }

    async fn node_info(
        &self,
        _request: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let start = Instant::now();
        let store = self.store.clone();
        let disks = tokio::task::spawn_blocking(move || {
            store
                .disks()
                .iter()
                .map(|d| {
                    let s = d.stats();
                    let scrub = d.scrub_state();
                    let corrupt = d.index().corrupt().map(|v| v.len()).unwrap_or(0);
                    pb::DiskInfo {
                        path: d.name().to_string(),
                        capacity_bytes: s.space.capacity,
                        used_bytes: s.space.used,
                        free_bytes: s.space.available,
                        live_bytes: s.live_bytes,
                        segment_bytes: s.segment_bytes,
                        chunks: s.chunks,
                        health: s.health,
                        corrupt_chunks: corrupt as u64,
                        scrub_passes: scrub.passes,
                        scrub_checked: scrub.checked_in_pass,
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(format!("node info task failed: {e}")))?;
        let health = if self.draining.load(Ordering::Relaxed) {
            "draining"
        } else if disks.iter().any(|d| d.health != "ok") {
            "degraded"
        } else {
            "ok"
        };
        self.record("node_info", start, "ok");
        Ok(Response::new(pb::NodeInfoResponse {
            node_id: self.ident.node_id.clone(),
            zone: self.ident.zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            io_engine: self.ident.io_engine.clone(),
            disks,
            max_chunk_size: self.store.max_chunk_size,
            health: health.to_string(),
            epoch: self.cluster.as_ref().map(|c| c.epoch()).unwrap_or(0),
            recovery: Some(*self.recovery.lock().expect("recovery info lock")),
        }))
    }
}

/// The gRPC `ExtentStore` service over [`Extents`](crate::extents::Extents).
pub struct ExtentService {
    extents: Arc<crate::extents::Extents>,
    metrics: Metrics,
}

impl ExtentService {
    pub fn new(extents: Arc<crate::extents::Extents>, metrics: Metrics) -> ExtentService {
        ExtentService { extents, metrics }
    }

    #[allow(clippy::result_large_err)]
    fn done<T>(
        &self,
        op: &str,
        start: Instant,
        r: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.metrics.requests.with_label_values(&[op, &code]).inc();
        self.metrics
            .request_seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        r.map(Response::new)
    }
}

#[tonic::async_trait]
impl sov_proto::storaged::extent_store_server::ExtentStore for ExtentService {
    async fn write_extent(
        &self,
        req: Request<pb::WriteExtentRequest>,
    ) -> Result<Response<pb::WriteExtentResponse>, Status> {
        let start = Instant::now();
        let r = req.into_inner();
        let n = r.data.len() as u64;
        let out = self.extents.write(r).await;
        if out.is_ok() {
            self.metrics.received_bytes.inc_by(n);
        }
        self.done(
            "WriteExtent",
            start,
            out.map(|applied| pb::WriteExtentResponse { applied }),
        )
    }

    async fn read_extent(
        &self,
        req: Request<pb::ReadExtentRequest>,
    ) -> Result<Response<pb::ReadExtentResponse>, Status> {
        let start = Instant::now();
        let out = self.extents.read(req.into_inner()).await;
        if let Ok(r) = &out {
            self.metrics.sent_bytes.inc_by(r.data.len() as u64);
        }
        self.done("ReadExtent", start, out)
    }

    async fn flush_volume(
        &self,
        req: Request<pb::FlushVolumeRequest>,
    ) -> Result<Response<pb::FlushVolumeResponse>, Status> {
        let start = Instant::now();
        let out = self.extents.flush(&req.get_ref().volume_id).await;
        self.done(
            "FlushVolume",
            start,
            out.map(|extents| pb::FlushVolumeResponse { extents }),
        )
    }

    async fn list_extents(
        &self,
        req: Request<pb::ListExtentsRequest>,
    ) -> Result<Response<pb::ListExtentsResponse>, Status> {
        let start = Instant::now();
        let out = self.extents.list(&req.get_ref().volume_id).await;
        self.done(
            "ListExtents",
            start,
            out.map(|extents| pb::ListExtentsResponse { extents }),
        )
    }

    async fn fence_volume(
        &self,
        req: Request<pb::FenceVolumeRequest>,
    ) -> Result<Response<pb::FenceVolumeResponse>, Status> {
        let start = Instant::now();
        let out = self.extents.fence_volume(req.into_inner()).await;
        self.done(
            "FenceVolume",
            start,
            out.map(|fence| pb::FenceVolumeResponse { fence }),
        )
    }

    async fn put_snap_copy(
        &self,
        req: Request<pb::PutSnapCopyRequest>,
    ) -> Result<Response<pb::WriteExtentResponse>, Status> {
        let start = Instant::now();
        let out = self.extents.put_copy(req.into_inner()).await;
        self.done(
            "PutSnapCopy",
            start,
            out.map(|applied| pb::WriteExtentResponse { applied }),
        )
    }
}
