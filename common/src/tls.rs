//! Mutual TLS between sov daemons (rustls on aws-lc-rs, TLS 1.3, the X25519MLKEM768 hybrid
//! key exchange first).
//!
//! Every daemon holds a certificate from the cluster CA (see [`crate::pki`]) that names its
//! identity: a URI `sov://<role>/<zone>/<name>` and the DNS name `<role>.sov`. A client dials a
//! role, not a host: it verifies the server's certificate for the name `<role>.sov`, so a
//! gateway's certificate cannot answer for a storaged. A server requires a client certificate
//! from the same CA, and [`AuthzLayer`] checks per gRPC method that the caller's role may call
//! it. Revoked certificates (the CRL in the TLS directory) are refused at the handshake and,
//! for connections opened before the revocation, at their next request.
//!
//! A TLS directory holds `ca.pem`, `cert.pem`, `key.pem` (mode 0600) and optionally `crl.der`;
//! the files are read again when they change, so a rotated certificate or a new CRL takes
//! effect without a restart.

// Statuses are returned as tonic makes them (a boxed one would be unboxed at every caller).
#![allow(clippy::result_large_err)]

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// What a daemon is; the role in its certificate decides what it may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Metad,
    Storaged,
    Gateway,
    VhostBlk,
    /// An operator's tool (the `sov` CLI): may call every operator method, never Raft.
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Metad,
        Role::Storaged,
        Role::Gateway,
        Role::VhostBlk,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Metad => "metad",
            Role::Storaged => "storaged",
            Role::Gateway => "gateway",
            Role::VhostBlk => "vhost-blk",
            Role::Admin => "admin",
        }
    }

    /// The DNS name every certificate of this role carries and every client checks.
    pub fn dns_name(self) -> String {
        format!("{}.sov", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown role {s:?} (metad, storaged, gateway, vhost-blk, admin)")
            })
    }
}

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub role: Role,
    pub zone: Option<String>,
    pub name: String,
}

/// Names and zones: lowercase letters, digits and dashes, 1 to 63 of them.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl NodeIdentity {
    pub fn new(role: Role, zone: Option<&str>, name: &str) -> anyhow::Result<NodeIdentity> {
        if !valid_label(name) {
            bail!("name {name:?}: use 1-63 lowercase letters, digits or dashes");
        }
        if let Some(z) = zone
            && (!valid_label(z) || z == "-")
        {
            bail!("zone {z:?}: use 1-63 lowercase letters, digits or dashes");
        }
        Ok(NodeIdentity {
            role,
            zone: zone.map(str::to_string),
            name: name.to_string(),
        })
    }

    /// The URI subject-alternative name that carries the identity.
    pub fn uri(&self) -> String {
        format!(
            "sov://{}/{}/{}",
            self.role,
            self.zone.as_deref().unwrap_or("-"),
            self.name
        )
    }

    pub fn parse_uri(uri: &str) -> Option<NodeIdentity> {
        let rest = uri.strip_prefix("sov://")?;
        let mut parts = rest.split('/');
        let role: Role = parts.next()?.parse().ok()?;
        let zone = parts.next()?;
        let name = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let zone = (zone != "-").then_some(zone);
        NodeIdentity::new(role, zone, name).ok()
    }

    /// The identity in a certificate (its one `sov://` URI name).
    pub fn from_cert(der: &CertificateDer<'_>) -> anyhow::Result<NodeIdentity> {
        let cert = webpki::EndEntityCert::try_from(der)
            .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
        let mut found = cert
            .valid_uri_names()
            .filter(|u| u.starts_with("sov://"))
            .map(|u| {
                NodeIdentity::parse_uri(u)
                    .ok_or_else(|| anyhow::anyhow!("certificate names a bad identity {u:?}"))
            });
        let id = found
            .next()
            .unwrap_or_else(|| Err(anyhow::anyhow!("certificate names no sov identity")))?;
        if found.next().is_some() {
            bail!("certificate names more than one sov identity");
        }
        Ok(id)
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// The certificate's serial number (what a CRL lists).
pub fn cert_serial(der: &CertificateDer<'_>) -> anyhow::Result<Vec<u8>> {
    let cert = webpki::EndEntityCert::try_from(der)
        .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    Ok(cert.serial().to_vec())
}

/// The crypto provider every sov TLS config uses: aws-lc-rs with the hybrid post-quantum
/// X25519MLKEM768 first, then X25519 and P-256 for peers without ML-KEM.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        use rustls::crypto::aws_lc_rs::{self, kx_group};
        let p = CryptoProvider {
            kx_groups: vec![
                kx_group::X25519MLKEM768,
                kx_group::X25519,
                kx_group::SECP256R1,
            ],
            ..aws_lc_rs::default_provider()
        };
        // Libraries that ask for the process default get the same one.
        let _ = p.clone().install_default();
        Arc::new(p)
    })
    .clone()
}

