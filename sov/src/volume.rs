//! `sov volume ...`: block volumes in metad, and the attach API. Attaching names a vhost-blk
//! (the exporter) in the volume's record and waits until that exporter has opened it and
//! reports its URI (`nbd://host:port/NAME`, or a vhost-user socket path).

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sov_common::units::ByteSize;
use sov_proto::metad as pb;

use crate::cluster::{MetadArgs, human_bytes, print, status_err, table};
use crate::{CliError, Output};

/// Exit code when an attach or detach did not finish in time.
const EXIT_TIMEOUT: u8 = 3;

#[derive(Debug, Args)]
pub struct Wait {
    /// Seconds to wait for the exporter.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a thin volume of SIZE (e.g. 10GiB) in a replicated pool.
    Create {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
        #[arg(long)]
        size: ByteSize,
        /// Pool (default: standard).
        #[arg(long, default_value = "")]
        pool: String,
        /// performance, standard, hdd or archive: the QoS defaults.
        #[arg(long, default_value = "standard")]
        tier: String,
        /// IOPS limit instead of the tier's.
        #[arg(long, default_value_t = 0)]
        iops: u64,
        /// Bandwidth limit instead of the tier's (e.g. 200MiB).
        #[arg(long)]
        bandwidth: Option<ByteSize>,
    },
    /// List volumes.
    List(MetadArgs),
    /// Show one volume with its snapshots, lease and attachment.
    Show {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
    },
    /// Delete a detached volume (its data is freed on every node after the grace period).
    Delete {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
    },
    /// Grow a volume (online when attached).
    /// Give the volume a new data key for sectors written from its next attachment on
    /// (older sectors keep theirs).
    RotateKey {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
    },
    Resize {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
        #[arg(long)]
        size: ByteSize,
    },
    /// Take a snapshot (instant; copy-on-write afterwards).
    Snapshot {
        #[command(flatten)]
        metad: MetadArgs,
        volume: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a snapshot that has no clones.
    DeleteSnapshot {
        #[command(flatten)]
        metad: MetadArgs,
        volume: String,
        #[arg(long)]
        name: String,
    },
    /// Make a new volume from a snapshot; it reads through until written.
    Clone {
        #[command(flatten)]
        metad: MetadArgs,
        volume: String,
        #[arg(long)]
        snapshot: String,
        #[arg(long)]
        name: String,
        /// Larger than the snapshot (default: its size).
        #[arg(long)]
        size: Option<ByteSize>,
    },
    /// Export a volume through a vhost-blk; prints the NBD URI or the vhost-user socket.
    Attach {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
        #[arg(long, value_parser = ["nbd", "vhost-user"], default_value = "nbd")]
        protocol: String,
        /// The vhost-blk to export it.
        #[arg(long, default_value = "vhost-blk-1")]
        exporter: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Stop exporting a volume (flushed, lease released).
    Detach {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
}

fn volume_json(v: &pb::Volume) -> Value {
    let a = v.attachment.clone().unwrap_or_default();
    let l = v.lease.clone().unwrap_or_default();
    let q = v.qos.unwrap_or_default();
    json!({
        "name": v.name, "id": v.id, "size": v.size, "pool": v.pool, "tier": v.tier,
        "state": v.state, "error": v.error,
        "qos": {"iops": q.iops, "bytes_per_sec": q.bytes_per_sec},
        "parent": if v.parent.is_empty() { Value::Null } else {
            json!({"volume": v.parent, "snapshot_id": v.parent_snap_id}) },
        "snapshots": v.snapshots.iter().map(|s| json!({
            "id": s.id, "name": s.name, "size": s.size, "clones": s.clones,
            "created_unix_ms": s.created_unix_ms})).collect::<Vec<_>>(),
        "lease": {"holder": l.holder, "epoch": l.epoch, "expires_unix_ms": l.expires_unix_ms},
        "attachment": if a.protocol.is_empty() { Value::Null } else {
            json!({"protocol": a.protocol, "exporter": a.exporter, "uri": a.uri}) },
        "uri": a.uri, "socket": if a.protocol == "vhost-user" { json!(a.uri) } else { Value::Null },
    })
}

async fn get(mc: &sov_client::meta::MetaClient, name: &str) -> Result<pb::Volume, CliError> {
    let req = pb::GetVolumeRequest {
        name: name.to_string(),
        consistency: 0,
    };
    mc.call(|mut c| {
        let req = req.clone();
        async move { c.get_volume(req).await }
    })
    .await
    .map_err(status_err)
}

/// Polls the volume until `done` says it is finished (Ok) or failed (Err).
async fn wait_for(
    mc: &sov_client::meta::MetaClient,
    name: &str,
    timeout: u64,
    what: &str,
    done: impl Fn(&pb::Volume) -> Option<Result<(), String>>,
) -> Result<pb::Volume, CliError> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let v = get(mc, name).await?;
        match done(&v) {
            Some(Ok(())) => return Ok(v),
            Some(Err(e)) => return Err(CliError::new(1, e)),
            None => {}
        }
        if Instant::now() > deadline {
            return Err(CliError::new(
                EXIT_TIMEOUT,
                format!(
                    "volume {name}: {what} did not finish in {timeout} s (state {})",
                    v.state
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

macro_rules! call {
    ($mc:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $mc.call(|mut c| {
            let req = req.clone();
            async move { c.$method(req).await }
        })
        .await
        .map_err(status_err)
    }};
}

pub async fn run(cmd: VolumeCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        VolumeCmd::Create {
            metad,
            name,
            size,
            pool,
            tier,
            iops,
            bandwidth,
        } => {
            let mc = metad.client()?;
            let v = call!(
                mc,
                create_volume,
                pb::CreateVolumeRequest {
                    name,
                    size: size.0,
                    pool,
                    tier,
                    qos: Some(pb::VolumeQos {
                        iops,
                        bytes_per_sec: bandwidth.map(|b| b.0).unwrap_or(0),
                    }),
                    ..Default::default()
                }
            )?;
            print(
                out,
                volume_json(&v),
                format!(
                    "created volume {} ({}, pool {}, tier {})",
                    v.name,
                    human_bytes(v.size),
                    v.pool,
                    v.tier
                ),
            );
        }
        VolumeCmd::List(a) => {
            let mc = a.client()?;
            let r = call!(mc, list_volumes, pb::ListVolumesRequest::default())?;
            let rows: Vec<Vec<String>> = r
                .volumes
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        human_bytes(v.size),
                        v.state.clone(),
                        v.pool.clone(),
                        v.snapshots.len().to_string(),
                        v.attachment.clone().unwrap_or_default().uri,
                    ]
                })
                .collect();
            print(
                out,
                json!({"volumes": r.volumes.iter().map(volume_json).collect::<Vec<_>>()}),
                table(&["NAME", "SIZE", "STATE", "POOL", "SNAPS", "URI"], &rows),
            );
        }
        VolumeCmd::Show { metad, name } => {
            let mc = metad.client()?;
            let v = get(&mc, &name).await?;
            let text = serde_json::to_string_pretty(&volume_json(&v)).expect("JSON");
            print(out, volume_json(&v), text);
        }
        VolumeCmd::Delete { metad, name } => {
            let mc = metad.client()?;
            call!(
                mc,
                delete_volume,
                pb::DeleteVolumeRequest { name: name.clone() }
            )?;
            print(
                out,
                json!({"deleted": name}),
                format!("deleted volume {name}"),
            );
        }
        VolumeCmd::RotateKey { metad, name } => {
            let mc = metad.client()?;
            let v = call!(mc, rotate_volume_key, pb::RotateVolumeKeyRequest { name })?;
            print(
                out,
                serde_json::json!({
                    "volume": v.name, "data_key_id": v.data_key_id,
                    "from_epoch": v.key_from_epoch, "older_keys": v.older_keys.len(),
                }),
                format!(
                    "volume {} seals sectors with data key {} from lease epoch {} (its next attachment)",
                    v.name, v.data_key_id, v.key_from_epoch
                ),
            );
        }
        VolumeCmd::Resize { metad, name, size } => {
            let mc = metad.client()?;
            let v = call!(
                mc,
                resize_volume,
                pb::ResizeVolumeRequest { name, size: size.0 }
            )?;
            print(
                out,
                volume_json(&v),
                format!("volume {} is now {}", v.name, human_bytes(v.size)),
            );
        }
        VolumeCmd::Snapshot {
            metad,
            volume,
            name,
            wait,
        } => {
            let mc = metad.client()?;
            let v = call!(
                mc,
                create_snapshot,
                pb::CreateSnapshotRequest {
                    volume: volume.clone(),
                    name: name.clone()
                }
            )?;
            let id = v.snapshots.iter().find(|s| s.name == name).map(|s| s.id);
            let id = id.unwrap_or(v.last_snap_id);
            // An attached volume: the snapshot holds once the exporter's writes carry it.
            let v = wait_for(&mc, &volume, wait.timeout, "the snapshot", |v| {
                match v.state.as_str() {
                    // Not exported: the snapshot holds at once.
                    "available" | "error" | "creating" | "deleting" => return Some(Ok(())),
                    // Being attached or detached: wait for it to settle.
                    "attaching" | "detaching" => return None,
                    _ => {}
                }
                let seen = v.attachment.as_ref().map(|a| a.snap_seen).unwrap_or(0);
                (seen >= id).then_some(Ok(()))
            })
            .await?;
            print(
                out,
                json!({"volume": v.name, "snapshot": name, "id": id}),
                format!("snapshot {name} of volume {} taken (id {id})", v.name),
            );
        }
        VolumeCmd::DeleteSnapshot {
            metad,
            volume,
            name,
        } => {
            let mc = metad.client()?;
            call!(
                mc,
                delete_snapshot,
                pb::DeleteSnapshotRequest {
                    volume: volume.clone(),
                    name: name.clone()
                }
            )?;
            print(
                out,
                json!({"volume": volume, "deleted_snapshot": name}),
                format!("deleted snapshot {name} of volume {volume}"),
            );
        }
        VolumeCmd::Clone {
            metad,
            volume,
            snapshot,
            name,
            size,
        } => {
            let mc = metad.client()?;
            let v = call!(
                mc,
                create_volume,
                pb::CreateVolumeRequest {
                    name,
                    size: size.map(|s| s.0).unwrap_or(0),
                    parent: volume.clone(),
                    parent_snapshot: snapshot.clone(),
                    ..Default::default()
                }
            )?;
            print(
                out,
                volume_json(&v),
                format!(
                    "cloned {volume}@{snapshot} as volume {} ({})",
                    v.name,
                    human_bytes(v.size)
                ),
            );
        }
        VolumeCmd::Attach {
            metad,
            name,
            protocol,
            exporter,
            wait,
        } => {
            let mc = metad.client()?;
            call!(
                mc,
                set_volume_state,
                pb::SetVolumeStateRequest {
                    name: name.clone(),
                    from: "available".into(),
                    to: "attaching".into(),
                    attachment: Some(pb::VolumeAttachment {
                        protocol: protocol.clone(),
                        exporter: exporter.clone(),
                        ..Default::default()
                    }),
                    error: String::new(),
                }
            )?;
            let v = wait_for(&mc, &name, wait.timeout, "attach", |v| {
                match v.state.as_str() {
                    "in-use" => Some(Ok(())),
                    "error" => Some(Err(format!("volume {name}: attach failed: {}", v.error))),
                    _ => None,
                }
            })
            .await?;
            let uri = v.attachment.clone().unwrap_or_default().uri;
            print(
                out,
                volume_json(&v),
                format!("attached volume {name} via {protocol} at {uri}"),
            );
        }
        VolumeCmd::Detach { metad, name, wait } => {
            let mc = metad.client()?;
            call!(
                mc,
                set_volume_state,
                pb::SetVolumeStateRequest {
                    name: name.clone(),
                    from: "in-use".into(),
                    to: "detaching".into(),
                    ..Default::default()
                }
            )?;
            let v = wait_for(&mc, &name, wait.timeout, "detach", |v| {
                match v.state.as_str() {
                    "available" => Some(Ok(())),
                    "error" => Some(Err(format!("volume {name}: detach failed: {}", v.error))),
                    _ => None,
                }
            })
            .await?;
            print(out, volume_json(&v), format!("detached volume {name}"));
        }
    }
    Ok(())
}
