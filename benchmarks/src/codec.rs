//! `sov-bench codec`: the two Reed-Solomon crates the data path may use, `reed-solomon-simd`
//! and `reed-solomon-erasure` (pure Rust build), on the same shards in the same run: encode
//! throughput, and reconstruction throughput with one and with `m` data shards lost. Every
//! reconstruction is checked byte for byte against the original before it counts.
//!
//! The data path stores the parity bytes, and the two crates do not produce the same parity:
//! whichever wins becomes part of the stored format (see `docs/design/datapath-plan.md`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use rand::RngCore;

#[derive(Debug, Parser)]
pub struct Args {
    /// A short run: one profile, small data, one round.
    #[arg(long)]
    pub quick: bool,
    /// Rounds per case; the median is reported [default: 5, 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    /// Also write the results file for `sov-bench report` here.
    #[arg(long)]
    pub results: Option<std::path::PathBuf>,
}

/// One erasure profile and shard size.
#[derive(Debug, Clone, Copy)]
struct Case {
    k: usize,
    m: usize,
    shard: usize,
}

/// Which crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Simd,
    Erasure,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::Simd => "reed-solomon-simd",
            Codec::Erasure => "reed-solomon-erasure",
        }
    }

    /// Parity shards for `data`.
    fn encode(self, c: Case, data: &[Vec<u8>]) -> anyhow::Result<Vec<Vec<u8>>> {
        match self {
            Codec::Simd => reed_solomon_simd::encode(c.k, c.m, data).context("simd encode"),
            Codec::Erasure => {
                let rs = reed_solomon_erasure::galois_8::ReedSolomon::new(c.k, c.m)
                    .context("erasure profile")?;
                let mut parity = vec![vec![0u8; c.shard]; c.m];
                let data_refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
                let mut parity_refs: Vec<&mut [u8]> =
                    parity.iter_mut().map(Vec::as_mut_slice).collect();
                rs.encode_sep(&data_refs, &mut parity_refs)
                    .context("erasure encode")?;
                Ok(parity)
            }
        }
    }

    /// The data shards in `lost`, rebuilt from the others and the parity.
    fn rebuild(
        self,
        c: Case,
        data: &[Vec<u8>],
        parity: &[Vec<u8>],
        lost: &[usize],
    ) -> anyhow::Result<Vec<(usize, Vec<u8>)>> {
        match self {
            Codec::Simd => {
                let originals = data.iter().enumerate().filter(|(i, _)| !lost.contains(i));
                let recovery = parity.iter().enumerate().take(lost.len());
                let restored = reed_solomon_simd::decode(c.k, c.m, originals, recovery)
                    .context("simd decode")?;
                let mut out: Vec<(usize, Vec<u8>)> = restored.into_iter().collect();
                out.sort_by_key(|(i, _)| *i);
                Ok(out)
            }
            Codec::Erasure => {
                let rs = reed_solomon_erasure::galois_8::ReedSolomon::new(c.k, c.m)
                    .context("erasure profile")?;
                let mut shards: Vec<Option<Vec<u8>>> = data
                    .iter()
                    .chain(parity.iter())
                    .enumerate()
                    .map(|(i, s)| (!lost.contains(&i)).then(|| s.clone()))
                    .collect();
                rs.reconstruct_data(&mut shards)
                    .context("erasure reconstruct")?;
                Ok(lost
                    .iter()
                    .map(|&i| (i, shards[i].take().unwrap_or_default()))
                    .collect())
            }
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

/// Times `f` over enough repetitions to last about `budget`, returning time per call.
fn time_per_call(
    budget: Duration,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    f()?; // warm-up, and the first correctness check
    let start = Instant::now();
    let mut n = 0u32;
    while n == 0 || start.elapsed() < budget {
        f()?;
        n += 1;
    }
    Ok(start.elapsed() / n)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 5 });
    let budget = if args.quick {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(500)
    };
    let cases: Vec<Case> = if args.quick {
        vec![Case {
            k: 4,
            m: 2,
            shard: 64 << 10,
        }]
    } else {
        vec![
            Case {
                k: 4,
                m: 2,
                shard: 1 << 20,
            },
            Case {
                k: 4,
                m: 2,
                shard: 64 << 10,
            },
            Case {
                k: 8,
                m: 3,
                shard: 512 << 10,
            },
        ]
    };
    let mut rows = Vec::new();
    for c in cases {
        let mut rng = rand::thread_rng();
        let data: Vec<Vec<u8>> = (0..c.k)
            .map(|_| {
                let mut s = vec![0u8; c.shard];
                rng.fill_bytes(&mut s);
                s
            })
            .collect();
        let stripe = c.k * c.shard;
        let mut results = Vec::new();
        for codec in [Codec::Simd, Codec::Erasure] {
            let parity = codec.encode(c, &data)?;
            ensure!(
                parity.len() == c.m,
                "{}: {} parity shards",
                codec.name(),
                parity.len()
            );
            let mut enc = Vec::new();
            let mut dec1 = Vec::new();
            let mut decm = Vec::new();
            for _ in 0..rounds {
                enc.push(time_per_call(budget, || {
                    codec.encode(c, &data).map(|_| ())
                })?);
                for (lost, out) in [(vec![0usize], &mut dec1), ((0..c.m).collect(), &mut decm)] {
                    out.push(time_per_call(budget, || {
                        let rebuilt = codec.rebuild(c, &data, &parity, &lost)?;
                        for (i, s) in &rebuilt {
                            if s != &data[*i] {
                                bail!("{} rebuilt shard {i} wrong", codec.name());
                            }
                        }
                        ensure!(
                            rebuilt.len() == lost.len(),
                            "{}: shards missing",
                            codec.name()
                        );
                        Ok(())
                    })?);
                }
            }
            results.push((
                codec,
                mib_s(stripe, median(enc)),
                mib_s(stripe, median(dec1)),
                mib_s(stripe, median(decm)),
            ));
        }
        rows.push((c, results));
    }

    let mut md = String::new();
    crate::tee!(
        md,
        "Reed-Solomon codecs, one thread, MiB/s of data (k shards) per second; medians of {rounds} round(s)\n"
    );
    crate::tee!(
        md,
        "| profile | shard | op | reed-solomon-simd | reed-solomon-erasure | simd / erasure |"
    );
    crate::tee!(md, "|---|---:|---|---:|---:|---:|");
    let mut json = Vec::new();
    for (c, results) in &rows {
        let (s, e) = (&results[0], &results[1]);
        for (op, sv, ev) in [
            ("encode", s.1, e.1),
            ("rebuild 1 lost", s.2, e.2),
            (
                if c.m == 2 {
                    "rebuild 2 lost"
                } else {
                    "rebuild m lost"
                },
                s.3,
                e.3,
            ),
        ] {
            crate::tee!(
                md,
                "| ec{{{},{}}} | {} KiB | {op} | {sv:.0} | {ev:.0} | {:.2} |",
                c.k,
                c.m,
                c.shard >> 10,
                sv / ev
            );
            json.push(serde_json::json!({
                "k": c.k, "m": c.m, "shard_bytes": c.shard, "op": op,
                "simd_mib_s": sv, "erasure_mib_s": ev, "ratio": sv / ev,
            }));
        }
    }
    crate::tee!(
        md,
        "\nreproduce: cargo build --release -p sov-bench && target/release/sov-bench codec{}",
        if args.quick { " --quick" } else { "" }
    );
    println!(
        "{}",
        serde_json::json!({"bench": "codec", "rounds": rounds, "rows": json})
    );
    codec_results(&md, args.quick).write_to(args.results.as_deref())?;
    Ok(())
}

