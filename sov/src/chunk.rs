//! `sov debug chunk put|get|delete|stat|list` and `sov debug node-info|corrupt`: talk to one
//! storaged directly. A failed verification exits with code 3 and says why.

use std::io::{Read, Write};
use std::time::Duration;

use clap::{Args, Subcommand};
use sov_proto::storaged as pb;
use sov_proto::storaged::chunk_store_client::ChunkStoreClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use crate::{CliError, Output};

/// Exit code for "the chunk failed verification".
const EXIT_CORRUPT: u8 = 3;
/// Exit code for "no such chunk".
const EXIT_NOT_FOUND: u8 = 4;
const FRAME: usize = 1 << 20;

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// storaged gRPC address, e.g. 127.0.0.1:7100.
    #[arg(long, env = "SOV_STORAGED")]
    storaged: String,
}

#[derive(Debug, Subcommand)]
pub enum ChunkCmd {
    /// Store stdin as a chunk and print its id (blake3 of the data unless --id is given).
    Put {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        id: Option<String>,
    },
    /// Write a chunk (or a byte range of it) to stdout.
    Get {
        #[command(flatten)]
        node: NodeArgs,
        id: String,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// 0 = to the end.
        #[arg(long, default_value_t = 0)]
        length: u64,
    },
    /// Delete a chunk.
    Delete {
        #[command(flatten)]
        node: NodeArgs,
        id: String,
    },
    /// Show a chunk's size, blake3 and disk.
    Stat {
        #[command(flatten)]
        node: NodeArgs,
        id: String,
    },
    /// List chunk ids by prefix.
    List {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

async fn connect(addr: &str) -> Result<ChunkStoreClient<Channel>, CliError> {
    let url = if addr.starts_with("http://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ch = Channel::from_shared(url.clone())
        .map_err(|e| CliError::new(2, format!("bad storaged address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(64 << 20));
    let ch = sov_common::tls::connect(ch, sov_common::tls::Role::Storaged)
        .await
        .map_err(|e| CliError::new(1, format!("cannot reach storaged at {addr}: {e}")))?;
    Ok(ChunkStoreClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

fn status_err(s: tonic::Status) -> CliError {
    let code = match s.code() {
        Code::DataLoss => EXIT_CORRUPT,
        Code::NotFound => EXIT_NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => 2,
        _ => 1,
    };
    CliError::new(code, format!("{:?}: {}", s.code(), s.message()))
}

fn print(out: Output, json: serde_json::Value, text: String) {
    match out {
        Output::Json => println!("{json}"),
        Output::Text => println!("{text}"),
    }
}

pub async fn run(cmd: ChunkCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        ChunkCmd::Put { node, id } => {
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .map_err(|e| CliError::new(1, format!("reading stdin: {e}")))?;
            let hash = blake3::hash(&data);
            let id = id.unwrap_or_else(|| hash.to_hex().to_string());
            let mut c = connect(&node.storaged).await?;
            let mut msgs = vec![pb::PutRequest {
                msg: Some(pb::put_request::Msg::Header(pb::PutHeader {
                    id: id.clone(),
                    length: data.len() as u64,
                    expected_blake3: hash.as_bytes().to_vec().into(),
                    epoch: 0,
                })),
            }];
            for part in data.chunks(FRAME) {
                msgs.push(pb::PutRequest {
                    msg: Some(pb::put_request::Msg::Data(part.to_vec().into())),
                });
            }
            let r = c
                .put(tokio_stream::iter(msgs))
                .await
                .map_err(status_err)?
                .into_inner();
            print(
                out,
                serde_json::json!({"id": r.id, "length": r.length, "blake3": hex::encode(&r.blake3), "disk": r.disk}),
                r.id,
            );
        }
        ChunkCmd::Get {
            node,
            id,
            offset,
            length,
        } => {
            let mut c = connect(&node.storaged).await?;
            let mut stream = c
                .get(pb::GetRequest { id, offset, length })
                .await
                .map_err(status_err)?
                .into_inner();
            let mut expected = None;
            let mut data = Vec::new();
            while let Some(msg) = stream.next().await {
                match msg.map_err(status_err)?.msg {
                    Some(pb::get_response::Msg::Info(i)) => expected = Some(i),
                    Some(pb::get_response::Msg::Data(d)) => data.extend_from_slice(&d),
                    None => {}
                }
            }
            let info = expected.ok_or_else(|| CliError::new(1, "storaged sent no chunk info"))?;
            if data.len() as u64 != info.range_length {
                return Err(CliError::new(
                    EXIT_CORRUPT,
                    format!("short read: {} of {} bytes", data.len(), info.range_length),
                ));
            }
            // A whole chunk is checked here too: bytes that changed on the wire are caught.
            if info.range_offset == 0 && info.range_length == info.length {
                let got = blake3::hash(&data);
                if got.as_bytes()[..] != info.blake3[..] {
                    return Err(CliError::new(
                        EXIT_CORRUPT,
                        format!(
                            "verification failed: blake3 {} expected {}",
                            got.to_hex(),
                            hex::encode(&info.blake3)
                        ),
                    ));
                }
            }
            std::io::stdout()
                .write_all(&data)
                .and_then(|_| std::io::stdout().flush())
                .map_err(|e| CliError::new(1, format!("writing stdout: {e}")))?;
        }
        ChunkCmd::Delete { node, id } => {
            let mut c = connect(&node.storaged).await?;
            c.delete(pb::DeleteRequest { id: id.clone() })
                .await
                .map_err(status_err)?;
            print(
                out,
                serde_json::json!({"deleted": id}),
                format!("deleted {id}"),
            );
        }
        ChunkCmd::Stat { node, id } => {
            let mut c = connect(&node.storaged).await?;
            let i = c
                .stat(pb::StatRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            print(
                out,
                serde_json::json!({"id": i.id, "length": i.length, "blake3": hex::encode(&i.blake3), "disk": i.disk}),
                format!(
                    "{}\t{} bytes\tblake3 {}\t{}",
                    i.id,
                    i.length,
                    hex::encode(&i.blake3),
                    i.disk
                ),
            );
        }
        ChunkCmd::List {
            node,
            prefix,
            limit,
        } => {
            let mut c = connect(&node.storaged).await?;
            let mut start_after = String::new();
            let mut all = Vec::new();
            loop {
                let page = c
                    .list(pb::ListRequest {
                        prefix: prefix.clone(),
                        start_after: start_after.clone(),
                        limit,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                all.extend(page.entries);
                if page.next_start_after.is_empty() {
                    break;
                }
                start_after = page.next_start_after;
            }
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(
                        all.iter()
                            .map(|e| serde_json::json!({"id": e.id, "length": e.length, "blake3": hex::encode(&e.blake3)}))
                            .collect()
                    )
                ),
                Output::Text => {
                    for e in all {
                        println!("{}\t{}", e.id, e.length);
                    }
                }
            }
        }
    }
    Ok(())
}

pub async fn node_info(a: NodeArgs, out: Output) -> Result<(), CliError> {
    let mut c = connect(&a.storaged).await?;
    let n = c
        .node_info(pb::NodeInfoRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    let disks: Vec<serde_json::Value> = n
        .disks
        .iter()
        .map(|d| {
            serde_json::json!({
                "path": d.path, "capacity_bytes": d.capacity_bytes, "used_bytes": d.used_bytes,
                "free_bytes": d.free_bytes, "live_bytes": d.live_bytes,
                "segment_bytes": d.segment_bytes, "chunks": d.chunks, "health": d.health,
                "corrupt_chunks": d.corrupt_chunks, "scrub_passes": d.scrub_passes,
                "scrub_checked": d.scrub_checked,
            })
        })
        .collect();
    let mut text = format!(
        "node {} zone {} version {} io {} health {}",
        n.node_id, n.zone, n.version, n.io_engine, n.health
    );
    for d in &n.disks {
        text.push_str(&format!(
            "\n  {}: {} chunks, {} live bytes, {} free, health {}, {} corrupt, {} scrub passes",
            d.path,
            d.chunks,
            d.live_bytes,
            d.free_bytes,
            d.health,
            d.corrupt_chunks,
            d.scrub_passes
        ));
    }
    print(
        out,
        serde_json::json!({
            "node_id": n.node_id, "zone": n.zone, "version": n.version,
            "io_engine": n.io_engine, "health": n.health,
            "max_chunk_size": n.max_chunk_size, "disks": disks,
        }),
        text,
    );
    Ok(())
}

pub async fn corrupt(a: NodeArgs, out: Output) -> Result<(), CliError> {
    let mut c = connect(&a.storaged).await?;
    let r = c
        .list_corrupt(pb::ListCorruptRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    match out {
        Output::Json => println!(
            "{}",
            serde_json::Value::Array(
                r.chunks
                    .iter()
                    .map(|c| serde_json::json!({"id": c.id, "disk": c.disk, "reason": c.reason, "found_at": c.found_at, "found_by": c.found_by}))
                    .collect()
            )
        ),
        Output::Text => {
            for c in r.chunks {
                println!("{}\t{}\t{}\t{}", c.id, c.disk, c.found_by, c.reason);
            }
        }
    }
    Ok(())
}
