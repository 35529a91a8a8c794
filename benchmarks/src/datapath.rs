//! `sov-bench datapath` and `sov-bench recovery`: the data path end to end on one local
//! cluster of real processes (metad + storage nodes in three zones, from `sov-testkit`).
//!
//! - `datapath`: write and read throughput through `sov-client` (sealing, erasure coding,
//!   placement, verification) for `replicated{1}`, `replicated{3}` and `ec{4,2}` pools, several
//!   rounds, medians, with the single-copy pool as the baseline of the ratio. Every object read
//!   back is compared with what was written.
//! - `recovery`: the time from a node going `out` until every placement group is whole again
//!   (checked by a full audit), and the rebuild rate it implies.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use sov_client::{Client, ClientConfig, PutOptions, pgcheck};
use sov_testkit::{DataCluster, TestDir, http_get, metric_value};

use crate::report::median;

const MIB: usize = 1 << 20;

#[derive(Debug, Parser)]
pub struct Args {
    /// A short run: small objects, one round.
    #[arg(long)]
    pub quick: bool,
    /// Object size in MiB [default: 64, 8 with --quick].
    #[arg(long)]
    pub size_mib: Option<usize>,
    /// Objects per round and pool [default: 8, 4 with --quick].
    #[arg(long)]
    pub objects: Option<usize>,
    /// Objects in flight at once [default: 4].
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Rounds; the median is reported [default: 3, 1 with --quick].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Also write the results file for `sov-bench report` here.
    #[arg(long)]
    pub results: Option<std::path::PathBuf>,
}

#[derive(Debug, Parser)]
pub struct RecoveryArgs {
    /// A short run: 64 MiB per pool.
    #[arg(long)]
    pub quick: bool,
    /// Data written per pool, in MiB, before a node is lost [default: 1024, 64 with --quick].
    #[arg(long)]
    pub data_mib: Option<usize>,
    /// Also write the results file for `sov-bench report` here.
    #[arg(long)]
    pub results: Option<std::path::PathBuf>,
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

async fn cluster(dir: &TestDir) -> anyhow::Result<(DataCluster, Client)> {
    let cl = DataCluster::start(dir.path(), 3, 2, &[], &["--no-scrub"]).await?;
    cl.pool_and_bucket("rep1", "replicated:1", 64).await?;
    cl.pool_and_bucket("rep3", "replicated:3", 64).await?;
    cl.pool_and_bucket("ec42", "ec:4+2", 64).await?;
    let c = Client::new(
        std::slice::from_ref(&cl.metad.addr),
        ClientConfig::default(),
    )?;
    Ok((cl, c))
}

/// Writes `n` objects of `len` bytes with `conc` in flight; returns seconds.
async fn write_round(
    c: &Client,
    bucket: &str,
    round: usize,
    n: usize,
    len: usize,
    conc: usize,
) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let bodies: Vec<Vec<u8>> = (0..n.min(conc))
        .map(|i| payload((round * 1000 + i) as u64, len))
        .collect();
    let start = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let body = &bodies[i % bodies.len()];
            async move {
                c.put_object(
                    bucket,
                    &format!("r{round}-o{i}"),
                    &body[..],
                    PutOptions::default(),
                )
                .await
                .with_context(|| format!("put {bucket}/r{round}-o{i}"))?;
                Ok(())
            }
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    let secs = start.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    Ok(secs)
}

/// Reads the round's objects back (checked); returns seconds.
async fn read_round(
    c: &Client,
    bucket: &str,
    round: usize,
    n: usize,
    len: usize,
    conc: usize,
) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let want: Vec<[u8; 32]> = (0..n.min(conc))
        .map(|i| *blake3::hash(&payload((round * 1000 + i) as u64, len)).as_bytes())
        .collect();
    let start = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let want = want[i % want.len()];
            async move {
                let (_, mut r) = c
                    .get_object(bucket, &format!("r{round}-o{i}"), None)
                    .await?;
                let mut h = blake3::Hasher::new();
                let mut got = 0;
                while let Some(chunk) = r.next_chunk().await {
                    let chunk = chunk?;
                    got += chunk.len();
                    h.update(&chunk);
                }
                ensure!(
                    got == len,
                    "{bucket}/r{round}-o{i}: {got} bytes, wrote {len}"
                );
                ensure!(
                    *h.finalize().as_bytes() == want,
                    "{bucket}/r{round}-o{i} differs"
                );
                Ok(())
            }
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    let secs = start.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    Ok(secs)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let size = args.size_mib.unwrap_or(if args.quick { 8 } else { 64 }) * MIB;
    let n = args.objects.unwrap_or(if args.quick { 4 } else { 8 });
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    let conc = args.concurrency.max(1);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let dir = TestDir::new("bench-datapath");
        let (_cl, c) = cluster(&dir).await?;
        let mut md = String::new();
        crate::tee!(
            md,
            "sov-bench datapath: metad + 6 storaged (3 zones), {n} objects of {} MiB per round, \
             {conc} in flight, {rounds} rounds, medians",
            size / MIB
        );
        let mut rows = Vec::new();
        for pool in ["rep1", "rep3", "ec42"] {
            let (mut w, mut r) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                let ws = write_round(&c, pool, round, n, size, conc).await?;
                let rs = read_round(&c, pool, round, n, size, conc).await?;
                let mib = (n * size) as f64 / MIB as f64;
                w.push(mib / ws);
                r.push(mib / rs);
            }
            rows.push((pool, median(w), median(r)));
        }
        let (bw, br) = (rows[0].1, rows[0].2);
        crate::tee!(md, "");
        crate::tee!(
            md,
            "| pool | redundancy | write MiB/s | read MiB/s | write vs rep1 | read vs rep1 |"
        );
        crate::tee!(md, "|---|---|---:|---:|---:|---:|");
        for (pool, w, r) in &rows {
            let red = match *pool {
                "rep1" => "replicated{1}",
                "rep3" => "replicated{3}",
                _ => "ec{4,2}",
            };
            crate::tee!(
                md,
                "| {pool} | {red} | {w:.1} | {r:.1} | {:.2} | {:.2} |",
                w / bw,
                r / br
            );
        }
        let tables = crate::results::tables_from_markdown(&md);
        let mut res = crate::results::BenchResult {
            bench: "datapath".into(),
            title: "Objects through sov-client by redundancy".into(),
            command: crate::results::this_command(),
            setup: format!(
                "One local cluster of real processes (metad and 6 storaged in 3 zones, on this \
                 machine's one disk); per round {n} objects of {} MiB written with {conc} in \
                 flight through `sov-client` (sealing, erasure coding, placement), then read \
                 back and compared; medians of {rounds} round(s). The single-copy pool is the \
                 baseline.",
                size / MIB
            ),
            ..Default::default()
        };
        res.tables = tables;
        res.write_to(args.results.as_deref())?;
        Ok(())
    })
}

