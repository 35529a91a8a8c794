//! Test harness: starts real sov binaries in temp dirs on free ports, waits until they are
//! ready, kills their whole process group, and keeps their logs when a test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sov_proto::metad::metad_client::MetadClient;
use sov_proto::metad::{StatusRequest, StatusResponse};
use sov_proto::storaged::chunk_store_client::ChunkStoreClient;
use tonic::transport::Channel;

/// Where the workspace's binaries are: `$SOV_BIN_DIR`, else the target profile directory of
/// the running test (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SOV_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe.parent().expect("the test binary is in a directory");
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of a workspace binary, failing loudly if it was not built.
pub fn bin_path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace)",
        p.display()
    );
    p
}

/// A child process in its own process group, with stdout and stderr in a log file.
pub struct Process {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Process {
    /// Starts `program args...` with its output appended to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<Process> {
        Self::spawn_env(name, program, args, &[], log)
    }

    /// Like [`Process::spawn`], with extra environment variables.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Process> {
        use std::os::unix::process::CommandExt;
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Process {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn signal_group(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) with a negative pid signals the process group we created.
            unsafe {
                libc::kill(-(pid as i32), sig);
            }
        }
    }

    /// SIGSTOP to the whole group: the process stays, frozen (a hung member).
    pub fn stop(&self) {
        self.signal_group(libc::SIGSTOP);
    }

    /// SIGCONT to the whole group.
    pub fn cont(&self) {
        self.signal_group(libc::SIGCONT);
    }

    /// SIGKILL to the whole group, then reap.
    pub fn kill9(&mut self) {
        self.signal_group(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit; SIGKILL after that.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                self.child.take();
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        bail!("{} did not exit within {timeout:?} of SIGTERM", self.name)
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ({}) ----\n{}\n----",
                self.name,
                self.log.display(),
                self.log_tail(60)
            );
        }
    }
}

/// What storaged writes to its `--ready-file`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Ready {
    pub listen: std::net::SocketAddr,
    pub metrics_listen: std::net::SocketAddr,
    pub pid: u32,
    pub node_id: String,
    pub io_engine: String,
}

/// Waits for `path` to hold a JSON `T`, while `proc` is alive.
pub fn wait_ready<T: serde::de::DeserializeOwned>(
    proc: &mut Process,
    path: &Path,
    timeout: Duration,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(v) = serde_json::from_slice(&bytes)
        {
            return Ok(v);
        }
        if let Some(status) = proc.try_wait() {
            bail!(
                "{} exited with {status} before it was ready:\n{}",
                proc.name,
                proc.log_tail(30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready after {timeout:?}:\n{}",
                proc.name,
                proc.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test process's cluster CA: made once per process (nextest runs each test in its own),
/// in a temporary folder. Making it installs an operator (`admin`) certificate as this
/// process's transport, so every client the test builds speaks mutual TLS.
pub struct Pki {
    pub dir: PathBuf,
    ca: sov_common::pki::Ca,
    admin: PathBuf,
}

static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();

/// The process's [`Pki`], made on first use.
pub fn pki() -> &'static Pki {
    PKI.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "sov-test-pki-{}-{:x}",
            std::process::id(),
            rand_u16()
        ));
        let ca = sov_common::pki::Ca::init(&dir.join("ca")).expect("making the test CA");
        let admin = dir.join("admin");
        let id = sov_common::tls::NodeIdentity::new(sov_common::tls::Role::Admin, None, "test")
            .expect("identity");
        ca.issue_into(&sov_common::pki::CertRequest::node(id), &admin)
            .expect("issuing the test's admin certificate");
        let ctx = sov_common::tls::TlsContext::load(&admin).expect("loading the admin certificate");
        sov_common::tls::install(sov_common::tls::Transport::Tls(ctx));
        Pki { dir, ca, admin }
    })
}

impl Pki {
    pub fn ca(&self) -> &sov_common::pki::Ca {
        &self.ca
    }

    /// The operator's TLS directory (give it to `sov` as `--tls-dir` or `SOV_TLS_DIR`).
    pub fn admin_dir(&self) -> &Path {
        &self.admin
    }

