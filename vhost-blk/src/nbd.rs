//! NBD (Network Block Device) server: fixed newstyle handshake, simple and structured replies,
//! the `base:allocation` metadata context, and concurrent request processing per connection.
//!
//! Protocol reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//!
//! TLS (`NBD_OPT_STARTTLS`, rustls) when configured with [`NbdServer::with_tls`]: in
//! `Required` mode every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD` until the
//! client upgraded, so no export name or data crosses the network in clear.
//!
//! Each connection runs a reader loop (parses requests in order, reads WRITE payloads, spawns
//! one task per request) and a writer task that serializes replies from an mpsc channel.
//! The number of in-flight requests and the bytes they hold are bounded by semaphores whose
//! permits are released only once the reply has been written.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::export::{BlockDevice, BlockError, Exports};

// ---------------------------------------------------------------------------------------------
// Protocol constants
// ---------------------------------------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_SEND_DF: u16 = 1 << 7;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types.
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
const CMD_FLAG_FUA: u16 = 1 << 0;

// Structured reply flags and types.
const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Errors.
const NBD_EPERM: u32 = 1;
const NBD_EIO: u32 = 5;
const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;

/// The only metadata context we offer, and the id we give it.
const META_BASE_ALLOCATION: &str = "base:allocation";
const META_BASE_ALLOCATION_ID: u32 = 1;

/// Largest READ/WRITE payload we accept (and advertise as maximum payload size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option payload accepted during the handshake.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Maximum length of a string (names, messages) per the spec.
const MAX_STRING: usize = 4096;
/// Options accepted on one connection before we give up on the client.
const MAX_OPTIONS: usize = 1024;
/// Default limits.
const DEFAULT_MAX_IN_FLIGHT: usize = 128;
const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 128 * 1024 * 1024;
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client violated the protocol; the connection was closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist; the connection was closed.
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    /// The client did not finish the handshake in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
}

/// An NBD server over a set of exports.
pub struct NbdServer<E: Exports> {
    exports: Arc<E>,
    max_in_flight: usize,
    max_in_flight_bytes: usize,
    handshake_timeout: Duration,
    tls: Option<NbdTls>,
}

/// The current TLS configuration (a new one after a certificate or CRL change).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// STARTTLS for the NBD listener.
#[derive(Clone)]
pub struct NbdTls {
    pub config: TlsSource,
    pub mode: TlsMode,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls").field("mode", &self.mode).finish()
    }
}

/// Whether clients may stay in clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS offered; clients may also go on without it.
    Optional,
    /// Nothing but STARTTLS (or ABORT) until the client upgraded.
    Required,
}

/// A connection before or after STARTTLS.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Only while the upgrade runs.
    Upgrading,
}