/// Refuses a secret file that group or others may read or write.
pub fn check_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} is accessible by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    Ok(())
}

/// Writes a secret file readable by its owner only (created 0600, never wider).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The files of a TLS directory.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: PathBuf,
}

impl TlsFiles {
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            crl: dir.join("crl.der"),
        }
    }

    fn stamp(&self) -> Vec<Option<SystemTime>> {
        [&self.ca, &self.cert, &self.key, &self.crl]
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

struct Built {
    server: Arc<ServerConfig>,
    /// For clients outside sov (NBD): TLS 1.2 and 1.3, a client certificate of the CA.
    block: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    crl: Option<webpki::CertRevocationList<'static>>,
    stamp: Vec<Option<SystemTime>>,
}

/// A daemon's TLS state: its identity and the current server and client configurations.
pub struct TlsContext {
    files: TlsFiles,
    identity: NodeIdentity,
    built: RwLock<Built>,
    /// When the files were last looked at, in ms since `born` (a request's check is a load).
    checked_ms: AtomicU64,
    born: Instant,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("identity", &self.identity.uri())
            .field("cert", &self.files.cert)
            .finish()
    }
}

/// How often the TLS files are looked at again (at most; on the next new connection).
const RELOAD_CHECK: Duration = Duration::from_secs(1);

fn build(files: &TlsFiles) -> anyhow::Result<(Built, NodeIdentity)> {
    let p = provider();
    check_private(&files.key)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow::anyhow!("cannot read key {}: {e}", files.key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("cannot read certificate {}: {e}", files.cert.display()))?;
    let Some(leaf) = chain.first() else {
        bail!("{} holds no certificate", files.cert.display());
    };
    let identity = NodeIdentity::from_cert(leaf)
        .with_context(|| format!("certificate {}", files.cert.display()))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&files.ca)
        .map_err(|e| anyhow::anyhow!("cannot read CA {}: {e}", files.ca.display()))?
    {
        let c = c.map_err(|e| anyhow::anyhow!("bad CA file {}: {e}", files.ca.display()))?;
        roots
            .add(c)
            .map_err(|e| anyhow::anyhow!("bad CA certificate {}: {e}", files.ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no CA certificate", files.ca.display());
    }
    let roots = Arc::new(roots);
    let (crls, crl) = match std::fs::read(&files.crl) {
        Ok(der) => {
            let owned = webpki::OwnedCertRevocationList::from_der(&der)
                .map_err(|e| anyhow::anyhow!("bad CRL {}: {e}", files.crl.display()))?;
            (
                vec![CertificateRevocationListDer::from(der)],
                Some(webpki::CertRevocationList::from(owned)),
            )
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", files.crl.display())),
    };
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
        .with_crls(crls.clone())
        .only_check_end_entity_revocation()
        .build()
        .context("client certificate verifier")?;
    let block = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)?
        .with_client_cert_verifier(client_verifier.clone())
        .with_single_cert(chain.clone(), key.clone_key())
        .context("block server certificate and key")?;
    let mut server = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .context("server certificate and key")?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let server_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, p.clone())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .build()
            .context("server certificate verifier")?;
    let mut client = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .context("client certificate and key")?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((
        Built {
            server: Arc::new(server),
            block: Arc::new(block),
            client: Arc::new(client),
            crl,
            stamp: files.stamp(),
        },
        identity,
    ))
}

