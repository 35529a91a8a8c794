//! `sov bucket ...`, `sov object ...` and `sov repair status`: buckets in metad, objects
//! through sov-client (sealed and placed from this process), and the state of redundancy.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::json;
use sov_client::pgcheck;
use sov_client::{Client, ClientConfig, ClientError, PutOptions};
use sov_proto::metad as pb;
use tokio::io::AsyncWriteExt;

use crate::cluster::{MetadArgs, human_bytes, print, status_err, table};
use crate::{CliError, Output};

/// Exit code when `repair status --wait` times out before the cluster is clean.
const EXIT_NOT_CLEAN: u8 = 3;

#[derive(Debug, Subcommand)]
pub enum BucketCmd {
    /// Create a bucket (with its own data key) whose objects go to POOL by default.
    Create {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
        #[arg(long)]
        pool: String,
        /// Owner recorded with the bucket (an access key id).
        #[arg(long, default_value = "")]
        owner: String,
    },
    /// List buckets.
    List(MetadArgs),
    /// Delete an empty bucket.
    /// Give the bucket a new data key for objects written from now on (older objects keep
    /// theirs).
    RotateKey {
        #[command(flatten)]
        metad: MetadArgs,
        /// Bucket name.
        name: String,
    },
    Delete {
        #[command(flatten)]
        metad: MetadArgs,
        name: String,
    },
    /// Give an access key read, write or owner permission on a bucket ("none" revokes).
    Grant {
        #[command(flatten)]
        metad: MetadArgs,
        bucket: String,
        access_key: String,
        #[arg(value_parser = ["read", "write", "owner", "none"])]
        permission: String,
    },
    /// Let anyone read the bucket without credentials (on), or stop it (off).
    Public {
        #[command(flatten)]
        metad: MetadArgs,
        bucket: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create an access key; the secret is printed once.
    Create {
        #[command(flatten)]
        metad: MetadArgs,
        /// A name to recognise the key by.
        #[arg(long, default_value = "")]
        name: String,
        /// May do anything to any bucket.
        #[arg(long)]
        admin: bool,
    },
    /// List access keys (never their secrets).
    List(MetadArgs),
    /// Delete an access key.
    Delete {
        #[command(flatten)]
        metad: MetadArgs,
        access_key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ObjectCmd {
    /// Write FILE ("-" for stdin) as BUCKET/KEY.
    Put {
        #[command(flatten)]
        metad: MetadArgs,
        bucket: String,
        key: String,
        file: String,
        /// Pool to write to instead of the bucket's default.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Read BUCKET/KEY into FILE ("-" or nothing for stdout), every byte verified.
    Get {
        #[command(flatten)]
        metad: MetadArgs,
        bucket: String,
        key: String,
        file: Option<String>,
    },
    /// Delete BUCKET/KEY (its data is freed on every node after the grace period).
    Rm {
        #[command(flatten)]
        metad: MetadArgs,
        bucket: String,
        key: String,
    },
    /// List the objects of BUCKET.
    Ls {
        #[command(flatten)]
        metad: MetadArgs,
        bucket: String,
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RepairCmd {
    /// Recovery progress of every storage node; with --deep, a full audit of every PG.
    Status(RepairArgs),
}

#[derive(Debug, Args)]
pub struct RepairArgs {
    #[command(flatten)]
    metad: MetadArgs,
    /// List every node and check every piece of every PG is where it belongs.
    #[arg(long)]
    deep: bool,
    /// Repeat the deep check until it is clean (exit 3 if --timeout passes first).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

fn client_err(e: ClientError) -> CliError {
    match e {
        ClientError::Meta(s) => status_err(s),
        ClientError::Invalid(m) => CliError::new(2, m),
        ClientError::Unavailable(m) => CliError::new(5, m),
        other => CliError::new(1, other.to_string()),
    }
}

fn client(m: &MetadArgs) -> Result<Client, CliError> {
    Ok(Client::with_meta(m.client()?, ClientConfig::default()))
}

pub async fn run_bucket(cmd: BucketCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        BucketCmd::Create {
            metad,
            name,
            pool,
            owner,
        } => {
            let mc = metad.client()?;
            let req = pb::CreateBucketRequest { name, owner, pool };
            let b = mc
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.create_bucket(req).await }
                })
                .await
                .map_err(status_err)?;
            print(
                out,
                json!({"name": b.name, "pool": b.pool, "owner": b.owner, "encrypted": !b.data_key_id.is_empty()}),
                format!("created bucket {} (pool {})", b.name, b.pool),
            );
        }
        BucketCmd::List(a) => {
            let mc = a.client()?;
            let r = mc
                .call(
                    |mut c| async move { c.list_buckets(pb::ListBucketsRequest::default()).await },
                )
                .await
                .map_err(status_err)?;
            let rows: Vec<Vec<String>> = r
                .buckets
                .iter()
                .map(|b| vec![b.name.clone(), b.pool.clone(), b.owner.clone()])
                .collect();
            print(
                out,
                json!({"buckets": r.buckets.iter().map(|b| json!({"name": b.name, "pool": b.pool, "owner": b.owner})).collect::<Vec<_>>()}),
                table(&["NAME", "POOL", "OWNER"], &rows),
            );
        }
        BucketCmd::RotateKey { metad, name } => {
            let mc = metad.client()?;
            let req = pb::RotateBucketKeyRequest { name: name.clone() };
            let b = mc
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.rotate_bucket_key(req).await }
                })
                .await
                .map_err(status_err)?;
            print(
                out,
                json!({"bucket": name, "data_key_id": b.data_key_id}),
                format!(
                    "bucket {name} now seals new objects with data key {}",
                    b.data_key_id
                ),
            );
        }
        BucketCmd::Delete { metad, name } => {
            let mc = metad.client()?;
            let req = pb::DeleteBucketRequest { name: name.clone() };
            mc.call(|mut c| {
                let req = req.clone();
                async move { c.delete_bucket(req).await }
            })
            .await
            .map_err(status_err)?;
            print(
                out,
                json!({"deleted": name}),
                format!("deleted bucket {name}"),
            );
        }
        BucketCmd::Grant {
            metad,
            bucket,
            access_key,
            permission,
        } => {
            let perm = if permission == "none" {
                String::new()
            } else {
                permission
            };
            let req = pb::SetBucketAccessRequest {
                bucket,
                access_key_id: access_key,
                permission: perm,
                public_read: None,
            };
            let b = set_access(&metad, req).await?;
            print_access(out, &b);
        }
        BucketCmd::Public {
            metad,
            bucket,
            state,
        } => {
            let req = pb::SetBucketAccessRequest {
                bucket,
                public_read: Some(state == "on"),
                ..Default::default()
            };
            let b = set_access(&metad, req).await?;
            print_access(out, &b);
        }
    }
    Ok(())
}

