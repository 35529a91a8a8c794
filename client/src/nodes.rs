//! Connections to storage nodes, with deadlines on every call (a dead or frozen node never
//! holds a caller) and a short memory of nodes that just failed, so the next chunks go around
//! them without waiting for a timeout each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sov_proto::storaged as pb;
use sov_proto::storaged::chunk_store_client::ChunkStoreClient;
use sov_proto::storaged::extent_store_client::ExtentStoreClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Frame size of a Put stream.
const FRAME: usize = 1 << 20;
/// How long a node that failed stays on the suspect list.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// Deadlines for calls to storage nodes.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub connect: Duration,
    /// Base time of one call; transfers add time at `min_rate` bytes per second.
    pub call: Duration,
    pub min_rate: u64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            connect: Duration::from_secs(2),
            call: Duration::from_secs(10),
            min_rate: 8 << 20,
        }
    }
}

impl Deadlines {
    fn for_bytes(&self, len: u64) -> Duration {
        self.call + Duration::from_secs_f64(len as f64 / self.min_rate.max(1) as f64)
    }
}

/// Storage node connections by address.
pub struct Nodes {
    channels: Mutex<HashMap<String, Channel>>,
    suspects: Mutex<HashMap<String, Instant>>,
    pub deadlines: Deadlines,
}

/// Whether a status says the chunk is absent or bad on that node (not that the node is down).
pub fn is_missing_or_bad(s: &Status) -> bool {
    matches!(s.code(), Code::NotFound | Code::DataLoss)
}

/// Whether a put failed because the writer's map is older than the node's.
pub fn is_stale_epoch(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && s.message().starts_with("stale epoch")
}

impl Nodes {
    pub fn new(deadlines: Deadlines) -> Nodes {
        Nodes {
            channels: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            deadlines,
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut ch = self.channels.lock().expect("channels lock");
        if let Some(c) = ch.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.starts_with("http://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Status::invalid_argument(format!("bad node address {addr:?}: {e}")))?
            .connect_timeout(self.deadlines.connect)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(64 << 20))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = sov_common::tls::channel(channel, sov_common::tls::Role::Storaged);
        ch.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    fn client(&self, addr: &str) -> Result<ChunkStoreClient<Channel>, Status> {
        Ok(ChunkStoreClient::new(self.channel(addr)?)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20))
    }

    /// The node's extent service (block volumes), on the same connection.
    pub fn extents(&self, addr: &str) -> Result<ExtentStoreClient<Channel>, Status> {
        Ok(ExtentStoreClient::new(self.channel(addr)?)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20))
    }

    /// Runs `f` under the call deadline for `bytes` moved.
    pub async fn with_deadline<T>(
        &self,
        bytes: u64,
        what: &str,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        Self::deadline(self.deadlines.for_bytes(bytes), what, f).await
    }

    /// Marks a node as failing for a few seconds.
    pub fn suspect(&self, node: &str) {
        self.suspects
            .lock()
            .expect("suspects lock")
            .insert(node.to_string(), Instant::now());
    }

    /// Whether a node failed within the last few seconds.
    pub fn is_suspect(&self, node: &str) -> bool {
        let mut s = self.suspects.lock().expect("suspects lock");
        match s.get(node) {
            Some(at) if at.elapsed() < SUSPECT_FOR => true,
            Some(_) => {
                s.remove(node);
                false
            }
            None => false,
        }
    }

    /// Clears a node's suspect mark (it answered).
    pub fn clear(&self, node: &str) {
        self.suspects.lock().expect("suspects lock").remove(node);
    }

