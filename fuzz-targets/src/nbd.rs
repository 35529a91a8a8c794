//! The NBD server of vhost-blk (`vhost_blk::nbd`), fed a client's bytes over an in-memory
//! pipe: the whole input from the first byte (`nbd_session`), or a valid handshake chosen by
//! the first byte and then the rest as transmission-phase requests (`nbd_transmission`).
//! After either, a well-behaved client must still be served by the same server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vhost_blk::mem::{MemDevice, MemExports};
use vhost_blk::nbd::{MAX_PAYLOAD, NbdError, NbdServer};

use crate::rt::{Input, paused};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

const DISK_SIZE: usize = 1 << 20;
const RO_SIZE: usize = 64 << 10;
/// Longer than any exchange may take; with the paused clock it only passes when the server
/// and the client both wait for each other, i.e. a hang.
const HANG: Duration = Duration::from_secs(3600);

/// Two RAM disks: `disk` (1 MiB, read-write) and `ro` (64 KiB, read-only).
fn server() -> Arc<NbdServer<MemExports>> {
    let exports = MemExports::new(vec![
        (MemDevice::new("disk", DISK_SIZE, false), "1 MiB RAM disk"),
        (MemDevice::new("ro", RO_SIZE, true), "read-only"),
    ]);
    Arc::new(NbdServer::new(Arc::new(exports)).with_handshake_timeout(Duration::from_secs(30)))
}

/// Runs one connection: `input` is everything the client sends (then it closes its side);
/// returns everything the server sent and how the connection ended.
async fn exchange(
    server: Arc<NbdServer<MemExports>>,
    input: Vec<u8>,
) -> (Vec<u8>, Result<(), NbdError>) {
    let (client, srv) = tokio::io::duplex(64 << 10);
    let task = tokio::spawn(server.handle(srv));
    let (mut rd, mut wr) = tokio::io::split(client);
    let send = async move {
        // The server may hang up before reading everything.
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    };
    let recv = async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let ((), out) = tokio::time::timeout(HANG, async { tokio::join!(send, recv) })
        .await
        .expect("the NBD server neither answered nor closed the connection");
    let result = tokio::time::timeout(HANG, task)
        .await
        .expect("the NBD connection did not end after the client closed")
        .expect("the NBD connection task panicked");
    (out, result)
}

/// A reader over what the server sent.
struct Out<'a>(&'a [u8]);

impl<'a> Out<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        (self.0.len() >= n).then(|| {
            let (h, t) = self.0.split_at(n);
            self.0 = t;
            h
        })
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn peek_u64(&self) -> Option<u64> {
        Some(u64::from_be_bytes(self.0.get(..8)?.try_into().ok()?))
    }
    /// One option reply: (option, reply type, data). Panics on a torn one.
    fn opt_reply(&mut self) -> (u32, u32, &'a [u8]) {
        assert_eq!(self.u64(), Some(OPT_REPLY_MAGIC), "option reply magic");
        let opt = self.u32().expect("a whole option reply header");
        let rep = self.u32().expect("a whole option reply header");
        let len = self.u32().expect("a whole option reply header");
        let data = self
            .take(len as usize)
            .expect("option reply data as long as it says");
        (opt, rep, data)
    }
}

/// The server's greeting: magic, IHAVEOPT, fixed newstyle and no zeroes.
fn check_hello(out: &mut Out<'_>) {
    assert_eq!(out.u64(), Some(NBDMAGIC), "greeting magic");
    assert_eq!(out.u64(), Some(IHAVEOPT), "greeting IHAVEOPT");
    assert_eq!(out.u16(), Some(3), "greeting flags");
}

/// Any bytes from the first one: the server greets, answers options with well-formed
/// replies, and ends the connection without panicking or hanging.
pub fn nbd_session(data: &[u8]) {
    let rt = paused();
    rt.block_on(async {
        let server = server();
        let (out, result) = exchange(server.clone(), data.to_vec()).await;
        assert!(
            !matches!(result, Err(NbdError::HandshakeTimeout)),
            "the handshake waited although the client had closed"
        );
        let mut out = Out(&out);
        check_hello(&mut out);
        // Option replies until the handshake ends (EXPORT_NAME's answer or transmission).
        while out.peek_u64() == Some(OPT_REPLY_MAGIC) {
            let (_, rep, data) = out.opt_reply();
            if rep & (1 << 31) == 0 {
                assert!(
                    matches!(rep, REP_ACK | 2 | REP_INFO | REP_META_CONTEXT),
                    "unknown reply type {rep}"
                );
            } else {
                assert!(data.len() <= 4096, "error message longer than 4096 bytes");
            }
        }
        still_serves(server).await;
    });
}

/// How the valid handshake in front of `nbd_transmission` goes.
#[derive(Clone, Copy)]
struct Handshake {
    no_zeroes: bool,
    structured: bool,
    block_status: bool,
    read_only: bool,
    export_name: bool,
}

