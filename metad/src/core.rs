//! A member's engine room: batched proposals, shared read-index rounds, the route to the
//! leader, the master key, and the leader's view of storage node liveness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use sov_common::codec::ChunkKey;
use sov_proto::metad::Disk;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Status;

use crate::client::Client;
use crate::config::MetadConfig;
use crate::metrics::Metrics;
use crate::network::Raft;
use crate::store::{Batch, Command, CommandResult, NodeId, StateMachine};

type Reply = oneshot::Sender<Result<Vec<CommandResult>, Status>>;

struct Proposal {
    commands: Vec<Command>,
    reply: Reply,
}

/// What the leader last heard from a storage node. Leader-local, never replicated: a new
/// leader starts everyone's clock afresh.
#[derive(Clone)]
pub struct Seen {
    pub at: Instant,
    pub at_unix_ms: u64,
    pub disks: Vec<Disk>,
}

/// Shared by the gRPC services and the background tasks of one member.
pub struct Core {
    pub id: NodeId,
    pub raft: Raft,
    pub sm: StateMachine,
    pub cfg: MetadConfig,
    pub metrics: Metrics,
    pub master: Option<ChunkKey>,
    /// Earlier master keys (open only, never seal).
    old_masters: std::sync::OnceLock<Vec<ChunkKey>>,
    proposals: mpsc::Sender<Proposal>,
    reads: Mutex<ReadState>,
    forward: Mutex<HashMap<String, Client>>,
    /// Serialises the leader's read-modify-write of the cluster map (compare-and-set makes it
    /// safe anyway; the lock only avoids pointless conflicts).
    pub map_lock: tokio::sync::Mutex<()>,
    pub seen: Mutex<HashMap<String, Seen>>,
    /// The term in which `seen` was started, so a new leadership restarts the clocks.
    pub seen_term: Mutex<u64>,
}

#[derive(Default)]
struct ReadState {
    running: bool,
    waiting: Vec<oneshot::Sender<Result<(), Status>>>,
}

/// Where a request is served.
pub enum Route {
    Local,
    /// The leader's id and a client for it.
    Leader(NodeId, Client),
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Core {
    pub fn new(
        id: NodeId,
        raft: Raft,
        sm: StateMachine,
        cfg: MetadConfig,
        metrics: Metrics,
        master: Option<ChunkKey>,
    ) -> Arc<Core> {
        let (tx, rx) = mpsc::channel(16 * 1024);
        let core = Arc::new(Core {
            id,
            raft,
            sm,
            cfg,
            metrics,
            master,
            old_masters: std::sync::OnceLock::new(),
            proposals: tx,
            reads: Mutex::new(ReadState::default()),
            forward: Mutex::new(HashMap::new()),
            map_lock: tokio::sync::Mutex::new(()),
            seen: Mutex::new(HashMap::new()),
            seen_term: Mutex::new(0),
        });
        tokio::spawn(propose_loop(core.clone(), rx));
        core
    }

    /// Proposes `commands` as one unit (they land in the same log entry, in order) and returns
    /// their results once applied on this member. Must be called on the leader; concurrent
    /// callers share log entries.
    pub async fn propose(&self, commands: Vec<Command>) -> Result<Vec<CommandResult>, Status> {
        let (reply, rx) = oneshot::channel();
        self.proposals
            .send(Proposal { commands, reply })
            .await
            .map_err(|_| Status::unavailable("metad is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("metad is shutting down"))?
    }

    /// Returns once this member's state machine holds every write acknowledged before the
    /// call (a read-index round on the leader). Concurrent readers share one round, which
    /// always starts after they arrived.
    pub async fn linearize(self: &Arc<Self>) -> Result<(), Status> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.reads.lock().expect("read state lock");
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            tokio::spawn(read_rounds(self.clone()));
        }
        rx.await
            .map_err(|_| Status::unavailable("metad is shutting down"))?
    }

    /// Local when this member leads, else a client for the leader (waiting a little for an
    /// election). A request that was already forwarded once is not forwarded again.
    pub async fn route(&self, forwarded: bool) -> Result<Route, Status> {
        let deadline = Instant::now() + self.cfg.raft.election_timeout_max.0 * 3;
        loop {
            let (leader, addr, leading, applied_own_term) = {
                let m = self.raft.metrics();
                let m = m.borrow();
                let applied_own_term =
                    m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term);
                let leader = m.current_leader;
                let addr = leader.and_then(|l| {
                    m.membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.addr.clone())
                });
                (
                    leader,
                    addr,
                    m.state == ServerState::Leader,
                    applied_own_term,
                )
            };
            // A new leader serves only once it has applied an entry of its own term: before
            // that, its state machine may lack entries its predecessor acknowledged.
            if leader == Some(self.id) && leading && applied_own_term {
                return Ok(Route::Local);
            }
            if let (Some(l), Some(addr)) = (leader, addr)
                && l != self.id
            {
                {
                    if forwarded {
                        return Err(Status::unavailable(format!(
                            "member {} is not the leader (member {l} is); retry",
                            self.id
                        )));
                    }
                    return Ok(Route::Leader(l, self.forward_client(&addr)?));
                }
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable("no metad leader elected yet; retry"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader's address as this member knows it.
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let l = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&l)
            .map(|n| n.addr.clone())
    }

    /// Resolves when this member no longer sees `leader` as the leader (it died, froze or
    /// lost an election): a request forwarded to it is then abandoned and retried.
    pub async fn leader_changed(&self, leader: NodeId) {
        let mut rx = self.raft.metrics();
        loop {
            if rx.borrow_and_update().current_leader != Some(leader) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn forward_client(&self, addr: &str) -> Result<Client, Status> {
        let mut f = self.forward.lock().expect("forward lock");
        if let Some(c) = f.get(addr) {
            return Ok(c.clone());
        }
        let c = crate::client::MetaClient::new(&[addr.to_string()])?;
        let client = c.first();
        f.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Sets the earlier master keys (once, at start).
    pub fn set_old_masters(&self, keys: Vec<ChunkKey>) {
        let _ = self.old_masters.set(keys);
    }

    /// The id of a master key: the first 8 bytes of a keyed-purpose blake3, in hex (it names
    /// the key without revealing it).
    pub fn kid(key: &ChunkKey) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"sov-master-kid");
        h.update(key.as_bytes());
        hex::encode(&h.finalize().as_bytes()[..8])
    }

    /// Every master key held: the current one first, then the earlier ones.
    pub fn masters(&self) -> impl Iterator<Item = &ChunkKey> {
        self.master
            .iter()
            .chain(self.old_masters.get().into_iter().flatten())
    }

    /// The master key, or FAILED_PRECONDITION when metad runs without one.
    pub fn master(&self) -> Result<&ChunkKey, Status> {
        self.master.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "metad has no master key: start it with --master-key-file to manage keys",
            )
        })
    }

    /// Records a heartbeat (leader-local).
    pub fn saw(&self, node: &str, disks: Vec<Disk>) {
        let mut seen = self.seen.lock().expect("seen lock");
        seen.insert(
            node.to_string(),
            Seen {
                at: Instant::now(),
                at_unix_ms: unix_ms(),
                disks,
            },
        );
    }
}

