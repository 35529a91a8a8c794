//! The `Metad` gRPC service. Any member accepts any request: writes and linearizable reads go
//! to the leader (forwarded once by the member that received them), stale reads are answered
//! from the receiving member's own state machine.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;
use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use rand::Rng;
use rand::distributions::Alphanumeric;
use sov_common::codec;
use sov_common::placement::{self, ClusterMap as PlacementMap, NodeInfo, NodeState, Redundancy};
use sov_proto::metad::metad_server::Metad;
use sov_proto::metad::*;
use tonic::{Request, Response, Status};

use crate::core::{Core, Route, unix_ms};
use crate::store::{Check, Command, CommandResult, Member, NodeId, Op};
use crate::tables::{self, AccessKeyRecord, DataKeyRecord};

/// Header a member sets on a request it forwards, so the leader never forwards it again.
pub const FORWARDED: &str = "x-sov-forwarded";
/// Response header naming the leader's address, as the answering member knows it.
pub const LEADER_HINT: &str = "x-sov-leader";
/// Times a read-modify-write retries after losing a compare-and-set race.
pub(crate) const RMW_TRIES: usize = 16;

pub struct MetadService {
    pub core: Arc<Core>,
}

fn forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

/// The request as passed on to the leader: marked forwarded, with its original caller when
/// the leader will audit it.
fn forward_request<T>(inner: T, origin: Option<&crate::audit::Origin>) -> Request<T> {
    let mut r = Request::new(inner);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(v) = origin.and_then(|o| o.header().parse().ok()) {
        r.metadata_mut().insert(crate::audit::ORIGIN_HEADER, v);
    }
    r
}

pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

pub(crate) fn decode<T: Message + Default>(what: &str, raw: &[u8]) -> Result<T, Status> {
    T::decode(raw).map_err(|e| internal(&format!("unreadable {what} record"), e))
}

/// Methods that change state. A forwarded one that is abandoned may still be applied, so it
/// must not be retried blindly.
fn is_write(method: &str) -> bool {
    !(method.starts_with("Get") || method.starts_with("List") || method == "Status")
}

/// The answer to a forwarded request whose leader went away before it answered.
fn abandoned(method: &str) -> Status {
    if is_write(method) {
        Status::unknown(format!(
            "{method}: outcome unknown, the leader changed before it answered; \
             read back before trying again"
        ))
    } else {
        Status::unavailable("the leader changed while the request was forwarded to it; retry")
    }
}

pub(crate) fn stale(c: i32) -> bool {
    c == Consistency::Stale as i32
}

/// Runs a handler for `method`: forwards it to the leader unless it may be served here,
/// counts it and times it.
/// Runs a method: forwarded to the leader unless `local_ok`, timed and counted. With
/// `audit = TARGET` (the names it acts on), the member that runs it records who called it,
/// on what, and the result in the audit log.
macro_rules! handle {
    ($self:ident, $req:ident, $method:literal, $call:ident, local_ok = $local:expr, $body:expr) => {
        handle!(@run $self, $req, $method, $call, $local, None::<String>, $body)
    };
    ($self:ident, $req:ident, $method:literal, $call:ident, local_ok = $local:expr, audit = $target:expr, $body:expr) => {
        handle!(@run $self, $req, $method, $call, $local, Some($target), $body)
    };
    (@run $self:ident, $req:ident, $method:literal, $call:ident, $local:expr, $target:expr, $body:expr) => {{
        let start = Instant::now();
        let target: Option<String> = $target;
        // Only audited calls need their caller named (the rest are counted, not recorded).
        let origin = target.as_ref().map(|_| crate::audit::Origin::of(&$req));
        let mut passed_on = false;
        let r = async {
            if !$local {
                if let Route::Leader(leader, mut c) = $self.core.route(forwarded(&$req)).await? {
                    passed_on = true;
                    $self.core.metrics.forwarded.with_label_values(&[$method]).inc();
                    return tokio::select! {
                        r = c.$call(forward_request($req.into_inner(), origin.as_ref())) => r.map(|r| r.into_inner()),
                        _ = $self.core.leader_changed(leader) => Err(abandoned($method)),
                    };
                }
            }
            $body
        }
        .await;
        if let (Some(t), Some(o)) = (target, origin)
            && !passed_on
        {
            $self
                .audit(crate::audit::record(&o, $method, &t, r.as_ref().map(|_| ())))
                .await;
        }
        $self.observe($method, start, r)
    }};
}

impl MetadService {
    fn crl_number(&self) -> Result<u64, Status> {
        Ok(self
            .get(tables::CRL_NUMBER)?
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// A wrapped record of table `prefix` sealed again under the current master key, or
    /// `None` when it already is.
    fn rewrap(&self, prefix: &[u8], raw: &[u8], current: &str) -> Result<Option<Vec<u8>>, Status> {
        if prefix == tables::AKEY_PREFIX {
            let mut rec: AccessKeyRecord =
                serde_json::from_slice(raw).map_err(|e| internal("unreadable access key", e))?;
            let aad = access_key_aad(&rec.access_key_id);
            let (plain, kid) =
                unseal_kid(&self.core, &aad, &rec.sealed_secret, &rec.sealed_blake3)?;
            if kid == current && rec.master_kid == current {
                return Ok(None);
            }
            (rec.sealed_secret, rec.sealed_blake3, rec.master_kid) =
                seal_current(&self.core, &aad, &plain)?;
            serde_json::to_vec(&rec)
                .map(Some)
                .map_err(|e| internal("encode", e))
        } else {
            let mut rec: DataKeyRecord =
                serde_json::from_slice(raw).map_err(|e| internal("unreadable data key", e))?;
            let aad = data_key_aad(&rec.id);
            let (plain, kid) = unseal_kid(&self.core, &aad, &rec.wrapped, &rec.wrapped_blake3)?;
            if kid == current && rec.master_kid == current {
                return Ok(None);
            }
            (rec.wrapped, rec.wrapped_blake3, rec.master_kid) =
                seal_current(&self.core, &aad, &plain)?;
            serde_json::to_vec(&rec)
                .map(Some)
                .map_err(|e| internal("encode", e))
        }
    }

    /// The master keys of every member (asked through their Status) and the wrapped records
    /// by the key that opens them.
    async fn master_status(&self, rewrapped: u64) -> Result<MasterKeyStatusResponse, Status> {
        let current = Core::kid(self.core.master()?);
        let members = self.member_master_keys(&current).await;
        let mut by_kid: std::collections::HashMap<String, u64> = Default::default();
        for (prefix, aad_of) in [
            (tables::AKEY_PREFIX, access_key_aad as fn(&str) -> Vec<u8>),
            (tables::DKEY_PREFIX, data_key_aad),
        ] {
            for (_, raw) in self.scan(prefix)? {
                let (id, sealed, sum) = if prefix == tables::AKEY_PREFIX {
                    let r: AccessKeyRecord = serde_json::from_slice(&raw)
                        .map_err(|e| internal("unreadable access key", e))?;
                    (r.access_key_id, r.sealed_secret, r.sealed_blake3)
                } else {
                    let r: DataKeyRecord = serde_json::from_slice(&raw)
                        .map_err(|e| internal("unreadable data key", e))?;
                    (r.id, r.wrapped, r.wrapped_blake3)
                };
                let kid = unseal_kid(&self.core, &aad_of(&id), &sealed, &sum)
                    .map(|(_, k)| k)
                    .unwrap_or_else(|_| "unknown".into());
                *by_kid.entry(kid).or_default() += 1;
            }
        }
        Ok(MasterKeyStatusResponse {
            current_kid: current,
            records_by_kid: by_kid,
            members,
            rewrapped,
        })
    }

    /// Each member's current and held master key ids (this one's own, the others' from
    /// their Status; an unreachable member has `error` set).
    async fn member_master_keys(&self, current: &str) -> Vec<MemberMasterKeys> {
        let membership: Vec<(u64, String)> = {
            let m = self.core.raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        };
        let mut members = Vec::new();
        for (id, addr) in membership {
            if id == self.core.id {
                members.push(MemberMasterKeys {
                    id,
                    current_kid: current.to_string(),
                    held_kids: self.core.masters().map(Core::kid).collect(),
                    error: String::new(),
                });
                continue;
            }
            let asked = async {
                let mut c = crate::client::MetaClient::new(std::slice::from_ref(&addr))?.first();
                let mut req = Request::new(StatusRequest {});
                req.set_timeout(Duration::from_secs(3));
                c.status(req).await.map(|r| r.into_inner())
            }
            .await;
            members.push(match asked {
                Ok(s) => MemberMasterKeys {
                    id,
                    current_kid: s.master_kid,
                    held_kids: s.held_master_kids,
                    error: String::new(),
                },
                Err(e) => MemberMasterKeys {
                    id,
                    error: e.message().to_string(),
                    ..Default::default()
                },
            });
        }
        members
    }

    /// Appends a record to the audit log (on the leader, where the call ran). A record that
    /// cannot be written is logged and counted; the call's answer stands.
    pub(crate) async fn audit(&self, rec: sov_proto::metad::AuditRecord) {
        let m = &self.core.metrics;
        match self
            .core
            .propose(vec![Command::AuditAppend {
                record: rec.encode_to_vec(),
            }])
            .await
        {
            Ok(_) => m.audit_records.inc(),
            Err(e) => {
                m.audit_failures.inc();
                tracing::error!(method = %rec.method, principal = %rec.principal, "audit record not written: {}", e.message());
            }
        }
    }

    fn observe<T>(
        &self,
        method: &str,
        start: Instant,
        r: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        let m = &self.core.metrics;
        m.requests.with_label_values(&[method, &code]).inc();
        m.request_seconds
            .with_label_values(&[method])
            .observe(start.elapsed().as_secs_f64());
        let leader = self.core.leader_addr();
        r.map(|v| {
            let mut resp = Response::new(v);
            // A hint for clients: send the next request straight to the leader.
            if let Some(addr) = leader
                && let Ok(v) = addr.parse()
            {
                resp.metadata_mut().insert(LEADER_HINT, v);
            }
            resp
        })
    }

    /// On the leader, for a linearizable read: waits for the read index.
    pub(crate) async fn read_barrier(&self, consistency: i32) -> Result<(), Status> {
        if stale(consistency) {
            Ok(())
        } else {
            self.core.linearize().await
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        self.core
            .sm
            .get(key)
            .map_err(|e| internal("reading the state machine", e))
    }

    pub(crate) fn scan(&self, prefix: &[u8]) -> Result<crate::store::Pairs, Status> {
        self.core
            .sm
            .scan(prefix, b"", usize::MAX)
            .map_err(|e| internal("reading the state machine", e))
    }

    /// Proposes one transaction; `Ok(None)` if it applied, else the failed check's index and
    /// the value found.
    pub(crate) async fn txn(
        &self,
        checks: Vec<(Vec<u8>, Check)>,
        ops: Vec<Op>,
    ) -> Result<Option<(u32, Option<Vec<u8>>)>, Status> {
        let mut r = self
            .core
            .propose(vec![Command::Txn { checks, ops }])
            .await?;
        match r.pop() {
            Some(CommandResult::Done) => Ok(None),
            Some(CommandResult::Failed { check, current }) => Ok(Some((check, current))),
            other => Err(internal(
                "unexpected transaction result",
                format!("{other:?}"),
            )),
        }
    }

    fn epoch(&self) -> Result<u64, Status> {
        Ok(tables::decode_u64(self.get(tables::EPOCH_KEY)?.as_deref()))
    }

    /// Nodes and pools as this member's state machine has them.
    fn cluster_map(&self) -> Result<ClusterMap, Status> {
        // Epoch, nodes and pools from one snapshot, so the epoch always names these contents.
        let (epoch_raw, mut tables_read) = self
            .core
            .sm
            .consistent_read(
                tables::EPOCH_KEY,
                &[tables::NODE_PREFIX, tables::POOL_PREFIX],
            )
            .map_err(|e| internal("reading the state machine", e))?;
        let epoch = tables::decode_u64(epoch_raw.as_deref());
        let pool_pairs = tables_read.pop().unwrap_or_default();
        let node_pairs = tables_read.pop().unwrap_or_default();
        let seen = self.core.seen.lock().expect("seen lock").clone();
        let mut nodes = Vec::new();
        for (_, v) in node_pairs {
            let mut n: Node = decode("node", &v)?;
            if let Some(s) = seen.get(&n.id) {
                n.last_heartbeat_unix_ms = s.at_unix_ms;
                for d in &mut n.disks {
                    if let Some(live) = s.disks.iter().find(|l| l.path == d.path) {
                        d.used_bytes = live.used_bytes;
                        d.health = live.health.clone();
                    }
                }
            }
            nodes.push(n);
        }
        let mut pools = Vec::new();
        for (_, v) in pool_pairs {
            pools.push(decode("pool", &v)?);
        }
        Ok(ClusterMap {
            epoch,
            nodes,
            pools,
        })
    }

    pub(crate) fn bucket_exists(&self, name: &str) -> Result<bool, Status> {
        Ok(self.get(&tables::bucket_key(name))?.is_some())
    }

    fn no_such_bucket(name: &str) -> Status {
        Status::not_found(format!("no such bucket: {name}"))
    }

    fn members(&self) -> ListMembersResponse {
        let m = self.core.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let leader = m.current_leader.unwrap_or(0);
        let matched = m.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, node)| sov_proto::metad::Member {
                id: *id,
                addr: node.addr.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                leader: *id == leader,
                matched_index: if *id == m.id {
                    m.last_log_index.unwrap_or(0)
                } else {
                    matched
                        .get(id)
                        .and_then(|l| l.map(|l| l.index))
                        .unwrap_or(0)
                },
            })
            .collect();
        ListMembersResponse {
            members,
            leader_id: leader,
        }
    }
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Status::unavailable("leadership moved during the membership change; retry")
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Status::failed_precondition(format!("membership change refused: {c}"))
        }
        RaftError::Fatal(f) => Status::unavailable(format!("raft stopped: {f}")),
    }
}

