//! `sov-bench fill-index`: writes N object records straight into metad's object index (no
//! data: size 0, no manifest), as many writers at once as asked. It sets up the listing
//! benchmark (a bucket of a million keys) in minutes instead of the hours a million S3 PUTs take
//! here; what is measured afterwards, the S3 listing, reads exactly these records.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use sov_client::meta::{MetaClient, parse_addrs};
use sov_proto::metad::{ObjectVersion, PutObjectRequest};

#[derive(Debug, Parser)]
pub struct Args {
    /// metad members, host:port[,host:port...].
    #[arg(long)]
    pub metad: String,
    /// Bucket to fill (must exist).
    #[arg(long)]
    pub bucket: String,
    /// Number of keys.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Writers at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // metad speaks mutual TLS: the operator certificate of the cluster (`sov up` writes it).
    if let Some(dir) = std::env::var_os("SOV_TLS_DIR") {
        let ctx = sov_common::tls::TlsContext::load(std::path::Path::new(&dir))?;
        sov_common::tls::install(sov_common::tls::Transport::Tls(ctx));
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mc = MetaClient::new(&parse_addrs(&args.metad))
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (mc, next, bucket, n) = (mc.clone(), next.clone(), args.bucket.clone(), args.keys);
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let req = PutObjectRequest {
                        object: Some(ObjectVersion {
                            bucket: bucket.clone(),
                            key: format!("k/{:03}/{i:010}", i % 1000),
                            etag: "d41d8cd98f00b204e9800998ecf8427e".into(),
                            ..Default::default()
                        }),
                        expected_version_id: None,
                    };
                    mc.call(|mut c| {
                        let req = req.clone();
                        async move { c.put_object(req).await }
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("put {i}: {}", e.message()))?;
                }
            }));
        }
        for t in tasks {
            t.await.context("writer task")??;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "filled {} keys into {} in {secs:.1}s ({:.0} records/s)",
            args.keys,
            args.bucket,
            args.keys as f64 / secs
        );
        Ok(())
    })
}
