//! Admin commands against metad: `sov cluster status`, `sov node list`,
//! `sov pool create|list` and `sov metad members|add|remove`.
//!
//! Every command takes `--metad ADDR[,ADDR...]` and talks through [`MetaClient`], which retries
//! `UNAVAILABLE` across the members given (any member forwards to the leader). gRPC failures
//! map to exit codes: `NOT_FOUND` 4; `INVALID_ARGUMENT`, `FAILED_PRECONDITION` and
//! `ALREADY_EXISTS` 2; metad unreachable 5; anything else 1.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sov_client::meta::{MetaClient, parse_addrs, retryable};
use sov_proto::metad as pb;
use sov_proto::metad::redundancy::Kind;
use tonic::{Code, Status};

use crate::{CliError, Output};

/// Exit code for a request metad refused as invalid, or a bad command line.
const EXIT_USAGE: u8 = 2;
/// Exit code for "no such member, node or pool".
const EXIT_NOT_FOUND: u8 = 4;
/// Exit code for "no metad member answered".
const EXIT_UNAVAILABLE: u8 = 5;
/// How long `cluster status` waits for each member's own status.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `cluster status` keeps retrying the cluster map before it falls back to a
/// member's own summary.
const MAP_RETRY_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct MetadArgs {
    /// metad member addresses, comma-separated (host:port[,host:port...]).
    #[arg(
        long = "metad",
        env = "SOV_METAD",
        value_name = "ADDR[,ADDR...]",
        default_value = "127.0.0.1:7400"
    )]
    metad: String,
}

impl MetadArgs {
    pub(crate) fn addrs(&self) -> Result<Vec<String>, CliError> {
        let addrs = parse_addrs(&self.metad);
        if addrs.is_empty() {
            return Err(CliError::new(EXIT_USAGE, "--metad: no address given"));
        }
        Ok(addrs)
    }

    pub(crate) fn client(&self) -> Result<MetaClient, CliError> {
        MetaClient::new(&self.addrs()?).map_err(status_err)
    }
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Leader, term, log indexes and members as the metad members see them, with a summary of
    /// the cluster map (epoch, storage nodes by state, pools).
    Status(MetadArgs),
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Storage nodes in the cluster map: address, zone, state, capacity, weight, disks and
    /// the age of the last heartbeat.
    List(MetadArgs),
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Create a pool; prints it, and a warning when it is weaker than asked (for example two
    /// members of a placement group share a zone).
    Create {
        #[command(flatten)]
        metad: MetadArgs,
        /// Pool name.
        name: String,
        /// Redundancy: `replicated:N` (N full copies) or `ec:K+M` (K data and M parity
        /// shards).
        #[arg(long, value_name = "replicated:N|ec:K+M", value_parser = parse_redundancy)]
        redundancy: pb::Redundancy,
        /// Storage tier.
        #[arg(long, value_enum, default_value_t = Tier::Standard)]
        tier: Tier,
        /// Placement groups; 0 lets metad pick from the cluster size.
        #[arg(long, default_value_t = 0)]
        pg_count: u32,
    },
    /// List pools.
    List(MetadArgs),
}

#[derive(Debug, Subcommand)]
pub enum MetadCmd {
    /// List the metad members (voters and learners) and the leader.
    Members(MetadArgs),
    /// Add a voter: metad joins it as a learner, waits for it to catch up, then makes it a
    /// voter. Start the new member first.
    Add {
        #[command(flatten)]
        metad: MetadArgs,
        /// Raft id of the new member (1 or more).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Address the other members reach it at.
        #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
        addr: String,
    },
    /// Remove a member.
    Remove {
        #[command(flatten)]
        metad: MetadArgs,
        /// Raft id of the member to remove.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
}

/// A pool's storage tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Tier {
    /// Fastest media (NVMe).
    Performance,
    /// General purpose.
    Standard,
    /// Spinning disks.
    Hdd,
    /// Cold data.
    Archive,
}

impl Tier {
    fn as_str(self) -> &'static str {
        match self {
            Tier::Performance => "performance",
            Tier::Standard => "standard",
            Tier::Hdd => "hdd",
            Tier::Archive => "archive",
        }
    }
}