    /// Environment for a `sov` CLI child: its TLS directory.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        vec![("SOV_TLS_DIR".to_string(), self.admin.display().to_string())]
    }

    /// Issues a certificate for `role`/`zone`/`name` into `dir` (kept if `dir` already holds
    /// one for that identity); returns `dir`.
    pub fn issue(
        &self,
        role: sov_common::tls::Role,
        zone: Option<&str>,
        name: &str,
        dir: &Path,
    ) -> anyhow::Result<PathBuf> {
        let id = sov_common::tls::NodeIdentity::new(role, zone, name)?;
        if let Ok(ctx) = sov_common::tls::TlsContext::load(dir)
            && ctx.identity() == &id
        {
            return Ok(dir.to_path_buf());
        }
        // Loopback names too, for clients that check the host they dialled (NBD over TLS).
        let req = sov_common::pki::CertRequest {
            extra_names: vec!["localhost".into(), "127.0.0.1".into()],
            ..sov_common::pki::CertRequest::node(id)
        };
        self.ca.issue_into(&req, dir)?;
        Ok(dir.to_path_buf())
    }
}

impl Pki {
    /// A transport with a fresh certificate for `role`/`zone`/`name` (kept in the PKI
    /// folder), and its serial (to revoke it).
    pub fn peer(
        &self,
        role: sov_common::tls::Role,
        zone: Option<&str>,
        name: &str,
    ) -> anyhow::Result<(sov_common::tls::Transport, String)> {
        let dir = self.dir.join(format!("peer-{name}-{:x}", rand_u16()));
        let id = sov_common::tls::NodeIdentity::new(role, zone, name)?;
        let serial = self
            .ca
            .issue_into(&sov_common::pki::CertRequest::node(id), &dir)?;
        let ctx = sov_common::tls::TlsContext::load(&dir)?;
        Ok((sov_common::tls::Transport::Tls(ctx), serial))
    }

    /// A transport whose certificate comes from another CA (another cluster's, or forged).
    pub fn foreign_peer(
        &self,
        role: sov_common::tls::Role,
        name: &str,
    ) -> anyhow::Result<sov_common::tls::Transport> {
        let other = self.dir.join(format!("foreign-{:x}", rand_u16()));
        let ca = sov_common::pki::Ca::init(&other.join("ca"))?;
        let id = sov_common::tls::NodeIdentity::new(role, None, name)?;
        ca.issue_into(&sov_common::pki::CertRequest::node(id), &other.join("tls"))?;
        Ok(sov_common::tls::Transport::Tls(
            sov_common::tls::TlsContext::load(&other.join("tls"))?,
        ))
    }

    /// Revokes `serial` and copies the new CRL into each TLS folder (a daemon's `work/tls`).
    pub fn revoke(&self, serial: &str, push: &[&Path]) -> anyhow::Result<()> {
        self.ca.revoke_hex(serial)?;
        for d in push {
            self.ca.copy_crl_into(d)?;
        }
        Ok(())
    }

    /// Opens TLS to `addr` as a client that trusts the CA but shows no certificate, expecting
    /// `role`, and reads what the server sends first. A server that requires a client
    /// certificate answers with an alert (an error here) and never with HTTP/2 SETTINGS.
    pub async fn read_without_client_cert(
        &self,
        addr: &str,
        role: sov_common::tls::Role,
    ) -> std::io::Result<Vec<u8>> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        use tokio::io::AsyncReadExt;
        let mut roots = rustls::RootCertStore::empty();
        for c in
            CertificateDer::pem_file_iter(self.ca.ca_pem_path()).map_err(std::io::Error::other)?
        {
            roots
                .add(c.map_err(std::io::Error::other)?)
                .map_err(std::io::Error::other)?;
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(sov_common::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr.trim_start_matches("http://")).await?;
        let name = rustls_pki_types::ServerName::try_from(role.dns_name())
            .map_err(std::io::Error::other)?;
        let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("the server said nothing for 5 s"))??;
        buf.truncate(n);
        Ok(buf)
    }
}

