//! Objects: written as sealed chunks to every member of each chunk's placement group (copies
//! or Reed-Solomon shards) and acknowledged only when every live member has its piece durable;
//! read back verified, around missing or bad copies, with the bad ones repaired in the
//! background.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use prost::Message;
use sov_common::codec::{self, ChunkKey};
use sov_common::layout::{ChunkId, Uid};
use sov_common::placement::Redundancy;
use sov_common::stripe;
use sov_proto::metad::{
    DeleteObjectRequest, GetBucketRequest, GetDataKeyRequest, GetObjectRequest, ObjectVersion,
    PutObjectRequest,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use tonic::Code;

use crate::error::ClientError;
use crate::manifest::{self, Manifest};
use crate::map::{MapCache, PoolView, View};
use crate::meta::MetaClient;
use crate::nodes::{Deadlines, Nodes, is_missing_or_bad, is_stale_epoch};

/// Rounds of placement a chunk write gets when the map changes under it.
const PLACE_ROUNDS: usize = 4;
/// Background repairs (read-repair puts) at once; more are left to the recovery sweep.
const REPAIRS_IN_FLIGHT: usize = 8;

/// How the client cuts and sends objects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Plaintext bytes per chunk.
    pub chunk_size: usize,
    /// Chunks written or read ahead at once (memory ≈ this × chunk size × amplification).
    pub inflight_chunks: usize,
    /// Age after which the cluster map is fetched again before use.
    pub map_max_age: Duration,
    /// Reads prefer nodes in this zone.
    pub zone: Option<String>,
    pub deadlines: Deadlines,
    /// Rewrite bad or missing copies found while reading.
    pub read_repair: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            chunk_size: 4 << 20,
            inflight_chunks: 4,
            map_max_age: Duration::from_secs(5),
            zone: None,
            deadlines: Deadlines::default(),
            read_repair: true,
        }
    }
}

/// Options of one put.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// Pool to write to; empty = the bucket's default pool.
    pub pool: Option<String>,
    pub content_type: String,
    pub storage_class: String,
    pub etag: Option<String>,
    pub user_metadata: HashMap<String, String>,
    /// Put only if the current version has this id ("" = only if there is none).
    pub expected_version_id: Option<String>,
}

/// What a put did.
#[derive(Debug, Clone)]
pub struct PutResult {
    pub object: ObjectVersion,
    pub replaced: Option<ObjectVersion>,
    pub chunks: u64,
    /// Chunks acknowledged with fewer than all members of their set (repair completes them).
    pub degraded_chunks: u64,
}

/// Chunks of one object as written, before the index names them.
#[derive(Debug, Clone)]
pub struct Written {
    pub manifest: Manifest,
    pub degraded_chunks: u64,
    /// blake3 of the plaintext.
    pub plain_blake3: [u8; 32],
}

struct Inner {
    meta: MetaClient,
    map: MapCache,
    nodes: Nodes,
    keys: Mutex<HashMap<String, ChunkKey>>,
    repairs: Arc<Semaphore>,
    cfg: ClientConfig,
}

/// The object client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// One stored piece of a chunk: the id, the bytes and their blake3.
type Piece = (String, Bytes, [u8; 32]);

async fn read_full<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut at = 0;
    while at < n {
        let got = r.read(&mut buf[at..]).await?;
        if got == 0 {
            break;
        }
        at += got;
    }
    buf.truncate(at);
    Ok(buf)
}

fn blocking_err(e: tokio::task::JoinError) -> ClientError {
    ClientError::Internal(format!("a coding task failed: {e}"))
}

impl Client {
    /// A client of the cluster whose metad members are `metad`.
    pub fn new(metad: &[String], cfg: ClientConfig) -> Result<Client, ClientError> {
        let meta = MetaClient::new(metad)?;
        Ok(Self::with_meta(meta, cfg))
    }

