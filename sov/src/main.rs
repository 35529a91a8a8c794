//! `sov`, the admin CLI: `sov up` starts a local cluster; `sov cluster|node|pool|metad ...`
//! administer it through metad; `sov bucket|object ...` use the data path and `sov repair
//! status` shows and audits redundancy; `sov debug chunk ...` exercises one storage node by hand.
//! Every command takes `--output json` for scripts.

mod audit;
mod cert;
mod chunk;
mod cluster;
mod masterkey;
mod object;
mod up;
mod volume;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// The sov admin CLI.
#[derive(Debug, Parser)]
#[command(name = "sov", version, about)]
struct Cli {
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// TLS directory with an operator (`admin`) certificate for talking to the cluster;
    /// `sov up` makes one in DATA/client/tls.
    #[arg(long, global = true, env = "SOV_TLS_DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// Talk to the cluster without TLS (a loopback cluster started with --insecure-plaintext).
    #[arg(long, global = true)]
    insecure_plaintext: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a local cluster of real processes and stop it on Ctrl-C.
    Up(up::UpArgs),
    /// Cluster-wide state from metad.
    Cluster {
        #[command(subcommand)]
        cmd: cluster::ClusterCmd,
    },
    /// Storage nodes in the cluster map.
    Node {
        #[command(subcommand)]
        cmd: cluster::NodeCmd,
    },
    /// Storage pools: create and list.
    Pool {
        #[command(subcommand)]
        cmd: cluster::PoolCmd,
    },
    /// metad membership: list, add and remove members.
    Metad {
        #[command(subcommand)]
        cmd: cluster::MetadCmd,
    },
    /// Buckets: create, list, delete.
    Bucket {
        #[command(subcommand)]
        cmd: object::BucketCmd,
    },
    /// S3 access keys: create, list, delete.
    Key {
        #[command(subcommand)]
        cmd: object::KeyCmd,
    },
    /// Objects through the data path: put, get, rm, ls.
    Object {
        #[command(subcommand)]
        cmd: object::ObjectCmd,
    },
    /// Block volumes: create, snapshot, clone, resize, attach (NBD or vhost-user), detach.
    Volume {
        #[command(subcommand)]
        cmd: volume::VolumeCmd,
    },
    /// Redundancy: recovery progress and a full audit of every placement group.
    Repair {
        #[command(subcommand)]
        cmd: object::RepairCmd,
    },
    /// The master key: status, and re-wrapping every secret under the current one.
    MasterKey {
        #[command(subcommand)]
        cmd: masterkey::MasterKeyCmd,
    },
    /// metad's audit log: every admin action and refused call; `verify` checks its chain.
    Audit(audit::AuditArgs),
    /// The cluster CA: issue, list, rotate and revoke node and operator certificates.
    Cert {
        #[command(subcommand)]
        cmd: cert::CertCmd,
    },
    /// Low-level tools for operators and tests.
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
}

#[derive(Debug, Subcommand)]
enum DebugCmd {
    /// Chunk operations against one storaged.
    Chunk {
        #[command(subcommand)]
        cmd: chunk::ChunkCmd,
    },
    /// Capacity, usage and health of one storaged.
    NodeInfo(chunk::NodeArgs),
    /// Chunks one storaged found corrupt.
    Corrupt(chunk::NodeArgs),
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::new(1, format!("{e:#}"))
    }
}

/// How this CLI talks to the cluster: mutual TLS with the operator certificate in
/// `--tls-dir` (or `$SOV_TLS_DIR`, or `~/.config/sov/tls`), or plaintext when asked.
fn client_transport(dir: Option<&std::path::Path>, plain: bool) -> Result<(), CliError> {
    use sov_common::tls;
    let home = std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".config/sov/tls"))
        .filter(|d| d.join("cert.pem").exists());
    let t = match (dir.map(std::path::Path::to_path_buf).or(home), plain) {
        (_, true) => tls::Transport::Plain,
        (Some(d), false) => tls::Transport::Tls(
            tls::TlsContext::load(&d)
                .map_err(|e| CliError::new(2, format!("TLS directory {}: {e:#}", d.display())))?,
        ),
        (None, false) => {
            return Err(CliError::new(
                2,
                "no TLS directory: give --tls-dir (or SOV_TLS_DIR), or --insecure-plaintext",
            ));
        }
    };
    tls::install(t);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    let out = cli.output;
    match (
        &cli.cmd,
        client_transport(cli.tls_dir.as_deref(), cli.insecure_plaintext),
    ) {
        // `sov up` makes its own; `sov cert` needs one only to publish a CRL.
        (Cmd::Up(_) | Cmd::Cert { .. }, _) | (_, Ok(())) => {}
        (_, Err(e)) => {
            eprintln!("sov: {}", e.message);
            return ExitCode::from(e.code);
        }
    }
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Up(args) => up::run(args, out).await,
            Cmd::Cluster { cmd } => cluster::run_cluster(cmd, out).await,
            Cmd::Node { cmd } => cluster::run_node(cmd, out).await,
            Cmd::Pool { cmd } => cluster::run_pool(cmd, out).await,
            Cmd::Metad { cmd } => cluster::run_metad(cmd, out).await,
            Cmd::Bucket { cmd } => object::run_bucket(cmd, out).await,
            Cmd::Object { cmd } => object::run_object(cmd, out).await,
            Cmd::Key { cmd } => object::run_key(cmd, out).await,
            Cmd::Volume { cmd } => volume::run(cmd, out).await,
            Cmd::Repair { cmd } => object::run_repair(cmd, out).await,
            Cmd::Cert { cmd } => cert::run(cmd, out).await,
            Cmd::Audit(a) => audit::run(a, out).await,
            Cmd::MasterKey { cmd } => masterkey::run(cmd, out).await,
            Cmd::Debug { cmd } => match cmd {
                DebugCmd::Chunk { cmd } => chunk::run(cmd, out).await,
                DebugCmd::NodeInfo(a) => chunk::node_info(a, out).await,
                DebugCmd::Corrupt(a) => chunk::corrupt(a, out).await,
            },
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sov: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
