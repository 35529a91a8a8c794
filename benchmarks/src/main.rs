//! sov-bench: benchmark programs for sov, one subcommand each, every one reporting a ratio
//! against a baseline measured in the same run.

mod codec;
mod datapath;
mod fill;
mod metad;
mod payload;
mod plot;
mod rawdisk;
mod report;
mod results;
mod s3;
mod s3client;
mod sector;
mod storaged;
mod suite;
mod tls;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Benchmarks for sov; each reports sov against a baseline run in the same process.
#[derive(Debug, Parser)]
#[command(name = "sov-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Chunk PUT/GET throughput of one storaged against pwrite/pread on the same disk with
    /// the same number of fdatasyncs.
    Storaged(storaged::Args),
    /// Linearizable writes/s and p50/p99 latency of a 3-member metad cluster at 1, 16 and 256
    /// concurrent clients, against a 3-member etcd cluster doing the same writes, both on
    /// loopback.
    Metad(metad::Args),
    /// Reed-Solomon encode and rebuild throughput of reed-solomon-simd against
    /// reed-solomon-erasure on the same shards, each rebuild checked byte for byte.
    Codec(codec::Args),
    /// Object write and read throughput through sov-client on a local cluster (6 storaged, 3
    /// zones) for replicated{3} and ec{4,2}, against a single-copy pool on the same cluster.
    Datapath(datapath::Args),
    /// Time to restore full redundancy after a node holding N GiB is lost.
    Recovery(datapath::RecoveryArgs),
    /// 4 KiB volume sector sealing: AES-256-GCM (what volumes use) against AES-256-XTS plus
    /// blake3, seal and open-with-verification, on one core.
    SectorCrypto(sector::Args),
    /// Mutual TLS between daemons: a loopback stream against plain TCP, and handshakes with
    /// X25519MLKEM768 against X25519.
    Tls(tls::Args),
    /// S3 throughput by object size (4 KiB to 256 MiB) and by concurrency (1 to 128) through
    /// sov's gateway, against s3s-fs, Ceph RGW and any endpoint given with --compare.
    S3(Box<s3::Args>),
    /// S3 throughput through `sov up` clusters of 1, 3 and 6 storaged.
    Scaling(s3::ScalingArgs),
    /// Every benchmark, one after the other, then the report (`make bench`, `make bench-quick`).
    Suite(suite::SuiteArgs),
    /// Writes benchmarks/REPORT.md and its PNG plots from the results files.
    Report(suite::ReportArgs),
    /// Writes N empty object records into metad's index (set-up of the S3 listing benchmark).
    FillIndex(fill::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Storaged(args) => storaged::run(args),
        Command::Metad(args) => metad::run(args),
        Command::Codec(args) => codec::run(args),
        Command::Datapath(args) => datapath::run(args),
        Command::Recovery(args) => datapath::run_recovery(args),
        Command::FillIndex(args) => fill::run(args),
        Command::SectorCrypto(args) => sector::run(args),
        Command::Tls(args) => tls::run(args),
        Command::S3(args) => s3::run(*args),
        Command::Scaling(args) => s3::run_scaling(args),
        Command::Suite(args) => suite::run_suite(args),
        Command::Report(args) => suite::run_report(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sov-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