/// Converts and checks a pool's redundancy.
fn redundancy(r: Option<&sov_proto::metad::Redundancy>) -> Result<Redundancy, Status> {
    use sov_proto::metad::redundancy::Kind;
    let small = |what: &str, v: u32| {
        u8::try_from(v).map_err(|_| Status::invalid_argument(format!("{what} {v} is too large")))
    };
    match r.and_then(|r| r.kind.as_ref()) {
        Some(Kind::Replicated(rep)) => Ok(Redundancy::Replicated {
            size: small("replica count", rep.size)?,
        }),
        Some(Kind::Ec(ec)) => Ok(Redundancy::Ec {
            k: small("k", ec.k)?,
            m: small("m", ec.m)?,
        }),
        None => Err(Status::invalid_argument(
            "a pool needs a redundancy: replicated{size} or ec{k,m}",
        )),
    }
}

const TIERS: [&str; 4] = ["performance", "standard", "hdd", "archive"];

fn placement_map(nodes: &[Node], epoch: u64) -> PlacementMap {
    PlacementMap {
        epoch,
        nodes: nodes
            .iter()
            .map(|n| NodeInfo {
                id: n.id.clone(),
                zone: n.zone.clone(),
                weight: n.weight,
                state: match n.state.as_str() {
                    "up" => NodeState::Up,
                    "down" => NodeState::Down,
                    _ => NodeState::Out,
                },
            })
            .collect(),
    }
}

fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}

pub(crate) fn version_id() -> String {
    let suffix: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(10)
        .map(char::from)
        .collect();
    format!("{:012x}{suffix}", unix_ms())
}

fn sealed_parts(s: &codec::SealedChunk) -> (String, String) {
    (hex::encode(&s.bytes), hex::encode(s.blake3))
}

fn unseal(core: &Core, aad: &[u8], sealed: &str, blake3_hex: &str) -> Result<Vec<u8>, Status> {
    unseal_kid(core, aad, sealed, blake3_hex).map(|(v, _)| v)
}

