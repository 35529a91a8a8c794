//! `sov master-key status|rotate`: which master key each metad member holds, how many wrapped
//! secrets each key seals, and re-wrapping them all under the current key.
//!
//! Rotating, on every member in turn: restart it with `--master-key-file NEW
//! --old-master-key-file OLD`; then `sov master-key rotate`; then restart the members with
//! `--master-key-file NEW` alone. Object data and volume sectors are never touched: only the
//! data keys and access key secrets the master key wraps.

use clap::Subcommand;
use sov_proto::metad as pb;

use crate::cluster::{MetadArgs, status_err};
use crate::{CliError, Output};

#[derive(Debug, Subcommand)]
pub enum MasterKeyCmd {
    /// The current key, the keys each member holds, and the wrapped secrets by key.
    Status(MetadArgs),
    /// Re-wrap every data key and access key secret under the current master key.
    Rotate(MetadArgs),
}

fn print(out: Output, r: &pb::MasterKeyStatusResponse, rotated: bool) {
    match out {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "current_kid": r.current_kid,
                "records_by_kid": r.records_by_kid,
                "rewrapped": r.rewrapped,
                "members": r.members.iter().map(|m| serde_json::json!({
                    "id": m.id, "current_kid": m.current_kid, "held_kids": m.held_kids,
                    "error": m.error,
                })).collect::<Vec<_>>(),
            })
        ),
        Output::Text => {
            if rotated {
                println!("re-wrapped {} secrets under {}", r.rewrapped, r.current_kid);
            }
            println!("current master key: {}", r.current_kid);
            let mut kids: Vec<_> = r.records_by_kid.iter().collect();
            kids.sort();
            for (k, n) in kids {
                println!("  {n} wrapped secrets under {k}");
            }
            for m in &r.members {
                if m.error.is_empty() {
                    println!(
                        "  member {}: current {}, holds {}",
                        m.id,
                        m.current_kid,
                        m.held_kids.join(", ")
                    );
                } else {
                    println!("  member {}: not reachable ({})", m.id, m.error);
                }
            }
        }
    }
}

pub async fn run(cmd: MasterKeyCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        MasterKeyCmd::Status(m) => {
            let r = m
                .client()?
                .call(
                    |mut c| async move { c.master_key_status(pb::MasterKeyStatusRequest {}).await },
                )
                .await
                .map_err(status_err)?;
            print(out, &r, false);
        }
        MasterKeyCmd::Rotate(m) => {
            let r = m
                .client()?
                .with_attempt_timeout(std::time::Duration::from_secs(120))
                .call(
                    |mut c| async move { c.rotate_master_key(pb::RotateMasterKeyRequest {}).await },
                )
                .await
                .map_err(status_err)?;
            print(out, &r, true);
        }
    }
    Ok(())
}