async fn read_rounds(core: Arc<Core>) {
    loop {
        let waiting = {
            let mut st = core.reads.lock().expect("read state lock");
            if st.waiting.is_empty() {
                st.running = false;
                return;
            }
            std::mem::take(&mut st.waiting)
        };
        core.metrics.read_rounds.inc();
        let timeout = core.cfg.raft.write_timeout.0;
        let r = match tokio::time::timeout(timeout, core.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(read_error(e)),
            Err(_) => Err(Status::unavailable(format!(
                "read index not confirmed by a quorum within {timeout:?}"
            ))),
        };
        for w in waiting {
            let _ = w.send(r.clone());
        }
    }
}

fn read_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, crate::store::Member>>) -> Status {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
            Status::unavailable(format!("leadership moved (to {:?}); retry", f.leader_id))
        }
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
            Status::unavailable(format!("no quorum for a read index: {q}"))
        }
        RaftError::Fatal(f) => Status::unavailable(format!("raft stopped: {f}")),
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, crate::store::Member>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Status::unavailable(format!(
            "not the leader any more (leader {:?}); retry",
            f.leader_id
        )),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Status::failed_precondition(c.to_string())
        }
        RaftError::Fatal(f) => Status::unavailable(format!("raft stopped: {f}")),
    }
}

/// A log entry stops taking proposals past this many key and value bytes.
const MAX_BATCH_BYTES: usize = 2 << 20;

fn command_bytes(c: &Command) -> usize {
    use crate::store::{Check, Op};
    match c {
        Command::Put { key, value } => key.len() + value.len(),
        Command::Delete { key } => key.len(),
        Command::AuditAppend { record } => record.len(),
        Command::CompareAndSet { key, expected, new } => {
            key.len() + expected.as_ref().map_or(0, Vec::len) + new.as_ref().map_or(0, Vec::len)
        }
        Command::Txn { checks, ops } => {
            checks
                .iter()
                .map(|(k, c)| {
                    k.len()
                        + match c {
                            Check::Equals(v) => v.len(),
                            _ => 0,
                        }
                })
                .sum::<usize>()
                + ops
                    .iter()
                    .map(|o| match o {
                        Op::Put { key, value } => key.len() + value.len(),
                        Op::Delete { key } => key.len(),
                    })
                    .sum::<usize>()
        }
    }
}

/// Takes proposals as they come, packs what is queued into one log entry, and keeps up to
/// `max_inflight` entries replicating at once.
async fn propose_loop(core: Arc<Core>, mut rx: mpsc::Receiver<Proposal>) {
    let inflight = Arc::new(Semaphore::new(core.cfg.raft.max_inflight));
    let max_batch = core.cfg.raft.max_batch;
    while let Some(first) = rx.recv().await {
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        // Everything that queued while we waited for a slot rides along.
        let mut batch = vec![first];
        let mut n = batch[0].commands.len();
        let mut bytes = batch[0].commands.iter().map(command_bytes).sum::<usize>();
        while n < max_batch && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    n += p.commands.len();
                    bytes += p.commands.iter().map(command_bytes).sum::<usize>();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let core = core.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut commands = Vec::with_capacity(n);
            let mut replies = Vec::with_capacity(batch.len());
            for p in batch {
                replies.push((p.commands.len(), p.reply));
                commands.extend(p.commands);
            }
            core.metrics.batch_commands.observe(commands.len() as f64);
            let timeout = core.cfg.raft.write_timeout.0;
            let r = tokio::time::timeout(timeout, core.raft.client_write(Batch { commands })).await;
            match r {
                Ok(Ok(resp)) => {
                    let mut results = resp.data.results.into_iter();
                    for (len, reply) in replies {
                        let mine: Vec<CommandResult> = results.by_ref().take(len).collect();
                        let _ = reply.send(Ok(mine));
                    }
                }
                Ok(Err(e)) => {
                    let s = write_error(e);
                    for (_, reply) in replies {
                        let _ = reply.send(Err(s.clone()));
                    }
                }
                Err(_) => {
                    for (_, reply) in replies {
                        let _ = reply.send(Err(Status::deadline_exceeded(format!(
                            "write not committed within {timeout:?} (no quorum?); \
                             it may still be applied later"
                        ))));
                    }
                }
            }
        });
    }
}