impl TlsContext {
    /// Loads a TLS directory (see the module docs).
    pub fn load(dir: &Path) -> anyhow::Result<Arc<TlsContext>> {
        let files = TlsFiles::in_dir(dir);
        let (built, identity) = build(&files)?;
        Ok(Arc::new(TlsContext {
            files,
            identity,
            built: RwLock::new(built),
            checked_ms: AtomicU64::new(0),
            born: Instant::now(),
        }))
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// Reads the files again if they changed since the last look (at most once a second). A
    /// broken new set is logged and the old one kept; a certificate for another identity is
    /// refused.
    pub fn refresh(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        let last = self.checked_ms.load(Ordering::Relaxed);
        if now < last + RELOAD_CHECK.as_millis() as u64
            || self
                .checked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if self.built.read().expect("tls lock").stamp == self.files.stamp() {
            return;
        }
        match build(&self.files) {
            Ok((b, id)) if id == self.identity => {
                tracing::info!(cert = %self.files.cert.display(), "TLS files changed: reloaded");
                *self.built.write().expect("tls lock") = b;
            }
            Ok((_, id)) => {
                tracing::error!(now = %self.identity, new = %id, "new certificate names another identity: kept the old one")
            }
            Err(e) => {
                tracing::error!("TLS files changed but do not load ({e:#}): kept the old ones")
            }
        }
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.refresh();
        self.built.read().expect("tls lock").server.clone()
    }

    /// The configuration for NBD clients (qemu, libnbd): TLS 1.2 or 1.3 (GnuTLS peers), a
    /// client certificate from the cluster CA required, the CRL applied.
    pub fn block_server_config(&self) -> Arc<ServerConfig> {
        self.refresh();
        self.built.read().expect("tls lock").block.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.refresh();
        self.built.read().expect("tls lock").client.clone()
    }

    /// Checks that `der` is a CRL of this cluster's CA: a verifier built with it must accept
    /// this process's own certificate (or find it revoked); a CRL from another CA or with a
    /// bad signature makes it fail otherwise.
    pub fn check_crl(&self, der: &[u8]) -> anyhow::Result<()> {
        use rustls::client::danger::ServerCertVerifier;
        webpki::OwnedCertRevocationList::from_der(der)
            .map_err(|e| anyhow::anyhow!("not a CRL: {e}"))?;
        let roots = self.roots()?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .with_crls(vec![CertificateRevocationListDer::from(der.to_vec())])
            .only_check_end_entity_revocation()
            .build()?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.files.cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", self.files.cert.display()))?;
        let Some((leaf, rest)) = chain.split_first() else {
            bail!("{} holds no certificate", self.files.cert.display());
        };
        let name = ServerName::try_from(self.identity.role.dns_name())?;
        let now = rustls_pki_types::UnixTime::now();
        match v.verify_server_cert(leaf, rest, &name, &[], now) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => Ok(()),
            Err(e) => bail!("the CRL does not check out against this cluster's CA: {e}"),
        }
    }

    fn roots(&self) -> anyhow::Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.files.ca)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", self.files.ca.display()))?
        {
            roots.add(c.map_err(|e| anyhow::anyhow!("bad CA file: {e}"))?)?;
        }
        Ok(Arc::new(roots))
    }

    /// Puts `der` in the TLS folder as the CRL (replacing the file whole) if it differs from
    /// the one there; the next connection or request uses it. Returns whether it changed.
    pub fn install_crl(&self, der: &[u8]) -> anyhow::Result<bool> {
        if std::fs::read(&self.files.crl).ok().as_deref() == Some(der) {
            return Ok(false);
        }
        self.check_crl(der)?;
        let tmp = self.files.crl.with_extension("der.tmp");
        std::fs::write(&tmp, der)?;
        std::fs::rename(&tmp, &self.files.crl)?;
        Ok(true)
    }

    /// Whether the current CRL lists this serial number.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.refresh();
        let b = self.built.read().expect("tls lock");
        b.crl
            .as_ref()
            .is_some_and(|crl| matches!(crl.find_serial(serial), Ok(Some(_))))
    }
}

/// How a process talks to its peers.
#[derive(Clone, Debug)]
pub enum Transport {
    /// Mutual TLS with this identity.
    Tls(Arc<TlsContext>),
    /// No TLS: only for loopback with `--insecure-plaintext`.
    Plain,
}

static TRANSPORT: RwLock<Option<Transport>> = RwLock::new(None);