/// Runs the `sov` CLI as this test's operator (the test CA's `admin` certificate) and returns
/// its standard output; panics with its standard error when it fails.
pub fn sov_ok(args: &[&str]) -> String {
    let out = Command::new(bin_path("sov"))
        .envs(pki().cli_env())
        .args(args)
        .output()
        .expect("running sov");
    assert!(
        out.status.success(),
        "sov {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The value after `flag` in `args` (the last one wins, as clap does).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2)
        .rev()
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

/// A name made of what certificate names allow.
fn label(s: &str) -> String {
    let l: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    if l.is_empty() { "x".into() } else { l }
}

/// `--tls-dir` for daemon `name` started with `args`, unless they choose their transport
/// themselves (`--tls-dir` or `--insecure-plaintext`): a certificate from [`pki`] with the
/// identity the flags give (a storaged's `--node-id` and `--zone`, a metad's `--id`).
pub fn tls_args(name: &str, work: &Path, args: &[String]) -> anyhow::Result<Vec<String>> {
    use sov_common::tls::Role;
    if args
        .iter()
        .any(|a| a == "--tls-dir" || a == "--insecure-plaintext")
    {
        return Ok(Vec::new());
    }
    let (role, zone, who) = match name {
        "metad" => (
            Role::Metad,
            None,
            format!("metad-{}", flag_value(args, "--id").unwrap_or("1")),
        ),
        "storaged" => (
            Role::Storaged,
            flag_value(args, "--zone"),
            flag_value(args, "--node-id")
                .map(label)
                .unwrap_or_else(|| format!("storaged-{:x}", rand_u16())),
        ),
        "vhost-blk" => (
            Role::VhostBlk,
            None,
            label(flag_value(args, "--id").unwrap_or("vhost-blk")),
        ),
        "gateway-s3" => (Role::Gateway, None, "gateway".to_string()),
        _ => return Ok(Vec::new()),
    };
    let dir = pki().issue(role, zone, &who, &work.join("tls"))?;
    Ok(vec!["--tls-dir".into(), dir.display().to_string()])
}

/// Starts daemon `name` (a binary of the workspace) with `args` and `--ready-file
/// <work>/<name>-ready-<n>.json`, its output in `<work>/<name>.log`, and waits until it is ready.
pub fn launch<T: serde::de::DeserializeOwned>(
    name: &str,
    work: &Path,
    args: &[String],
    env: &[(String, String)],
    n: u32,
    timeout: Duration,
) -> anyhow::Result<(Process, T)> {
    std::fs::create_dir_all(work)?;
    let ready_file = work.join(format!("{name}-ready-{n}.json"));
    let _ = std::fs::remove_file(&ready_file);
    let mut all = args.to_vec();
    all.extend(tls_args(name, work, args)?);
    all.push("--ready-file".into());
    all.push(ready_file.display().to_string());
    let mut proc = Process::spawn_env(
        name,
        &bin_path(name),
        &all,
        env,
        &work.join(format!("{name}.log")),
    )?;
    let ready = wait_ready(&mut proc, &ready_file, timeout)?;
    Ok((proc, ready))
}

/// A running storaged.
pub struct Storaged {
    pub proc: Process,
    pub ready: Ready,
    pub work: PathBuf,
    pub disks: Vec<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    starts: u32,
}

impl Storaged {
    /// Starts storaged on `disks` with `extra` flags; logs and the ready file go in `work`.
    pub fn start(work: &Path, disks: &[PathBuf], extra: &[&str]) -> anyhow::Result<Storaged> {
        Self::start_env(work, disks, extra, &[])
    }

    /// Like [`Storaged::start`], with extra environment variables (failpoints, `RUST_LOG`).
    pub fn start_env(
        work: &Path,
        disks: &[PathBuf],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Storaged> {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        for d in disks {
            args.push("--disk".into());
            args.push(d.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (proc, ready) = Self::launch(work, &args, &env, 1)?;
        Ok(Storaged {
            proc,
            ready,
            work: work.to_path_buf(),
            disks: disks.to_vec(),
            args,
            env,
            starts: 1,
        })
    }

    fn launch(
        work: &Path,
        args: &[String],
        env: &[(String, String)],
        n: u32,
    ) -> anyhow::Result<(Process, Ready)> {
        launch("storaged", work, args, env, n, Duration::from_secs(120))
    }

    /// Starts it again with the same disks and flags (new ports), after a kill or a stop.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.restart_with(&[])
    }

    /// Like [`Storaged::restart`], with `extra` flags for this start only (later flags win).
    pub fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.proc.kill9();
        self.starts += 1;
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (proc, ready) = Self::launch(&self.work, &args, &self.env, self.starts)?;
        self.proc = proc;
        self.ready = ready;
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.ready.listen)
    }

    pub fn addr(&self) -> String {
        self.ready.listen.to_string()
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.ready.metrics_listen)
    }

    /// A gRPC client, connected.
    pub async fn client(&self) -> anyhow::Result<ChunkStoreClient<Channel>> {
        let ep = Channel::from_shared(self.endpoint())?
            .connect_timeout(Duration::from_secs(5))
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(64 << 20));
        let ch = sov_common::tls::connect(ep, sov_common::tls::Role::Storaged).await?;
        Ok(ChunkStoreClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.proc.terminate(timeout)
    }
}

/// A loopback port that was free a moment ago (for daemons whose address others must know
/// before they start, like metad members).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

/// The first of `n` consecutive loopback ports that are free now (for daemons numbered from a
/// base port, as `sov up` does).
pub fn free_port_range(n: u16) -> u16 {
    for _ in 0..200 {
        let base = 20_000 + (rand_u16() % 40_000);
        let held: Vec<_> = (0..n)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no {n} consecutive free loopback ports");
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u16
}

/// What metad writes to its `--ready-file`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MetadReady {
    pub listen: std::net::SocketAddr,
    pub metrics_listen: std::net::SocketAddr,
    pub pid: u32,
    pub id: u64,
}

/// Raft timings for tests: slow enough that two busy cores do not cause spurious elections.
pub const METAD_TEST_FLAGS: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--election-timeout-min",
    "1000ms",
    "--election-timeout-max",
    "2000ms",
];

