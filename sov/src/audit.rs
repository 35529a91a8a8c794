//! `sov audit`: metad's audit log (every admin action and every refused call), and `sov audit
//! verify`, which checks the hash chain from the first record.

use std::time::Duration;

use clap::{Args, Subcommand};
use prost::Message;
use sov_proto::metad as pb;

use crate::cluster::{MetadArgs, status_err};
use crate::{CliError, Output};

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    cmd: Option<AuditCmd>,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Check that no record was changed, removed or reordered (the hash chain from the start).
    Verify(MetadArgs),
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    metad: MetadArgs,
    /// First record to show (sequence number).
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// At most this many records.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Keep printing new records as they come.
    #[arg(long)]
    follow: bool,
}

async fn page(
    mc: &sov_client::meta::MetaClient,
    since: u64,
    limit: u32,
) -> Result<pb::ListAuditResponse, CliError> {
    mc.call(|mut c| async move { c.list_audit(pb::ListAuditRequest { since, limit }).await })
        .await
        .map_err(status_err)
}

fn print(out: Output, r: &pb::AuditRecord) {
    match out {
        Output::Json => println!("{}", json(r)),
        Output::Text => {
            let secs = r.unix_ms / 1000;
            println!(
                "{:>6} {} {:<24} {:<22} {:<18} {:<20} {}{}",
                r.seq,
                format_time(secs),
                r.principal,
                r.from,
                r.method,
                r.code,
                r.target,
                if r.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.message)
                }
            )
        }
    }
}

fn json(r: &pb::AuditRecord) -> serde_json::Value {
    serde_json::json!({
        "seq": r.seq, "unix_ms": r.unix_ms, "principal": r.principal, "auth": r.auth,
        "from": r.from, "method": r.method, "target": r.target, "code": r.code,
        "message": r.message, "prev_hash": r.prev_hash, "hash": r.hash,
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` from unix seconds (civil date from days, no time crate needed).
fn format_time(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The chain hash of a record, as metad computes it: blake3 of its encoding without `hash`.
fn chain_hash(r: &pb::AuditRecord) -> String {
    let mut r = r.clone();
    r.hash.clear();
    blake3::hash(&r.encode_to_vec()).to_hex().to_string()
}

pub async fn run(a: AuditArgs, out: Output) -> Result<(), CliError> {
    match a.cmd {
        Some(AuditCmd::Verify(m)) => {
            let mc = m.client()?;
            let (mut since, mut prev, mut n) = (1u64, String::new(), 0u64);
            loop {
                let p = page(&mc, since, 1000).await?;
                for r in &p.records {
                    if r.seq != since || r.prev_hash != prev || chain_hash(r) != r.hash {
                        return Err(CliError::new(
                            3,
                            format!("audit log broken at record {since} (found {})", r.seq),
                        ));
                    }
                    prev = r.hash.clone();
                    since += 1;
                    n += 1;
                }
                if p.records.is_empty() || since >= p.next {
                    break;
                }
            }
            match out {
                Output::Json => println!("{}", serde_json::json!({"verified": n, "head": prev})),
                Output::Text => println!("audit log intact: {n} records, head {prev}"),
            }
            Ok(())
        }
        None => {
            let l = a.list;
            let mc = l.metad.client()?;
            let mut since = l.since;
            let mut left = l.limit;
            if out == Output::Text {
                println!(
                    "{:>6} {:<20} {:<24} {:<22} {:<18} {:<20} TARGET",
                    "SEQ", "TIME", "WHO", "FROM", "WHAT", "RESULT"
                );
            }
            loop {
                let p = page(&mc, since, left.min(1000)).await?;
                for r in &p.records {
                    print(out, r);
                    since = r.seq + 1;
                }
                left = left.saturating_sub(p.records.len() as u32);
                if l.follow {
                    if p.records.is_empty() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
                if p.records.is_empty() || left == 0 || since >= p.next {
                    return Ok(());
                }
            }
        }
    }
}