/// Sets the transport every client in this process uses from now on (daemons do it once at
/// start; a test process once per test).
pub fn install(t: Transport) {
    *TRANSPORT.write().expect("transport lock") = Some(t);
}

/// The process's transport; plaintext if none was installed.
pub fn transport() -> Transport {
    TRANSPORT
        .read()
        .expect("transport lock")
        .clone()
        .unwrap_or(Transport::Plain)
}

/// What a daemon's flags say: `--tls-dir DIR`, or `--insecure-plaintext`, which is only
/// accepted when every address the daemon listens on or dials is loopback.
pub fn transport_from_flags(
    tls_dir: Option<&Path>,
    insecure_plaintext: bool,
    me: Role,
    addrs: &[&str],
) -> anyhow::Result<Transport> {
    match (tls_dir, insecure_plaintext) {
        (Some(_), true) => bail!("give --tls-dir or --insecure-plaintext, not both"),
        (Some(dir), false) => {
            let ctx = TlsContext::load(dir)
                .with_context(|| format!("loading TLS directory {}", dir.display()))?;
            if ctx.identity().role != me {
                bail!(
                    "the certificate in {} is for a {}, not a {me}",
                    dir.display(),
                    ctx.identity().role
                );
            }
            Ok(Transport::Tls(ctx))
        }
        (None, true) => {
            if let Some(a) = addrs.iter().find(|a| !is_loopback(a)) {
                bail!(
                    "--insecure-plaintext is only allowed on loopback, and {a} is not; give --tls-dir"
                );
            }
            tracing::warn!("running without TLS (--insecure-plaintext, loopback only)");
            Ok(Transport::Plain)
        }
        (None, false) => {
            bail!("no --tls-dir given (use --insecure-plaintext for a loopback-only test setup)")
        }
    }
}

/// Whether `host:port` (or a bare host, with or without `http://`) is a loopback address.
pub fn is_loopback(addr: &str) -> bool {
    let a = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return sa.ip().is_loopback();
    }
    if let Ok(ip) = a.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let host = a.rsplit_once(':').map(|(h, _)| h).unwrap_or(a);
    host == "localhost"
}

/// A lazily connecting channel to `ep`'s address that verifies the server has `role`. `ep`
/// carries the caller's timeouts and windows; its URI is `http://host:port`.
pub fn channel(ep: Endpoint, role: Role) -> Channel {
    channel_with(ep, role, transport())
}

/// [`channel`] with a given transport instead of the process's.
pub fn channel_with(ep: Endpoint, role: Role, t: Transport) -> Channel {
    match t {
        Transport::Plain => ep.connect_lazy(),
        Transport::Tls(ctx) => ep.connect_with_connector_lazy(Connector { ctx, role }),
    }
}

/// Like [`channel`], connected now (the error says why it could not).
pub async fn connect(ep: Endpoint, role: Role) -> Result<Channel, tonic::transport::Error> {
    connect_with(ep, role, transport()).await
}

/// [`connect`] with a given transport instead of the process's.
pub async fn connect_with(
    ep: Endpoint,
    role: Role,
    t: Transport,
) -> Result<Channel, tonic::transport::Error> {
    match t {
        Transport::Plain => ep.connect().await,
        Transport::Tls(ctx) => ep.connect_with_connector(Connector { ctx, role }).await,
    }
}

/// Dials TCP, then TLS, checking the server's certificate for `<role>.sov`.
#[derive(Clone)]
struct Connector {
    ctx: Arc<TlsContext>,
    role: Role,
}

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let ctx = self.ctx.clone();
        let role = self.role;
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?
                .to_string();
            let tcp = TcpStream::connect(&authority).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(role.dns_name())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(ctx.client_config())
                .connect(name, tcp)
                .await
                .map_err(|e| io::Error::other(format!("TLS to {role} at {authority}: {e}")))?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Who is at the other end of an accepted connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// From the verified client certificate; `None` on a plaintext listener.
    pub identity: Option<NodeIdentity>,
    pub serial: Vec<u8>,
}

