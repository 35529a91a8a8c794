//! Helpers shared by storaged's end-to-end tests: gRPC put/get against a real storaged.
#![allow(dead_code)]

use bytes::Bytes;
use sov_proto::storaged as pb;
use sov_proto::storaged::chunk_store_client::ChunkStoreClient;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::transport::Channel;

pub type Client = ChunkStoreClient<Channel>;

pub fn put_msgs(id: &str, data: &[u8]) -> Vec<pb::PutRequest> {
    let mut msgs = vec![pb::PutRequest {
        msg: Some(pb::put_request::Msg::Header(pb::PutHeader {
            id: id.to_string(),
            length: data.len() as u64,
            expected_blake3: Bytes::new(),
            epoch: 0,
        })),
    }];
    for part in data.chunks(1 << 20) {
        msgs.push(pb::PutRequest {
            msg: Some(pb::put_request::Msg::Data(Bytes::copy_from_slice(part))),
        });
    }
    msgs
}

pub async fn put(c: &mut Client, id: &str, data: &[u8]) -> Result<pb::PutResponse, Status> {
    c.put(tokio_stream::iter(put_msgs(id, data)))
        .await
        .map(|r| r.into_inner())
}

pub async fn get_range(
    c: &mut Client,
    id: &str,
    offset: u64,
    length: u64,
) -> Result<(pb::ChunkInfo, Vec<u8>), Status> {
    let mut s = c
        .get(pb::GetRequest {
            id: id.to_string(),
            offset,
            length,
        })
        .await?
        .into_inner();
    let mut info = None;
    let mut data = Vec::new();
    while let Some(m) = s.next().await {
        match m?.msg {
            Some(pb::get_response::Msg::Info(i)) => info = Some(i),
            Some(pb::get_response::Msg::Data(d)) => data.extend_from_slice(&d),
            None => {}
        }
    }
    Ok((info.expect("a get stream starts with info"), data))
}

pub async fn get(c: &mut Client, id: &str) -> Result<Vec<u8>, Status> {
    get_range(c, id, 0, 0).await.map(|(_, d)| d)
}

pub async fn delete(c: &mut Client, id: &str) -> Result<(), Status> {
    c.delete(pb::DeleteRequest { id: id.to_string() })
        .await
        .map(|_| ())
}

pub async fn node_info(c: &mut Client) -> pb::NodeInfoResponse {
    c.node_info(pb::NodeInfoRequest {})
        .await
        .expect("node info")
        .into_inner()
}

pub async fn corrupt_ids(c: &mut Client) -> Vec<pb::CorruptChunk> {
    c.list_corrupt(pb::ListCorruptRequest {})
        .await
        .expect("list corrupt")
        .into_inner()
        .chunks
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