/// Opens a value sealed under a master key: tries the current key, then the earlier ones
/// (AES-GCM refuses a wrong key); also returns the id of the key that opened it.
fn unseal_kid(
    core: &Core,
    aad: &[u8],
    sealed: &str,
    blake3_hex: &str,
) -> Result<(Vec<u8>, String), Status> {
    core.master()?;
    let bytes = hex::decode(sealed).map_err(|e| internal("sealed value is not hex", e))?;
    let sum: [u8; 32] = hex::decode(blake3_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Status::internal("sealed value has a bad checksum field"))?;
    let mut last = None;
    for k in core.masters() {
        match codec::open(k, aad, &bytes, &sum) {
            Ok(v) => return Ok((v, Core::kid(k))),
            Err(e) => last = Some(e),
        }
    }
    Err(Status::failed_precondition(format!(
        "no master key this member holds opens it ({}): give the key it was sealed with as \
         --old-master-key-file",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

/// Seals `plain` under the current master key; (sealed hex, blake3 hex, key id).
fn seal_current(core: &Core, aad: &[u8], plain: &[u8]) -> Result<(String, String, String), Status> {
    let master = core.master()?;
    let (s, b) = sealed_parts(&codec::seal(master, aad, plain));
    Ok((s, b, Core::kid(master)))
}

fn access_key_aad(id: &str) -> Vec<u8> {
    format!("sov-access-key:{id}").into_bytes()
}

fn data_key_aad(id: &str) -> Vec<u8> {
    format!("sov-data-key:{id}").into_bytes()
}

#[tonic::async_trait]
impl Metad for MetadService {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let start = Instant::now();
        let r = (|| {
            let map = self.cluster_map()?;
            let count = |s: &str| map.nodes.iter().filter(|n| n.state == s).count() as u32;
            let members = self.members();
            let m = self.core.raft.metrics();
            let m = m.borrow();
            let leader_addr = m
                .current_leader
                .and_then(|l| {
                    m.membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.addr.clone())
                })
                .unwrap_or_default();
            Ok(StatusResponse {
                member_id: self.core.id,
                role: format!("{:?}", m.state).to_lowercase(),
                leader_id: m.current_leader.unwrap_or(0),
                leader_addr,
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
                members: members.members,
                epoch: map.epoch,
                nodes_up: count("up"),
                nodes_down: count("down"),
                nodes_out: count("out"),
                pools: map.pools.len() as u32,
                master_kid: self.core.master.as_ref().map(Core::kid).unwrap_or_default(),
                held_master_kids: self.core.masters().map(Core::kid).collect(),
            })
        })();
        self.observe("Status", start, r)
    }

    async fn list_members(
        &self,
        req: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        handle!(self, req, "ListMembers", list_members, local_ok = false, {
            Ok(self.members())
        })
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        handle!(
            self,
            req,
            "AddMember",
            add_member,
            local_ok = false,
            audit = format!("member {} at {}", req.get_ref().id, req.get_ref().addr),
            {
                let r = req.get_ref();
                if r.id == 0 || r.addr.trim().is_empty() {
                    return Err(Status::invalid_argument(
                        "a member needs an id > 0 and an address",
                    ));
                }
                let voters: BTreeSet<NodeId> = {
                    let m = self.core.raft.metrics();
                    let m = m.borrow();
                    m.membership_config.membership().voter_ids().collect()
                };
                if voters.contains(&r.id) {
                    return Err(Status::already_exists(format!(
                        "member {} is already a voter",
                        r.id
                    )));
                }
                let node = Member {
                    addr: r.addr.trim().to_string(),
                };
                // Joins as a learner and waits until it has caught up, then becomes a voter.
                tokio::time::timeout(
                    Duration::from_secs(120),
                    self.core.raft.add_learner(r.id, node, true),
                )
                .await
                .map_err(|_| {
                    Status::deadline_exceeded("the new member did not catch up within 120s")
                })?
                .map_err(membership_error)?;
                self.core
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([r.id])), false)
                    .await
                    .map_err(membership_error)?;
                Ok(self.members())
            }
        )
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        handle!(
            self,
            req,
            "RemoveMember",
            remove_member,
            local_ok = false,
            audit = format!("member {}", req.get_ref().id),
            {
                let id = req.get_ref().id;
                let mut voters: BTreeSet<NodeId> = {
                    let m = self.core.raft.metrics();
                    let m = m.borrow();
                    m.membership_config.membership().voter_ids().collect()
                };
                if !voters.remove(&id) {
                    return Err(Status::not_found(format!("member {id} is not a voter")));
                }
                if voters.is_empty() {
                    return Err(Status::failed_precondition("cannot remove the last member"));
                }
                self.core
                    .raft
                    .change_membership(voters, false)
                    .await
                    .map_err(membership_error)?;
                Ok(self.members())
            }
        )
    }

    async fn register_node(
        &self,
        req: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        if let Some(n) = &req.get_ref().node {
            node_claim(&req, &n.id, Some(n.zone.as_str()))?;
        }
        handle!(
            self,
            req,
            "RegisterNode",
            register_node,
            local_ok = false,
            {
                let Some(mut node) = req.into_inner().node else {
                    return Err(Status::invalid_argument("RegisterNode needs a node"));
                };
                tables::validate_node_id(&node.id).map_err(Status::invalid_argument)?;
                if node.addr.trim().is_empty() {
                    return Err(Status::invalid_argument("a node needs an address"));
                }
                if node.zone.is_empty() {
                    node.zone = "default".into();
                }
                tables::validate_name("zone", &node.zone).map_err(Status::invalid_argument)?;
                let live_disks = node.disks.clone();
                for d in &mut node.disks {
                    d.used_bytes = 0;
                    d.health.clear();
                }
                if node.capacity_bytes == 0 {
                    node.capacity_bytes = node.disks.iter().map(|d| d.capacity_bytes).sum();
                }
                if node.weight == 0 {
                    node.weight = node.capacity_bytes;
                }
                node.state = "up".into();
                node.last_heartbeat_unix_ms = 0;
                let epoch = self
                    .put_node(node.clone(), |old| {
                        let mut n = node.clone();
                        n.changed_epoch = old.map(|o| o.changed_epoch).unwrap_or(0);
                        n
                    })
                    .await?;
                self.core.saw(&node.id, live_disks);
                Ok(RegisterNodeResponse {
                    epoch,
                    heartbeat_interval_ms: self.core.cfg.nodes.heartbeat_interval.0.as_millis()
                        as u64,
                })
            }
        )
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        node_claim(&req, &req.get_ref().node_id, None)?;
        handle!(self, req, "Heartbeat", heartbeat, local_ok = false, {
            let r = req.into_inner();
            // Answers from the committed map (heartbeats from many nodes share one round).
            self.core.linearize().await?;
            let Some(raw) = self.get(&tables::node_key(&r.node_id))? else {
                return Err(Status::not_found(format!(
                    "unknown node {:?}: register first",
                    r.node_id
                )));
            };
            let node: Node = decode("node", &raw)?;
            // Capacity of the disks that work: a disk that failed (or was added) changes the
            // node's share of placement, so the map follows it.
            let usable: u64 = r
                .disks
                .iter()
                .filter(|d| d.health != "failed")
                .map(|d| d.capacity_bytes)
                .sum();
            let capacity_changed = !r.disks.is_empty() && usable != node.capacity_bytes;
            let disks = r.disks.clone();
            self.core.saw(&r.node_id, r.disks);
            let epoch = if capacity_changed {
                self.put_node(node.clone(), |cur| {
                    let mut n = cur.cloned().unwrap_or_else(|| node.clone());
                    if n.weight == n.capacity_bytes {
                        n.weight = usable;
                    }
                    n.capacity_bytes = usable;
                    n.disks = disks
                        .iter()
                        .map(|d| Disk {
                            path: d.path.clone(),
                            capacity_bytes: d.capacity_bytes,
                            ..Default::default()
                        })
                        .collect();
                    n.state = "up".into();
                    n
                })
                .await?
            } else if node.state != "up" {
                set_node_state(&self.core, &r.node_id, "up", false).await?
            } else {
                self.epoch()?
            };
            Ok(HeartbeatResponse { epoch })
        })
    }

    async fn get_cluster_map(
        &self,
        req: Request<GetClusterMapRequest>,
    ) -> Result<Response<ClusterMap>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(
            self,
            req,
            "GetClusterMap",
            get_cluster_map,
            local_ok = local,
            {
                self.read_barrier(req.get_ref().consistency).await?;
                self.cluster_map()
            }
        )
    }

    async fn create_pool(
        &self,
        req: Request<CreatePoolRequest>,
    ) -> Result<Response<CreatePoolResponse>, Status> {
        handle!(
            self,
            req,
            "CreatePool",
            create_pool,
            local_ok = false,
            audit = format!("pool {}", req.get_ref().name),
            {
                let r = req.into_inner();
                tables::validate_name("pool name", &r.name).map_err(Status::invalid_argument)?;
                let red = redundancy(r.redundancy.as_ref())?;
                let tier = if r.tier.is_empty() {
                    "standard".to_string()
                } else {
                    r.tier.clone()
                };
                if !TIERS.contains(&tier.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "unknown tier {tier:?}: one of {}",
                        TIERS.join(", ")
                    )));
                }
                if r.pg_count > 65_536 {
                    return Err(Status::invalid_argument("pg_count is at most 65536"));
                }
                let _g = self.core.map_lock.lock().await;
                let map = self.cluster_map()?;
                let pmap = placement_map(&map.nodes, map.epoch);
                placement::check_profile(&red, &pmap).map_err(|e| {
                    Status::failed_precondition(format!("pool {} refused: {e}", r.name))
                })?;
                let warning = placement::zone_shortfall(&red, &pmap).unwrap_or_default();
                let eligible = pmap.nodes.iter().filter(|n| n.is_eligible()).count().max(1);
                let pg_count = if r.pg_count > 0 {
                    r.pg_count
                } else {
                    // About 100 PG members per node, a power of two, at least 32.
                    ((eligible * 100 / red.width().max(1)).max(32) as u32)
                        .next_power_of_two()
                        .min(4096)
                };
                let next_raw = self.get(tables::NEXT_POOL_ID_KEY)?;
                let id = tables::decode_u64(next_raw.as_deref()).max(1);
                let pool = Pool {
                    name: r.name.clone(),
                    id,
                    redundancy: r.redundancy,
                    tier,
                    pg_count,
                    created_epoch: map.epoch + 1,
                };
                let next_check = match next_raw {
                    Some(v) => Check::Equals(v),
                    None => Check::Absent,
                };
                // Pools are part of the map: a new pool is a new epoch.
                let epoch_raw = self.get(tables::EPOCH_KEY)?;
                let epoch_check = match &epoch_raw {
                    Some(v) => Check::Equals(v.clone()),
                    None => Check::Absent,
                };
                let failed = self
                    .txn(
                        vec![
                            (tables::pool_key(&r.name), Check::Absent),
                            (tables::NEXT_POOL_ID_KEY.to_vec(), next_check),
                            (tables::EPOCH_KEY.to_vec(), epoch_check),
                        ],
                        vec![
                            Op::Put {
                                key: tables::pool_key(&r.name),
                                value: pool.encode_to_vec(),
                            },
                            Op::Put {
                                key: tables::NEXT_POOL_ID_KEY.to_vec(),
                                value: tables::encode_u64(id + 1),
                            },
                            Op::Put {
                                key: tables::EPOCH_KEY.to_vec(),
                                value: tables::encode_u64(map.epoch + 1),
                            },
                        ],
                    )
                    .await?;
                match failed {
                    None => Ok(CreatePoolResponse {
                        pool: Some(pool),
                        warning,
                    }),
                    Some((0, _)) => Err(Status::already_exists(format!(
                        "pool {} already exists",
                        r.name
                    ))),
                    Some(_) => Err(Status::aborted("pool ids raced; retry")),
                }
            }
        )
    }

    async fn list_pools(
        &self,
        req: Request<ListPoolsRequest>,
    ) -> Result<Response<ListPoolsResponse>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(self, req, "ListPools", list_pools, local_ok = local, {
            self.read_barrier(req.get_ref().consistency).await?;
            Ok(ListPoolsResponse {
                pools: self.cluster_map()?.pools,
            })
        })
    }

    async fn create_bucket(
        &self,
        req: Request<CreateBucketRequest>,
    ) -> Result<Response<Bucket>, Status> {
        handle!(
            self,
            req,
            "CreateBucket",
            create_bucket,
            local_ok = false,
            audit = format!(
                "bucket {} (pool {:?})",
                req.get_ref().name,
                req.get_ref().pool
            ),
            {
                let r = req.into_inner();
                tables::validate_bucket_name(&r.name).map_err(Status::invalid_argument)?;
                // With a master key, every bucket gets its own data key in the same step.
                let data_key = match self.core.master() {
                    Ok(_) => Some(self.new_data_key(&format!("bucket:{}", r.name))?),
                    Err(_) => None,
                };
                let bucket = Bucket {
                    name: r.name.clone(),
                    owner: r.owner.clone(),
                    created_unix_ms: unix_ms(),
                    pool: r.pool.clone(),
                    data_key_id: data_key.as_ref().map(|k| k.0.clone()).unwrap_or_default(),
                    ..Default::default()
                };
                let mut checks = vec![(tables::bucket_key(&r.name), Check::Absent)];
                if !r.pool.is_empty() {
                    checks.push((tables::pool_key(&r.pool), Check::Exists));
                }
                let mut ops = vec![Op::Put {
                    key: tables::bucket_key(&r.name),
                    value: bucket.encode_to_vec(),
                }];
                if let Some((id, _, value)) = data_key {
                    ops.push(Op::Put {
                        key: tables::dkey_key(&id),
                        value,
                    });
                }
                let failed = self.txn(checks, ops).await?;
                match failed {
                    None => Ok(bucket),
                    Some((0, cur)) => {
                        let owner = cur
                            .and_then(|c| Bucket::decode(c.as_slice()).ok())
                            .map(|b| b.owner)
                            .unwrap_or_default();
                        Err(Status::already_exists(format!(
                            "bucket {} already exists (owner {owner:?})",
                            r.name
                        )))
                    }
                    Some(_) => Err(Status::not_found(format!("no such pool: {}", r.pool))),
                }
            }
        )
    }

    async fn rotate_bucket_key(
        &self,
        req: Request<RotateBucketKeyRequest>,
    ) -> Result<Response<Bucket>, Status> {
        handle!(
            self,
            req,
            "RotateBucketKey",
            rotate_bucket_key,
            local_ok = false,
            audit = format!("bucket {}", req.get_ref().name),
            {
                let name = req.into_inner().name;
                tables::validate_bucket_name(&name).map_err(Status::invalid_argument)?;
                self.read_barrier(Consistency::Linearizable as i32).await?;
                let key = tables::bucket_key(&name);
                let Some(raw) = self.get(&key)? else {
                    return Err(Status::not_found(format!("no such bucket: {name}")));
                };
                let mut b: Bucket = decode("bucket", &raw)?;
                let (id, _, dkey) = self.new_data_key(&format!("bucket:{name}"))?;
                b.data_key_id = id.clone();
                let ops = vec![
                    Op::Put {
                        key: key.clone(),
                        value: b.encode_to_vec(),
                    },
                    Op::Put {
                        key: tables::dkey_key(&id),
                        value: dkey,
                    },
                ];
                match self.txn(vec![(key, Check::Equals(raw))], ops).await? {
                    None => Ok(b),
                    Some(_) => Err(Status::aborted(format!(
                        "bucket {name} changed meanwhile; try again"
                    ))),
                }
            }
        )
    }

    async fn get_bucket(&self, req: Request<GetBucketRequest>) -> Result<Response<Bucket>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(self, req, "GetBucket", get_bucket, local_ok = local, {
            let r = req.get_ref();
            tables::validate_bucket_name(&r.name).map_err(Status::invalid_argument)?;
            self.read_barrier(r.consistency).await?;
            match self.get(&tables::bucket_key(&r.name))? {
                Some(v) => decode("bucket", &v),
                None => Err(Self::no_such_bucket(&r.name)),
            }
        })
    }

    async fn delete_bucket(
        &self,
        req: Request<DeleteBucketRequest>,
    ) -> Result<Response<DeleteBucketResponse>, Status> {
        handle!(
            self,
            req,
            "DeleteBucket",
            delete_bucket,
            local_ok = false,
            audit = format!("bucket {}", req.get_ref().name),
            {
                let name = req.into_inner().name;
                tables::validate_bucket_name(&name).map_err(Status::invalid_argument)?;
                let mut confirmed = false;
                for _ in 0..RMW_TRIES {
                    let Some(cur) = self.get(&tables::bucket_key(&name))? else {
                        if !confirmed {
                            // A negative answer from local state: confirm it is current.
                            self.core.linearize().await?;
                            confirmed = true;
                            continue;
                        }
                        return Err(Self::no_such_bucket(&name));
                    };
                    let failed = self
                        .txn(
                            vec![
                                (tables::bucket_key(&name), Check::Equals(cur)),
                                (tables::objects_prefix(&name), Check::PrefixEmpty),
                            ],
                            vec![Op::Delete {
                                key: tables::bucket_key(&name),
                            }],
                        )
                        .await?;
                    match failed {
                        None => return Ok(DeleteBucketResponse {}),
                        Some((1, _)) => {
                            return Err(Status::failed_precondition(format!(
                                "bucket {name} is not empty"
                            )));
                        }
                        Some(_) => continue,
                    }
                }
                Err(Status::aborted("bucket kept changing; retry"))
            }
        )
    }

    async fn list_buckets(
        &self,
        req: Request<ListBucketsRequest>,
    ) -> Result<Response<ListBucketsResponse>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(self, req, "ListBuckets", list_buckets, local_ok = local, {
            let r = req.get_ref();
            self.read_barrier(r.consistency).await?;
            let mut buckets = Vec::new();
            for (_, v) in self.scan(tables::BUCKET_PREFIX)? {
                let b: Bucket = decode("bucket", &v)?;
                if r.owner.is_empty() || b.owner == r.owner {
                    buckets.push(b);
                }
            }
            Ok(ListBucketsResponse { buckets })
        })
    }

    async fn put_object(
        &self,
        req: Request<PutObjectRequest>,
    ) -> Result<Response<PutObjectResponse>, Status> {
        handle!(self, req, "PutObject", put_object, local_ok = false, {
            let r = req.into_inner();
            let Some(mut obj) = r.object else {
                return Err(Status::invalid_argument("PutObject needs an object"));
            };
            tables::validate_bucket_name(&obj.bucket).map_err(Status::invalid_argument)?;
            tables::validate_object_key(&obj.key).map_err(Status::invalid_argument)?;
            if obj.version_id.is_empty() {
                obj.version_id = version_id();
            }
            if obj.modified_unix_ms == 0 {
                obj.modified_unix_ms = unix_ms();
            }
            let key = tables::object_key(&obj.bucket, &obj.key);
            let value = obj.encode_to_vec();
            if value.len() > tables::MAX_RECORD {
                return Err(Status::invalid_argument(format!(
                    "object record is {} bytes, the limit is {} (manifest and metadata)",
                    value.len(),
                    tables::MAX_RECORD
                )));
            }
            let mut confirmed = false;
            for _ in 0..RMW_TRIES {
                let cur = self.get(&key)?;
                let replaced = cur
                    .as_deref()
                    .map(|c| decode::<ObjectVersion>("object", c))
                    .transpose()?;
                if let Some(want) = &r.expected_version_id {
                    let have = replaced
                        .as_ref()
                        .map(|o| o.version_id.as_str())
                        .unwrap_or("");
                    if have != want {
                        if !confirmed {
                            // A negative answer from local state: confirm it is current.
                            self.core.linearize().await?;
                            confirmed = true;
                            continue;
                        }
                        return Err(Status::failed_precondition(format!(
                            "current version is {have:?}, not {want:?}"
                        )));
                    }
                }
                let obj_check = match cur {
                    Some(c) => Check::Equals(c),
                    None => Check::Absent,
                };
                let mut ops = vec![Op::Put {
                    key: key.clone(),
                    value: value.clone(),
                }];
                if let Some(old) = &replaced {
                    ops.extend(self.tombstones(&old.manifest)?);
                }
                let failed = self
                    .txn(
                        vec![
                            (tables::bucket_key(&obj.bucket), Check::Exists),
                            (key.clone(), obj_check),
                        ],
                        ops,
                    )
                    .await?;
                match failed {
                    None => {
                        return Ok(PutObjectResponse {
                            object: Some(obj),
                            replaced,
                        });
                    }
                    Some((0, _)) => return Err(Self::no_such_bucket(&obj.bucket)),
                    Some(_) => continue,
                }
            }
            Err(Status::aborted("the key kept changing; retry"))
        })
    }

    async fn get_object(
        &self,
        req: Request<GetObjectRequest>,
    ) -> Result<Response<ObjectVersion>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(self, req, "GetObject", get_object, local_ok = local, {
            let r = req.get_ref();
            tables::validate_bucket_name(&r.bucket).map_err(Status::invalid_argument)?;
            tables::validate_object_key(&r.key).map_err(Status::invalid_argument)?;
            self.read_barrier(r.consistency).await?;
            match self.get(&tables::object_key(&r.bucket, &r.key))? {
                Some(v) => decode("object", &v),
                None if !self.bucket_exists(&r.bucket)? => Err(Self::no_such_bucket(&r.bucket)),
                None => Err(Status::not_found(format!("no such key: {}", r.key))),
            }
        })
    }

    async fn delete_object(
        &self,
        req: Request<DeleteObjectRequest>,
    ) -> Result<Response<DeleteObjectResponse>, Status> {
        handle!(
            self,
            req,
            "DeleteObject",
            delete_object,
            local_ok = false,
            {
                let r = req.into_inner();
                tables::validate_bucket_name(&r.bucket).map_err(Status::invalid_argument)?;
                tables::validate_object_key(&r.key).map_err(Status::invalid_argument)?;
                let key = tables::object_key(&r.bucket, &r.key);
                let mut confirmed = false;
                for _ in 0..RMW_TRIES {
                    let cur = self.get(&key)?;
                    let Some(cur) = cur else {
                        if !confirmed {
                            // A negative answer from local state: confirm it is current.
                            self.core.linearize().await?;
                            confirmed = true;
                            continue;
                        }
                        if !self.bucket_exists(&r.bucket)? {
                            return Err(Self::no_such_bucket(&r.bucket));
                        }
                        if let Some(want) =
                            r.expected_version_id.as_deref().filter(|w| !w.is_empty())
                        {
                            return Err(Status::failed_precondition(format!(
                                "no current version, not {want:?}"
                            )));
                        }
                        return Ok(DeleteObjectResponse { deleted: None });
                    };
                    let deleted: ObjectVersion = decode("object", &cur)?;
                    if let Some(want) = &r.expected_version_id
                        && &deleted.version_id != want
                    {
                        if !confirmed {
                            // A negative answer from local state: confirm it is current.
                            self.core.linearize().await?;
                            confirmed = true;
                            continue;
                        }
                        {
                            return Err(Status::failed_precondition(format!(
                                "current version is {:?}, not {want:?}",
                                deleted.version_id
                            )));
                        }
                    }
                    let mut ops = vec![Op::Delete { key: key.clone() }];
                    ops.extend(self.tombstones(&deleted.manifest)?);
                    let failed = self
                        .txn(vec![(key.clone(), Check::Equals(cur))], ops)
                        .await?;
                    if failed.is_none() {
                        return Ok(DeleteObjectResponse {
                            deleted: Some(deleted),
                        });
                    }
                }
                Err(Status::aborted("the key kept changing; retry"))
            }
        )
    }

    async fn list_objects(
        &self,
        req: Request<ListObjectsRequest>,
    ) -> Result<Response<ListObjectsResponse>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(self, req, "ListObjects", list_objects, local_ok = local, {
            let r = req.get_ref();
            tables::validate_bucket_name(&r.bucket).map_err(Status::invalid_argument)?;
            for (what, v) in [("prefix", &r.prefix), ("start_after", &r.start_after)] {
                if v.len() > tables::MAX_KEY_LEN {
                    return Err(Status::invalid_argument(format!(
                        "{what} is longer than {} bytes",
                        tables::MAX_KEY_LEN
                    )));
                }
            }
            if r.delimiter.len() > 64 {
                return Err(Status::invalid_argument(
                    "delimiter is longer than 64 bytes",
                ));
            }
            if r.max_keys as usize > tables::MAX_LIST {
                return Err(Status::invalid_argument(format!(
                    "max_keys is at most {}",
                    tables::MAX_LIST
                )));
            }
            self.read_barrier(r.consistency).await?;
            if !self.bucket_exists(&r.bucket)? {
                return Err(Self::no_such_bucket(&r.bucket));
            }
            let max = if r.max_keys == 0 {
                tables::MAX_LIST
            } else {
                r.max_keys as usize
            };
            let l = tables::list_objects(
                &self.core.sm,
                &r.bucket,
                &r.prefix,
                &r.delimiter,
                &r.start_after,
                max,
            )
            .map_err(Status::internal)?;
            Ok(ListObjectsResponse {
                objects: l.objects,
                common_prefixes: l.common_prefixes,
                truncated: l.truncated,
                next_start_after: l.next_start_after,
            })
        })
    }

    async fn create_access_key(
        &self,
        req: Request<CreateAccessKeyRequest>,
    ) -> Result<Response<AccessKeySecret>, Status> {
        handle!(
            self,
            req,
            "CreateAccessKey",
            create_access_key,
            local_ok = false,
            audit = format!(
                "access key {:?} name {:?} admin {}",
                req.get_ref().access_key_id,
                req.get_ref().name,
                req.get_ref().admin
            ),
            {
                let r = req.into_inner();
                let name = r.name;
                if name.len() > 128 {
                    return Err(Status::invalid_argument(
                        "key name is longer than 128 bytes",
                    ));
                }
                let master = self.core.master()?;
                let (id, secret) = match (
                    r.access_key_id.is_empty(),
                    r.secret_access_key.is_empty(),
                ) {
                    (true, true) => (
                        format!(
                            "SOV{}",
                            random_string(17, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
                        ),
                        random_string(
                            40,
                            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
                        ),
                    ),
                    (false, false) => {
                        let id = r.access_key_id;
                        if !(16..=128).contains(&id.len())
                            || !id.bytes().all(|b| b.is_ascii_alphanumeric())
                        {
                            return Err(Status::invalid_argument(
                                "an access key id is 16 to 128 letters and digits",
                            ));
                        }
                        let secret = r.secret_access_key;
                        if !(8..=128).contains(&secret.len())
                            || !secret.bytes().all(|b| b.is_ascii_graphic())
                        {
                            return Err(Status::invalid_argument(
                                "a secret is 8 to 128 printable ASCII characters without spaces",
                            ));
                        }
                        (id, secret)
                    }
                    _ => {
                        return Err(Status::invalid_argument(
                            "give both access_key_id and secret_access_key, or neither",
                        ));
                    }
                };
                let admin = r.admin;
                let sealed = codec::seal(master, &access_key_aad(&id), secret.as_bytes());
                let (sealed_secret, sealed_blake3) = sealed_parts(&sealed);
                let created = unix_ms();
                let rec = AccessKeyRecord {
                    version: 1,
                    access_key_id: id.clone(),
                    name: name.clone(),
                    created_unix_ms: created,
                    sealed_secret,
                    sealed_blake3,
                    admin,
                    master_kid: Core::kid(master),
                };
                let value = serde_json::to_vec(&rec).map_err(|e| internal("encode", e))?;
                let failed = self
                    .txn(
                        vec![(tables::akey_key(&id), Check::Absent)],
                        vec![Op::Put {
                            key: tables::akey_key(&id),
                            value,
                        }],
                    )
                    .await?;
                if failed.is_some() {
                    return Err(Status::already_exists(format!(
                        "access key {id} already exists"
                    )));
                }
                Ok(AccessKeySecret {
                    key: Some(AccessKey {
                        access_key_id: id,
                        name,
                        created_unix_ms: created,
                        admin,
                    }),
                    secret_access_key: secret,
                })
            }
        )
    }

    async fn get_access_key(
        &self,
        req: Request<GetAccessKeyRequest>,
    ) -> Result<Response<AccessKeySecret>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(
            self,
            req,
            "GetAccessKey",
            get_access_key,
            local_ok = local,
            {
                let r = req.get_ref();
                self.core.master()?;
                self.read_barrier(r.consistency).await?;
                let Some(raw) = self.get(&tables::akey_key(&r.access_key_id))? else {
                    return Err(Status::not_found(format!(
                        "no such access key: {}",
                        r.access_key_id
                    )));
                };
                let rec: AccessKeyRecord = serde_json::from_slice(&raw)
                    .map_err(|e| internal("unreadable access key", e))?;
                let secret = unseal(
                    &self.core,
                    &access_key_aad(&rec.access_key_id),
                    &rec.sealed_secret,
                    &rec.sealed_blake3,
                )?;
                Ok(AccessKeySecret {
                    key: Some(AccessKey {
                        access_key_id: rec.access_key_id,
                        name: rec.name,
                        created_unix_ms: rec.created_unix_ms,
                        admin: rec.admin,
                    }),
                    secret_access_key: String::from_utf8(secret)
                        .map_err(|e| internal("secret is not UTF-8", e))?,
                })
            }
        )
    }

    async fn list_access_keys(
        &self,
        req: Request<ListAccessKeysRequest>,
    ) -> Result<Response<ListAccessKeysResponse>, Status> {
        handle!(
            self,
            req,
            "ListAccessKeys",
            list_access_keys,
            local_ok = false,
            {
                self.read_barrier(Consistency::Linearizable as i32).await?;
                let mut keys = Vec::new();
                for (_, v) in self.scan(tables::AKEY_PREFIX)? {
                    let rec: AccessKeyRecord = serde_json::from_slice(&v)
                        .map_err(|e| internal("unreadable access key", e))?;
                    keys.push(AccessKey {
                        access_key_id: rec.access_key_id,
                        name: rec.name,
                        created_unix_ms: rec.created_unix_ms,
                        admin: rec.admin,
                    });
                }
                Ok(ListAccessKeysResponse { keys })
            }
        )
    }

    async fn delete_access_key(
        &self,
        req: Request<DeleteAccessKeyRequest>,
    ) -> Result<Response<DeleteAccessKeyResponse>, Status> {
        handle!(
            self,
            req,
            "DeleteAccessKey",
            delete_access_key,
            local_ok = false,
            audit = format!("access key {}", req.get_ref().access_key_id),
            {
                let id = req.into_inner().access_key_id;
                let key = tables::akey_key(&id);
                match self
                    .txn(vec![(key.clone(), Check::Exists)], vec![Op::Delete { key }])
                    .await?
                {
                    None => Ok(DeleteAccessKeyResponse {}),
                    Some(_) => Err(Status::not_found(format!("no such access key: {id}"))),
                }
            }
        )
    }

    async fn create_data_key(
        &self,
        req: Request<CreateDataKeyRequest>,
    ) -> Result<Response<DataKey>, Status> {
        handle!(
            self,
            req,
            "CreateDataKey",
            create_data_key,
            local_ok = false,
            audit = format!("data key for {:?}", req.get_ref().purpose),
            {
                let purpose = req.into_inner().purpose;
                if purpose.len() > 256 {
                    return Err(Status::invalid_argument("purpose is longer than 256 bytes"));
                }
                let (id, key, value) = self.new_data_key(&purpose)?;
                let created = unix_ms();
                if self
                    .txn(
                        vec![(tables::dkey_key(&id), Check::Absent)],
                        vec![Op::Put {
                            key: tables::dkey_key(&id),
                            value,
                        }],
                    )
                    .await?
                    .is_some()
                {
                    return Err(Status::aborted("data key id collision; retry"));
                }
                Ok(DataKey {
                    id,
                    key: key.as_bytes().to_vec().into(),
                    purpose,
                    created_unix_ms: created,
                })
            }
        )
    }

    async fn get_data_key(
        &self,
        req: Request<GetDataKeyRequest>,
    ) -> Result<Response<DataKey>, Status> {
        handle!(self, req, "GetDataKey", get_data_key, local_ok = false, {
            let id = req.get_ref().id.clone();
            self.core.master()?;
            self.read_barrier(Consistency::Linearizable as i32).await?;
            let Some(raw) = self.get(&tables::dkey_key(&id))? else {
                return Err(Status::not_found(format!("no such data key: {id}")));
            };
            let rec: DataKeyRecord =
                serde_json::from_slice(&raw).map_err(|e| internal("unreadable data key", e))?;
            let key = unseal(
                &self.core,
                &data_key_aad(&id),
                &rec.wrapped,
                &rec.wrapped_blake3,
            )?;
            Ok(DataKey {
                id,
                key: key.into(),
                purpose: rec.purpose,
                created_unix_ms: rec.created_unix_ms,
            })
        })
    }

    async fn set_bucket_access(
        &self,
        req: Request<SetBucketAccessRequest>,
    ) -> Result<Response<Bucket>, Status> {
        handle!(
            self,
            req,
            "SetBucketAccess",
            set_bucket_access,
            local_ok = false,
            audit = format!(
                "bucket {} key {:?} {:?}",
                req.get_ref().bucket,
                req.get_ref().access_key_id,
                req.get_ref().permission
            ),
            {
                let r = req.into_inner();
                tables::validate_bucket_name(&r.bucket).map_err(Status::invalid_argument)?;
                if !matches!(r.permission.as_str(), "" | "read" | "write" | "owner") {
                    return Err(Status::invalid_argument(
                        "permission must be read, write, owner or empty (revoke)",
                    ));
                }
                let key = tables::bucket_key(&r.bucket);
                for _ in 0..RMW_TRIES {
                    let Some(cur) = self.get(&key)? else {
                        self.core.linearize().await?;
                        if self.get(&key)?.is_some() {
                            continue;
                        }
                        return Err(Self::no_such_bucket(&r.bucket));
                    };
                    let mut b: Bucket = decode("bucket", &cur)?;
                    if !r.access_key_id.is_empty() {
                        b.grants.retain(|g| g.access_key_id != r.access_key_id);
                        if !r.permission.is_empty() {
                            b.grants.push(Grant {
                                access_key_id: r.access_key_id.clone(),
                                permission: r.permission.clone(),
                            });
                        }
                    }
                    if let Some(p) = r.public_read {
                        b.public_read = p;
                    }
                    if self
                        .txn(
                            vec![(key.clone(), Check::Equals(cur))],
                            vec![Op::Put {
                                key: key.clone(),
                                value: b.encode_to_vec(),
                            }],
                        )
                        .await?
                        .is_none()
                    {
                        return Ok(b);
                    }
                }
                Err(Status::aborted("bucket kept changing; retry"))
            }
        )
    }

    async fn create_upload(
        &self,
        req: Request<CreateUploadRequest>,
    ) -> Result<Response<Upload>, Status> {
        handle!(
            self,
            req,
            "CreateUpload",
            create_upload,
            local_ok = false,
            MetadService::create_upload(self, req.into_inner()).await
        )
    }

    async fn get_upload(&self, req: Request<GetUploadRequest>) -> Result<Response<Upload>, Status> {
        handle!(self, req, "GetUpload", get_upload, local_ok = false, {
            MetadService::get_upload(self, req.into_inner()).await
        })
    }

    async fn put_part(
        &self,
        req: Request<PutPartRequest>,
    ) -> Result<Response<PutPartResponse>, Status> {
        handle!(self, req, "PutPart", put_part, local_ok = false, {
            MetadService::put_part(self, req.into_inner()).await
        })
    }

    async fn list_parts(
        &self,
        req: Request<ListPartsRequest>,
    ) -> Result<Response<ListPartsResponse>, Status> {
        handle!(self, req, "ListParts", list_parts, local_ok = false, {
            MetadService::list_parts(self, req.into_inner()).await
        })
    }

    async fn list_uploads(
        &self,
        req: Request<ListUploadsRequest>,
    ) -> Result<Response<ListUploadsResponse>, Status> {
        handle!(self, req, "ListUploads", list_uploads, local_ok = false, {
            MetadService::list_uploads(self, req.into_inner()).await
        })
    }

    async fn complete_upload(
        &self,
        req: Request<CompleteUploadRequest>,
    ) -> Result<Response<PutObjectResponse>, Status> {
        handle!(
            self,
            req,
            "CompleteUpload",
            complete_upload,
            local_ok = false,
            MetadService::complete_upload(self, req.into_inner()).await
        )
    }

    async fn abort_upload(
        &self,
        req: Request<AbortUploadRequest>,
    ) -> Result<Response<AbortUploadResponse>, Status> {
        handle!(self, req, "AbortUpload", abort_upload, local_ok = false, {
            MetadService::abort_upload(self, req.into_inner())
                .await
                .map(|()| AbortUploadResponse {})
        })
    }

    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "CreateVolume",
            create_volume,
            local_ok = false,
            audit = format!(
                "volume {} ({} bytes)",
                req.get_ref().name,
                req.get_ref().size
            ),
            MetadService::create_volume(self, req.into_inner()).await
        )
    }

    async fn get_volume(&self, req: Request<GetVolumeRequest>) -> Result<Response<Volume>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(self, req, "GetVolume", get_volume, local_ok = local, {
            MetadService::get_volume(self, req.into_inner()).await
        })
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let local = stale(req.get_ref().consistency);
        handle!(self, req, "ListVolumes", list_volumes, local_ok = local, {
            MetadService::list_volumes(self, req.into_inner()).await
        })
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        handle!(
            self,
            req,
            "DeleteVolume",
            delete_volume,
            local_ok = false,
            audit = format!("volume {}", req.get_ref().name),
            {
                MetadService::delete_volume(self, req.into_inner())
                    .await
                    .map(|()| DeleteVolumeResponse {})
            }
        )
    }

    async fn resize_volume(
        &self,
        req: Request<ResizeVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "ResizeVolume",
            resize_volume,
            local_ok = false,
            audit = format!(
                "volume {} to {} bytes",
                req.get_ref().name,
                req.get_ref().size
            ),
            MetadService::resize_volume(self, req.into_inner()).await
        )
    }

    async fn publish_crl(
        &self,
        req: Request<PublishCrlRequest>,
    ) -> Result<Response<CrlResponse>, Status> {
        handle!(
            self,
            req,
            "PublishCrl",
            publish_crl,
            local_ok = false,
            audit = format!("CRL number {}", req.get_ref().number),
            {
                let r = req.into_inner();
                if let sov_common::tls::Transport::Tls(ctx) = sov_common::tls::transport() {
                    ctx.check_crl(&r.der)
                        .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
                }
                let current = self.crl_number()?;
                if r.number <= current {
                    return Err(Status::failed_precondition(format!(
                        "CRL number {} is not above the published one ({current})",
                        r.number
                    )));
                }
                let cur = self.get(tables::CRL_NUMBER)?;
                let check = match cur {
                    Some(v) => Check::Equals(v),
                    None => Check::Absent,
                };
                let ops = vec![
                    Op::Put {
                        key: tables::CRL.to_vec(),
                        value: r.der.to_vec(),
                    },
                    Op::Put {
                        key: tables::CRL_NUMBER.to_vec(),
                        value: r.number.to_be_bytes().to_vec(),
                    },
                ];
                match self
                    .txn(vec![(tables::CRL_NUMBER.to_vec(), check)], ops)
                    .await?
                {
                    None => Ok(CrlResponse {
                        der: r.der,
                        number: r.number,
                    }),
                    Some(_) => Err(Status::aborted("another CRL was published meanwhile")),
                }
            }
        )
    }

    async fn get_crl(&self, req: Request<GetCrlRequest>) -> Result<Response<CrlResponse>, Status> {
        // Any member's copy will do: the next poll catches up.
        handle!(self, req, "GetCrl", get_crl, local_ok = true, {
            let number = self.crl_number()?;
            let der = if number > req.get_ref().newer_than {
                self.get(tables::CRL)?.unwrap_or_default()
            } else {
                Vec::new()
            };
            Ok(CrlResponse {
                der: der.into(),
                number,
            })
        })
    }

    async fn rotate_volume_key(
        &self,
        req: Request<RotateVolumeKeyRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "RotateVolumeKey",
            rotate_volume_key,
            local_ok = false,
            audit = format!("volume {}", req.get_ref().name),
            MetadService::rotate_volume_key(self, &req.into_inner().name).await
        )
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "CreateSnapshot",
            create_snapshot,
            local_ok = false,
            audit = format!("snapshot {}@{}", req.get_ref().volume, req.get_ref().name),
            MetadService::create_snapshot(self, req.into_inner()).await
        )
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "DeleteSnapshot",
            delete_snapshot,
            local_ok = false,
            audit = format!("snapshot {}@{}", req.get_ref().volume, req.get_ref().name),
            MetadService::delete_snapshot(self, req.into_inner()).await
        )
    }

    async fn acquire_volume_lease(
        &self,
        req: Request<VolumeLeaseRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "AcquireVolumeLease",
            acquire_volume_lease,
            local_ok = false,
            MetadService::acquire_volume_lease(self, req.into_inner()).await
        )
    }

    async fn renew_volume_lease(
        &self,
        req: Request<VolumeLeaseRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "RenewVolumeLease",
            renew_volume_lease,
            local_ok = false,
            MetadService::renew_volume_lease(self, req.into_inner()).await
        )
    }

    async fn release_volume_lease(
        &self,
        req: Request<VolumeLeaseRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "ReleaseVolumeLease",
            release_volume_lease,
            local_ok = false,
            MetadService::release_volume_lease(self, req.into_inner()).await
        )
    }

    async fn set_volume_state(
        &self,
        req: Request<SetVolumeStateRequest>,
    ) -> Result<Response<Volume>, Status> {
        handle!(
            self,
            req,
            "SetVolumeState",
            set_volume_state,
            local_ok = false,
            audit = format!(
                "volume {} {} -> {}",
                req.get_ref().name,
                req.get_ref().from,
                req.get_ref().to
            ),
            MetadService::set_volume_state(self, req.into_inner()).await
        )
    }

    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        handle!(self, req, "ListAudit", list_audit, local_ok = false, {
            use crate::audit;
            self.read_barrier(Consistency::Linearizable as i32).await?;
            let r = req.into_inner();
            let limit = if r.limit == 0 {
                1000
            } else {
                r.limit.min(10_000)
            } as usize;
            let start_after = if r.since > 1 {
                audit::record_key(r.since - 1)
            } else {
                Vec::new()
            };
            let records = self
                .core
                .sm
                .scan(audit::RECORDS, &start_after, limit)
                .map_err(|e| internal("reading the audit log", e))?
                .iter()
                .map(|(_, v)| decode::<AuditRecord>("audit", v))
                .collect::<Result<Vec<_>, _>>()?;
            let next = self
                .get(audit::NEXT)?
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(1);
            Ok(ListAuditResponse { records, next })
        })
    }

    async fn append_audit(
        &self,
        req: Request<AppendAuditRequest>,
    ) -> Result<Response<AppendAuditResponse>, Status> {
        handle!(self, req, "AppendAudit", append_audit, local_ok = false, {
            let Some(rec) = req.into_inner().record else {
                return Err(Status::invalid_argument("AppendAudit needs a record"));
            };
            self.audit(rec).await;
            Ok(AppendAuditResponse {})
        })
    }

    async fn master_key_status(
        &self,
        req: Request<MasterKeyStatusRequest>,
    ) -> Result<Response<MasterKeyStatusResponse>, Status> {
        handle!(
            self,
            req,
            "MasterKeyStatus",
            master_key_status,
            local_ok = false,
            {
                self.read_barrier(Consistency::Linearizable as i32).await?;
                self.master_status(0).await
            }
        )
    }

    async fn rotate_master_key(
        &self,
        req: Request<RotateMasterKeyRequest>,
    ) -> Result<Response<MasterKeyStatusResponse>, Status> {
        handle!(
            self,
            req,
            "RotateMasterKey",
            rotate_master_key,
            local_ok = false,
            audit = "every wrapped data key and access key secret".to_string(),
            {
                let current = Core::kid(self.core.master()?);
                // Every member must already open and seal with the new key, or a member
                // that leads later could not unwrap what this one re-wraps.
                for m in &self.member_master_keys(&current).await {
                    if m.current_kid != current {
                        return Err(Status::failed_precondition(format!(
                            "member {} runs with master key {:?}, not {current}{}: restart it \
                             with --master-key-file NEW --old-master-key-file OLD first",
                            m.id,
                            m.current_kid,
                            if m.error.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", m.error)
                            }
                        )));
                    }
                }
                let mut rewrapped = 0;
                for prefix in [tables::AKEY_PREFIX, tables::DKEY_PREFIX] {
                    for page in self.scan(prefix)?.chunks(256) {
                        let mut cmds = Vec::new();
                        for (k, raw) in page {
                            if let Some(new) = self.rewrap(prefix, raw, &current)? {
                                cmds.push(Command::Txn {
                                    checks: vec![(k.clone(), Check::Equals(raw.clone()))],
                                    ops: vec![Op::Put {
                                        key: k.clone(),
                                        value: new,
                                    }],
                                });
                            }
                        }
                        if cmds.is_empty() {
                            continue;
                        }
                        let results = self.core.propose(cmds).await?;
                        rewrapped += results
                            .iter()
                            .filter(|r| matches!(r, CommandResult::Done))
                            .count() as u64;
                    }
                }
                self.master_status(rewrapped).await
            }
        )
    }

    async fn list_tombstones(
        &self,
        req: Request<ListTombstonesRequest>,
    ) -> Result<Response<ListTombstonesResponse>, Status> {
        handle!(
            self,
            req,
            "ListTombstones",
            list_tombstones,
            local_ok = false,
            {
                let r = req.get_ref();
                self.read_barrier(Consistency::Linearizable as i32).await?;
                let limit = match r.limit {
                    0 => tables::MAX_LIST,
                    n => (n as usize).min(tables::MAX_LIST),
                };
                let start = if r.start_after.is_empty() {
                    Vec::new()
                } else {
                    tables::tomb_key(&r.start_after)
                };
                let pairs = self
                    .core
                    .sm
                    .scan(tables::TOMB_PREFIX, &start, limit + 1)
                    .map_err(|e| internal("reading the state machine", e))?;
                let more = pairs.len() > limit;
                let mut tombstones = Vec::new();
                for (_, v) in pairs.into_iter().take(limit) {
                    tombstones.push(decode::<Tombstone>("tombstone", &v)?);
                }
                let next_start_after = if more {
                    tombstones.last().map(|t| t.id.clone()).unwrap_or_default()
                } else {
                    String::new()
                };
                Ok(ListTombstonesResponse {
                    tombstones,
                    next_start_after,
                })
            }
        )
    }

    async fn ack_tombstone(
        &self,
        req: Request<AckTombstoneRequest>,
    ) -> Result<Response<AckTombstoneResponse>, Status> {
        handle!(
            self,
            req,
            "AckTombstone",
            ack_tombstone,
            local_ok = false,
            {
                let r = req.into_inner();
                let key = tables::tomb_key(&r.id);
                for _ in 0..RMW_TRIES {
                    let Some(cur) = self.get(&key)? else {
                        return Ok(AckTombstoneResponse { found: false });
                    };
                    let mut t: Tombstone = decode("tombstone", &cur)?;
                    t.pending.retain(|n| n != &r.node_id);
                    let op = if t.pending.is_empty() {
                        Op::Delete { key: key.clone() }
                    } else {
                        Op::Put {
                            key: key.clone(),
                            value: t.encode_to_vec(),
                        }
                    };
                    if self
                        .txn(vec![(key.clone(), Check::Equals(cur))], vec![op])
                        .await?
                        .is_none()
                    {
                        return Ok(AckTombstoneResponse { found: true });
                    }
                }
                Err(Status::aborted("the tombstone kept changing; retry"))
            }
        )
    }
}