impl<S> MaybeTls<S> {
    fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

fn upgrading() -> std::io::Error {
    std::io::Error::other("connection in the middle of a TLS upgrade")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl<E: Exports> NbdServer<E> {
    /// A server with default limits (128 requests / 128 MiB in flight per connection,
    /// 30 s handshake timeout).
    pub fn new(exports: Arc<E>) -> Self {
        Self {
            exports,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            tls: None,
        }
    }

    /// Offers STARTTLS with this configuration, optionally or as the only way in.
    pub fn with_tls(mut self, tls: NbdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Overrides the per-connection in-flight limits (requests, payload bytes). The byte
    /// limit is raised to at least `MAX_PAYLOAD` so a maximal request can always proceed.
    pub fn with_limits(mut self, max_in_flight: usize, max_in_flight_bytes: usize) -> Self {
        self.max_in_flight = max_in_flight.max(1);
        self.max_in_flight_bytes = max_in_flight_bytes.max(MAX_PAYLOAD as usize);
        self
    }

    /// Overrides the time a client gets to complete option negotiation.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Serves TCP connections until `shutdown` resolves. Then stops accepting, tells every
    /// connection to stop reading new requests, lets in-flight requests finish and their
    /// replies go out, and returns when all connections have closed.
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        self.serve(listener, shutdown).await
    }

    /// Serves Unix socket connections until `shutdown` resolves (same semantics as
    /// [`serve_tcp`](Self::serve_tcp)).
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        shutdown: impl Future<Output = ()>,
    ) {
        self.serve(listener, shutdown).await
    }

    async fn serve<L: Listener>(self: Arc<Self>, listener: L, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept_one() => match accepted {
                    Ok((stream, peer)) => {
                        let server = self.clone();
                        let rx = stop_rx.clone();
                        conns.spawn(async move {
                            debug!(%peer, "nbd: connection");
                            let r = server.handle_inner(stream, Some(rx)).await;
                            log_end(&r, &peer);
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "nbd: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        info!("nbd: listener shutting down");
        let _ = stop_tx.send(true);
        while conns.join_next().await.is_some() {}
    }

    /// Serves one connection: handshake, then transmission until the client disconnects.
    pub async fn handle<S>(self: Arc<Self>, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.handle_inner(stream, None).await
    }

    async fn handle_inner<S>(
        self: Arc<Self>,
        stream: S,
        mut stop: Option<watch::Receiver<bool>>,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut stream = MaybeTls::Plain(stream);
        let negotiated = tokio::select! {
            r = tokio::time::timeout(self.handshake_timeout, self.handshake(&mut stream)) => {
                match r {
                    Ok(r) => r?,
                    Err(_) => return Err(NbdError::HandshakeTimeout),
                }
            }
            _ = wait_stop(&mut stop) => return Ok(()),
        };
        let Some(session) = negotiated else {
            return Ok(());
        };
        self.transmission(stream, session, stop).await
    }

    // -----------------------------------------------------------------------------------------
    // Handshake
    // -----------------------------------------------------------------------------------------

    /// Runs option negotiation. `Ok(None)` means the client aborted cleanly.
    async fn handshake<S>(
        &self,
        stream: &mut MaybeTls<S>,
    ) -> Result<Option<Session<E::Device>>, NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut hello = BytesMut::with_capacity(18);
        hello.put_u64(NBDMAGIC);
        hello.put_u64(IHAVEOPT);
        hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        stream.write_all(&hello).await?;
        stream.flush().await?;

        let client_flags = stream.read_u32().await?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(protocol(format!("unknown client flags {client_flags:#x}")));
        }
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(protocol("client does not support fixed newstyle"));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

        let mut state = OptState::default();
        for _ in 0..MAX_OPTIONS {
            let magic = match stream.read_u64().await {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    debug!("nbd: client closed during negotiation");
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            };
            if magic != IHAVEOPT {
                return Err(protocol(format!("bad option magic {magic:#x}")));
            }
            let opt = stream.read_u32().await?;
            let len = stream.read_u32().await?;
            if len > MAX_OPTION_LEN {
                // We will not consume that much data; tell the client (unless it cannot be
                // told) and hang up, since the stream is now out of sync.
                if opt != OPT_EXPORT_NAME {
                    send_opt_reply(stream, opt, REP_ERR_TOO_BIG, b"option too long").await?;
                }
                return Err(protocol(format!("option {opt} length {len} too large")));
            }
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).await?;
            debug!(opt, len, "nbd: option");

            let tls_required = self
                .tls
                .as_ref()
                .is_some_and(|t| t.mode == TlsMode::Required);
            if tls_required && !stream.is_tls() && opt != OPT_STARTTLS && opt != OPT_ABORT {
                if opt == OPT_EXPORT_NAME {
                    // No reply is possible to EXPORT_NAME but the export itself.
                    return Err(protocol("EXPORT_NAME before STARTTLS on a TLS-only server"));
                }
                send_opt_reply(
                    stream,
                    opt,
                    REP_ERR_TLS_REQD,
                    b"TLS required: STARTTLS first",
                )
                .await?;
                continue;
            }
            match opt {
                OPT_STARTTLS => {
                    let Some(NbdTls { config, .. }) = &self.tls else {
                        send_opt_reply(stream, opt, REP_ERR_UNSUP, b"no TLS here").await?;
                        continue;
                    };
                    if stream.is_tls() || !data.is_empty() {
                        send_opt_reply(stream, opt, REP_ERR_INVALID, b"STARTTLS not valid here")
                            .await?;
                        continue;
                    }
                    send_opt_reply(stream, opt, REP_ACK, &[]).await?;
                    let MaybeTls::Plain(plain) = std::mem::replace(stream, MaybeTls::Upgrading)
                    else {
                        return Err(protocol("STARTTLS on a connection that is not plain"));
                    };
                    let tls = tokio_rustls::TlsAcceptor::from(config())
                        .accept(plain)
                        .await?;
                    *stream = MaybeTls::Tls(Box::new(tls));
                    // Options negotiated before the upgrade do not carry over.
                    state = OptState::default();
                    debug!("nbd: TLS established");
                }
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8(data)
                        .map_err(|_| protocol("export name is not UTF-8"))?;
                    let Some(device) = self.exports.open(&name).await else {
                        warn!(export = %name, "nbd: EXPORT_NAME for unknown export");
                        return Err(NbdError::UnknownExport(name));
                    };
                    let flags = transmission_flags(&*device, state.structured);
                    let mut buf = BytesMut::with_capacity(10 + 124);
                    buf.put_u64(device.size());
                    buf.put_u16(flags);
                    if !no_zeroes {
                        buf.put_bytes(0, 124);
                    }
                    stream.write_all(&buf).await?;
                    stream.flush().await?;
                    return Ok(Some(state.into_session(device, &name)));
                }
                OPT_ABORT => {
                    // The client may already have gone; ignore errors.
                    let _ = send_opt_reply(stream, opt, REP_ACK, &[]).await;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        send_opt_reply(stream, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                        continue;
                    }
                    for (name, desc) in self.exports.list() {
                        let name = truncate_str(&name, MAX_STRING);
                        let desc = truncate_str(&desc, MAX_STRING);
                        let mut p = BytesMut::with_capacity(4 + name.len() + desc.len());
                        p.put_u32(name.len() as u32);
                        p.put_slice(name.as_bytes());
                        p.put_slice(desc.as_bytes());
                        send_opt_reply(stream, opt, REP_SERVER, &p).await?;
                    }
                    send_opt_reply(stream, opt, REP_ACK, &[]).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, requests)) = parse_info_request(&data) else {
                        send_opt_reply(stream, opt, REP_ERR_INVALID, b"malformed INFO/GO").await?;
                        continue;
                    };
                    let Some(device) = self.exports.open(&name).await else {
                        debug!(export = %name, "nbd: INFO/GO for unknown export");
                        send_opt_reply(stream, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                        continue;
                    };
                    let flags = transmission_flags(&*device, state.structured);
                    let mut p = BytesMut::with_capacity(12);
                    p.put_u16(INFO_EXPORT);
                    p.put_u64(device.size());
                    p.put_u16(flags);
                    send_opt_reply(stream, opt, REP_INFO, &p).await?;

                    // Block size constraints are always sent (clients ignore unrequested info).
                    let preferred = device
                        .block_size()
                        .clamp(512, MAX_PAYLOAD)
                        .next_power_of_two();
                    let mut p = BytesMut::with_capacity(14);
                    p.put_u16(INFO_BLOCK_SIZE);
                    p.put_u32(1);
                    p.put_u32(preferred);
                    p.put_u32(MAX_PAYLOAD);
                    send_opt_reply(stream, opt, REP_INFO, &p).await?;

                    if requests.contains(&INFO_NAME) {
                        let n = truncate_str(&name, MAX_STRING);
                        let mut p = BytesMut::with_capacity(2 + n.len());
                        p.put_u16(INFO_NAME);
                        p.put_slice(n.as_bytes());
                        send_opt_reply(stream, opt, REP_INFO, &p).await?;
                    }
                    if requests.contains(&INFO_DESCRIPTION) {
                        let desc = self
                            .exports
                            .list()
                            .into_iter()
                            .find(|(n, _)| *n == name)
                            .map(|(_, d)| d)
                            .unwrap_or_default();
                        if !desc.is_empty() {
                            let d = truncate_str(&desc, MAX_STRING);
                            let mut p = BytesMut::with_capacity(2 + d.len());
                            p.put_u16(INFO_DESCRIPTION);
                            p.put_slice(d.as_bytes());
                            send_opt_reply(stream, opt, REP_INFO, &p).await?;
                        }
                    }
                    send_opt_reply(stream, opt, REP_ACK, &[]).await?;
                    if opt == OPT_GO {
                        return Ok(Some(state.into_session(device, &name)));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        send_opt_reply(stream, opt, REP_ERR_INVALID, b"takes no data").await?;
                        continue;
                    }
                    state.structured = true;
                    send_opt_reply(stream, opt, REP_ACK, &[]).await?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = opt == OPT_SET_META_CONTEXT;
                    if set {
                        // Replaces the previous selection, even on failure.
                        state.meta_export = None;
                    }
                    if !state.structured {
                        send_opt_reply(stream, opt, REP_ERR_INVALID, b"structured replies first")
                            .await?;
                        continue;
                    }
                    let Some((name, queries)) = parse_meta_request(&data) else {
                        send_opt_reply(stream, opt, REP_ERR_INVALID, b"malformed meta request")
                            .await?;
                        continue;
                    };
                    if self.exports.open(&name).await.is_none() {
                        send_opt_reply(stream, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                        continue;
                    }
                    let selected = if set {
                        queries.iter().any(|q| q == META_BASE_ALLOCATION)
                    } else {
                        queries.is_empty()
                            || queries
                                .iter()
                                .any(|q| q == META_BASE_ALLOCATION || q == "base:")
                    };
                    if selected {
                        let mut p = BytesMut::with_capacity(4 + META_BASE_ALLOCATION.len());
                        p.put_u32(if set { META_BASE_ALLOCATION_ID } else { 0 });
                        p.put_slice(META_BASE_ALLOCATION.as_bytes());
                        send_opt_reply(stream, opt, REP_META_CONTEXT, &p).await?;
                        if set {
                            state.meta_export = Some(name);
                        }
                    }
                    send_opt_reply(stream, opt, REP_ACK, &[]).await?;
                }
                _ => {
                    debug!(opt, "nbd: unsupported option");
                    send_opt_reply(stream, opt, REP_ERR_UNSUP, b"unsupported option").await?;
                }
            }
        }
        Err(protocol("too many options"))
    }

    // -----------------------------------------------------------------------------------------
    // Transmission
    // -----------------------------------------------------------------------------------------

    async fn transmission<S>(
        &self,
        stream: S,
        session: Session<E::Device>,
        mut stop: Option<watch::Receiver<bool>>,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let (tx, rx) = mpsc::unbounded_channel::<Reply>();
        let writer = tokio::spawn(writer_task(wr, rx));
        let ctx = Arc::new(ReqCtx {
            device: session.device,
            structured: session.structured,
            block_status: session.block_status,
            tx,
        });
        let count = Arc::new(Semaphore::new(self.max_in_flight));
        let bytes_budget = Arc::new(Semaphore::new(self.max_in_flight_bytes));
        let mut tasks = JoinSet::new();
        let mut result = Ok(());

        loop {
            while tasks.try_join_next().is_some() {}
            // Only the header read may be cancelled (by shutdown or writer death); after
            // that the connection is closed, so a partly read header does not matter.
            let hdr = tokio::select! {
                h = read_header(&mut rd) => h,
                _ = wait_stop(&mut stop) => {
                    debug!("nbd: server shutdown, closing connection");
                    break;
                }
                _ = ctx.tx.closed() => {
                    debug!("nbd: reply writer gone, closing connection");
                    break;
                }
            };
            let hdr = match hdr {
                Ok(Some(h)) => h,
                Ok(None) => {
                    debug!("nbd: client closed connection");
                    break;
                }
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            if hdr.magic != REQUEST_MAGIC {
                warn!(magic = hdr.magic, "nbd: bad request magic, closing");
                result = Err(protocol(format!("bad request magic {:#x}", hdr.magic)));
                break;
            }
            debug!(
                cmd = hdr.cmd,
                flags = hdr.flags,
                cookie = hdr.cookie,
                offset = hdr.offset,
                len = hdr.len,
                "nbd: request"
            );
            if hdr.cmd == CMD_DISC {
                debug!("nbd: client requested disconnect");
                break;
            }
            if hdr.cmd == CMD_WRITE && hdr.len > MAX_PAYLOAD {
                warn!(len = hdr.len, "nbd: oversized WRITE, closing");
                result = Err(protocol(format!("WRITE of {} bytes", hdr.len)));
                break;
            }

            // Bound what is in flight before reading any payload.
            let held = match hdr.cmd {
                CMD_READ | CMD_WRITE => hdr.len.min(MAX_PAYLOAD),
                _ => 0,
            };
            let Ok(count_permit) = count.clone().acquire_owned().await else {
                break;
            };
            let Ok(bytes_permit) = bytes_budget.clone().acquire_many_owned(held).await else {
                break;
            };
            let permits = Permits {
                _count: count_permit,
                _bytes: bytes_permit,
            };

            let payload = if hdr.cmd == CMD_WRITE {
                let mut buf = BytesMut::zeroed(hdr.len as usize);
                if let Err(e) = rd.read_exact(&mut buf).await {
                    result = Err(e.into());
                    break;
                }
                Some(buf.freeze())
            } else {
                None
            };

            let ctx = ctx.clone();
            tasks.spawn(async move {
                let mut guard = ReplyGuard {
                    ctx: &ctx,
                    cookie: hdr.cookie,
                    permits: Some(permits),
                };
                let reply = execute(&ctx, &hdr, payload).await;
                guard.send(reply);
            });
        }

        // Let in-flight requests finish and their replies go out, then close.
        while tasks.join_next().await.is_some() {}
        drop(ctx);
        match writer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e.into());
                }
            }
            Err(e) => warn!(error = %e, "nbd: writer task failed"),
        }
        result
    }
}