/// Parses `replicated:N` or `ec:K+M`; every count must be at least 1.
pub(crate) fn parse_redundancy(s: &str) -> Result<pb::Redundancy, String> {
    const FORMS: &str = "expected replicated:N (e.g. replicated:3) or ec:K+M (e.g. ec:4+2)";
    let count = |what: &str, v: &str| -> Result<u32, String> {
        match v.trim().parse::<u32>() {
            Ok(0) => Err(format!("{what} must be at least 1")),
            Ok(n) => Ok(n),
            Err(_) => Err(format!(
                "{what} {:?} is not a whole number; {FORMS}",
                v.trim()
            )),
        }
    };
    let (kind, rest) = s.trim().split_once(':').ok_or_else(|| FORMS.to_string())?;
    let kind = match kind.trim().to_ascii_lowercase().as_str() {
        "replicated" => Kind::Replicated(pb::Replicated {
            size: count("the number of copies", rest)?,
        }),
        "ec" => {
            let (k, m) = rest
                .split_once('+')
                .ok_or_else(|| format!("ec needs K+M; {FORMS}"))?;
            Kind::Ec(pb::ErasureCoded {
                k: count("K (data shards)", k)?,
                m: count("M (parity shards)", m)?,
            })
        }
        other => return Err(format!("unknown redundancy {other:?}; {FORMS}")),
    };
    Ok(pb::Redundancy { kind: Some(kind) })
}

/// Checks `HOST:PORT` with a non-empty host and a port from 1 to 65535.
fn parse_host_port(s: &str) -> Result<String, String> {
    let s = s.trim();
    match s.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && matches!(port.parse::<u16>(), Ok(p) if p != 0) =>
        {
            Ok(s.to_string())
        }
        _ => Err("expected HOST:PORT, e.g. 10.0.0.4:7400".to_string()),
    }
}

/// The canonical gRPC name of a status code, as in `NOT_FOUND`.
fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The exit code a failed call maps to. A connection failure that tonic reports as `UNKNOWN`
/// counts as unavailable, like `UNAVAILABLE` itself.
pub(crate) fn exit_code(s: &Status) -> u8 {
    match s.code() {
        Code::NotFound => EXIT_NOT_FOUND,
        Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => EXIT_USAGE,
        _ if retryable(s) => EXIT_UNAVAILABLE,
        _ => 1,
    }
}

fn status_text(s: &Status) -> String {
    if s.message().is_empty() {
        code_name(s.code()).to_string()
    } else {
        format!("{}: {}", code_name(s.code()), s.message())
    }
}

pub(crate) fn status_err(s: Status) -> CliError {
    CliError::new(exit_code(&s), status_text(&s))
}

pub(crate) fn print(out: Output, json: Value, text: String) {
    match out {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json).expect("a JSON value always serializes")
        ),
        Output::Text => println!("{text}"),
    }
}

/// Left-aligned columns two spaces apart, with a header row.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(rows)
        .map(|row| {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, &w)| format!("{cell:<w$}"))
                .collect();
            line.join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `key  value` lines with the values aligned.
fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<w$}  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Bytes in the largest binary unit below them, one decimal: `931.5GiB`.
pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// A duration in milliseconds in its two largest units: `850ms`, `42s`, `3m7s`, `2h5m`,
/// `4d1h`.
fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `replicated:3` or `ec:4+2`, the syntax `--redundancy` takes; `None` when unset.
fn redundancy_str(r: Option<&pb::Redundancy>) -> Option<String> {
    match r.and_then(|r| r.kind)? {
        Kind::Replicated(x) => Some(format!("replicated:{}", x.size)),
        Kind::Ec(e) => Some(format!("ec:{}+{}", e.k, e.m)),
    }
}