/// A tombstone's id: the pool and the object write's uid.
pub fn tomb_id(pool_id: u64, uid: &[u8]) -> String {
    format!("{pool_id:016x}/{}", hex::encode(uid))
}

impl MetadService {
    /// A fresh data key wrapped by the master key: its id, the key, and the record to store.
    pub(crate) fn new_data_key(
        &self,
        purpose: &str,
    ) -> Result<(String, codec::ChunkKey, Vec<u8>), Status> {
        let master = self.core.master()?;
        let id = hex::encode(rand::random::<[u8; 16]>());
        let key = codec::ChunkKey::generate();
        let wrapped = codec::seal(master, &data_key_aad(&id), key.as_bytes());
        let (wrapped, wrapped_blake3) = sealed_parts(&wrapped);
        let rec = DataKeyRecord {
            version: 1,
            id: id.clone(),
            purpose: purpose.to_string(),
            created_unix_ms: unix_ms(),
            wrapped,
            wrapped_blake3,
            master_kid: Core::kid(master),
        };
        let value = serde_json::to_vec(&rec).map_err(|e| internal("encode", e))?;
        Ok((id, key, value))
    }

    /// Every registered storage node: who a new tombstone waits for.
    pub(crate) fn registered_nodes(&self) -> Result<Vec<String>, Status> {
        self.scan(tables::NODE_PREFIX)?
            .into_iter()
            .map(|(_, v)| decode::<Node>("node", &v).map(|n| n.id))
            .collect()
    }

