//! `sov-bench suite`: every benchmark, one after the other, each writing its results file;
//! then `sov-bench report`: those files as one Markdown report with PNG plots and a headline
//! table at the top.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::plot;
use crate::results::{BenchResult, Headline, Table};

/// The order of the report's sections; others follow by name.
const ORDER: &[&str] = &[
    "storaged",
    "metad",
    "s3",
    "scaling",
    "block",
    "datapath",
    "recovery",
    "codec",
    "sector-crypto",
    "tls",
];

#[derive(Debug, Parser)]
pub struct ReportArgs {
    /// Folder of the results files (`*.json`).
    #[arg(long, default_value = "benchmarks/results")]
    pub results: PathBuf,
    /// The report to write; the plots go to `plots/` next to it.
    #[arg(long, default_value = "benchmarks/REPORT.md")]
    pub out: PathBuf,
    /// The command to name at the top as the one that made the report.
    #[arg(long, default_value = "make bench")]
    pub made_by: String,
}

#[derive(Debug, Parser)]
pub struct SuiteArgs {
    /// The small version: every benchmark in its quick form (a few minutes).
    #[arg(long)]
    pub quick: bool,
    /// Folder of the release binaries (sov, metad, storaged, gateway-s3, vhost-blk, sov-bench).
    #[arg(long, default_value = "target/release")]
    pub bin: PathBuf,
    /// Folder for the results files and the logs of each step.
    #[arg(long, default_value = "benchmarks/results")]
    pub results: PathBuf,
    /// The report to write.
    #[arg(long, default_value = "benchmarks/REPORT.md")]
    pub out: PathBuf,
    /// Only these steps (comma-separated; see --list).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print the steps and their commands, run nothing.
    #[arg(long)]
    pub list: bool,
    /// Leave Ceph out (RGW and RBD comparisons).
    #[arg(long)]
    pub no_ceph: bool,
    /// The s3s-fs binary [default: on PATH, else ~/.cargo/bin/s3s-fs].
    #[arg(long)]
    pub s3s_fs: Option<PathBuf>,
    /// An S3 endpoint to add to the S3 benchmark (see `sov-bench s3 --compare`); its keys come
    /// from SOV_BENCH_COMPARE_ACCESS_KEY and SOV_BENCH_COMPARE_SECRET_KEY.
    #[arg(long)]
    pub compare: Option<String>,
    /// Where the benchmarks keep their data.
    #[arg(long, default_value = "/var/tmp")]
    pub work: PathBuf,
    /// The command the report names as the one that made it [default: make bench, or make
    /// bench-quick with --quick].
    #[arg(long)]
    pub made_by: Option<String>,
}

struct Step {
    name: &'static str,
    program: String,
    args: Vec<String>,
}

impl Step {
    fn command_line(&self) -> String {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn s3s_fs(args: &SuiteArgs) -> PathBuf {
    if let Some(p) = &args.s3s_fs {
        return p.clone();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/s3s-fs")
        })
}

fn steps(args: &SuiteArgs) -> Vec<Step> {
    let bin = args.bin.display().to_string();
    let bench = format!("{bin}/sov-bench");
    let res = |n: &str| args.results.join(format!("{n}.json")).display().to_string();
    let work = args.work.display().to_string();
    let q = args.quick;
    let quick: Vec<String> = if q { vec!["--quick".into()] } else { vec![] };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let ceph = (!args.no_ceph).then(|| "benchmarks/ceph/ceph.sh".to_string());
    let mut out = Vec::new();
    let mut add = |name: &'static str, program: &str, mut a: Vec<String>| {
        a.extend(quick.iter().cloned());
        out.push(Step {
            name,
            program: program.into(),
            args: a,
        });
    };
    let rounds = if q { "1" } else { "3" };
    add(
        "storaged",
        &bench,
        s(&[
            "storaged",
            "--rounds",
            rounds,
            "--dir",
            &work,
            "--results",
            &res("storaged"),
        ]),
    );
    add(
        "metad",
        &bench,
        s(&["metad", "--dir", &work, "--results", &res("metad")]),
    );
    let mut s3 = s(&[
        "s3",
        "--sov-bin",
        &bin,
        "--s3s-fs",
        &s3s_fs(args).display().to_string(),
        "--work",
        &work,
        "--list-keys",
        if q { "2000" } else { "100000" },
        "--results",
        &res("s3"),
    ]);
    if let Some(c) = &ceph {
        s3.extend(s(&["--ceph", c]));
    }
    if let Some(url) = &args.compare {
        s3.extend(s(&["--compare", url]));
    }
    add("s3", &bench, s3);
    add(
        "scaling",
        &bench,
        s(&[
            "scaling",
            "--sov-bin",
            &bin,
            "--work",
            &work,
            "--results",
            &res("scaling"),
        ]),
    );
    let mut block = s(&[
        "benchmarks/block/block_bench.py",
        "--sov-bin",
        &bin,
        "--work",
        &work,
        "--results",
        &res("block"),
    ]);
    if let Some(c) = &ceph {
        block.extend(s(&["--ceph", c]));
    }
    add("block", "python3", block);
    add(
        "datapath",
        &bench,
        s(&["datapath", "--results", &res("datapath")]),
    );
    add(
        "recovery",
        &bench,
        s(&["recovery", "--results", &res("recovery")]),
    );
    add("codec", &bench, s(&["codec", "--results", &res("codec")]));
    add(
        "sector-crypto",
        &bench,
        s(&["sector-crypto", "--results", &res("sector-crypto")]),
    );
    add("tls", &bench, s(&["tls", "--results", &res("tls")]));
    out
}