fn linearizable() -> i32 {
    pb::Consistency::Linearizable as i32
}

async fn get_cluster_map(mc: &MetaClient) -> Result<pb::ClusterMap, Status> {
    let consistency = linearizable();
    mc.call(|mut c| async move {
        c.get_cluster_map(pb::GetClusterMapRequest { consistency })
            .await
    })
    .await
}

fn member_json(m: &pb::Member) -> Value {
    json!({
        "id": m.id, "addr": m.addr, "role": m.role, "leader": m.leader,
        "matched_index": m.matched_index,
    })
}

fn members_table(members: &[pb::Member]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.addr.clone(),
                m.role.clone(),
                if m.leader { "yes" } else { "" }.to_string(),
                if m.matched_index == 0 {
                    "-".to_string()
                } else {
                    m.matched_index.to_string()
                },
            ]
        })
        .collect();
    table(&["ID", "ADDR", "ROLE", "LEADER", "MATCHED"], &rows)
}

fn pool_json(p: &pb::Pool) -> Value {
    json!({
        "name": p.name, "id": p.id, "redundancy": redundancy_str(p.redundancy.as_ref()),
        "tier": p.tier, "pg_count": p.pg_count, "created_epoch": p.created_epoch,
    })
}

fn pool_row(p: &pb::Pool) -> Vec<String> {
    vec![
        p.name.clone(),
        p.id.to_string(),
        redundancy_str(p.redundancy.as_ref()).unwrap_or_else(|| "-".to_string()),
        p.tier.clone(),
        p.pg_count.to_string(),
        p.created_epoch.to_string(),
    ]
}

const POOL_HEADER: [&str; 6] = ["NAME", "ID", "REDUNDANCY", "TIER", "PGS", "CREATED EPOCH"];

// ---- sov cluster ----

pub async fn run_cluster(cmd: ClusterCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        ClusterCmd::Status(a) => cluster_status(a, out).await,
    }
}

/// One member's own status: a single attempt, bounded by [`PROBE_TIMEOUT`].
async fn probe(addr: &str) -> Result<pb::StatusResponse, Status> {
    let mc = MetaClient::new(&[addr.to_string()])?.with_retry_for(Duration::ZERO);
    let call = mc.call(|mut c| async move { c.status(pb::StatusRequest {}).await });
    match tokio::time::timeout(PROBE_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(Status::unavailable(format!(
            "no answer within {}s",
            PROBE_TIMEOUT.as_secs()
        ))),
    }
}

/// Epoch, storage nodes by state and pool count.
struct MapSummary {
    epoch: u64,
    /// `up`, `down`, `out` first (always present), then any other state metad reports.
    states: Vec<(String, u64)>,
    pools: u64,
}

impl MapSummary {
    fn from_states(epoch: u64, mut counts: BTreeMap<String, u64>, pools: u64) -> MapSummary {
        let mut states = Vec::new();
        for s in ["up", "down", "out"] {
            states.push((s.to_string(), counts.remove(s).unwrap_or(0)));
        }
        states.extend(counts);
        MapSummary {
            epoch,
            states,
            pools,
        }
    }

    fn total(&self) -> u64 {
        self.states.iter().map(|(_, n)| n).sum()
    }
}