async fn set_access(
    m: &MetadArgs,
    req: pb::SetBucketAccessRequest,
) -> Result<pb::Bucket, CliError> {
    m.client()?
        .call(|mut c| {
            let req = req.clone();
            async move { c.set_bucket_access(req).await }
        })
        .await
        .map_err(status_err)
}

fn print_access(out: Output, b: &pb::Bucket) {
    let grants: Vec<Vec<String>> = b
        .grants
        .iter()
        .map(|g| vec![g.access_key_id.clone(), g.permission.clone()])
        .collect();
    print(
        out,
        json!({"bucket": b.name, "owner": b.owner, "public_read": b.public_read,
               "grants": b.grants.iter().map(|g| json!({"access_key": g.access_key_id, "permission": g.permission})).collect::<Vec<_>>()}),
        format!(
            "bucket {} (owner {:?}, public read {})\n{}",
            b.name,
            b.owner,
            if b.public_read { "on" } else { "off" },
            table(&["ACCESS KEY", "PERMISSION"], &grants)
        ),
    );
}

pub async fn run_key(cmd: KeyCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        KeyCmd::Create { metad, name, admin } => {
            let req = pb::CreateAccessKeyRequest {
                name,
                admin,
                ..Default::default()
            };
            let k = metad
                .client()?
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.create_access_key(req).await }
                })
                .await
                .map_err(status_err)?;
            let id = k
                .key
                .as_ref()
                .map(|k| k.access_key_id.clone())
                .unwrap_or_default();
            print(
                out,
                json!({"access_key": id, "secret_key": k.secret_access_key, "admin": admin}),
                format!(
                    "access key: {id}\nsecret key: {}\n(the secret is not shown again)",
                    k.secret_access_key
                ),
            );
        }
        KeyCmd::List(a) => {
            let r = a
                .client()?
                .call(|mut c| async move { c.list_access_keys(pb::ListAccessKeysRequest {}).await })
                .await
                .map_err(status_err)?;
            let rows: Vec<Vec<String>> = r
                .keys
                .iter()
                .map(|k| {
                    vec![
                        k.access_key_id.clone(),
                        k.name.clone(),
                        if k.admin { "admin" } else { "" }.to_string(),
                    ]
                })
                .collect();
            print(
                out,
                json!({"keys": r.keys.iter().map(|k| json!({"access_key": k.access_key_id, "name": k.name, "admin": k.admin, "created_unix_ms": k.created_unix_ms})).collect::<Vec<_>>()}),
                table(&["ACCESS KEY", "NAME", "ROLE"], &rows),
            );
        }
        KeyCmd::Delete { metad, access_key } => {
            let req = pb::DeleteAccessKeyRequest {
                access_key_id: access_key.clone(),
            };
            metad
                .client()?
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.delete_access_key(req).await }
                })
                .await
                .map_err(status_err)?;
            print(
                out,
                json!({"deleted": access_key}),
                format!("deleted access key {access_key}"),
            );
        }
    }
    Ok(())
}