    async fn deadline<T>(
        d: Duration,
        what: &str,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(d, f).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{what}: no answer within {d:?}"
            ))),
        }
    }

    /// Stores `data` as `id` on the node at `addr`; returns once it is durable there.
    pub async fn put(
        &self,
        addr: &str,
        id: &str,
        data: Bytes,
        blake3: [u8; 32],
        epoch: u64,
    ) -> Result<(), Status> {
        let mut c = self.client(addr)?;
        let len = data.len() as u64;
        let mut msgs = vec![pb::PutRequest {
            msg: Some(pb::put_request::Msg::Header(pb::PutHeader {
                id: id.to_string(),
                length: len,
                expected_blake3: Bytes::copy_from_slice(&blake3),
                epoch,
            })),
        }];
        let mut at = 0;
        while at < data.len() {
            let end = (at + FRAME).min(data.len());
            msgs.push(pb::PutRequest {
                msg: Some(pb::put_request::Msg::Data(data.slice(at..end))),
            });
            at = end;
        }
        let d = self.deadlines.for_bytes(len);
        Self::deadline(d, "put", async move {
            c.put(futures::stream::iter(msgs)).await.map(|_| ())
        })
        .await
    }

    /// Reads a whole chunk (the node verifies it against its blake3 before sending).
    pub async fn get(&self, addr: &str, id: &str) -> Result<Bytes, Status> {
        let mut c = self.client(addr)?;
        let req = pb::GetRequest {
            id: id.to_string(),
            offset: 0,
            length: 0,
        };
        let d = self.deadlines.for_bytes(8 << 20);
        Self::deadline(d, "get", async move {
            let mut s = c.get(req).await?.into_inner();
            let mut buf = BytesMut::new();
            let mut frames: Vec<Bytes> = Vec::new();
            let mut expected = None;
            while let Some(m) = s.message().await? {
                match m.msg {
                    Some(pb::get_response::Msg::Info(i)) => expected = Some(i.range_length),
                    Some(pb::get_response::Msg::Data(d)) => frames.push(d),
                    None => {}
                }
            }
            if frames.len() == 1 {
                let f = frames.pop().expect("one frame");
                check_len(expected, f.len())?;
                return Ok(f);
            }
            for f in frames {
                buf.extend_from_slice(&f);
            }
            check_len(expected, buf.len())?;
            Ok(buf.freeze())
        })
        .await
    }

    /// Deletes a chunk; an absent one is fine.
    pub async fn delete(&self, addr: &str, id: &str) -> Result<(), Status> {
        let mut c = self.client(addr)?;
        let req = pb::DeleteRequest { id: id.to_string() };
        match Self::deadline(self.deadlines.call, "delete", async move {
            c.delete(req).await.map(|_| ())
        })
        .await
        {
            Err(s) if s.code() == Code::NotFound => Ok(()),
            r => r,
        }
    }

    /// Describes a chunk.
    pub async fn stat(&self, addr: &str, id: &str) -> Result<pb::ChunkInfo, Status> {
        let mut c = self.client(addr)?;
        let req = pb::StatRequest { id: id.to_string() };
        Self::deadline(self.deadlines.call, "stat", async move {
            c.stat(req).await.map(|r| r.into_inner())
        })
        .await
    }

    /// Every id under `prefix` (all pages).
    pub async fn list_all(&self, addr: &str, prefix: &str) -> Result<Vec<pb::ListEntry>, Status> {
        let mut c = self.client(addr)?;
        let mut out = Vec::new();
        let mut start_after = String::new();
        loop {
            let req = pb::ListRequest {
                prefix: prefix.to_string(),
                start_after: start_after.clone(),
                limit: 10_000,
            };
            let mut cc = c.clone();
            let page = Self::deadline(self.deadlines.call, "list", async move {
                cc.list(req).await.map(|r| r.into_inner())
            })
            .await?;
            out.extend(page.entries);
            if page.next_start_after.is_empty() {
                return Ok(out);
            }
            start_after = page.next_start_after;
            c = c.clone();
        }
    }

    /// The node's own description (disks, epoch, recovery progress).
    pub async fn node_info(&self, addr: &str) -> Result<pb::NodeInfoResponse, Status> {
        let mut c = self.client(addr)?;
        Self::deadline(self.deadlines.call, "node info", async move {
            c.node_info(pb::NodeInfoRequest {})
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// Chunks the node found corrupt and has not yet rewritten.
    pub async fn list_corrupt(&self, addr: &str) -> Result<Vec<pb::CorruptChunk>, Status> {
        let mut c = self.client(addr)?;
        Self::deadline(self.deadlines.call, "list corrupt", async move {
            c.list_corrupt(pb::ListCorruptRequest {})
                .await
                .map(|r| r.into_inner().chunks)
        })
        .await
    }
}

fn check_len(expected: Option<u64>, got: usize) -> Result<(), Status> {
    match expected {
        Some(e) if e != got as u64 => Err(Status::data_loss(format!(
            "chunk stream ended after {got} of {e} bytes"
        ))),
        None => Err(Status::internal("chunk stream had no info message")),
        _ => Ok(()),
    }
}