// ---------------------------------------------------------------------------------------------
// Negotiation helpers
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct OptState {
    structured: bool,
    /// Export for which `base:allocation` was selected by the last SET_META_CONTEXT.
    meta_export: Option<String>,
}

impl OptState {
    fn into_session<D>(self, device: Arc<D>, name: &str) -> Session<D> {
        let block_status = self.structured && self.meta_export.as_deref() == Some(name);
        Session {
            device,
            structured: self.structured,
            block_status,
        }
    }
}

struct Session<D> {
    device: Arc<D>,
    structured: bool,
    block_status: bool,
}

fn transmission_flags<D: BlockDevice>(device: &D, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    if device.read_only() {
        flags |= TFLAG_READ_ONLY;
    }
    if structured {
        // We always answer a READ with a single data chunk, so "don't fragment" is free.
        flags |= TFLAG_SEND_DF;
    }
    flags
}

/// Logs how a connection ended (protocol errors were already logged at warn level).
/// A listener NBD clients connect to: TCP or a Unix socket.
trait Listener: Send {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and a name for its peer.
    fn accept_one(&self) -> impl Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, peer) = self.accept().await?;
        // Small replies must not wait for Nagle's algorithm.
        let _ = s.set_nodelay(true);
        Ok((s, peer.to_string()))
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, _) = self.accept().await?;
        Ok((s, "unix".to_string()))
    }
}