pub async fn run_object(cmd: ObjectCmd, out: Output) -> Result<(), CliError> {
    match cmd {
        ObjectCmd::Put {
            metad,
            bucket,
            key,
            file,
            pool,
        } => {
            let c = client(&metad)?;
            let opts = PutOptions {
                pool,
                ..Default::default()
            };
            let start = Instant::now();
            let r = if file == "-" {
                c.put_object(&bucket, &key, tokio::io::stdin(), opts).await
            } else {
                let f = tokio::fs::File::open(&file)
                    .await
                    .map_err(|e| CliError::new(2, format!("{file}: {e}")))?;
                c.put_object(&bucket, &key, f, opts).await
            }
            .map_err(client_err)?;
            let secs = start.elapsed().as_secs_f64();
            print(
                out,
                json!({"bucket": bucket, "key": key, "size": r.object.size, "version_id": r.object.version_id,
                       "etag": r.object.etag, "chunks": r.chunks, "degraded_chunks": r.degraded_chunks, "seconds": secs}),
                format!(
                    "put {bucket}/{key}: {} in {} chunks ({} degraded), {secs:.2}s",
                    human_bytes(r.object.size),
                    r.chunks,
                    r.degraded_chunks
                ),
            );
        }
        ObjectCmd::Get {
            metad,
            bucket,
            key,
            file,
        } => {
            let c = client(&metad)?;
            let (_, mut reader) = c
                .get_object(&bucket, &key, None)
                .await
                .map_err(client_err)?;
            let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match file.as_deref() {
                None | Some("-") => Box::new(tokio::io::stdout()),
                Some(p) => Box::new(
                    tokio::fs::File::create(p)
                        .await
                        .map_err(|e| CliError::new(2, format!("{p}: {e}")))?,
                ),
            };
            while let Some(chunk) = reader.next_chunk().await {
                let chunk = chunk.map_err(client_err)?;
                sink.write_all(&chunk)
                    .await
                    .map_err(|e| CliError::new(1, format!("writing: {e}")))?;
            }
            sink.flush()
                .await
                .map_err(|e| CliError::new(1, format!("writing: {e}")))?;
        }
        ObjectCmd::Rm { metad, bucket, key } => {
            let c = client(&metad)?;
            let d = c.delete_object(&bucket, &key).await.map_err(client_err)?;
            print(
                out,
                json!({"deleted": d.is_some()}),
                match d {
                    Some(_) => format!("deleted {bucket}/{key}"),
                    None => format!("{bucket}/{key} did not exist"),
                },
            );
        }
        ObjectCmd::Ls {
            metad,
            bucket,
            prefix,
        } => {
            let mc = metad.client()?;
            let mut rows = Vec::new();
            let mut objs = Vec::new();
            let mut start_after = String::new();
            loop {
                let req = pb::ListObjectsRequest {
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    start_after: start_after.clone(),
                    ..Default::default()
                };
                let r = mc
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.list_objects(req).await }
                    })
                    .await
                    .map_err(status_err)?;
                for o in &r.objects {
                    rows.push(vec![o.key.clone(), o.size.to_string(), o.pool.clone()]);
                    objs.push(
                        json!({"key": o.key, "size": o.size, "pool": o.pool, "etag": o.etag}),
                    );
                }
                if !r.truncated {
                    break;
                }
                start_after = r.next_start_after;
            }
            print(
                out,
                json!({"objects": objs}),
                table(&["KEY", "SIZE", "POOL"], &rows),
            );
        }
    }
    Ok(())
}