    /// The tombstones that free a replaced or deleted version's data on every storage node
    /// (one per leaf manifest with data), as operations for the transaction that drops the
    /// version. None when the manifest is not one this build writes (then there is nothing it
    /// could free).
    pub(crate) fn tombstones(&self, manifest: &[u8]) -> Result<Vec<Op>, Status> {
        let m = match sov_client::manifest::decode(manifest) {
            Ok(m) => m,
            Err(e) => {
                if !manifest.is_empty() {
                    tracing::warn!(error = %e, "a dropped version has no usable manifest; its data is not tombstoned");
                }
                return Ok(Vec::new());
            }
        };
        let pending = self.registered_nodes()?;
        let now = unix_ms();
        let mut ops = Vec::new();
        for leaf in sov_client::manifest::leaves(&m) {
            if sov_client::manifest::chunk_count(leaf) == 0 {
                continue;
            }
            let id = tomb_id(leaf.pool_id, &leaf.uid);
            let t = Tombstone {
                id: id.clone(),
                manifest: leaf.encode_to_vec().into(),
                not_before_unix_ms: now + self.core.cfg.nodes.delete_grace.0.as_millis() as u64,
                pending: pending.clone(),
                created_unix_ms: now,
                ..Default::default()
            };
            ops.push(Op::Put {
                key: tables::tomb_key(&id),
                value: t.encode_to_vec(),
            });
        }
        Ok(ops)
    }