impl Handshake {
    fn from_byte(b: u8) -> Handshake {
        Handshake {
            no_zeroes: b & 1 != 0,
            structured: b & 2 != 0,
            block_status: b & 2 != 0 && b & 4 != 0,
            read_only: b & 8 != 0,
            export_name: b & 16 != 0,
        }
    }

    fn export(&self) -> &'static str {
        if self.read_only { "ro" } else { "disk" }
    }

    fn size(&self) -> u64 {
        if self.read_only {
            RO_SIZE as u64
        } else {
            DISK_SIZE as u64
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let flags = FLAG_C_FIXED_NEWSTYLE | if self.no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        v.extend_from_slice(&flags.to_be_bytes());
        let opt = |v: &mut Vec<u8>, opt: u32, data: &[u8]| {
            v.extend_from_slice(&IHAVEOPT.to_be_bytes());
            v.extend_from_slice(&opt.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(data);
        };
        let name = self.export().as_bytes();
        if self.structured {
            opt(&mut v, OPT_STRUCTURED_REPLY, &[]);
        }
        if self.block_status {
            let q = b"base:allocation";
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name);
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
            opt(&mut v, OPT_SET_META_CONTEXT, &d);
        }
        if self.export_name {
            opt(&mut v, OPT_EXPORT_NAME, name);
        } else {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name);
            d.extend_from_slice(&0u16.to_be_bytes());
            opt(&mut v, OPT_GO, &d);
        }
        v
    }

    /// Reads and checks the server's side of the handshake.
    fn check(&self, out: &mut Out<'_>) {
        check_hello(out);
        let ack = |out: &mut Out<'_>, want_opt: u32| loop {
            let (opt, rep, _) = out.opt_reply();
            assert_eq!(opt, want_opt, "reply to another option");
            assert_eq!(rep & (1 << 31), 0, "a valid option was refused: {rep:#x}");
            if rep == REP_ACK {
                break;
            }
        };
        if self.structured {
            ack(out, OPT_STRUCTURED_REPLY);
        }
        if self.block_status {
            ack(out, OPT_SET_META_CONTEXT);
        }
        if self.export_name {
            assert_eq!(out.u64(), Some(self.size()), "export size");
            out.u16().expect("transmission flags");
            if !self.no_zeroes {
                assert_eq!(out.take(124), Some(&[0u8; 124][..]), "124 zeroes");
            }
        } else {
            ack(out, OPT_GO);
        }
    }
}

/// A request the server read whole, so it owes a reply.
#[derive(Debug, Clone, Copy)]
struct Req {
    cmd: u16,
    offset: u64,
    len: u32,
}