/// An accepted connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream, PeerInfo),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(_, p) | Conn::Tls(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` with `t`: TLS handshakes run in their own tasks, so a
/// slow or silent client never holds up the others. Failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    t: Transport,
) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            match &t {
                Transport::Plain => {
                    let info = PeerInfo {
                        remote: Some(remote),
                        identity: None,
                        serial: Vec::new(),
                    };
                    if tx.send(Ok(Conn::Plain(tcp, info))).await.is_err() {
                        return;
                    }
                }
                Transport::Tls(ctx) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.server_config());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => match peer_of(&tls, remote) {
                                Ok(info) => {
                                    let _ = tx.send(Ok(Conn::Tls(Box::new(tls), info))).await;
                                }
                                Err(e) => tracing::warn!(%remote, "TLS peer refused: {e:#}"),
                            },
                            Ok(Err(e)) => tracing::warn!(%remote, "TLS handshake failed: {e}"),
                            Err(_) => tracing::warn!(%remote, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn peer_of(
    tls: &tokio_rustls::server::TlsStream<TcpStream>,
    remote: SocketAddr,
) -> anyhow::Result<PeerInfo> {
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("no client certificate"))?;
    Ok(PeerInfo {
        remote: Some(remote),
        identity: Some(NodeIdentity::from_cert(leaf)?),
        serial: cert_serial(leaf)?,
    })
}

/// The roles allowed to call a gRPC method (`/package.Service/Method`); `None` = nobody.
pub type Policy = fn(&str) -> Option<&'static [Role]>;

/// Checks every request's caller against a [`Policy`]: unknown callers get UNAUTHENTICATED,
/// roles the method does not allow PERMISSION_DENIED, revoked certificates UNAUTHENTICATED.
/// On a plaintext listener there is no identity and nothing is checked.
#[derive(Clone)]
pub struct AuthzLayer {
    policy: Policy,
    transport: Transport,
    on_refused: Option<RefusalObserver>,
}

/// Told of every refused call: the gRPC path, the caller, the answer (metad audits them).
pub type RefusalObserver = Arc<dyn Fn(&str, Option<&PeerInfo>, &Status) + Send + Sync>;

impl AuthzLayer {
    pub fn new(policy: Policy, transport: Transport) -> AuthzLayer {
        AuthzLayer {
            policy,
            transport,
            on_refused: None,
        }
    }

    /// Also tells `f` of every refused call.
    pub fn with_observer(mut self, f: RefusalObserver) -> AuthzLayer {
        self.on_refused = Some(f);
        self
    }