/// A running metad member on a fixed port (it keeps the port across restarts, as members
/// know each other by address).
pub struct Metad {
    pub proc: Process,
    pub id: u64,
    pub addr: String,
    pub ready: MetadReady,
    pub work: PathBuf,
    args: Vec<String>,
    starts: u32,
}

impl Metad {
    /// Starts member `id` listening on `addr`, data in `work/data`, with `extra` flags.
    pub fn start(work: &Path, id: u64, addr: &str, extra: &[String]) -> anyhow::Result<Metad> {
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            work.join("data").display().to_string(),
        ];
        args.extend(METAD_TEST_FLAGS.iter().map(|s| s.to_string()));
        args.extend(extra.iter().cloned());
        let (proc, ready) = Self::launch(work, &args, 1)?;
        Ok(Metad {
            proc,
            id,
            addr: addr.to_string(),
            ready,
            work: work.to_path_buf(),
            args,
            starts: 1,
        })
    }

    fn launch(work: &Path, args: &[String], n: u32) -> anyhow::Result<(Process, MetadReady)> {
        launch("metad", work, args, &[], n, Duration::from_secs(60))
    }

    /// Starts it again on the same address and data (after a kill).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.restart_with(&[])
    }

    /// Like [`Metad::restart`], with `extra` flags for this start only (later flags win).
    pub fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.proc.kill9();
        self.starts += 1;
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (proc, ready) = Self::launch(&self.work, &args, self.starts)?;
        self.proc = proc;
        self.ready = ready;
        Ok(())
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.ready.metrics_listen)
    }

    /// A client for this member only.
    pub fn client(&self) -> anyhow::Result<MetadClient<Channel>> {
        let ep = Channel::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(Duration::from_secs(2));
        let ch = sov_common::tls::channel(ep, sov_common::tls::Role::Metad);
        Ok(MetadClient::new(ch))
    }

    /// This member's Status, or None if it does not answer within a second.
    pub async fn status(&self) -> Option<StatusResponse> {
        let mut c = self.client().ok()?;
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(2), c.status(req))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }
}