    /// Writes a node record built by `make` from the current one, bumping the epoch if it
    /// changed. Returns the epoch after.
    async fn put_node(
        &self,
        node: Node,
        make: impl Fn(Option<&Node>) -> Node,
    ) -> Result<u64, Status> {
        let _g = self.core.map_lock.lock().await;
        // The no-change answer below comes from local state: make it current first.
        self.core.linearize().await?;
        for _ in 0..RMW_TRIES {
            let key = tables::node_key(&node.id);
            let cur_raw = self.get(&key)?;
            let cur = cur_raw
                .as_deref()
                .map(|c| decode::<Node>("node", c))
                .transpose()?;
            let mut new = make(cur.as_ref());
            let epoch_raw = self.get(tables::EPOCH_KEY)?;
            let epoch = tables::decode_u64(epoch_raw.as_deref());
            if cur.as_ref() == Some(&new) {
                return Ok(epoch);
            }
            new.changed_epoch = epoch + 1;
            let failed = self
                .txn(
                    vec![
                        (
                            key.clone(),
                            cur_raw.map(Check::Equals).unwrap_or(Check::Absent),
                        ),
                        (
                            tables::EPOCH_KEY.to_vec(),
                            epoch_raw.map(Check::Equals).unwrap_or(Check::Absent),
                        ),
                    ],
                    vec![
                        Op::Put {
                            key,
                            value: new.encode_to_vec(),
                        },
                        Op::Put {
                            key: tables::EPOCH_KEY.to_vec(),
                            value: tables::encode_u64(epoch + 1),
                        },
                    ],
                )
                .await?;
            if failed.is_none() {
                tracing::info!(node = %new.id, state = %new.state, epoch = epoch + 1, "cluster map changed");
                return Ok(epoch + 1);
            }
        }
        Err(Status::aborted("cluster map kept changing; retry"))
    }
}