fn log_end(r: &Result<(), NbdError>, peer: &str) {
    match r {
        Ok(()) => debug!(peer, "nbd: connection closed"),
        Err(NbdError::HandshakeTimeout) => warn!(peer, "nbd: handshake timed out"),
        Err(e) => debug!(peer, error = %e, "nbd: connection ended"),
    }
}

fn protocol(msg: impl Into<String>) -> NbdError {
    let msg = msg.into();
    warn!(%msg, "nbd: protocol error");
    NbdError::Protocol(msg)
}

async fn send_opt_reply<S>(stream: &mut S, opt: u32, rep: u32, data: &[u8]) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(20 + data.len());
    buf.put_u64(OPT_REPLY_MAGIC);
    buf.put_u32(opt);
    buf.put_u32(rep);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
    stream.write_all(&buf).await?;
    stream.flush().await
}

/// Parses INFO/GO data: name length, name, request count, requests. Must be exact.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut cur = Cursor(data);
    let name_len = cur.u32()? as usize;
    let name = std::str::from_utf8(cur.take(name_len)?).ok()?.to_owned();
    let n = cur.u16()? as usize;
    let mut reqs = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        reqs.push(cur.u16()?);
    }
    cur.0.is_empty().then_some((name, reqs))
}

/// Parses LIST/SET_META_CONTEXT data: name length, name, query count, queries.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut cur = Cursor(data);
    let name_len = cur.u32()? as usize;
    let name = std::str::from_utf8(cur.take(name_len)?).ok()?.to_owned();
    let n = cur.u32()? as usize;
    let mut queries = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let len = cur.u32()? as usize;
        queries.push(std::str::from_utf8(cur.take(len)?).ok()?.to_owned());
    }
    cur.0.is_empty().then_some((name, queries))
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn wait_stop(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            if rx.wait_for(|v| *v).await.is_err() {
                // Sender gone without signalling: never stop.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Header {
    magic: u32,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Reads one 28-byte request header. `Ok(None)` on a clean EOF before the first byte.
async fn read_header<R: AsyncRead + Unpin>(rd: &mut R) -> std::io::Result<Option<Header>> {
    let mut b = [0u8; 28];
    let n = rd.read(&mut b).await?;
    if n == 0 {
        return Ok(None);
    }
    rd.read_exact(&mut b[n..]).await?;
    let mut cur = Cursor(&b);
    let bad = || std::io::Error::other("short header");
    Ok(Some(Header {
        magic: cur.u32().ok_or_else(bad)?,
        flags: cur.u16().ok_or_else(bad)?,
        cmd: cur.u16().ok_or_else(bad)?,
        cookie: u64::from_be_bytes(cur.take(8).ok_or_else(bad)?.try_into().map_err(|_| bad())?),
        offset: u64::from_be_bytes(cur.take(8).ok_or_else(bad)?.try_into().map_err(|_| bad())?),
        len: cur.u32().ok_or_else(bad)?,
    }))
}

struct ReqCtx<D> {
    device: Arc<D>,
    structured: bool,
    block_status: bool,
    tx: mpsc::UnboundedSender<Reply>,
}

/// Holds a request's in-flight permits until its reply has been written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// What a request produced.
enum Outcome {
    /// Success without data.
    Done,
    /// READ data (for `offset`).
    Data(u64, Bytes),
    /// Block status: one extent of `len` bytes with `flags`.
    Extent(u32, u32),
    /// Failure with an NBD errno and a message.
    Err(u32, String),
}

/// Sends the reply exactly once; if the request task panics, the guard replies `NBD_EIO`
/// from its destructor so the client is not left waiting.
struct ReplyGuard<'a, D> {
    ctx: &'a ReqCtx<D>,
    cookie: u64,
    permits: Option<Permits>,
}

impl<D> ReplyGuard<'_, D> {
    fn send(&mut self, outcome: Outcome) {
        if let Some(permits) = self.permits.take() {
            let bytes = encode_reply(self.ctx.structured, self.cookie, outcome);
            let _ = self.ctx.tx.send(Reply {
                bytes,
                _permits: permits,
            });
        }
    }
}

impl<D> Drop for ReplyGuard<'_, D> {
    fn drop(&mut self) {
        if self.permits.is_some() {
            warn!(
                cookie = self.cookie,
                "nbd: request task aborted, replying EIO"
            );
            self.send(Outcome::Err(NBD_EIO, "internal error".into()));
        }
    }
}

fn errno(e: &BlockError) -> u32 {
    match e {
        BlockError::OutOfRange(_) => NBD_EINVAL,
        BlockError::NoSpace(_) => NBD_ENOSPC,
        BlockError::NotPermitted(_) => NBD_EPERM,
        BlockError::Io(_) => NBD_EIO,
    }
}

fn fail(e: BlockError) -> Outcome {
    Outcome::Err(errno(&e), e.to_string())
}

/// Checks `offset..offset+len` against the device size.
fn in_range(offset: u64, len: u32, size: u64) -> bool {
    offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size)
}