fn node_bytes(cl: &DataCluster, i: usize) -> f64 {
    http_get(&cl.nodes[i].metrics_url())
        .ok()
        .and_then(|t| metric_value(&t, "storaged_disk_live_bytes", ""))
        .unwrap_or(0.0)
}

pub fn run_recovery(args: RecoveryArgs) -> anyhow::Result<()> {
    let per_pool = args.data_mib.unwrap_or(if args.quick { 64 } else { 1024 }) * MIB;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let dir = TestDir::new("bench-recovery");
        let (cl, c) = cluster(&dir).await?;
        let obj = 16 * MIB;
        let n = per_pool.div_ceil(obj);
        for pool in ["rep3", "ec42"] {
            write_round(&c, pool, 0, n, obj, 4).await?;
        }
        let check = pgcheck::check(&c).await?;
        ensure!(check.clean(), "not clean before the loss:\n{check}");
        let victim = 0;
        let held = node_bytes(&cl, victim);
        let mut cl = cl;
        let lost = Instant::now();
        cl.nodes[victim].kill9();
        let id = cl.ids[victim].clone();
        cl.wait_map(Duration::from_secs(60), "victim out", |m| {
            m.nodes.iter().any(|n| n.id == id && n.state == "out")
        })
        .await?;
        let out_at = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(3600);
        let check = loop {
            let check = pgcheck::check(&c).await?;
            if check.clean() {
                break check;
            }
            if Instant::now() > deadline {
                bail!("not clean after an hour:\n{check}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let rebuild = out_at.elapsed().as_secs_f64();
        read_round(&c, "rep3", 0, n, obj, 4).await?;
        read_round(&c, "ec42", 0, n, obj, 4).await?;
        let mut md = String::new();
        crate::tee!(
            md,
            "sov-bench recovery: {} MiB written to each of rep3 and ec42 on 6 nodes; node {id} \
             held {:.0} MiB",
            per_pool / MIB,
            held / MIB as f64
        );
        crate::tee!(md, "");
        crate::tee!(
            md,
            "| lost node held | kill → out | out → full redundancy | rebuild rate |"
        );
        crate::tee!(md, "|---:|---:|---:|---:|");
        crate::tee!(
            md,
            "| {:.0} MiB | {:.1} s | {:.1} s | {:.1} MiB/s |",
            held / MIB as f64,
            (out_at - lost).as_secs_f64(),
            rebuild,
            held / MIB as f64 / rebuild
        );
        println!("\n{check}");
        let mut res = crate::results::BenchResult {
            bench: "recovery".into(),
            title: "Repair: time to full redundancy after a node loss".into(),
            command: crate::results::this_command(),
            setup: format!(
                "The datapath cluster (metad, 6 storaged in 3 zones); {} MiB written to each of \
                 a replicated{{3}} and an ec{{4,2}} pool in 16 MiB objects, then one node is \
                 killed with SIGKILL. metad marks it `out` after its `out_after`; the time \
                 counted is from `out` until a full audit of every placement group (every copy \
                 and shard where it belongs, no strays) is clean, with the repair rate \
                 unlimited. Everything is read back afterwards and compared.",
                per_pool / MIB
            ),
            tables: crate::results::tables_from_markdown(&md),
            ..Default::default()
        };
        res.notes.push(format!(
            "The survivors rebuilt the lost node's {:.0} MiB at {:.1} MiB/s.",
            held / MIB as f64,
            held / MIB as f64 / rebuild
        ));
        res.write_to(args.results.as_deref())?;
        Ok(())
    })
}