/// Several metad members forming one cluster.
pub struct MetadCluster {
    pub members: Vec<Metad>,
}

impl MetadCluster {
    /// Starts `n` members (ids 1..=n) on free loopback ports, each in `work/metad-<id>`.
    pub fn start(work: &Path, n: usize, extra: &[&str]) -> anyhow::Result<MetadCluster> {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let mut args: Vec<String> = vec!["--peers".into(), peers.clone()];
            args.extend(extra.iter().map(|s| s.to_string()));
            let id = i as u64 + 1;
            members.push(Metad::start(
                &work.join(format!("metad-{id}")),
                id,
                &format!("127.0.0.1:{p}"),
                &args,
            )?);
        }
        Ok(MetadCluster { members })
    }

    /// Every member's address, comma-separated (what `--metad` takes).
    pub fn addr_list(&self) -> String {
        self.members
            .iter()
            .map(|m| m.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index (into `members`) of the member that says it leads, among those in `among`,
    /// waiting up to `timeout` for one.
    pub async fn leader_among(&self, among: &[usize], timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            // A deposed leader may still say it leads for a moment: take the one with the
            // highest term, and only if no member answering knows a higher term.
            let mut best: Option<(u64, usize)> = None;
            let mut max_term = 0;
            for &i in among {
                if let Some(s) = self.members[i].status().await {
                    max_term = max_term.max(s.term);
                    if s.role == "leader" && best.is_none_or(|(t, _)| s.term > t) {
                        best = Some((s.term, i));
                    }
                }
            }
            if let Some((t, i)) = best
                && t == max_term
            {
                return Ok(i);
            }
            if Instant::now() > deadline {
                bail!("no leader among members {among:?} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Like [`MetadCluster::leader_among`] over every member.
    pub async fn leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.leader_among(&all, timeout).await
    }
}

/// Fetches a URL over plain HTTP/1.0 (enough for /metrics on loopback) and returns the body.
pub fn http_get(url: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("no header/body split in the response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {url}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Reads one sample value from Prometheus text (`name{labels} value`); sums matching series
/// when `labels_contain` matches several.
pub fn metric_value(text: &str, name: &str, labels_contain: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let series_name = series.split('{').next().unwrap_or("");
        if series_name == name && series.contains(labels_contain) {
            let v: f64 = value.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// A temp dir that is kept (and its path printed) when the test panics.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("sov-test-{name}-"))
            .tempdir()
            .expect("creating a temp dir");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.dir.take()
        {
            eprintln!("test files kept in {}", d.keep().display());
        }
    }
}

/// Flags that make storage node liveness fast enough for tests (metad side).
pub const DATA_METAD_FLAGS: &[&str] = &[
    "--node-heartbeat-interval",
    "200ms",
    "--down-after",
    "2s",
    "--out-after",
    "8s",
    "--delete-grace",
    "1s",
];

/// A whole data cluster of real processes: one metad (with a master key) and storage nodes
/// spread over zones, each node registered, heartbeating and running recovery.
pub struct DataCluster {
    pub dir: PathBuf,
    pub metad: Metad,
    pub nodes: Vec<Storaged>,
    /// Zone of each node (same order as `nodes`).
    pub zones: Vec<String>,
    /// Node id of each node.
    pub ids: Vec<String>,
}

impl DataCluster {
    /// Starts metad with `metad_extra` after [`DATA_METAD_FLAGS`], then `zones × per_zone`
    /// storage nodes (`n1`… in zones `z1`…) with `storaged_extra`, and waits until metad has
    /// every node `up`.
    pub async fn start(
        dir: &Path,
        zones: usize,
        per_zone: usize,
        metad_extra: &[&str],
        storaged_extra: &[&str],
    ) -> anyhow::Result<DataCluster> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let key = dir.join("master.key");
        std::fs::write(&key, "5a".repeat(32))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        let mut args: Vec<String> = vec!["--master-key-file".into(), key.display().to_string()];
        args.extend(DATA_METAD_FLAGS.iter().map(|s| s.to_string()));
        args.extend(metad_extra.iter().map(|s| s.to_string()));
        let metad = Metad::start(
            &dir.join("metad"),
            1,
            &format!("127.0.0.1:{}", free_port()),
            &args,
        )?;
        let mut c = DataCluster {
            dir: dir.to_path_buf(),
            metad,
            nodes: Vec::new(),
            zones: Vec::new(),
            ids: Vec::new(),
        };
        for z in 0..zones {
            for _ in 0..per_zone {
                c.add_node(&format!("z{}", z + 1), storaged_extra)?;
            }
        }
        let want = c.ids.clone();
        c.wait_map(Duration::from_secs(60), "every node up", |m| {
            want.iter()
                .all(|id| m.nodes.iter().any(|n| &n.id == id && n.state == "up"))
        })
        .await?;
        Ok(c)
    }

    /// Starts one more storage node (`n<count+1>`) in `zone`; returns its index. It registers
    /// by itself; wait for it with [`DataCluster::wait_map`].
    pub fn add_node(&mut self, zone: &str, storaged_extra: &[&str]) -> anyhow::Result<usize> {
        let id = format!("n{}", self.nodes.len() + 1);
        let work = self.dir.join(&id);
        let disk = work.join("disk");
        std::fs::create_dir_all(&disk)?;
        let mut extra: Vec<&str> = vec![
            "--metad",
            &self.metad.addr,
            "--node-id",
            &id,
            "--zone",
            zone,
            "--recovery-interval",
            "2s",
            "--recovery-rate",
            "0",
        ];
        extra.extend_from_slice(storaged_extra);
        self.nodes.push(Storaged::start(&work, &[disk], &extra)?);
        self.zones.push(zone.to_string());
        self.ids.push(id);
        Ok(self.nodes.len() - 1)
    }

    /// A client of this cluster's metad.
    pub fn metad_client(&self) -> anyhow::Result<MetadClient<Channel>> {
        self.metad.client()
    }

    /// The cluster map, fresh.
    pub async fn map(&self) -> anyhow::Result<sov_proto::metad::ClusterMap> {
        let mut c = self.metad.client()?;
        Ok(
            c.get_cluster_map(sov_proto::metad::GetClusterMapRequest { consistency: 0 })
                .await?
                .into_inner(),
        )
    }

    /// Waits until `f` holds for the cluster map.
    pub async fn wait_map(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&sov_proto::metad::ClusterMap) -> bool,
    ) -> anyhow::Result<sov_proto::metad::ClusterMap> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(m) = self.map().await
                && f(&m)
            {
                return Ok(m);
            }
            if Instant::now() > deadline {
                bail!("{what}: not reached within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a pool (`redundancy` as in `sov pool create`: replicated:N or ec:K+M) and a
    /// bucket of the same name writing to it.
    pub async fn pool_and_bucket(
        &self,
        name: &str,
        redundancy: &str,
        pg_count: u32,
    ) -> anyhow::Result<()> {
        use sov_proto::metad::{
            CreateBucketRequest, CreatePoolRequest, ErasureCoded, Redundancy, Replicated,
            redundancy::Kind,
        };
        let kind = match redundancy.split_once(':') {
            Some(("replicated", n)) => Kind::Replicated(Replicated { size: n.parse()? }),
            Some(("ec", km)) => {
                let (k, m) = km.split_once('+').context("ec:K+M")?;
                Kind::Ec(ErasureCoded {
                    k: k.parse()?,
                    m: m.parse()?,
                })
            }
            _ => bail!("bad redundancy {redundancy}"),
        };
        let mut c = self.metad.client()?;
        c.create_pool(CreatePoolRequest {
            name: name.into(),
            redundancy: Some(Redundancy { kind: Some(kind) }),
            tier: "standard".into(),
            pg_count,
        })
        .await?;
        c.create_bucket(CreateBucketRequest {
            name: name.into(),
            owner: String::new(),
            pool: name.into(),
        })
        .await?;
        Ok(())
    }

    /// Indexes of the nodes in `zone`.
    pub fn zone(&self, zone: &str) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.zones[i] == zone)
            .collect()
    }
}

/// What vhost-blk writes to its `--ready-file`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct VhostBlkReady {
    pub id: String,
    pub listen: std::net::SocketAddr,
    pub metrics_listen: std::net::SocketAddr,
    pub pid: u32,
}

/// A running vhost-blk (volume exporter). Its NBD port stays the same across restarts.
pub struct VhostBlk {
    pub proc: Process,
    pub ready: VhostBlkReady,
    pub work: PathBuf,
    args: Vec<String>,
    starts: u32,
}

impl VhostBlk {
    /// Starts vhost-blk `id` against metad `metad` with `extra` flags.
    pub fn start(work: &Path, metad: &str, id: &str, extra: &[&str]) -> anyhow::Result<VhostBlk> {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--metad".into(),
            metad.into(),
            "--id".into(),
            id.into(),
            "--data".into(),
            work.join("data").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (proc, ready) = Self::launch(work, &args, 1)?;
        Ok(VhostBlk {
            proc,
            ready,
            work: work.to_path_buf(),
            args,
            starts: 1,
        })
    }

    fn launch(work: &Path, args: &[String], n: u32) -> anyhow::Result<(Process, VhostBlkReady)> {
        launch("vhost-blk", work, args, &[], n, Duration::from_secs(60))
    }

    /// Kills it (`kill -9`) and starts it again with the same flags and NBD port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill9();
        self.starts += 1;
        let (proc, ready) = Self::launch(&self.work, &self.args, self.starts)?;
        self.proc = proc;
        self.ready = ready;
        Ok(())
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.ready.metrics_listen)
    }
}