    /// A client over an existing metad client.
    pub fn with_meta(meta: MetaClient, cfg: ClientConfig) -> Client {
        Client {
            inner: Arc::new(Inner {
                map: MapCache::new(meta.clone(), cfg.map_max_age),
                meta,
                nodes: Nodes::new(cfg.deadlines),
                keys: Mutex::new(HashMap::new()),
                repairs: Arc::new(Semaphore::new(REPAIRS_IN_FLIGHT)),
                cfg,
            }),
        }
    }

    pub fn meta(&self) -> &MetaClient {
        &self.inner.meta
    }

    pub fn map(&self) -> &MapCache {
        &self.inner.map
    }

    pub fn nodes(&self) -> &Nodes {
        &self.inner.nodes
    }

    pub(crate) async fn data_key(&self, id: &str) -> Result<ChunkKey, ClientError> {
        if id.is_empty() {
            return Err(ClientError::Invalid(
                "the bucket has no data key (metad runs without a master key), so its objects \
                 cannot be encrypted"
                    .into(),
            ));
        }
        if let Some(k) = self.inner.keys.lock().expect("keys lock").get(id) {
            return Ok(k.clone());
        }
        let req = GetDataKeyRequest { id: id.to_string() };
        let dk = self
            .inner
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_data_key(req).await }
            })
            .await?;
        let bytes: [u8; 32] = dk.key[..]
            .try_into()
            .map_err(|_| ClientError::Internal(format!("data key {id} is not 32 bytes")))?;
        let key = ChunkKey::from_bytes(bytes);
        self.inner
            .keys
            .lock()
            .expect("keys lock")
            .insert(id.to_string(), key.clone());
        Ok(key)
    }

    /// Writes an object from `body` and records it in the index.
    pub async fn put_object<R: AsyncRead + Unpin + Send>(
        &self,
        bucket: &str,
        key: &str,
        body: R,
        opts: PutOptions,
    ) -> Result<PutResult, ClientError> {
        let req = GetBucketRequest {
            name: bucket.to_string(),
            consistency: 0,
        };
        let b = self
            .inner
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_bucket(req).await }
            })
            .await?;
        let pool = opts
            .pool
            .clone()
            .filter(|p| !p.is_empty())
            .or_else(|| Some(b.pool.clone()).filter(|p| !p.is_empty()))
            .ok_or_else(|| {
                ClientError::Invalid(format!(
                    "bucket {bucket} has no default pool and none was given"
                ))
            })?;
        let w = self.write_data(&pool, &b.data_key_id, body).await?;
        self.commit(bucket, key, &pool, w, opts).await
    }

    /// Records written data as the current version of bucket/key; on a definite failure the
    /// data is freed again (on `UNKNOWN` it is kept: the version may exist).
    pub async fn commit(
        &self,
        bucket: &str,
        key: &str,
        pool: &str,
        w: Written,
        opts: PutOptions,
    ) -> Result<PutResult, ClientError> {
        let object = ObjectVersion {
            bucket: bucket.to_string(),
            key: key.to_string(),
            size: w.manifest.size,
            etag: opts
                .etag
                .clone()
                .unwrap_or_else(|| hex::encode(&w.plain_blake3[..16])),
            pool: pool.to_string(),
            storage_class: opts.storage_class.clone(),
            content_type: opts.content_type.clone(),
            user_metadata: opts.user_metadata.clone(),
            manifest: w.manifest.encode_to_vec().into(),
            ..Default::default()
        };
        let req = PutObjectRequest {
            object: Some(object),
            expected_version_id: opts.expected_version_id.clone(),
        };
        let r = self
            .inner
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.put_object(req).await }
            })
            .await;
        match r {
            Ok(r) => Ok(PutResult {
                object: r.object.unwrap_or_default(),
                replaced: r.replaced,
                chunks: manifest::chunk_count(&w.manifest),
                degraded_chunks: w.degraded_chunks,
            }),
            Err(s) => {
                // An unknown outcome may have committed: keep the chunks (at worst orphans).
                if s.code() != Code::Unknown {
                    self.discard(&w.manifest);
                }
                Err(ClientError::Meta(s))
            }
        }
    }

    /// Writes `body` as chunks in `pool` sealed under data key `data_key_id`; returns the
    /// manifest. Nothing is recorded in the index (the caller does that).
    pub async fn write_data<R: AsyncRead + Unpin + Send>(
        &self,
        pool: &str,
        data_key_id: &str,
        mut body: R,
    ) -> Result<Written, ClientError> {
        let view = self.inner.map.get().await?;
        let pool = view
            .pools
            .get(pool)
            .cloned()
            .ok_or_else(|| ClientError::Invalid(format!("no such pool: {pool}")))?;
        let key = self.data_key(data_key_id).await?;
        let uid = Uid::random();
        let cs = self.inner.cfg.chunk_size.max(1);
        let (replicas, ec_k, ec_m, codec_id) = match pool.redundancy {
            Redundancy::Replicated { size } => (u32::from(size), 0, 0, 0),
            Redundancy::Ec { k, m } => (
                0,
                u32::from(k),
                u32::from(m),
                u32::from(stripe::CODEC_RS_SIMD),
            ),
        };
        let mut m = Manifest {
            format: manifest::FORMAT,
            pool_id: pool.id,
            pg_count: pool.pg_count,
            replicas,
            ec_k,
            ec_m,
            codec: codec_id,
            data_key_id: data_key_id.to_string(),
            uid: uid.0.to_vec().into(),
            size: 0,
            chunk_size: cs as u32,
            chunk_blake3: Bytes::new(),
            parts: vec![],
        };
        let mut hashes = Vec::new();
        let mut plain = blake3::Hasher::new();
        let mut degraded = 0u64;
        let mut inflight = FuturesOrdered::new();
        let mut idx = 0u32;
        let mut total = 0u64;
        let result: Result<(), ClientError> = async {
            loop {
                let buf = read_full(&mut body, cs).await?;
                if buf.is_empty() {
                    break;
                }
                let last = buf.len() < cs;
                total += buf.len() as u64;
                plain.update(&buf);
                inflight.push_back(self.write_chunk(&pool, uid, idx, buf, key.clone()));
                idx += 1;
                while inflight.len() >= self.inner.cfg.inflight_chunks.max(1) {
                    let (h, d) = inflight.next().await.expect("non-empty")?;
                    hashes.push(h);
                    degraded += u64::from(d);
                }
                if last {
                    break;
                }
            }
            while let Some(r) = inflight.next().await {
                let (h, d) = r?;
                hashes.push(h);
                degraded += u64::from(d);
            }
            Ok(())
        }
        .await;
        m.size = total;
        if let Err(e) = result {
            drop(inflight);
            // Chunks already placed are orphans: free what can be freed now.
            m.chunk_blake3 = vec![0u8; idx as usize * 32].into();
            m.size = u64::from(idx) * cs as u64;
            self.discard(&m);
            return Err(e);
        }
        m.chunk_blake3 = hashes.concat().into();
        Ok(Written {
            manifest: m,
            degraded_chunks: degraded,
            plain_blake3: *plain.finalize().as_bytes(),
        })
    }

    /// Seals (and for erasure coding, encodes) one chunk and places it.
    async fn write_chunk(
        &self,
        pool: &PoolView,
        uid: Uid,
        idx: u32,
        plaintext: Vec<u8>,
        key: ChunkKey,
    ) -> Result<([u8; 32], bool), ClientError> {
        let base = ChunkId::new(pool.id, pool.pg_count, uid, idx, None);
        let r = pool.redundancy;
        let (sealed_hash, pieces) =
            tokio::task::spawn_blocking(move || pieces_of(&key, &base, r, &plaintext))
                .await
                .map_err(blocking_err)??;
        let degraded = self.place(pool, &base, &pieces).await?;
        Ok((sealed_hash, degraded))
    }

    /// Puts `pieces[i]` on position `i` of the chunk's set; `Ok(true)` when acknowledged
    /// degraded (some member skipped or failed).
    async fn place(
        &self,
        pool: &PoolView,
        base: &ChunkId,
        pieces: &[Piece],
    ) -> Result<bool, ClientError> {
        let r = pool.redundancy;
        let min = r.min_size();
        let nodes = &self.inner.nodes;
        let mut view = self.inner.map.get().await?;
        let mut last_err = String::new();
        for round in 0..PLACE_ROUNDS {
            let slots = view.slots(pool.id, &r, base.pg);
            let mut puts = FuturesUnordered::new();
            let mut skipped = 0usize;
            for (pos, slot) in slots.iter().enumerate() {
                let Some(node) = slot else {
                    skipped += 1;
                    continue;
                };
                let addr = match view.addr(node) {
                    Some(a) if view.is_up(node) && !nodes.is_suspect(node) => a.to_string(),
                    _ => {
                        skipped += 1;
                        continue;
                    }
                };
                let (id, data, h) = pieces[pos].clone();
                let epoch = view.epoch;
                let node = node.clone();
                puts.push(async move {
                    let mut r = nodes.put(&addr, &id, data.clone(), h, epoch).await;
                    if let Err(s) = &r
                        && !is_stale_epoch(s)
                        && s.code() != Code::InvalidArgument
                    {
                        // One more try inside the deadline before the member counts as failed.
                        r = nodes.put(&addr, &id, data, h, epoch).await;
                    }
                    (node, r)
                });
            }
            let mut ok = 0usize;
            let mut stale = false;
            let mut errors = Vec::new();
            while let Some((node, r)) = puts.next().await {
                match r {
                    Ok(()) => {
                        ok += 1;
                        nodes.clear(&node);
                    }
                    Err(s) if is_stale_epoch(&s) => stale = true,
                    Err(s) => {
                        nodes.suspect(&node);
                        errors.push(format!("{node}: {}", s.message()));
                    }
                }
            }
            if stale {
                view = self.inner.map.refresh(view.epoch + 1).await?;
                continue;
            }
            if ok >= min {
                return Ok(ok < slots.len());
            }
            last_err = format!(
                "pool {} ({r}): chunk {} reached {ok} of {} members ({skipped} down or unplaced), \
                 at least {min} needed{}{}",
                pool.name,
                base.base(),
                slots.len(),
                if errors.is_empty() { "" } else { "; " },
                errors.join("; ")
            );
            if round == 0 {
                // The map may be behind (nodes went out, new ones came): look once more.
                view = self.inner.map.refresh(view.epoch + 1).await?;
                continue;
            }
            break;
        }
        Err(ClientError::Unavailable(last_err))
    }

    /// Frees the chunks of an object version that was never recorded (best effort, detached).
    pub fn discard(&self, m: &Manifest) {
        let this = self.clone();
        let m = m.clone();
        tokio::spawn(async move {
            let Some(view) = this.inner.map.cached() else {
                return;
            };
            let ids = manifest::stored_ids(&m);
            for id in ids {
                for n in view.up_nodes() {
                    let _ = this.inner.nodes.delete(&n.addr, &id).await;
                }
            }
        });
    }

    /// Removes the current version of a key; its data is freed by the storage nodes once the
    /// tombstone metad wrote in the same step is due.
    pub async fn delete_object(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectVersion>, ClientError> {
        let req = DeleteObjectRequest {
            bucket: bucket.to_string(),
            key: key.to_string(),
            expected_version_id: None,
        };
        let r = self
            .inner
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.delete_object(req).await }
            })
            .await?;
        Ok(r.deleted)
    }

    /// The current version of a key (linearizable).
    pub async fn head_object(&self, bucket: &str, key: &str) -> Result<ObjectVersion, ClientError> {
        let req = GetObjectRequest {
            bucket: bucket.to_string(),
            key: key.to_string(),
            consistency: 0,
        };
        Ok(self
            .inner
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_object(req).await }
            })
            .await?)
    }

    /// Opens the current version of a key for reading, optionally a byte range
    /// `[start, end)` of it.
    pub async fn get_object(
        &self,
        bucket: &str,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<(ObjectVersion, ObjectReader), ClientError> {
        let v = self.head_object(bucket, key).await?;
        let m = manifest::decode(&v.manifest).map_err(ClientError::Internal)?;
        let r = self.reader(m, range).await?;
        Ok((v, r))
    }

    /// A reader over the data a manifest describes (a composite one part after part).
    pub async fn reader(
        &self,
        m: Manifest,
        range: Option<(u64, u64)>,
    ) -> Result<ObjectReader, ClientError> {
        let (start, end) = range.unwrap_or((0, m.size));
        if start > end || end > m.size {
            return Err(ClientError::Invalid(format!(
                "range {start}..{end} is outside the object of {} bytes",
                m.size
            )));
        }
        // Each leaf manifest's share of the range, in its own offsets.
        let mut segs = std::collections::VecDeque::new();
        let mut at = 0u64;
        for leaf in manifest::leaves(&m) {
            let (lo, hi) = (at, at + leaf.size);
            at = hi;
            let (s, e) = (start.max(lo), end.min(hi));
            if s < e {
                segs.push_back((leaf.clone(), s - lo, e - lo));
            }
        }
        Ok(ObjectReader {
            client: self.clone(),
            segs,
            cur: None,
        })
    }

    /// Reads a whole object into memory (tests, small objects).
    pub async fn read_all(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(ObjectVersion, Vec<u8>), ClientError> {
        let (v, mut r) = self.get_object(bucket, key, None).await?;
        let mut out = Vec::with_capacity(v.size as usize);
        while let Some(c) = r.next_chunk().await {
            out.extend_from_slice(&c?);
        }
        Ok((v, out))
    }

    /// Reads, verifies and opens chunk `idx`.
    async fn read_chunk(
        &self,
        m: Arc<Manifest>,
        idx: u64,
        key: ChunkKey,
    ) -> Result<Bytes, ClientError> {
        let r = manifest::redundancy(&m).map_err(ClientError::Internal)?;
        let cid = manifest::chunk_id(&m, idx);
        let want = manifest::chunk_blake3(&m, idx);
        let view = self.inner.map.get().await?;
        let slots = view.slots(m.pool_id, &r, cid.pg);
        let sealed = match r {
            Redundancy::Replicated { .. } => self.read_replica(&view, &slots, &cid, want).await?,
            Redundancy::Ec { k, m: par } => {
                self.read_stripe(&view, &slots, &cid, usize::from(k), usize::from(par), want)
                    .await?
            }
        };
        let aad = cid.base();
        tokio::task::spawn_blocking(move || codec::open(&key, aad.as_bytes(), &sealed, &want))
            .await
            .map_err(blocking_err)?
            .map(Bytes::from)
            .map_err(|e| ClientError::DataLoss(format!("chunk {cid}: {e}")))
    }

    /// Nodes to ask for a piece held at `slot`: the slot's node first (when up), then every
    /// other up node (a past member may still hold it), same-zone nodes first.
    fn candidates(&self, view: &View, slot: Option<&String>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(n) = slot
            && view.is_up(n)
            && let Some(a) = view.addr(n)
        {
            out.push((n.clone(), a.to_string()));
        }
        let zone = self.inner.cfg.zone.as_deref();
        let mut rest: Vec<_> = view
            .up_nodes()
            .filter(|n| Some(&n.id) != slot)
            .map(|n| (Some(n.zone.as_str()) != zone, n.id.clone(), n.addr.clone()))
            .collect();
        rest.sort();
        out.extend(rest.into_iter().map(|(_, id, a)| (id, a)));
        out
    }

    async fn read_replica(
        &self,
        view: &View,
        slots: &[Option<String>],
        cid: &ChunkId,
        want: [u8; 32],
    ) -> Result<Bytes, ClientError> {
        let id = cid.to_string();
        let nodes = &self.inner.nodes;
        // Current members first (same zone first), then anyone else.
        let zone = self.inner.cfg.zone.as_deref();
        let mut order: Vec<(bool, usize, String, String)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let n = s.as_ref()?;
                let node = view.nodes.get(n)?;
                view.is_up(n).then(|| {
                    (
                        Some(node.zone.as_str()) != zone,
                        i,
                        n.clone(),
                        node.addr.clone(),
                    )
                })
            })
            .collect();
        order.sort();
        let mut tried: Vec<String> = order.iter().map(|o| o.2.clone()).collect();
        let mut list: Vec<(String, String)> =
            order.into_iter().map(|(_, _, n, a)| (n, a)).collect();
        for (n, a) in self.candidates(view, None) {
            if !tried.contains(&n) {
                tried.push(n.clone());
                list.push((n, a));
            }
        }
        let mut to_repair = Vec::new();
        let mut errors = Vec::new();
        for (node, addr) in list {
            match nodes.get(&addr, &id).await {
                Ok(b) if *blake3::hash(&b).as_bytes() == want => {
                    nodes.clear(&node);
                    if !to_repair.is_empty() {
                        self.repair(view.epoch, to_repair, id.clone(), b.clone(), want);
                    }
                    return Ok(b);
                }
                Ok(_) => {
                    errors.push(format!("{node}: checksum mismatch"));
                    if slots.iter().flatten().any(|s| s == &node) {
                        to_repair.push(addr);
                    }
                }
                Err(s) => {
                    if is_missing_or_bad(&s) {
                        if slots.iter().flatten().any(|x| x == &node) {
                            to_repair.push(addr);
                        }
                    } else {
                        nodes.suspect(&node);
                    }
                    if s.code() != Code::NotFound {
                        errors.push(format!("{node}: {}", s.message()));
                    }
                }
            }
        }
        Err(ClientError::DataLoss(format!(
            "chunk {id}: no good copy on any up node ({})",
            if errors.is_empty() {
                "not found".into()
            } else {
                errors.join("; ")
            }
        )))
    }

    async fn read_stripe(
        &self,
        view: &View,
        slots: &[Option<String>],
        cid: &ChunkId,
        k: usize,
        m: usize,
        want: [u8; 32],
    ) -> Result<Bytes, ClientError> {
        let w = k + m;
        let nodes = &self.inner.nodes;
        let shard_id = |s: usize| {
            ChunkId {
                shard: Some(s as u8),
                ..*cid
            }
            .to_string()
        };
        let good = |b: &Bytes, s: usize| {
            stripe::Header::parse(b)
                .map(|h| usize::from(h.index) == s && h.blake3 == want)
                .unwrap_or(false)
        };
        let mut shards: Vec<Option<Bytes>> = vec![None; w];
        let mut bad_members: Vec<usize> = Vec::new();
        // Fetch positions from their slot's node, in waves: data first, then parity as needed.
        let mut next_pos = 0usize;
        loop {
            let have = shards.iter().filter(|s| s.is_some()).count();
            if have >= k || next_pos >= w {
                break;
            }
            let mut wave = Vec::new();
            while wave.len() < k - have && next_pos < w {
                let p = next_pos;
                next_pos += 1;
                if let Some(n) = &slots[p]
                    && view.is_up(n)
                    && !nodes.is_suspect(n)
                    && let Some(a) = view.addr(n)
                {
                    wave.push((p, n.clone(), a.to_string()));
                }
            }
            let got = futures::future::join_all(wave.into_iter().map(|(p, n, a)| {
                let id = shard_id(p);
                async move { (p, n, nodes.get(&a, &id).await) }
            }))
            .await;
            for (p, n, r) in got {
                match r {
                    Ok(b) if good(&b, p) => shards[p] = Some(b),
                    Ok(_) => bad_members.push(p),
                    Err(s) if is_missing_or_bad(&s) => bad_members.push(p),
                    Err(_) => nodes.suspect(&n),
                }
            }
        }
        // Still short: ask every other up node for the missing shards (past members, moves).
        if shards.iter().filter(|s| s.is_some()).count() < k {
            let missing: Vec<usize> = (0..w).filter(|&p| shards[p].is_none()).collect();
            let found = futures::future::join_all(missing.into_iter().map(|p| {
                let cands = self.candidates(view, None);
                let id = shard_id(p);
                let skip = slots[p].clone();
                async move {
                    for (n, a) in cands {
                        if Some(&n) == skip.as_ref() {
                            continue;
                        }
                        if let Ok(b) = nodes.get(&a, &id).await
                            && good(&b, p)
                        {
                            return (p, Some(b));
                        }
                    }
                    (p, None)
                }
            }))
            .await;
            for (p, b) in found {
                if b.is_some() {
                    shards[p] = b;
                }
            }
        }
        let have = shards.iter().filter(|s| s.is_some()).count();
        if have < k {
            return Err(ClientError::DataLoss(format!(
                "chunk {cid}: only {have} of the {k} shards needed are readable"
            )));
        }
        let owned = shards.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            let refs: Vec<Option<&[u8]>> = owned.iter().map(|s| s.as_deref()).collect();
            stripe::decode(k, m, &refs)
        })
        .await
        .map_err(blocking_err)?
        .map_err(|e| ClientError::DataLoss(format!("chunk {cid}: {e}")))?;
        if *blake3::hash(&sealed).as_bytes() != want {
            return Err(ClientError::DataLoss(format!(
                "chunk {cid}: decoded stripe does not match the manifest"
            )));
        }
        if self.inner.cfg.read_repair && !bad_members.is_empty() {
            let this = self.clone();
            let slots = slots.to_vec();
            let view_epoch = view.epoch;
            let addrs: Vec<(usize, String)> = bad_members
                .into_iter()
                .filter_map(|p| Some((p, view.addr(slots[p].as_ref()?)?.to_string())))
                .collect();
            let sealed = sealed.clone();
            let cid = *cid;
            if let Ok(permit) = self.inner.repairs.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    let _permit = permit;
                    let Ok(Ok(all)) =
                        tokio::task::spawn_blocking(move || stripe::encode(k, m, &sealed)).await
                    else {
                        return;
                    };
                    for (p, addr) in addrs {
                        let id = ChunkId {
                            shard: Some(p as u8),
                            ..cid
                        }
                        .to_string();
                        let b = Bytes::from(all[p].clone());
                        let h = *blake3::hash(&b).as_bytes();
                        match this.inner.nodes.put(&addr, &id, b, h, view_epoch).await {
                            Ok(()) => {
                                tracing::info!(chunk = %id, node = %addr, "read-repair rewrote a shard")
                            }
                            Err(e) => {
                                tracing::debug!(chunk = %id, error = %e.message(), "read-repair failed")
                            }
                        }
                    }
                });
            }
        }
        Ok(Bytes::from(sealed))
    }

    /// Rewrites a good copy onto members that lacked it or held a bad one (background).
    fn repair(&self, epoch: u64, addrs: Vec<String>, id: String, data: Bytes, blake3: [u8; 32]) {
        if !self.inner.cfg.read_repair {
            return;
        }
        let Ok(permit) = self.inner.repairs.clone().try_acquire_owned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            for addr in addrs {
                match this
                    .inner
                    .nodes
                    .put(&addr, &id, data.clone(), blake3, epoch)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(chunk = %id, node = %addr, "read-repair rewrote a copy")
                    }
                    Err(e) => {
                        tracing::debug!(chunk = %id, error = %e.message(), "read-repair failed")
                    }
                }
            }
        });
    }
}