async fn cluster_status(a: MetadArgs, out: Output) -> Result<(), CliError> {
    let addrs = a.addrs()?;
    let answers: Vec<Result<pb::StatusResponse, Status>> =
        futures::future::join_all(addrs.iter().map(|addr| probe(addr))).await;

    // The leader's own view when it answered (the only one with matched indexes), otherwise
    // the most advanced member's.
    let answered = || answers.iter().filter_map(|r| r.as_ref().ok());
    let view = answered()
        .filter(|s| s.role == "leader")
        .max_by_key(|s| (s.term, s.applied_index))
        .or_else(|| answered().max_by_key(|s| (s.term, s.applied_index)));
    let Some(view) = view else {
        let code = answers
            .iter()
            .find_map(|r| r.as_ref().err())
            .map_or(EXIT_UNAVAILABLE, exit_code);
        let why: Vec<String> = addrs
            .iter()
            .zip(&answers)
            .filter_map(|(addr, r)| {
                r.as_ref()
                    .err()
                    .map(|e| format!("{addr}: {}", status_text(e)))
            })
            .collect();
        return Err(CliError::new(
            code,
            format!("no metad member answered ({})", why.join("; ")),
        ));
    };

    // The cluster map through the leader; without one, the member's own summary.
    let mut map_note = None;
    let summary = if view.leader_id == 0 {
        map_note = Some(format!(
            "no leader known; epoch, nodes and pools are member {}'s own view",
            view.member_id
        ));
        None
    } else {
        let mc = MetaClient::new(&addrs)
            .map_err(status_err)?
            .with_retry_for(MAP_RETRY_FOR);
        match get_cluster_map(&mc).await {
            Ok(map) => {
                let mut counts = BTreeMap::new();
                for n in &map.nodes {
                    *counts.entry(n.state.clone()).or_insert(0) += 1;
                }
                Some(MapSummary::from_states(
                    map.epoch,
                    counts,
                    map.pools.len() as u64,
                ))
            }
            Err(e) => {
                map_note = Some(format!(
                    "cluster map unreadable ({}); epoch, nodes and pools are member {}'s own view",
                    status_text(&e),
                    view.member_id
                ));
                None
            }
        }
    };
    let summary = summary.unwrap_or_else(|| {
        let counts = BTreeMap::from([
            ("up".to_string(), u64::from(view.nodes_up)),
            ("down".to_string(), u64::from(view.nodes_down)),
            ("out".to_string(), u64::from(view.nodes_out)),
        ]);
        MapSummary::from_states(view.epoch, counts, u64::from(view.pools))
    });

    let mut members = view.members.clone();
    members.sort_by_key(|m| m.id);
    let leader =
        (view.leader_id != 0).then(|| json!({"id": view.leader_id, "addr": view.leader_addr}));
    let mut nodes = serde_json::Map::new();
    for (state, n) in &summary.states {
        nodes.insert(state.clone(), json!(n));
    }
    nodes.insert("total".to_string(), json!(summary.total()));
    let answers_json: Vec<Value> = addrs
        .iter()
        .zip(&answers)
        .map(|(addr, r)| match r {
            Ok(s) => json!({
                "addr": addr, "member_id": s.member_id, "role": s.role, "term": s.term,
                "leader_id": s.leader_id, "last_log_index": s.last_log_index,
                "applied_index": s.applied_index, "error": null,
            }),
            Err(e) => json!({
                "addr": addr,
                "error": {"code": code_name(e.code()), "message": e.message()},
            }),
        })
        .collect();
    let json = json!({
        "leader": leader,
        "view": {"member_id": view.member_id, "role": view.role},
        "term": view.term,
        "last_log_index": view.last_log_index,
        "applied_index": view.applied_index,
        "snapshot_index": view.snapshot_index,
        "members": members.iter().map(member_json).collect::<Vec<_>>(),
        "epoch": summary.epoch,
        "nodes": nodes,
        "pools": summary.pools,
        "note": map_note,
        "answers": answers_json,
    });

    let leader_text = if view.leader_id == 0 {
        "none".to_string()
    } else {
        format!("{} at {}", view.leader_id, view.leader_addr)
    };
    let states: Vec<String> = summary
        .states
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    let mut text = key_values(&[
        ("leader", leader_text),
        ("view", format!("member {} ({})", view.member_id, view.role)),
        ("term", view.term.to_string()),
        (
            "log",
            format!(
                "last {}, applied {}, snapshot {}",
                view.last_log_index, view.applied_index, view.snapshot_index
            ),
        ),
        ("epoch", summary.epoch.to_string()),
        (
            "nodes",
            format!("{} ({} total)", states.join(", "), summary.total()),
        ),
        ("pools", summary.pools.to_string()),
    ]);
    if let Some(note) = &map_note {
        text.push_str(&format!("\nnote: {note}"));
    }
    text.push_str("\n\n");
    text.push_str(&members_table(&members));
    let rows: Vec<Vec<String>> = addrs
        .iter()
        .zip(&answers)
        .map(|(addr, r)| match r {
            Ok(s) => vec![
                addr.clone(),
                s.member_id.to_string(),
                s.role.clone(),
                s.term.to_string(),
                s.applied_index.to_string(),
                String::new(),
            ],
            Err(e) => vec![
                addr.clone(),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
                "-".to_string(),
                status_text(e),
            ],
        })
        .collect();
    text.push_str("\n\n");
    text.push_str(&table(
        &["ASKED", "MEMBER", "ROLE", "TERM", "APPLIED", "ERROR"],
        &rows,
    ));
    print(out, json, text);
    Ok(())
}