async fn execute<D: BlockDevice>(ctx: &ReqCtx<D>, hdr: &Header, payload: Option<Bytes>) -> Outcome {
    let dev = &*ctx.device;
    let fua = hdr.flags & CMD_FLAG_FUA != 0;
    let (off, len) = (hdr.offset, hdr.len);
    let outcome = match hdr.cmd {
        CMD_READ => {
            if len == 0 || len > MAX_PAYLOAD {
                Outcome::Err(NBD_EINVAL, format!("invalid read length {len}"))
            } else if !in_range(off, len, dev.size()) {
                Outcome::Err(NBD_EINVAL, "read past end of device".into())
            } else {
                match dev.read(off, len).await {
                    Ok(data) if data.len() == len as usize => Outcome::Data(off, data),
                    Ok(data) => Outcome::Err(
                        NBD_EIO,
                        format!("device returned {} bytes, wanted {len}", data.len()),
                    ),
                    Err(e) => fail(e),
                }
            }
        }
        CMD_WRITE => {
            let data = payload.unwrap_or_default();
            if dev.read_only() {
                Outcome::Err(NBD_EPERM, "device is read-only".into())
            } else if len == 0 {
                Outcome::Err(NBD_EINVAL, "zero-length write".into())
            } else if !in_range(off, len, dev.size()) {
                Outcome::Err(NBD_ENOSPC, "write past end of device".into())
            } else {
                match dev.write(off, data, fua).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => fail(e),
                }
            }
        }
        CMD_FLUSH => match dev.flush().await {
            Ok(()) => Outcome::Done,
            Err(e) => fail(e),
        },
        CMD_TRIM => {
            if dev.read_only() {
                Outcome::Err(NBD_EPERM, "device is read-only".into())
            } else if len == 0 {
                Outcome::Err(NBD_EINVAL, "zero-length trim".into())
            } else if !in_range(off, len, dev.size()) {
                Outcome::Err(NBD_EINVAL, "trim past end of device".into())
            } else {
                match dev.trim(off, len).await {
                    Ok(()) if fua => match dev.flush().await {
                        Ok(()) => Outcome::Done,
                        Err(e) => fail(e),
                    },
                    Ok(()) => Outcome::Done,
                    Err(e) => fail(e),
                }
            }
        }
        CMD_WRITE_ZEROES => {
            // NBD_CMD_FLAG_NO_HOLE is accepted: the device decides how to zero.
            if dev.read_only() {
                Outcome::Err(NBD_EPERM, "device is read-only".into())
            } else if len == 0 {
                Outcome::Err(NBD_EINVAL, "zero-length write zeroes".into())
            } else if !in_range(off, len, dev.size()) {
                Outcome::Err(NBD_ENOSPC, "write zeroes past end of device".into())
            } else {
                match dev.write_zeroes(off, len, fua).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => fail(e),
                }
            }
        }
        CMD_BLOCK_STATUS if ctx.block_status => {
            if len == 0 {
                Outcome::Err(NBD_EINVAL, "zero-length block status".into())
            } else if !in_range(off, len, dev.size()) {
                Outcome::Err(NBD_EINVAL, "block status past end of device".into())
            } else {
                // Everything is reported as allocated data (status flags 0).
                Outcome::Extent(len, 0)
            }
        }
        other => Outcome::Err(NBD_EINVAL, format!("unsupported command {other}")),
    };
    if let Outcome::Err(code, msg) = &outcome {
        debug!(cookie = hdr.cookie, cmd = hdr.cmd, code, %msg, "nbd: request failed");
    }
    outcome
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// One encoded reply: header bytes plus optional payload (kept separate to avoid copying).
struct Reply {
    bytes: (BytesMut, Option<Bytes>),
    _permits: Permits,
}

fn encode_reply(structured: bool, cookie: u64, outcome: Outcome) -> (BytesMut, Option<Bytes>) {
    let mut h = BytesMut::with_capacity(32);
    if !structured {
        h.put_u32(SIMPLE_REPLY_MAGIC);
        match outcome {
            Outcome::Done | Outcome::Extent(..) => {
                h.put_u32(0);
                h.put_u64(cookie);
                (h, None)
            }
            Outcome::Data(_, data) => {
                h.put_u32(0);
                h.put_u64(cookie);
                (h, Some(data))
            }
            Outcome::Err(code, _) => {
                h.put_u32(code);
                h.put_u64(cookie);
                (h, None)
            }
        }
    } else {
        h.put_u32(STRUCTURED_REPLY_MAGIC);
        h.put_u16(REPLY_FLAG_DONE);
        match outcome {
            Outcome::Done => {
                // NBD_REPLY_TYPE_NONE.
                h.put_u16(0);
                h.put_u64(cookie);
                h.put_u32(0);
                (h, None)
            }
            Outcome::Data(offset, data) => {
                h.put_u16(REPLY_TYPE_OFFSET_DATA);
                h.put_u64(cookie);
                h.put_u32(8 + data.len() as u32);
                h.put_u64(offset);
                (h, Some(data))
            }
            Outcome::Extent(len, flags) => {
                h.put_u16(REPLY_TYPE_BLOCK_STATUS);
                h.put_u64(cookie);
                h.put_u32(12);
                h.put_u32(META_BASE_ALLOCATION_ID);
                h.put_u32(len);
                h.put_u32(flags);
                (h, None)
            }
            Outcome::Err(code, msg) => {
                let msg = truncate_str(&msg, MAX_STRING);
                h.put_u16(REPLY_TYPE_ERROR);
                h.put_u64(cookie);
                h.put_u32(6 + msg.len() as u32);
                h.put_u32(code);
                h.put_u16(msg.len() as u16);
                h.put_slice(msg.as_bytes());
                (h, None)
            }
        }
    }
}

/// Writes replies in the order they complete; flushes whenever the queue runs dry.
async fn writer_task<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    let res = async {
        while let Some(reply) = rx.recv().await {
            write_reply(&mut wr, reply).await?;
            while let Ok(reply) = rx.try_recv() {
                write_reply(&mut wr, reply).await?;
            }
            wr.flush().await?;
        }
        wr.shutdown().await
    }
    .await;
    if let Err(e) = &res {
        debug!(error = %e, "nbd: reply write failed");
    }
    res
}