pub fn run_suite(args: SuiteArgs) -> anyhow::Result<()> {
    let mut steps = steps(&args);
    if !args.only.is_empty() {
        for o in &args.only {
            if !steps.iter().any(|s| s.name == o) {
                bail!(
                    "--only {o}: no such step (steps: {})",
                    steps.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                );
            }
        }
        steps.retain(|s| args.only.iter().any(|o| o == s.name));
    }
    if args.list {
        for s in &steps {
            println!("{:14} {}", s.name, s.command_line());
        }
        return Ok(());
    }
    let logs = args.results.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let bar = ProgressBar::new(steps.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:20}] step {pos}/{len}: {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let mut summary = Table::new("", &["step", "seconds", "result", "log"]);
    let mut failed = Vec::new();
    for s in &steps {
        bar.set_message(format!("{} ({})", s.name, s.command_line()));
        let result_file = args.results.join(format!("{}.json", s.name));
        let _ = std::fs::remove_file(&result_file);
        let log = logs.join(format!("{}.log", s.name));
        let t = Instant::now();
        let st = Command::new(&s.program)
            .args(&s.args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .status();
        let secs = t.elapsed().as_secs_f64();
        let ok = match &st {
            Ok(st) if st.success() && result_file.exists() => "ok".to_string(),
            Ok(st) if st.success() => "no results file".to_string(),
            Ok(st) => format!("failed ({st})"),
            Err(e) => format!("did not start: {e}"),
        };
        if ok != "ok" {
            bar.println(format!(
                "step {} {ok}; log {}:\n{}",
                s.name,
                log.display(),
                tail(&log, 15)
            ));
            failed.push(format!("{}: {ok} (`{}`)", s.name, s.command_line()));
        }
        summary.row(vec![
            s.name.into(),
            format!("{secs:.0}"),
            ok,
            log.display().to_string(),
        ]);
        bar.inc(1);
    }
    bar.finish_and_clear();
    std::fs::write(args.results.join("failed.txt"), failed.join("\n"))?;
    let made_by = args.made_by.clone().unwrap_or_else(|| {
        if args.quick {
            "make bench-quick".into()
        } else {
            "make bench".into()
        }
    });
    let headline = write_report(&args.results, &args.out, &made_by)?;
    println!("{}", summary.markdown());
    println!("{}", headline_table(&headline).markdown());
    println!("report: {}", args.out.display());
    if !failed.is_empty() {
        bail!("{} step(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run_report(args: ReportArgs) -> anyhow::Result<()> {
    let headline = write_report(&args.results, &args.out, &args.made_by)?;
    println!("{}", headline_table(&headline).markdown());
    println!("report: {}", args.out.display());
    Ok(())
}

fn headline_table(rows: &[(String, Headline)]) -> Table {
    let mut t = Table::new(
        "",
        &[
            "what",
            "sov",
            "peer",
            "peer's figure",
            "sov / peer",
            "section",
        ],
    );
    for (bench, h) in rows {
        t.row(vec![
            h.what.clone(),
            h.sov.clone(),
            h.peer_name.clone(),
            h.peer.clone(),
            format!("{:.2}", h.ratio),
            format!("[{bench}](#{bench})"),
        ]);
    }
    t
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    format!("{cores} vCPU ({cpu}), {mem_gib:.0} GiB RAM, Linux {kernel}")
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn now_utc() -> String {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (full, _) = crate::s3client::amz_date(unix);
    // 20261127T012345Z → 2026-11-27 01:23 UTC
    format!(
        "{}-{}-{} {}:{} UTC",
        &full[0..4],
        &full[4..6],
        &full[6..8],
        &full[9..11],
        &full[11..13]
    )
}

/// Writes the report from every results file in `dir`; returns the headline rows.
pub fn write_report(
    dir: &Path,
    out: &Path,
    made_by: &str,
) -> anyhow::Result<Vec<(String, Headline)>> {
    let mut results = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            results.push(BenchResult::read(&path)?);
        }
    }
    let rank = |b: &str| ORDER.iter().position(|o| *o == b).unwrap_or(ORDER.len());
    results.sort_by(|a, b| {
        rank(&a.bench)
            .cmp(&rank(&b.bench))
            .then(a.bench.cmp(&b.bench))
    });
    let out_dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let plots_dir = out_dir.join("plots");
    let failed = std::fs::read_to_string(dir.join("failed.txt")).unwrap_or_default();

    let mut md = String::new();
    md.push_str("# sov benchmark report\n\n");
    md.push_str(&format!(
        "Made by `{made_by}` on {} at commit `{}`, on {}. Every comparison ran both sides on \
         this machine in the same run, one after the other; figures are medians over rounds \
         and ratios are sov over the peer (above 1: sov is faster). Each section names the \
         command that produced it. Generated by `sov-bench report` from the files in `{}`.\n\n",
        now_utc(),
        git_commit(),
        machine(),
        dir.display()
    ));
    let mut headline = Vec::new();
    for r in &results {
        for h in &r.headline {
            headline.push((r.bench.clone(), h.clone()));
        }
    }
    md.push_str("## Headline\n\n");
    if headline.is_empty() {
        md.push_str("No headline figures (no results files with comparisons).\n\n");
    } else {
        md.push_str(&headline_table(&headline).markdown());
        md.push('\n');
    }
    if !failed.trim().is_empty() {
        md.push_str("**Steps that failed in this run** (no section below for them):\n\n");
        for l in failed.lines() {
            md.push_str(&format!("- {l}\n"));
        }
        md.push('\n');
    }
    for r in &results {
        md.push_str(&format!("<a id=\"{}\"></a>\n## {}\n\n", r.bench, r.title));
        if !r.setup.is_empty() {
            md.push_str(&format!("{}\n\n", r.setup));
        }
        md.push_str(&format!("Command: `{}`\n\n", r.command));
        for t in &r.tables {
            if !t.title.is_empty() {
                md.push_str(&format!("**{}**\n\n", t.title));
            }
            let body = Table {
                title: String::new(),
                ..t.clone()
            };
            md.push_str(&body.markdown());
            md.push('\n');
        }
        let files = plot::render_all(&r.plots, &plots_dir)?;
        for (p, f) in r.plots.iter().zip(&files) {
            md.push_str(&format!("![{}](plots/{f})\n\n", p.title));
        }
        for n in &r.notes {
            md.push_str(&format!("- {n}\n"));
        }
        if !r.notes.is_empty() {
            md.push('\n');
        }
    }
    std::fs::write(out, md).with_context(|| format!("writing {}", out.display()))?;
    Ok(headline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Plot, Series};

    #[test]
    fn a_report_from_results_files() {
        let dir = tempfile::tempdir().unwrap();
        let res = dir.path().join("results");
        let mut t = Table::new("writes", &["clients", "sov", "peer"]);
        t.row(vec!["1".into(), "10".into(), "20".into()]);
        for (bench, title) in [("codec", "Codec"), ("metad", "metad vs etcd")] {
            BenchResult {
                bench: bench.into(),
                title: title.into(),
                command: format!("sov-bench {bench}"),
                tables: vec![t.clone()],
                plots: vec![Plot {
                    name: format!("{bench}-p"),
                    title: "p".into(),
                    x_label: "clients".into(),
                    y_label: "ops/s".into(),
                    series: vec![Series {
                        name: "sov".into(),
                        points: vec![(1.0, 10.0), (2.0, 12.0)],
                    }],
                    ..Default::default()
                }],
                headline: vec![t.headline(0, "writes at 1", "sov", "peer", "etcd", "w/s")],
                notes: vec!["a note".into()],
                ..Default::default()
            }
            .write(&res.join(format!("{bench}.json")))
            .unwrap();
        }
        std::fs::write(res.join("failed.txt"), "block: failed (exit 1)").unwrap();
        let out = dir.path().join("REPORT.md");
        let h = write_report(&res, &out, "make bench").unwrap();
        assert_eq!(h.len(), 2);
        let md = std::fs::read_to_string(&out).unwrap();
        // metad comes before codec, the headline first, the failure named.
        let (m, c) = (
            md.find("## metad vs etcd").unwrap(),
            md.find("## Codec").unwrap(),
        );
        assert!(md.find("## Headline").unwrap() < m && m < c, "{md}");
        assert!(md.contains("| writes at 1 | 10 w/s | etcd | 20 w/s | 0.50 | [metad](#metad) |"));
        assert!(md.contains("- block: failed (exit 1)"));
        assert!(md.contains("![p](plots/metad-p.png)"));
        assert!(dir.path().join("plots/codec-p.png").exists());
        assert!(md.contains("Command: `sov-bench codec`"));
    }

    #[test]
    fn the_suite_lists_every_step_with_its_command() {
        let args =
            SuiteArgs::parse_from(["suite", "--quick", "--no-ceph", "--s3s-fs", "/x/s3s-fs"]);
        let st = steps(&args);
        let names: Vec<&str> = st.iter().map(|s| s.name).collect();
        assert_eq!(names, ORDER);
        let s3 = st.iter().find(|s| s.name == "s3").unwrap().command_line();
        assert!(
            s3.contains("--s3s-fs /x/s3s-fs") && s3.ends_with("--quick"),
            "{s3}"
        );
        assert!(!s3.contains("--ceph"));
        let with = steps(&SuiteArgs::parse_from(["suite"]));
        assert!(
            with.iter()
                .find(|s| s.name == "block")
                .unwrap()
                .command_line()
                .contains("--ceph benchmarks/ceph/ceph.sh")
        );
    }
}