// ---- sov node ----

const NODE_HEADER: [&str; 8] = [
    "ID",
    "ADDR",
    "ZONE",
    "STATE",
    "CAPACITY",
    "WEIGHT",
    "DISKS",
    "HEARTBEAT",
];

pub async fn run_node(cmd: NodeCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        NodeCmd::List(a) => node_list(a, out).await,
    }
}

async fn node_list(a: MetadArgs, out: Output) -> Result<(), CliError> {
    let mc = a.client()?;
    let mut map = get_cluster_map(&mc).await.map_err(status_err)?;
    map.nodes.sort_by(|x, y| x.id.as_str().cmp(y.id.as_str()));
    let now = now_unix_ms();
    let age = |n: &pb::Node| {
        (n.last_heartbeat_unix_ms != 0).then(|| now.saturating_sub(n.last_heartbeat_unix_ms))
    };

    let nodes_json: Vec<Value> = map
        .nodes
        .iter()
        .map(|n| {
            let disks: Vec<Value> = n
                .disks
                .iter()
                .map(|d| {
                    json!({
                        "path": d.path, "capacity_bytes": d.capacity_bytes,
                        "used_bytes": d.used_bytes, "health": d.health,
                    })
                })
                .collect();
            json!({
                "id": n.id, "addr": n.addr, "zone": n.zone, "state": n.state,
                "capacity_bytes": n.capacity_bytes, "weight": n.weight, "disks": disks,
                "last_heartbeat_unix_ms": n.last_heartbeat_unix_ms,
                "heartbeat_age_ms": age(n), "metrics_addr": n.metrics_addr,
                "changed_epoch": n.changed_epoch,
            })
        })
        .collect();
    let json = json!({"epoch": map.epoch, "nodes": nodes_json});

    let text = if map.nodes.is_empty() {
        format!("no storage nodes registered (epoch {})", map.epoch)
    } else {
        let rows: Vec<Vec<String>> = map
            .nodes
            .iter()
            .map(|n| {
                // The disk count, with any disk that is not "ok" called out: `3 (1 failed)`.
                let mut unwell: BTreeMap<&str, usize> = BTreeMap::new();
                for d in n.disks.iter().filter(|d| d.health != "ok") {
                    *unwell.entry(d.health.as_str()).or_insert(0) += 1;
                }
                let disks = if unwell.is_empty() {
                    n.disks.len().to_string()
                } else {
                    let parts: Vec<String> =
                        unwell.iter().map(|(h, c)| format!("{c} {h}")).collect();
                    format!("{} ({})", n.disks.len(), parts.join(", "))
                };
                vec![
                    n.id.clone(),
                    n.addr.clone(),
                    n.zone.clone(),
                    n.state.clone(),
                    human_bytes(n.capacity_bytes),
                    n.weight.to_string(),
                    disks,
                    age(n).map_or_else(
                        || "never".to_string(),
                        |ms| format!("{} ago", human_age(ms)),
                    ),
                ]
            })
            .collect();
        table(&NODE_HEADER, &rows)
    };
    print(out, json, text);
    Ok(())
}