async fn write_reply<W: AsyncWrite + Unpin>(wr: &mut W, reply: Reply) -> std::io::Result<()> {
    let (head, payload) = reply.bytes;
    wr.write_all(&head).await?;
    if let Some(p) = payload {
        wr.write_all(&p).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::DuplexStream;

    struct TestDev {
        data: Mutex<Vec<u8>>,
        ro: bool,
        delay: Duration,
    }

    impl BlockDevice for TestDev {
        fn size(&self) -> u64 {
            self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
        }
        fn read_only(&self) -> bool {
            self.ro
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
            tokio::time::sleep(self.delay).await;
            let d = self
                .data
                .lock()
                .map_err(|e| BlockError::Io(e.to_string()))?;
            let end = offset as usize + len as usize;
            d.get(offset as usize..end)
                .map(Bytes::copy_from_slice)
                .ok_or_else(|| BlockError::OutOfRange("read".into()))
        }
        async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BlockError> {
            let mut d = self
                .data
                .lock()
                .map_err(|e| BlockError::Io(e.to_string()))?;
            let end = offset as usize + data.len();
            d.get_mut(offset as usize..end)
                .ok_or_else(|| BlockError::NoSpace("write".into()))?
                .copy_from_slice(&data);
            Ok(())
        }
        async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), BlockError> {
            let mut d = self
                .data
                .lock()
                .map_err(|e| BlockError::Io(e.to_string()))?;
            let end = offset as usize + len as usize;
            d.get_mut(offset as usize..end)
                .ok_or_else(|| BlockError::NoSpace("zero".into()))?
                .fill(0);
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u32) -> Result<(), BlockError> {
            self.write_zeroes(offset, len, false).await
        }
        async fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn id(&self) -> String {
            "test".into()
        }
    }

    struct TestExports {
        rw: Arc<TestDev>,
        ro: Arc<TestDev>,
        slow: Arc<TestDev>,
    }

    impl Exports for TestExports {
        type Device = TestDev;
        async fn open(&self, name: &str) -> Option<Arc<TestDev>> {
            match name {
                "rw" => Some(self.rw.clone()),
                "ro" => Some(self.ro.clone()),
                "slow" => Some(self.slow.clone()),
                _ => None,
            }
        }
        fn list(&self) -> Vec<(String, String)> {
            vec![
                ("rw".into(), "read-write".into()),
                ("ro".into(), "read-only".into()),
                ("slow".into(), "slow".into()),
            ]
        }
    }

    const SIZE: usize = 1 << 20;

    fn dev(ro: bool, delay_ms: u64) -> Arc<TestDev> {
        Arc::new(TestDev {
            data: Mutex::new(vec![0; SIZE]),
            ro,
            delay: Duration::from_millis(delay_ms),
        })
    }

    /// Starts a server on one end of a duplex pipe; returns the client end and the task.
    fn start() -> (DuplexStream, tokio::task::JoinHandle<Result<(), NbdError>>) {
        let exports = Arc::new(TestExports {
            rw: dev(false, 0),
            ro: dev(true, 0),
            slow: dev(false, 100),
        });
        let server = Arc::new(NbdServer::new(exports));
        let (client, srv) = tokio::io::duplex(1 << 20);
        (client, tokio::spawn(server.handle(srv)))
    }

    async fn greet(c: &mut DuplexStream, client_flags: u32) {
        assert_eq!(c.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(c.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(
            c.read_u16().await.unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c.write_u32(client_flags).await.unwrap();
    }

    async fn send_opt(c: &mut DuplexStream, opt: u32, data: &[u8]) {
        c.write_u64(IHAVEOPT).await.unwrap();
        c.write_u32(opt).await.unwrap();
        c.write_u32(data.len() as u32).await.unwrap();
        c.write_all(data).await.unwrap();
    }

    /// Reads one option reply: (reply type, data).
    async fn opt_reply(c: &mut DuplexStream, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(c.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        assert_eq!(c.read_u32().await.unwrap(), opt);
        let rep = c.read_u32().await.unwrap();
        let len = c.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        c.read_exact(&mut data).await.unwrap();
        (rep, data)
    }

    fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }

    /// Runs GO for `name`; returns (size, transmission flags).
    async fn go(c: &mut DuplexStream, name: &str) -> (u64, u16) {
        send_opt(c, OPT_GO, &go_data(name, &[INFO_NAME, INFO_BLOCK_SIZE])).await;
        let mut export = None;
        let mut saw_name = false;
        loop {
            let (rep, data) = opt_reply(c, OPT_GO).await;
            match rep {
                REP_INFO => {
                    let ty = u16::from_be_bytes([data[0], data[1]]);
                    match ty {
                        INFO_EXPORT => {
                            assert_eq!(data.len(), 12);
                            let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                            let flags = u16::from_be_bytes([data[10], data[11]]);
                            export = Some((size, flags));
                        }
                        INFO_NAME => {
                            assert_eq!(&data[2..], name.as_bytes());
                            saw_name = true;
                        }
                        INFO_BLOCK_SIZE => {
                            assert_eq!(data.len(), 14);
                            assert_eq!(u32::from_be_bytes(data[2..6].try_into().unwrap()), 1);
                            assert_eq!(u32::from_be_bytes(data[6..10].try_into().unwrap()), 4096);
                            assert_eq!(
                                u32::from_be_bytes(data[10..14].try_into().unwrap()),
                                MAX_PAYLOAD
                            );
                        }
                        _ => {}
                    }
                }
                REP_ACK => break,
                other => panic!("unexpected reply {other:#x}"),
            }
        }
        assert!(saw_name);
        export.expect("NBD_INFO_EXPORT")
    }

    async fn request(c: &mut DuplexStream, cmd: u16, flags: u16, cookie: u64, off: u64, len: u32) {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(flags);
        b.put_u16(cmd);
        b.put_u64(cookie);
        b.put_u64(off);
        b.put_u32(len);
        c.write_all(&b).await.unwrap();
    }

    /// Reads a simple reply header: (error, cookie).
    async fn simple_reply(c: &mut DuplexStream) -> (u32, u64) {
        assert_eq!(c.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        (c.read_u32().await.unwrap(), c.read_u64().await.unwrap())
    }

    async fn connect(
        name: &str,
    ) -> (
        DuplexStream,
        tokio::task::JoinHandle<Result<(), NbdError>>,
        u16,
    ) {
        let (mut c, task) = start();
        greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let (size, flags) = go(&mut c, name).await;
        assert_eq!(size, SIZE as u64);
        (c, task, flags)
    }

    #[tokio::test]
    async fn list_and_info() {
        let (mut c, task) = start();
        greet(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        send_opt(&mut c, OPT_LIST, &[]).await;
        let mut names = Vec::new();
        loop {
            let (rep, data) = opt_reply(&mut c, OPT_LIST).await;
            if rep == REP_ACK {
                break;
            }
            assert_eq!(rep, REP_SERVER);
            let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
        }
        assert_eq!(names, ["rw", "ro", "slow"]);

        send_opt(&mut c, OPT_LIST, b"junk").await;
        assert_eq!(opt_reply(&mut c, OPT_LIST).await.0, REP_ERR_INVALID);

        send_opt(&mut c, OPT_INFO, &go_data("nope", &[])).await;
        assert_eq!(opt_reply(&mut c, OPT_INFO).await.0, REP_ERR_UNKNOWN);
        send_opt(&mut c, OPT_GO, &go_data("nope", &[])).await;
        assert_eq!(opt_reply(&mut c, OPT_GO).await.0, REP_ERR_UNKNOWN);

        // Malformed GO: name length larger than the data.
        send_opt(&mut c, OPT_GO, &[0, 0, 1, 0, b'x', 0, 0]).await;
        assert_eq!(opt_reply(&mut c, OPT_GO).await.0, REP_ERR_INVALID);

        send_opt(&mut c, 999, b"whatever").await;
        assert_eq!(opt_reply(&mut c, 999).await.0, REP_ERR_UNSUP);

        // INFO with description.
        send_opt(&mut c, OPT_INFO, &go_data("ro", &[INFO_DESCRIPTION])).await;
        let mut desc = None;
        loop {
            let (rep, data) = opt_reply(&mut c, OPT_INFO).await;
            if rep == REP_ACK {
                break;
            }
            if u16::from_be_bytes([data[0], data[1]]) == INFO_DESCRIPTION {
                desc = Some(String::from_utf8(data[2..].to_vec()).unwrap());
            }
        }
        assert_eq!(desc.as_deref(), Some("read-only"));

        send_opt(&mut c, OPT_ABORT, &[]).await;
        assert_eq!(opt_reply(&mut c, OPT_ABORT).await.0, REP_ACK);
        assert!(task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn refuses_non_fixed_newstyle_and_unknown_flags() {
        let (mut c, task) = start();
        greet(&mut c, 0).await;
        assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.unwrap(), 0);

        let (mut c, task) = start();
        greet(&mut c, FLAG_C_FIXED_NEWSTYLE | 0x100).await;
        assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
    }

    #[tokio::test]
    async fn garbage_and_oversize_options() {
        let (mut c, task) = start();
        greet(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        c.write_all(b"this is not an option header at all")
            .await
            .unwrap();
        assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));

        let (mut c, task) = start();
        greet(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        c.write_u64(IHAVEOPT).await.unwrap();
        c.write_u32(OPT_GO).await.unwrap();
        c.write_u32(u32::MAX).await.unwrap();
        assert_eq!(opt_reply(&mut c, OPT_GO).await.0, REP_ERR_TOO_BIG);
        assert!(task.await.unwrap().is_err());

        // EXPORT_NAME with an unknown export: the connection is closed without a reply.
        let (mut c, task) = start();
        greet(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        send_opt(&mut c, OPT_EXPORT_NAME, b"nope").await;
        assert!(matches!(
            task.await.unwrap(),
            Err(NbdError::UnknownExport(_))
        ));
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn export_name_with_and_without_zeroes() {
        for no_zeroes in [false, true] {
            let (mut c, task) = start();
            let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
            greet(&mut c, flags).await;
            send_opt(&mut c, OPT_EXPORT_NAME, b"rw").await;
            assert_eq!(c.read_u64().await.unwrap(), SIZE as u64);
            let tflags = c.read_u16().await.unwrap();
            assert_ne!(tflags & TFLAG_HAS_FLAGS, 0);
            if !no_zeroes {
                let mut z = [1u8; 124];
                c.read_exact(&mut z).await.unwrap();
                assert!(z.iter().all(|b| *b == 0));
            }
            request(&mut c, CMD_FLUSH, 0, 7, 0, 0).await;
            assert_eq!(simple_reply(&mut c).await, (0, 7));
            request(&mut c, CMD_DISC, 0, 8, 0, 0).await;
            assert!(task.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn simple_replies_io_and_errors() {
        let (mut c, task, flags) = connect("rw").await;
        for f in [
            TFLAG_HAS_FLAGS,
            TFLAG_SEND_FLUSH,
            TFLAG_SEND_FUA,
            TFLAG_SEND_TRIM,
            TFLAG_SEND_WRITE_ZEROES,
            TFLAG_CAN_MULTI_CONN,
        ] {
            assert_ne!(flags & f, 0, "flag {f:#x}");
        }
        assert_eq!(flags & (TFLAG_READ_ONLY | TFLAG_SEND_DF), 0);

        // Unaligned write, then read back.
        request(&mut c, CMD_WRITE, CMD_FLAG_FUA, 1, 513, 1000).await;
        c.write_all(&[0x11; 1000]).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 1));
        request(&mut c, CMD_READ, 0, 2, 512, 1002).await;
        assert_eq!(simple_reply(&mut c).await, (0, 2));
        let mut buf = vec![0; 1002];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf[0], 0);
        assert!(buf[1..1001].iter().all(|b| *b == 0x11));
        assert_eq!(buf[1001], 0);

        // Write zeroes and trim.
        request(&mut c, CMD_WRITE_ZEROES, 2, 3, 513, 10).await;
        assert_eq!(simple_reply(&mut c).await, (0, 3));
        request(&mut c, CMD_TRIM, 0, 4, 600, 10).await;
        assert_eq!(simple_reply(&mut c).await, (0, 4));
        request(&mut c, CMD_READ, 0, 5, 513, 100).await;
        assert_eq!(simple_reply(&mut c).await, (0, 5));
        let mut buf = vec![0; 100];
        c.read_exact(&mut buf).await.unwrap();
        assert!(buf[..10].iter().all(|b| *b == 0));
        assert!(buf[10..87].iter().all(|b| *b == 0x11));
        assert!(buf[87..97].iter().all(|b| *b == 0));

        // Errors.
        let end = SIZE as u64;
        request(&mut c, CMD_READ, 0, 10, end - 10, 20).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EINVAL, 10));
        request(&mut c, CMD_READ, 0, 11, u64::MAX, 20).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EINVAL, 11));
        request(&mut c, CMD_READ, 0, 12, 0, 0).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EINVAL, 12));
        request(&mut c, CMD_READ, 0, 13, 0, MAX_PAYLOAD + 1).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EINVAL, 13));
        // Rejected write: the payload must still be consumed.
        request(&mut c, CMD_WRITE, 0, 14, end - 10, 20).await;
        c.write_all(&[0xee; 20]).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (NBD_ENOSPC, 14));
        request(&mut c, CMD_WRITE_ZEROES, 0, 15, end, 1).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_ENOSPC, 15));
        request(&mut c, CMD_TRIM, 0, 16, end, 1).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EINVAL, 16));
        request(&mut c, CMD_TRIM, 0, 17, 0, 0).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EINVAL, 17));
        request(&mut c, 42, 0, 18, 0, 0).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EINVAL, 18));
        // Block status was not negotiated.
        request(&mut c, CMD_BLOCK_STATUS, 0, 19, 0, 512).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EINVAL, 19));

        // Still in sync after all that.
        request(&mut c, CMD_FLUSH, 0, 20, 0, 0).await;
        assert_eq!(simple_reply(&mut c).await, (0, 20));

        // Bad magic closes the connection.
        c.write_all(&[0u8; 28]).await.unwrap();
        assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn oversized_write_closes() {
        let (mut c, task, _) = connect("rw").await;
        request(&mut c, CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 1).await;
        assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
    }

    #[tokio::test]
    async fn read_only_device() {
        let (mut c, task, flags) = connect("ro").await;
        assert_ne!(flags & TFLAG_READ_ONLY, 0);
        request(&mut c, CMD_WRITE, 0, 1, 0, 4).await;
        c.write_all(b"abcd").await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (NBD_EPERM, 1));
        request(&mut c, CMD_WRITE_ZEROES, 0, 2, 0, 4).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EPERM, 2));
        request(&mut c, CMD_TRIM, 0, 3, 0, 4).await;
        assert_eq!(simple_reply(&mut c).await, (NBD_EPERM, 3));
        request(&mut c, CMD_READ, 0, 4, 0, 4).await;
        assert_eq!(simple_reply(&mut c).await, (0, 4));
        let mut b = [1u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [0; 4]);
        request(&mut c, CMD_DISC, 0, 5, 0, 0).await;
        assert!(task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn structured_replies_and_block_status() {
        let (mut c, task) = start();
        greet(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        // Meta context before structured replies is refused.
        let mut meta = go_data("rw", &[]);
        meta.truncate(4 + 2);
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        send_opt(&mut c, OPT_SET_META_CONTEXT, &meta).await;
        assert_eq!(
            opt_reply(&mut c, OPT_SET_META_CONTEXT).await.0,
            REP_ERR_INVALID
        );

        send_opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(opt_reply(&mut c, OPT_STRUCTURED_REPLY).await.0, REP_ACK);
        send_opt(&mut c, OPT_SET_META_CONTEXT, &meta).await;
        let (rep, data) = opt_reply(&mut c, OPT_SET_META_CONTEXT).await;
        assert_eq!(rep, REP_META_CONTEXT);
        assert_eq!(
            u32::from_be_bytes(data[..4].try_into().unwrap()),
            META_BASE_ALLOCATION_ID
        );
        assert_eq!(&data[4..], META_BASE_ALLOCATION.as_bytes());
        assert_eq!(opt_reply(&mut c, OPT_SET_META_CONTEXT).await.0, REP_ACK);
        let (_, flags) = go(&mut c, "rw").await;
        assert_ne!(flags & TFLAG_SEND_DF, 0);

        async fn chunk(c: &mut DuplexStream) -> (u16, u16, u64, Vec<u8>) {
            assert_eq!(c.read_u32().await.unwrap(), STRUCTURED_REPLY_MAGIC);
            let flags = c.read_u16().await.unwrap();
            let ty = c.read_u16().await.unwrap();
            let cookie = c.read_u64().await.unwrap();
            let len = c.read_u32().await.unwrap();
            let mut p = vec![0; len as usize];
            c.read_exact(&mut p).await.unwrap();
            (flags, ty, cookie, p)
        }

        request(&mut c, CMD_WRITE, 0, 1, 100, 3).await;
        c.write_all(b"xyz").await.unwrap();
        assert_eq!(chunk(&mut c).await, (REPLY_FLAG_DONE, 0, 1, vec![]));

        request(&mut c, CMD_READ, 0, 2, 99, 5).await;
        let (f, ty, cookie, p) = chunk(&mut c).await;
        assert_eq!(
            (f, ty, cookie),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2)
        );
        assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 99);
        assert_eq!(&p[8..], b"\0xyz\0");

        request(&mut c, CMD_READ, 0, 3, SIZE as u64, 1).await;
        let (f, ty, cookie, p) = chunk(&mut c).await;
        assert_eq!((f, ty, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3));
        assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), NBD_EINVAL);
        let mlen = u16::from_be_bytes([p[4], p[5]]) as usize;
        assert_eq!(p.len(), 6 + mlen);

        request(&mut c, CMD_BLOCK_STATUS, 0, 4, 0, 4096).await;
        let (f, ty, cookie, p) = chunk(&mut c).await;
        assert_eq!(
            (f, ty, cookie),
            (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4)
        );
        assert_eq!(p.len(), 12);
        assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), 4096);

        request(&mut c, CMD_DISC, 0, 5, 0, 0).await;
        assert!(task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn requests_run_concurrently_and_disc_drains() {
        let (mut c, task, _) = connect("slow").await;
        let start = std::time::Instant::now();
        for i in 0..16 {
            request(&mut c, CMD_READ, 0, i, i * 4096, 4096).await;
        }
        // Disconnect right away: in-flight reads must still be answered.
        request(&mut c, CMD_DISC, 0, 99, 0, 0).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..16 {
            let (err, cookie) = simple_reply(&mut c).await;
            assert_eq!(err, 0);
            let mut b = vec![0; 4096];
            c.read_exact(&mut b).await.unwrap();
            seen.insert(cookie);
        }
        assert_eq!(seen.len(), 16);
        // 16 reads of 100 ms each: serialized they would take 1.6 s.
        assert!(
            start.elapsed() < Duration::from_millis(800),
            "{:?}",
            start.elapsed()
        );
        assert!(task.await.unwrap().is_ok());
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn handshake_timeout() {
        let exports = Arc::new(TestExports {
            rw: dev(false, 0),
            ro: dev(true, 0),
            slow: dev(false, 0),
        });
        let server =
            Arc::new(NbdServer::new(exports).with_handshake_timeout(Duration::from_millis(100)));
        let (_c, srv) = tokio::io::duplex(4096);
        let r = server.handle(srv).await;
        assert!(matches!(r, Err(NbdError::HandshakeTimeout)));
    }

    #[tokio::test]
    async fn serve_tcp_shuts_down_gracefully() {
        let exports = Arc::new(TestExports {
            rw: dev(false, 0),
            ro: dev(true, 0),
            slow: dev(false, 200),
        });
        let server = Arc::new(NbdServer::new(exports));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.serve_tcp(listener, async move {
            let _ = stop_rx.await;
        }));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).await.unwrap();
        c.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        c.write_u64(IHAVEOPT).await.unwrap();
        c.write_u32(OPT_EXPORT_NAME).await.unwrap();
        c.write_u32(4).await.unwrap();
        c.write_all(b"slow").await.unwrap();
        let mut info = [0u8; 10];
        c.read_exact(&mut info).await.unwrap();
        // A slow read is in flight when the server is told to stop: it is still answered.
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(0);
        b.put_u16(CMD_READ);
        b.put_u64(9);
        b.put_u64(0);
        b.put_u32(512);
        c.write_all(&b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(()).unwrap();
        let mut reply = [0u8; 16 + 512];
        c.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[4..8], &[0, 0, 0, 0]);
        let mut rest = [0u8; 1];
        assert_eq!(c.read(&mut rest).await.unwrap(), 0);
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn parsers_reject_bad_input() {
        assert!(parse_info_request(&[]).is_none());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_none());
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 1]).is_none());
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 0, 9]).is_none());
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 0]),
            Some((String::new(), vec![]))
        );
        assert!(parse_meta_request(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, b'a']).is_none());
        assert_eq!(truncate_str("héllo", 2), "h");
    }
}