/// Sets a node's state (a new epoch if it changed). Leader only. With `only_if_silent`, a node
/// heard from within `down_after` (a heartbeat racing the liveness pass) is left as it is.
pub async fn set_node_state(
    core: &Arc<Core>,
    id: &str,
    state: &str,
    only_if_silent: bool,
) -> Result<u64, Status> {
    let svc = MetadService { core: core.clone() };
    let Some(raw) = svc.get(&tables::node_key(id))? else {
        return Err(Status::not_found(format!("unknown node {id:?}")));
    };
    let node: Node = decode("node", &raw)?;
    let state = state.to_string();
    let down_after = core.cfg.nodes.down_after.0;
    svc.put_node(node, |cur| {
        let mut n = cur.cloned().unwrap_or_default();
        if only_if_silent {
            let seen = core.seen.lock().expect("seen lock");
            if seen.get(id).is_some_and(|s| s.at.elapsed() < down_after) {
                return n;
            }
        }
        n.state = state.clone();
        n
    })
    .await
}

/// The leader's liveness pass: nodes silent past `down_after` go `down`, past `out_after` go
/// `out`. A new leadership (term) restarts every node's clock, so a leader change never marks
/// a node down by itself.
pub async fn liveness_pass(core: &Arc<Core>) -> Result<(), Status> {
    let (leading, term) = {
        let m = core.raft.metrics();
        let m = m.borrow();
        (m.state == openraft::ServerState::Leader, m.current_term)
    };
    if !leading {
        return Ok(());
    }
    let svc = MetadService { core: core.clone() };
    let nodes: Vec<Node> = svc
        .scan(tables::NODE_PREFIX)?
        .iter()
        .map(|(_, v)| decode("node", v))
        .collect::<Result<_, _>>()?;
    let now = Instant::now();
    let mut changes = Vec::new();
    {
        let mut seen_term = core.seen_term.lock().expect("seen term lock");
        let mut seen = core.seen.lock().expect("seen lock");
        if *seen_term != term {
            *seen_term = term;
            for n in &nodes {
                seen.entry(n.id.clone()).or_insert(crate::core::Seen {
                    at: now,
                    at_unix_ms: unix_ms(),
                    disks: Vec::new(),
                });
            }
            for s in seen.values_mut() {
                s.at = now;
            }
        }
        for n in &nodes {
            let at = seen
                .entry(n.id.clone())
                .or_insert(crate::core::Seen {
                    at: now,
                    at_unix_ms: unix_ms(),
                    disks: Vec::new(),
                })
                .at;
            let silent = now.duration_since(at);
            let want = if silent >= core.cfg.nodes.out_after.0 {
                "out"
            } else if silent >= core.cfg.nodes.down_after.0 {
                "down"
            } else {
                continue;
            };
            // Only ever downgrade here: up -> down -> out. A heartbeat brings it back.
            let rank = |s: &str| match s {
                "up" => 0,
                "down" => 1,
                _ => 2,
            };
            if rank(want) > rank(&n.state) {
                changes.push((n.id.clone(), want));
            }
        }
    }
    for (id, state) in changes {
        set_node_state(core, &id, state, true).await?;
    }
    Ok(())
}