/// A recording TCP proxy: forwards every connection to a target set later (a daemon's port is
/// known only once it started) and keeps every byte each way, per connection, to read the wire.
pub struct Tap {
    pub addr: std::net::SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    /// (client to server, server to client) bytes of each connection.
    pub streams: std::sync::Arc<std::sync::Mutex<Vec<TapStream>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What one proxied connection carried.
#[derive(Default, Clone)]
pub struct TapStream {
    pub up: Vec<u8>,
    pub down: Vec<u8>,
}

impl Tap {
    /// Listens on a free loopback port; connections wait until [`Tap::set_target`].
    pub async fn start() -> anyhow::Result<Tap> {
        use std::sync::{Arc, Mutex};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let target: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::new(Mutex::new(None));
        let streams: Arc<Mutex<Vec<TapStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (t, s) = (target.clone(), streams.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = l.accept().await {
                let (t, s) = (t.clone(), s.clone());
                tokio::spawn(async move {
                    let to = loop {
                        if let Some(a) = *t.lock().expect("tap target") {
                            break a;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    };
                    let Ok(up) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let i = {
                        let mut v = s.lock().expect("tap streams");
                        v.push(TapStream::default());
                        v.len() - 1
                    };
                    let (cr, cw) = conn.into_split();
                    let (ur, uw) = up.into_split();
                    let a = Self::pump(cr, uw, s.clone(), i, true);
                    let b = Self::pump(ur, cw, s, i, false);
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Ok(Tap {
            addr,
            target,
            streams,
            task,
        })
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        streams: std::sync::Arc<std::sync::Mutex<Vec<TapStream>>>,
        i: usize,
        up: bool,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            {
                let mut v = streams.lock().expect("tap streams");
                let s = &mut v[i];
                if up { &mut s.up } else { &mut s.down }.extend_from_slice(&buf[..n]);
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    pub fn set_target(&self, to: std::net::SocketAddr) {
        *self.target.lock().expect("tap target") = Some(to);
    }

    /// Every connection's bytes so far.
    pub fn recorded(&self) -> Vec<TapStream> {
        self.streams.lock().expect("tap streams").clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}