/// The printed table as a results file: encode and rebuild of each crate per profile, and the
/// headline (encode and one-shard rebuild of the first profile).
fn codec_results(md: &str, quick: bool) -> crate::results::BenchResult {
    use crate::results::{BenchResult, Plot, Series, tables_from_markdown};
    let tables = tables_from_markdown(md);
    let mut res = BenchResult {
        bench: "codec".into(),
        title: "Reed-Solomon: reed-solomon-simd (ours) against reed-solomon-erasure".into(),
        command: format!(
            "cargo build --release -p sov-bench && target/release/sov-bench codec{}",
            if quick { " --quick" } else { "" }
        ),
        setup: "The same random shards through both crates in one thread: encode, and rebuild \
                of one lost data shard and of m lost data shards, every rebuilt shard compared \
                with the original; MiB/s of data (k shards) per second. reed-solomon-erasure \
                is built without its C SIMD feature (pure Rust)."
            .into(),
        ..Default::default()
    };
    if let Some(t) = tables.first() {
        let rows: Vec<usize> = (0..t.rows.len())
            .filter(|&r| t.rows[r].get(2).is_some_and(|op| op == "encode"))
            .collect();
        let mut simd = Series::new("reed-solomon-simd encode");
        let mut erasure = Series::new("reed-solomon-erasure encode");
        for (i, &r) in rows.iter().enumerate() {
            simd.points
                .push(((i + 1) as f64, t.value(r, "reed-solomon-simd")));
            erasure
                .points
                .push(((i + 1) as f64, t.value(r, "reed-solomon-erasure")));
        }
        res.plots.push(Plot {
            name: "codec-encode".into(),
            title: format!(
                "Encode MiB/s by profile ({})",
                rows.iter()
                    .enumerate()
                    .map(|(i, &r)| format!("{} = {} {}", i + 1, t.rows[r][0], t.rows[r][1]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            x_label: "profile".into(),
            y_label: "MiB/s".into(),
            series: vec![simd, erasure],
            ..Default::default()
        });
        for r in [0, 1] {
            if r < t.rows.len() {
                res.headline.push(t.headline(
                    r,
                    &format!(
                        "Reed-Solomon {} {}, {}",
                        t.rows[r][0], t.rows[r][1], t.rows[r][2]
                    ),
                    "reed-solomon-simd",
                    "reed-solomon-erasure",
                    "reed-solomon-erasure",
                    "MiB/s",
                ));
            }
        }
    }
    res.tables = tables;
    res
}
