//! A client for metad that any sov component uses: several member addresses, retries on
//! `UNAVAILABLE` (no leader yet, leader changed, member down) with a bounded total time. It
//! needs no leader (every member forwards), but follows the `x-sov-leader` hint each answer
//! carries, so its next requests skip the forwarding hop.
//!
//! A retried write whose first attempt did reach the leader may be applied twice; every table
//! operation is either idempotent or answers the repeat with a clear status (for example
//! `ALREADY_EXISTS` for a bucket).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sov_proto::metad::metad_client::MetadClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

/// The generated client type for one member.
pub type Client = MetadClient<Channel>;

/// Members to talk to and how long to keep retrying.
#[derive(Clone)]
pub struct MetaClient {
    clients: Arc<Vec<(String, Client)>>,
    next: Arc<AtomicUsize>,
    retry_for: Duration,
    attempt_timeout: Duration,
}

/// How long one attempt at one member may take before the next member is tried. A frozen or
/// cut-off leader otherwise holds every caller until the channel's own timeout (30 s), long
/// after the others elected a new one.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

impl std::fmt::Debug for MetaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<&str> = self.clients.iter().map(|(a, _)| a.as_str()).collect();
        f.debug_struct("MetaClient")
            .field("members", &addrs)
            .finish()
    }
}

/// Parses `host:port[,host:port...]` (an `http://` prefix is optional).
pub fn parse_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn endpoint(addr: &str) -> Result<Endpoint, Status> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| Status::invalid_argument(format!("bad metad address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        // A frozen member must not hold a caller forever; AddMember waits for catch-up, so
        // this is generous.
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

impl MetaClient {
    /// A client for these members. Connects lazily; never fails on an unreachable member.
    pub fn new(addrs: &[String]) -> Result<MetaClient, Status> {
        if addrs.is_empty() {
            return Err(Status::invalid_argument("no metad address given"));
        }
        let mut clients = Vec::new();
        for a in addrs {
            let ch = sov_common::tls::channel(endpoint(a)?, sov_common::tls::Role::Metad);
            clients.push((
                a.clone(),
                MetadClient::new(ch).max_decoding_message_size(64 << 20),
            ));
        }
        Ok(MetaClient {
            clients: Arc::new(clients),
            next: Arc::new(AtomicUsize::new(0)),
            retry_for: Duration::from_secs(15),
            attempt_timeout: ATTEMPT_TIMEOUT,
        })
    }

    /// Same members, a different retry budget (0 = one attempt per member at most).
    pub fn with_retry_for(mut self, d: Duration) -> MetaClient {
        self.retry_for = d;
        self
    }

    /// Same members, a different time limit per attempt (for calls that legitimately take
    /// long, such as adding a member that must catch up first).
    pub fn with_attempt_timeout(mut self, d: Duration) -> MetaClient {
        self.attempt_timeout = d;
        self
    }

    /// Sends the next requests to the member the answer names as leader, if it is one of ours
    /// (saves the forwarding hop).
    fn follow_leader_hint<T>(&self, r: &Response<T>) {
        let Some(hint) = r
            .metadata()
            .get("x-sov-leader")
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        let strip = |a: &str| {
            a.trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_string()
        };
        if let Some(i) = self.clients.iter().position(|(a, _)| strip(a) == hint) {
            self.next.store(i, Ordering::Relaxed);
        }
    }

    /// The first member's generated client, without retries.
    pub fn first(&self) -> Client {
        self.clients[0].1.clone()
    }

    /// The member addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.clients.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Calls `f` with a member's client; on `UNAVAILABLE`, an attempt that took longer than
    /// the attempt timeout, a transport timeout or a connection failure, moves to the next
    /// member and retries with backoff until the retry budget is spent. Other statuses are
    /// returned as they are.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut tries = 0usize;
        loop {
            let i = self.next.load(Ordering::Relaxed) % self.clients.len();
            let client = self.clients[i].1.clone();
            let attempt = match tokio::time::timeout(self.attempt_timeout, f(client)).await {
                Ok(r) => r,
                Err(_) => Err(Status::unavailable(format!(
                    "metad member {} did not answer within {:?}",
                    self.clients[i].0, self.attempt_timeout
                ))),
            };
            match attempt {
                Ok(r) => {
                    self.follow_leader_hint(&r);
                    return Ok(r.into_inner());
                }
                Err(s) if retryable(&s) => {
                    tries += 1;
                    self.next.store(i + 1, Ordering::Relaxed);
                    let spent = start.elapsed();
                    if spent >= self.retry_for && tries >= self.clients.len() {
                        return Err(Status::new(
                            s.code(),
                            format!(
                                "metad unavailable after {tries} attempts in {:.1}s: {}",
                                spent.as_secs_f64(),
                                s.message()
                            ),
                        ));
                    }
                    // Try every member once quickly before sleeping.
                    if tries.is_multiple_of(self.clients.len()) {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(250));
                    }
                }
                Err(s) => return Err(s),
            }
        }
    }
}

impl MetaClient {
    /// Every tombstone metad holds (all pages).
    pub async fn all_tombstones(&self) -> Result<Vec<sov_proto::metad::Tombstone>, Status> {
        let mut all = Vec::new();
        let mut start_after = String::new();
        loop {
            let req = sov_proto::metad::ListTombstonesRequest {
                start_after: start_after.clone(),
                limit: 1000,
            };
            let page = self
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.list_tombstones(req).await }
                })
                .await?;
            all.extend(page.tombstones);
            if page.next_start_after.is_empty() {
                return Ok(all);
            }
            start_after = page.next_start_after;
        }
    }
}

/// Whether a status means "try again, possibly elsewhere".
pub fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        // The per-request timeout of the channel (a frozen or partitioned member).
        Code::Cancelled => s.message().contains("Timeout"),
        // tonic reports a refused or reset connection as Unknown with a transport source.
        Code::Unknown => s.message().contains("transport") || s.message().contains("connect"),
        _ => false,
    }
}

/// Keeps this process's TLS folder holding the CRL published in metad (asked every 3 s), so a
/// `sov cert revoke` reaches every daemon without copying files. Does nothing without TLS.
pub async fn keep_crl_current(meta: MetaClient) {
    let sov_common::tls::Transport::Tls(ctx) = sov_common::tls::transport() else {
        return;
    };
    let meta = meta.with_retry_for(Duration::ZERO);
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let r = meta
            .call(|mut c| async move {
                c.get_crl(sov_proto::metad::GetCrlRequest { newer_than: last })
                    .await
            })
            .await;
        match r {
            Ok(crl) if crl.number > last && !crl.der.is_empty() => {
                match ctx.install_crl(&crl.der) {
                    Ok(changed) => {
                        if changed {
                            tracing::info!(number = crl.number, "installed the published CRL");
                        }
                        last = crl.number;
                    }
                    Err(e) => tracing::warn!("the published CRL was not installed: {e:#}"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("no CRL from metad: {}", e.message()),
        }
    }
}