/// The stored pieces of one chunk: copies, or shards in index order.
fn pieces_of(
    key: &ChunkKey,
    base: &ChunkId,
    r: Redundancy,
    plaintext: &[u8],
) -> Result<([u8; 32], Vec<Piece>), ClientError> {
    let sealed = codec::seal(key, base.base().as_bytes(), plaintext);
    match r {
        Redundancy::Replicated { size } => {
            let b = Bytes::from(sealed.bytes);
            let id = base.to_string();
            Ok((
                sealed.blake3,
                (0..size)
                    .map(|_| (id.clone(), b.clone(), sealed.blake3))
                    .collect(),
            ))
        }
        Redundancy::Ec { k, m } => {
            let shards = stripe::encode(usize::from(k), usize::from(m), &sealed.bytes)
                .map_err(|e| ClientError::Internal(e.to_string()))?;
            Ok((
                sealed.blake3,
                shards
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let h = *blake3::hash(&s).as_bytes();
                        (
                            ChunkId {
                                shard: Some(i as u8),
                                ..*base
                            }
                            .to_string(),
                            Bytes::from(s),
                            h,
                        )
                    })
                    .collect(),
            ))
        }
    }
}

/// Streams an object's bytes chunk by chunk, reading a few chunks ahead.
pub struct ObjectReader {
    client: Client,
    /// Leaf manifests still to read, with the range to read of each.
    segs: std::collections::VecDeque<(Manifest, u64, u64)>,
    cur: Option<Segment>,
}