    /// The decision for one request.
    pub fn check(&self, path: &str, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let Transport::Tls(ctx) = &self.transport else {
            return Ok(());
        };
        let Some(id) = peer.and_then(|p| p.identity.as_ref()) else {
            return Err(Status::unauthenticated("no client certificate"));
        };
        if peer.is_some_and(|p| ctx.is_revoked(&p.serial)) {
            return Err(Status::unauthenticated(format!(
                "the certificate of {id} is revoked"
            )));
        }
        match (self.policy)(path) {
            Some(roles) if roles.contains(&id.role) => Ok(()),
            Some(_) => Err(Status::permission_denied(format!(
                "a {} may not call {path}",
                id.role
            ))),
            None => Err(Status::permission_denied(format!("{path} is not served"))),
        }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthzLayer`] wraps around a tonic router.
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerInfo>();
        match self.layer.check(req.uri().path(), peer) {
            Ok(()) => {
                // The clone is not ready; the one polled ready is taken (tower's rule).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await })
            }
            Err(status) => {
                tracing::warn!(path = %req.uri().path(), peer = ?peer.and_then(|p| p.remote), "refused: {}", status.message());
                if let Some(f) = &self.layer.on_refused {
                    f(req.uri().path(), peer, &status);
                }
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// Roles that may call each metad method. metad members may call everything (a follower
/// forwards its callers' requests to the leader after checking them itself); the operator's
/// `admin` everything but Raft. Storage nodes never get data keys.
pub fn metad_policy(path: &str) -> Option<&'static [Role]> {
    use Role::*;
    const RAFT: &[Role] = &[Metad];
    const ANY: &[Role] = &[Metad, Admin, Storaged, Gateway, VhostBlk];
    const OPERATOR: &[Role] = &[Metad, Admin];
    const NODE: &[Role] = &[Metad, Admin, Storaged];
    const S3: &[Role] = &[Metad, Admin, Gateway];
    const READ: &[Role] = &[Metad, Admin, Gateway, Storaged, VhostBlk];
    const KEYS: &[Role] = &[Metad, Admin, Gateway, VhostBlk];
    const VOLUME: &[Role] = &[Metad, Admin, VhostBlk];
    const VOLUME_READ: &[Role] = &[Metad, Admin, VhostBlk, Storaged];
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match service {
        "sov.metad.v1.Raft" => match method {
            "AppendEntries" | "Vote" | "InstallSnapshot" => Some(RAFT),
            _ => None,
        },
        "sov.metad.v1.Metad" => Some(match method {
            "Status" | "ListMembers" | "GetClusterMap" | "ListPools" => ANY,
            "AddMember" | "RemoveMember" | "CreatePool" | "CreateAccessKey" | "ListAccessKeys"
            | "DeleteAccessKey" => OPERATOR,
            "RegisterNode" | "Heartbeat" | "ListTombstones" | "AckTombstone" => NODE,
            "CreateBucket" | "DeleteBucket" | "SetBucketAccess" | "PutObject" | "GetObject"
            | "DeleteObject" | "ListObjects" | "GetAccessKey" | "CreateUpload" | "GetUpload"
            | "PutPart" | "ListParts" | "ListUploads" | "CompleteUpload" | "AbortUpload" => S3,
            "GetBucket" | "ListBuckets" => READ,
            "CreateDataKey" | "GetDataKey" => KEYS,
            "CreateVolume" | "DeleteVolume" | "ResizeVolume" | "CreateSnapshot"
            | "DeleteSnapshot" | "AcquireVolumeLease" | "RenewVolumeLease"
            | "ReleaseVolumeLease" | "SetVolumeState" => VOLUME,
            "GetVolume" | "ListVolumes" => VOLUME_READ,
            "ListAudit" | "MasterKeyStatus" | "RotateMasterKey" | "RotateBucketKey"
            | "RotateVolumeKey" | "PublishCrl" => OPERATOR,
            "GetCrl" => ANY,
            "AppendAudit" => RAFT,
            _ => return None,
        }),
        _ => None,
    }
}

/// Roles that may call each storaged method: chunks for storage nodes (replication,
/// recovery) and gateways, extents for storage nodes and vhost-blk; the operator both.
pub fn storaged_policy(path: &str) -> Option<&'static [Role]> {
    use Role::*;
    const CHUNKS: &[Role] = &[Storaged, Gateway, Admin];
    const EXTENTS: &[Role] = &[Storaged, VhostBlk, Admin];
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match service {
        "sov.storaged.v1.ChunkStore" => match method {
            "Put" | "Get" | "Delete" | "Stat" | "List" | "ListCorrupt" | "NodeInfo" => Some(CHUNKS),
            _ => None,
        },
        "sov.storaged.v1.ExtentStore" => match method {
            "WriteExtent" | "ReadExtent" | "FlushVolume" | "ListExtents" | "FenceVolume"
            | "PutSnapCopy" => Some(EXTENTS),
            _ => None,
        },
        _ => None,
    }
}

/// A server configuration for a client-facing HTTPS endpoint (the S3 gateway): TLS 1.2 and
/// 1.3, HTTP/2 and HTTP/1.1, no client certificate. `cert` may hold a chain.
pub fn https_server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    check_private(key)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("cannot read key {}: {e}", key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("cannot read certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::ALL_VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("HTTPS certificate and key")?;
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CertRequest};

    fn dir_for(ca: &Ca, root: &Path, role: Role, name: &str) -> PathBuf {
        let d = root.join(name);
        let req = CertRequest::node(NodeIdentity::new(role, Some("z1"), name).unwrap());
        ca.issue_into(&req, &d).unwrap();
        d
    }

    async fn handshake(
        server: &TlsContext,
        client: Arc<ClientConfig>,
        expect: Role,
    ) -> anyhow::Result<(Option<NodeIdentity>, Option<rustls::NamedGroup>)> {
        let (a, b) = tokio::io::duplex(64 << 10);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let srv = tokio::spawn(async move {
            let s = acceptor.accept(a).await?;
            let id = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(NodeIdentity::from_cert)
                .transpose()?;
            anyhow::Ok(id)
        });
        let name = ServerName::try_from(expect.dns_name())?;
        let c = tokio_rustls::TlsConnector::from(client)
            .connect(name, b)
            .await;
        let srv = srv.await?;
        let c = c?;
        let group = c
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name());
        Ok((srv?, group))
    }

    #[tokio::test]
    async fn nodes_agree_on_the_hybrid_post_quantum_group_and_see_each_others_identity() {
        let t = tempfile::tempdir().unwrap();
        let ca = Ca::init(&t.path().join("pki")).unwrap();
        let s = TlsContext::load(&dir_for(&ca, t.path(), Role::Storaged, "s1")).unwrap();
        let g = TlsContext::load(&dir_for(&ca, t.path(), Role::Gateway, "g1")).unwrap();
        let (id, group) = handshake(&s, g.client_config(), Role::Storaged)
            .await
            .unwrap();
        assert_eq!(group, Some(rustls::NamedGroup::X25519MLKEM768));
        assert_eq!(id.unwrap(), *g.identity());
        assert_eq!(s.identity().uri(), "sov://storaged/z1/s1");
    }

    #[tokio::test]
    async fn a_client_without_ml_kem_still_connects_with_x25519() {
        let t = tempfile::tempdir().unwrap();
        let ca = Ca::init(&t.path().join("pki")).unwrap();
        let s = TlsContext::load(&dir_for(&ca, t.path(), Role::Metad, "m1")).unwrap();
        let g = TlsContext::load(&dir_for(&ca, t.path(), Role::Admin, "op")).unwrap();
        let mut old = (*g.client_config()).clone();
        let p = CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        // Same verifier and key, a provider without ML-KEM.
        let roots = {
            let mut r = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(t.path().join("pki/ca.pem")).unwrap() {
                r.add(c.unwrap()).unwrap();
            }
            Arc::new(r)
        };
        let chain: Vec<_> = CertificateDer::pem_file_iter(t.path().join("op/cert.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(t.path().join("op/key.pem")).unwrap();
        old = ClientConfig::builder_with_provider(Arc::new(p))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap()
            .tap_alpn(old.alpn_protocols);
        let (_, group) = handshake(&s, Arc::new(old), Role::Metad).await.unwrap();
        assert_eq!(group, Some(rustls::NamedGroup::X25519));
    }

    trait TapAlpn {
        fn tap_alpn(self, a: Vec<Vec<u8>>) -> Self;
    }
    impl TapAlpn for ClientConfig {
        fn tap_alpn(mut self, a: Vec<Vec<u8>>) -> Self {
            self.alpn_protocols = a;
            self
        }
    }

    #[tokio::test]
    async fn a_server_of_another_role_or_ca_is_refused_by_the_client() {
        let t = tempfile::tempdir().unwrap();
        let ca = Ca::init(&t.path().join("pki")).unwrap();
        let other = Ca::init(&t.path().join("pki2")).unwrap();
        let g = TlsContext::load(&dir_for(&ca, t.path(), Role::Gateway, "g1")).unwrap();
        let s = TlsContext::load(&dir_for(&ca, t.path(), Role::Storaged, "s1")).unwrap();
        // A gateway answering where a storaged is expected.
        let e = handshake(&g, s.client_config(), Role::Storaged).await;
        assert!(e.is_err(), "a gateway passed as a storaged");
        // A storaged from another cluster's CA, either side.
        let s2 = TlsContext::load(&dir_for(&other, t.path(), Role::Storaged, "s2")).unwrap();
        assert!(
            handshake(&s2, g.client_config(), Role::Storaged)
                .await
                .is_err()
        );
        assert!(
            handshake(&s, s2.client_config(), Role::Storaged)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_revoked_client_is_refused_after_the_crl_changes() {
        let t = tempfile::tempdir().unwrap();
        let ca = Ca::init(&t.path().join("pki")).unwrap();
        let sdir = dir_for(&ca, t.path(), Role::Storaged, "s1");
        let s = TlsContext::load(&sdir).unwrap();
        let g = TlsContext::load(&dir_for(&ca, t.path(), Role::Gateway, "g1")).unwrap();
        handshake(&s, g.client_config(), Role::Storaged)
            .await
            .unwrap();
        let serial =
            cert_serial(&CertificateDer::from_pem_file(t.path().join("g1/cert.pem")).unwrap())
                .unwrap();
        let crl = ca.revoke(&serial).unwrap();
        std::fs::write(sdir.join("crl.der"), crl).unwrap();
        std::thread::sleep(RELOAD_CHECK + Duration::from_millis(100));
        assert!(s.is_revoked(&serial));
        assert!(
            handshake(&s, g.client_config(), Role::Storaged)
                .await
                .is_err()
        );
        let layer = AuthzLayer::new(storaged_policy, Transport::Tls(s.clone()));
        let peer = PeerInfo {
            remote: None,
            identity: Some(g.identity().clone()),
            serial,
        };
        let e = layer
            .check("/sov.storaged.v1.ChunkStore/Get", Some(&peer))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn roles_are_checked_per_method() {
        let t = tempfile::tempdir().unwrap();
        let ca = Ca::init(&t.path().join("pki")).unwrap();
        let s = TlsContext::load(&dir_for(&ca, t.path(), Role::Metad, "m1")).unwrap();
        let layer = AuthzLayer::new(metad_policy, Transport::Tls(s));
        let peer = |role| PeerInfo {
            remote: None,
            identity: Some(NodeIdentity::new(role, None, "x").unwrap()),
            serial: vec![1],
        };
        let code = |path: &str, role| layer.check(path, Some(&peer(role))).err().map(|e| e.code());
        assert_eq!(code("/sov.metad.v1.Raft/Vote", Role::Metad), None);
        assert_eq!(
            code("/sov.metad.v1.Raft/Vote", Role::Gateway),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code("/sov.metad.v1.Metad/RegisterNode", Role::Gateway),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code("/sov.metad.v1.Metad/RegisterNode", Role::Storaged),
            None
        );
        assert_eq!(
            code("/sov.metad.v1.Metad/GetDataKey", Role::Storaged),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code("/sov.metad.v1.Metad/Nope", Role::Admin),
            Some(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            layer
                .check("/sov.metad.v1.Metad/Status", None)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    /// Every rpc in the protos has an entry, so a new method cannot go unchecked by accident.
    #[test]
    fn the_policies_cover_every_rpc_in_the_protos() {
        for (proto, policy) in [
            (
                include_str!("../../proto/proto/metad.proto"),
                metad_policy as Policy,
            ),
            (
                include_str!("../../proto/proto/storaged.proto"),
                storaged_policy,
            ),
        ] {
            let package = proto
                .lines()
                .find_map(|l| l.trim().strip_prefix("package "))
                .unwrap()
                .trim_end_matches(';');
            let mut service = "";
            let mut n = 0;
            for l in proto.lines().map(str::trim) {
                if let Some(s) = l.strip_prefix("service ") {
                    service = s.split_whitespace().next().unwrap();
                } else if let Some(r) = l.strip_prefix("rpc ") {
                    let m = r.split(['(', ' ']).next().unwrap();
                    let path = format!("/{package}.{service}/{m}");
                    assert!(policy(&path).is_some(), "{path} has no policy");
                    n += 1;
                }
            }
            assert!(n > 5, "found only {n} rpcs");
        }
    }

    #[test]
    fn identities_round_trip_and_bad_ones_are_refused() {
        let id = NodeIdentity::new(Role::VhostBlk, None, "vb-1").unwrap();
        assert_eq!(id.uri(), "sov://vhost-blk/-/vb-1");
        assert_eq!(NodeIdentity::parse_uri(&id.uri()), Some(id));
        assert!(NodeIdentity::parse_uri("sov://root/-/x").is_none());
        assert!(NodeIdentity::parse_uri("sov://metad/a/b/c").is_none());
        assert!(NodeIdentity::new(Role::Metad, None, "UPPER").is_err());
        assert!(is_loopback("127.0.0.1:7000"));
        assert!(is_loopback("http://[::1]:7000"));
        assert!(is_loopback("localhost:1"));
        assert!(!is_loopback("10.0.0.1:7000"));
        assert!(!is_loopback("0.0.0.0:7000"));
    }
}