/// Cuts `body` into requests the way the server reads them, giving each a distinct cookie
/// (its number) so replies can be matched. Returns the bytes to send and the requests that
/// are whole.
fn requests(body: &[u8]) -> (Vec<u8>, HashMap<u64, Req>) {
    let mut out = Vec::with_capacity(body.len());
    let mut reqs = HashMap::new();
    let mut inp = body;
    while inp.len() >= 28 {
        let mut h = inp[..28].to_vec();
        inp = &inp[28..];
        let cookie = reqs.len() as u64;
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&h);
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
        let cmd = u16::from_be_bytes([h[6], h[7]]);
        let offset = u64::from_be_bytes(h[16..24].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(h[24..28].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC || cmd == CMD_DISC || (cmd == CMD_WRITE && len > MAX_PAYLOAD) {
            break;
        }
        if cmd == CMD_WRITE {
            if inp.len() < len as usize {
                break;
            }
            out.extend_from_slice(&inp[..len as usize]);
            inp = &inp[len as usize..];
        }
        reqs.insert(cookie, Req { cmd, offset, len });
    }
    out.extend_from_slice(inp);
    (out, reqs)
}

/// Whether the in-memory device must carry out `r` (else it must fail).
fn must_succeed(r: &Req, hs: &Handshake) -> bool {
    let in_range = r
        .offset
        .checked_add(u64::from(r.len))
        .is_some_and(|end| end <= hs.size());
    let sized = r.len > 0 && in_range;
    match r.cmd {
        CMD_READ => sized && r.len <= MAX_PAYLOAD,
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => sized && !hs.read_only,
        CMD_FLUSH => true,
        CMD_BLOCK_STATUS => sized && hs.block_status,
        _ => false,
    }
}

/// A valid handshake (chosen by the first byte), then the rest as requests: every request
/// the server read whole gets exactly one well-formed reply, success exactly when the device
/// can do it, and a READ's data as long as asked.
pub fn nbd_transmission(data: &[u8]) {
    let mut inp = Input(data);
    let hs = Handshake::from_byte(inp.u8());
    let (body, reqs) = requests(inp.rest());
    let mut input = hs.bytes();
    input.extend_from_slice(&body);
    let rt = paused();
    rt.block_on(async {
        let server = server();
        let (out, result) = exchange(server.clone(), input).await;
        assert!(
            !matches!(result, Err(NbdError::HandshakeTimeout)),
            "the handshake timed out"
        );
        let mut out = Out(&out);
        hs.check(&mut out);
        let mut pending = reqs;
        while !out.0.is_empty() {
            let (cookie, ok) = if hs.structured {
                structured_reply(&mut out, &pending, &hs)
            } else {
                simple_reply(&mut out, &pending)
            };
            let r = pending
                .remove(&cookie)
                .expect("checked by the reply parser");
            assert_eq!(
                ok,
                must_succeed(&r, &hs),
                "request {r:?} after handshake: success was {ok}"
            );
        }
        assert!(pending.is_empty(), "requests without a reply: {pending:?}");
        still_serves(server).await;
    });
}

/// One simple reply; returns its cookie and whether it reports success.
fn simple_reply(out: &mut Out<'_>, pending: &HashMap<u64, Req>) -> (u64, bool) {
    assert_eq!(out.u32(), Some(SIMPLE_REPLY_MAGIC), "simple reply magic");
    let error = out.u32().expect("a whole simple reply");
    let cookie = out.u64().expect("a whole simple reply");
    let r = pending
        .get(&cookie)
        .unwrap_or_else(|| panic!("a reply for cookie {cookie}, which is not pending"));
    if error == 0 && r.cmd == CMD_READ {
        out.take(r.len as usize)
            .expect("READ data as long as the request");
    }
    (cookie, error == 0)
}

/// One structured reply (we only ever send one chunk per request, flagged DONE).
fn structured_reply(out: &mut Out<'_>, pending: &HashMap<u64, Req>, hs: &Handshake) -> (u64, bool) {
    assert_eq!(
        out.u32(),
        Some(STRUCTURED_REPLY_MAGIC),
        "structured reply magic"
    );
    let flags = out.u16().expect("a whole structured reply");
    let ty = out.u16().expect("a whole structured reply");
    let cookie = out.u64().expect("a whole structured reply");
    let len = out.u32().expect("a whole structured reply");
    let payload = out
        .take(len as usize)
        .expect("a structured reply as long as it says");
    assert_eq!(
        flags, REPLY_FLAG_DONE,
        "one chunk per request, flagged DONE"
    );
    let r = pending
        .get(&cookie)
        .unwrap_or_else(|| panic!("a reply for cookie {cookie}, which is not pending"));
    let mut p = Out(payload);
    match ty {
        REPLY_TYPE_NONE => {
            assert!(payload.is_empty());
            assert!(
                !matches!(r.cmd, CMD_READ | CMD_BLOCK_STATUS),
                "no data for {r:?}"
            );
            (cookie, true)
        }
        REPLY_TYPE_OFFSET_DATA => {
            assert_eq!(r.cmd, CMD_READ);
            assert_eq!(p.u64(), Some(r.offset), "OFFSET_DATA offset");
            assert_eq!(p.0.len(), r.len as usize, "OFFSET_DATA length");
            (cookie, true)
        }
        REPLY_TYPE_BLOCK_STATUS => {
            assert!(r.cmd == CMD_BLOCK_STATUS && hs.block_status);
            assert_eq!(payload.len(), 12);
            assert_eq!(p.u32(), Some(1), "the base:allocation context id");
            assert_eq!(p.u32(), Some(r.len), "one extent over the whole request");
            (cookie, true)
        }
        REPLY_TYPE_ERROR => {
            let code = p.u32().expect("an error code");
            let n = p.u16().expect("a message length");
            assert_ne!(code, 0, "an error reply with error 0");
            assert_eq!(p.0.len(), usize::from(n), "error message length");
            assert!(std::str::from_utf8(p.0).is_ok(), "error message is UTF-8");
            (cookie, false)
        }
        other => panic!("unknown structured reply type {other}"),
    }
}

/// A well-behaved client on a new connection: GO, a READ of the first sector, DISC.
async fn still_serves(server: Arc<NbdServer<MemExports>>) {
    let hs = Handshake::from_byte(0);
    let mut input = hs.bytes();
    let mut req = Vec::new();
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_READ.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    input.extend_from_slice(&req);
    let mut disc = req.clone();
    disc[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
    input.extend_from_slice(&disc);
    let (out, result) = exchange(server, input).await;
    assert!(
        result.is_ok(),
        "a valid client's connection failed: {result:?}"
    );
    let mut out = Out(&out);
    hs.check(&mut out);
    assert_eq!(out.u32(), Some(SIMPLE_REPLY_MAGIC));
    assert_eq!(out.u32(), Some(0), "the valid READ failed");
    assert_eq!(out.u64(), Some(7));
    assert_eq!(out.take(512).map(<[u8]>::len), Some(512));
    assert!(out.0.is_empty(), "bytes after the last reply");
}
