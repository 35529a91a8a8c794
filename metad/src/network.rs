//! The Raft transport between members: openraft's messages, bincode-encoded, in the `Raft` gRPC
//! service. Clients connect lazily, so an unreachable member costs nothing until it is needed.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sov_proto::metad::RaftPayload;
use sov_proto::metad::raft_client::RaftClient;
use sov_proto::metad::raft_server::Raft as RaftRpc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::store::{Member, NodeId, TypeConfig};

/// The openraft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// Makes a [`Connection`] per target member.
#[derive(Clone, Default)]
pub struct Network;

/// The channel to one member.
pub struct Connection {
    target: NodeId,
    addr: String,
    client: Option<RaftClient<Channel>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Connection {
        Connection {
            target,
            addr: node.addr.clone(),
            client: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

fn net_err<E: std::error::Error>(msg: impl Into<String>) -> RPCError<NodeId, Member, E> {
    RPCError::Network(NetworkError::new(&TransportError(msg.into())))
}

impl Connection {
    fn client<E: std::error::Error>(
        &mut self,
    ) -> Result<RaftClient<Channel>, RPCError<NodeId, Member, E>> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| net_err(format!("bad member address {}: {e}", self.addr)))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20);
        let c = RaftClient::new(sov_common::tls::channel(ep, sov_common::tls::Role::Metad))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Sends one message and decodes the member's `Result`.
    async fn send<Req, Resp, E>(
        &mut self,
        which: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = bincode::serialize(req).map_err(|e| net_err(format!("encode {which}: {e}")))?;
        let mut client = self.client()?;
        let mut request = Request::new(RaftPayload { data: data.into() });
        request.set_timeout(timeout);
        let reply = match which {
            "append_entries" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(s) => {
                // Forget the channel so the next call reconnects from scratch.
                self.client = None;
                return Err(net_err(format!(
                    "{which} to member {} at {}: {}",
                    self.target,
                    self.addr,
                    s.message()
                )));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            bincode::Options::deserialize(wire(), &reply.data)
                .map_err(|e| net_err(format!("decode {which} reply: {e}")))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.send("append_entries", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send("install_snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.send("vote", &rpc, option.hard_ttl()).await
    }
}

/// The `Raft` gRPC service: hands each message to the local openraft.
pub struct RaftService {
    pub raft: Raft,
}

/// bincode as `bincode::serialize` writes it, with a bound on what a peer's bytes may make
/// us allocate.
fn wire() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(512 << 20)
}

fn decode<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    use bincode::Options;
    wire()
        .deserialize(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    let data = bincode::serialize(v).map_err(|e| Status::internal(format!("encode: {e}")))?;
    Ok(Response::new(RaftPayload { data: data.into() }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