// ---- sov pool ----

pub async fn run_pool(cmd: PoolCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        PoolCmd::Create {
            metad,
            name,
            redundancy,
            tier,
            pg_count,
        } => {
            let mc = metad.client()?;
            let req = pb::CreatePoolRequest {
                name,
                redundancy: Some(redundancy),
                tier: tier.as_str().to_string(),
                pg_count,
            };
            let r = mc
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.create_pool(req).await }
                })
                .await
                .map_err(status_err)?;
            let pool = r
                .pool
                .ok_or_else(|| CliError::new(1, "metad answered without the pool"))?;
            let warning = (!r.warning.is_empty()).then_some(r.warning);
            if out == Output::Text
                && let Some(w) = &warning
            {
                eprintln!("warning: {w}");
            }
            let json = json!({"pool": pool_json(&pool), "warning": warning});
            let text = format!(
                "created pool {}\n\n{}",
                pool.name,
                table(&POOL_HEADER, &[pool_row(&pool)])
            );
            print(out, json, text);
        }
        PoolCmd::List(a) => {
            let mc = a.client()?;
            let consistency = linearizable();
            let mut r = mc
                .call(
                    |mut c| async move { c.list_pools(pb::ListPoolsRequest { consistency }).await },
                )
                .await
                .map_err(status_err)?;
            r.pools.sort_by(|x, y| x.name.as_str().cmp(y.name.as_str()));
            let json = json!({"pools": r.pools.iter().map(pool_json).collect::<Vec<_>>()});
            let text = if r.pools.is_empty() {
                "no pools".to_string()
            } else {
                let rows: Vec<Vec<String>> = r.pools.iter().map(pool_row).collect();
                table(&POOL_HEADER, &rows)
            };
            print(out, json, text);
        }
    }
    Ok(())
}

// ---- sov metad ----

pub async fn run_metad(cmd: MetadCmd, out: Output) -> Result<(), CliError> {
    let (headline, extra, mut r) = match cmd {
        MetadCmd::Members(a) => {
            let mc = a.client()?;
            let r = mc
                .call(|mut c| async move { c.list_members(pb::ListMembersRequest {}).await })
                .await
                .map_err(status_err)?;
            (None, None, r)
        }
        MetadCmd::Add { metad, id, addr } => {
            // Adding waits until the new member caught up with the log.
            let mc = metad
                .client()?
                .with_attempt_timeout(std::time::Duration::from_secs(30));
            let req = pb::AddMemberRequest {
                id,
                addr: addr.clone(),
            };
            let r = mc
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.add_member(req).await }
                })
                .await
                .map_err(status_err)?;
            (
                Some(format!("added member {id} at {addr}")),
                Some(("added", json!({"id": id, "addr": addr}))),
                r,
            )
        }
        MetadCmd::Remove { metad, id } => {
            let mc = metad.client()?;
            let r = mc
                .call(|mut c| async move { c.remove_member(pb::RemoveMemberRequest { id }).await })
                .await
                .map_err(status_err)?;
            (
                Some(format!("removed member {id}")),
                Some(("removed", json!({"id": id}))),
                r,
            )
        }
    };
    r.members.sort_by_key(|m| m.id);
    let mut json = json!({
        "leader_id": (r.leader_id != 0).then_some(r.leader_id),
        "members": r.members.iter().map(member_json).collect::<Vec<_>>(),
    });
    if let Some((key, v)) = extra {
        json[key] = v;
    }
    let mut text = String::new();
    if let Some(h) = headline {
        text.push_str(&h);
        text.push_str("\n\n");
    }
    text.push_str(&members_table(&r.members));
    if r.leader_id == 0 {
        text.push_str("\nno leader known");
    }
    print(out, json, text);
    Ok(())
}