/// The leaf manifest being read.
struct Segment {
    m: Arc<Manifest>,
    key: ChunkKey,
    next: u64,
    last: u64,
    start: u64,
    end: u64,
    ahead: FuturesOrdered<BoxFuture<'static, Result<(u64, Bytes), ClientError>>>,
}

impl ObjectReader {
    /// The next piece of the requested range, or `None` at its end.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, ClientError>> {
        loop {
            if self.cur.is_none() {
                let (m, start, end) = self.segs.pop_front()?;
                let key = match self.client.data_key(&m.data_key_id).await {
                    Ok(k) => k,
                    Err(e) => return Some(Err(e)),
                };
                let cs = u64::from(m.chunk_size.max(1));
                self.cur = Some(Segment {
                    m: Arc::new(m),
                    key,
                    next: start / cs,
                    last: (end - 1) / cs + 1,
                    start,
                    end,
                    ahead: FuturesOrdered::new(),
                });
            }
            let seg = self.cur.as_mut().expect("just set");
            if let Some(r) = seg.next_chunk(&self.client).await {
                return Some(r);
            }
            self.cur = None;
        }
    }
}

impl Segment {
    async fn next_chunk(&mut self, client: &Client) -> Option<Result<Bytes, ClientError>> {
        let depth = client.inner.cfg.inflight_chunks.clamp(1, 4);
        while self.ahead.len() < depth && self.next < self.last {
            let (c, m, k, i) = (client.clone(), self.m.clone(), self.key.clone(), self.next);
            self.ahead.push_back(Box::pin(async move {
                c.read_chunk(m, i, k).await.map(|b| (i, b))
            }));
            self.next += 1;
        }
        let (i, b) = match self.ahead.next().await? {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let cs = u64::from(self.m.chunk_size);
        let chunk_start = i * cs;
        if b.len() as u64 != manifest::chunk_len(&self.m, i) {
            return Some(Err(ClientError::DataLoss(format!(
                "chunk {i} opened to {} bytes, the manifest says {}",
                b.len(),
                manifest::chunk_len(&self.m, i)
            ))));
        }
        let from = self.start.saturating_sub(chunk_start).min(b.len() as u64) as usize;
        let to = (self.end - chunk_start).min(b.len() as u64) as usize;
        Some(Ok(b.slice(from..to)))
    }
}