/// The cluster map in figures, for the gauges.
pub struct MapSummary {
    pub epoch: u64,
    pub nodes_by_state: Vec<(&'static str, i64)>,
    pub pools: i64,
}

/// Epoch, node counts by state and pool count, from this member's state machine.
pub fn map_summary(core: &Arc<Core>) -> Result<MapSummary, Status> {
    let svc = MetadService { core: core.clone() };
    let map = svc.cluster_map()?;
    let count = |s: &str| map.nodes.iter().filter(|n| n.state == s).count() as i64;
    Ok(MapSummary {
        epoch: map.epoch,
        nodes_by_state: vec![
            ("up", count("up")),
            ("down", count("down")),
            ("out", count("out")),
        ],
        pools: map.pools.len() as i64,
    })
}

/// A storage node speaks only for itself: the node id (and zone) it registers or heartbeats
/// with must be the name (and zone) in its certificate. Operators and members may speak for
/// any node (a member forwards after this check ran where the call came in).
fn node_claim<T>(req: &Request<T>, node_id: &str, zone: Option<&str>) -> Result<(), Status> {
    use sov_common::tls::{PeerInfo, Role};
    let Some(id) = req
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.as_ref())
    else {
        return Ok(());
    };
    if id.role != Role::Storaged {
        return Ok(());
    }
    if id.name != node_id {
        return Err(Status::permission_denied(format!(
            "{id} may not speak for node {node_id:?}"
        )));
    }
    if let (Some(cz), Some(z)) = (&id.zone, zone)
        && cz != z
        && !(z.is_empty() && cz == "default")
    {
        return Err(Status::permission_denied(format!(
            "{id} may not register in zone {z:?}"
        )));
    }
    Ok(())
}

/// Records the calls `AuthzLayer` refused on this member (`refused` carries the gRPC path, the
/// caller and the answer): on the leader directly, from a follower through `AppendAudit`.
pub async fn audit_refusals(
    core: Arc<Core>,
    mut refused: tokio::sync::mpsc::Receiver<(String, crate::audit::Origin, Status)>,
) {
    while let Some((path, origin, status)) = refused.recv().await {
        let method = path.rsplit('/').next().unwrap_or(&path).to_string();
        let rec = crate::audit::record(&origin, &method, &path, Err(&status));
        let r = match core.route(false).await {
            Ok(Route::Local) => core
                .propose(vec![Command::AuditAppend {
                    record: rec.encode_to_vec(),
                }])
                .await
                .map(|_| ()),
            Ok(Route::Leader(_, mut c)) => c
                .append_audit(AppendAuditRequest { record: Some(rec) })
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => core.metrics.audit_records.inc(),
            Err(e) => {
                core.metrics.audit_failures.inc();
                tracing::error!(%path, principal = %origin.principal, "audit record of a refused call not written: {}", e.message());
            }
        }
    }
}

/// Keeps this member's TLS folder holding the published CRL (checked every 2 s): a revocation
/// reaches metad's own listener and its connections to the other members.
pub async fn install_published_crls(core: Arc<Core>, ctx: Arc<sov_common::tls::TlsContext>) {
    let mut last = None;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Ok(Some(der)) = core.sm.get(tables::CRL) else {
            continue;
        };
        if last.as_ref() == Some(&der) {
            continue;
        }
        match ctx.install_crl(&der) {
            Ok(true) => tracing::info!("installed the published CRL"),
            Ok(false) => {}
            Err(e) => tracing::warn!("the published CRL was not installed: {e:#}"),
        }
        last = Some(der);
    }
}
