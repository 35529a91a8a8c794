//! `sov audit`: metad's audit log (every admin action and every refused call), and `sov audit
//! verify`, which checks the hash chain from the first record.

use std::time::Duration;

use clap::{Args, Subcommand};
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

/// `YYYY-MM-DDTHH:MM:SSZ` from unix seconds.
fn format_time(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = sov_common::units::civil_utc(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

pub async fn run(a: AuditArgs, out: Output) -> Result<(), CliError> {
    match a.cmd {
        Some(AuditCmd::Verify(m)) => {
            let mc = m.client()?;
            let (mut since, mut prev, mut n) = (1u64, String::new(), 0u64);
            loop {
                let p = page(&mc, since, 1000).await?;
                for r in &p.records {
                    if r.seq != since
                        || r.prev_hash != prev
                        || sov_client::audit::chain_hash(r) != r.hash
                    {
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