pub async fn run_repair(cmd: RepairCmd, out: Output) -> Result<(), CliError> {
    let RepairCmd::Status(a) = cmd;
    let c = client(&a.metad)?;
    let view = c.map().refresh(0).await.map_err(status_err)?;
    let mut rows = Vec::new();
    let mut nodes_json = Vec::new();
    for n in view.nodes.values() {
        let info = if view.is_up(&n.id) {
            c.nodes().node_info(&n.addr).await.ok()
        } else {
            None
        };
        let r = info.as_ref().and_then(|i| i.recovery).unwrap_or_default();
        let state = format!("{:?}", n.state).to_lowercase();
        rows.push(vec![
            n.id.clone(),
            n.zone.clone(),
            state.clone(),
            info.as_ref()
                .map(|i| i.epoch.to_string())
                .unwrap_or("-".into()),
            if r.active {
                format!("pass {}/{}", r.pgs_done, r.pgs_total)
            } else {
                "idle".into()
            },
            r.passes.to_string(),
            r.copied.to_string(),
            r.rebuilt.to_string(),
            r.healed.to_string(),
            r.strays_deleted.to_string(),
            human_bytes(r.bytes),
            r.last_missing.to_string(),
        ]);
        nodes_json.push(json!({"id": n.id, "zone": n.zone, "state": state, "epoch": info.as_ref().map(|i| i.epoch),
            "active": r.active, "pgs_done": r.pgs_done, "pgs_total": r.pgs_total, "passes": r.passes,
            "copied": r.copied, "rebuilt": r.rebuilt, "healed": r.healed, "strays_deleted": r.strays_deleted,
            "tombstone_deletes": r.tombstone_deletes, "bytes": r.bytes, "last_missing": r.last_missing,
            "last_unrecoverable": r.last_unrecoverable, "clean_epoch": r.clean_epoch}));
    }
    let mut text = table(
        &[
            "NODE",
            "ZONE",
            "STATE",
            "EPOCH",
            "RECOVERY",
            "PASSES",
            "COPIED",
            "REBUILT",
            "HEALED",
            "STRAYS",
            "PULLED",
            "LAST_MISSING",
        ],
        &rows,
    );
    let mut deep = serde_json::Value::Null;
    if a.deep || a.wait {
        let deadline = Instant::now() + Duration::from_secs(a.timeout);
        let check = loop {
            let check = pgcheck::check(&c).await.map_err(client_err)?;
            if !a.wait || check.clean() || Instant::now() >= deadline {
                break check;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        text = format!("{text}\n\n{check}");
        deep = json!({"epoch": check.epoch, "clean": check.clean(), "unreachable": check.unreachable,
            "pools": check.pools.iter().map(|p| json!({"pool": p.pool, "redundancy": p.redundancy, "pgs": p.pgs,
                "clean_pgs": p.clean_pgs, "undersized_pgs": p.undersized_pgs, "chunks": p.chunks, "missing": p.missing,
                "strays": p.strays, "unreadable": p.unreadable, "tombstoned": p.tombstoned})).collect::<Vec<_>>(),
            "volumes": check.volumes.iter().map(|v| json!({"volume": v.volume, "extents": v.extents, "diverged": v.diverged})).collect::<Vec<_>>()});
        print(
            out,
            json!({"epoch": view.epoch, "nodes": nodes_json, "deep": deep}),
            text,
        );
        if a.wait && !check.clean() {
            return Err(CliError::new(
                EXIT_NOT_CLEAN,
                format!("not clean after {}s", a.timeout),
            ));
        }
        return Ok(());
    }
    print(
        out,
        json!({"epoch": view.epoch, "nodes": nodes_json, "deep": deep}),
        text,
    );
    Ok(())
}
