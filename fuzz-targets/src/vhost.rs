//! The vhost-user-blk backend of vhost-blk: frontend messages on its control socket
//! (`vhost_user_messages`), and descriptor chains in guest memory through the request parser
//! and the device (`virtio_descriptors`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vhost_blk::mem::MemDevice;
use vhost_blk::vhost_user::{VhostUserBlkOptions, VhostUserError, fuzzing, serve_vhost_user_blk};

use crate::rt::{Input, scratch, threaded};

const VERSION_FLAG: u32 = 0x1;
const REPLY_FLAG: u32 = 0x4;
const QUEUES: usize = 2;
const DEVICE_SIZE: usize = 1 << 20;

/// Serves one connection on a fresh socket while `client` talks to it; returns how the
/// backend's serve call ended.
fn serve_one(
    device: Arc<MemDevice>,
    client: impl FnOnce(UnixStream),
) -> Result<(), VhostUserError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = scratch();
    let socket = dir
        .path()
        .join(format!("vu-{}.sock", N.fetch_add(1, Ordering::Relaxed)));
    let opts = VhostUserBlkOptions {
        num_queues: QUEUES,
        queue_size: 128,
        ..Default::default()
    };
    let rt = threaded().handle().clone();
    let path = socket.clone();
    let server = std::thread::spawn(move || serve_vhost_user_blk(&path, device, rt, opts));
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline && !server.is_finished(),
                    "cannot connect to the vhost-user socket: {e}"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("a write timeout");
    client(stream);
    server.join().expect("the vhost-user serve thread panicked")
}

/// Reads until the backend closes the connection; a silent backend is a hang.
fn read_to_close(s: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the vhost-user backend neither answered nor closed the connection")
            }
            Err(_) => return,
        }
    }
}

/// The bytes as a frontend's messages (no file descriptors): the backend answers or closes
/// the connection, its serve call returns, and a new serve call then handshakes normally.
pub fn vhost_user_messages(data: &[u8]) {
    threaded();
    let fds_before = open_fds();
    let device = Arc::new(MemDevice::new("fuzz", DEVICE_SIZE, false));
    let result = serve_one(device.clone(), |mut s| {
        let mut w = s.try_clone().expect("a second handle on the socket");
        let bytes = data.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        read_to_close(&mut s);
        writer.join().expect("the writer thread");
    });
    assert!(
        matches!(result, Ok(()) | Err(VhostUserError::Protocol(_))),
        "serve ended with {result:?}"
    );
    let result = serve_one(device, valid_frontend);
    assert!(
        result.is_ok(),
        "a valid frontend's connection failed: {result:?}"
    );
    // Nothing stays open: a leak per connection ends an exporter that serves many.
    let fds_after = open_fds();
    assert!(
        fds_after <= fds_before,
        "{} file descriptors more after two connections",
        fds_after - fds_before
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

fn request(s: &mut UnixStream, code: u32, body: &[u8]) {
    let mut msg = Vec::with_capacity(12 + body.len());
    for v in [code, VERSION_FLAG, body.len() as u32] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    msg.extend_from_slice(body);
    s.write_all(&msg).expect("writing to the backend");
}

fn reply(s: &mut UnixStream, code: u32) -> Vec<u8> {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).expect("a reply header");
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    assert_eq!(word(0), code, "reply to another request");
    assert_eq!(word(4) & REPLY_FLAG, REPLY_FLAG, "reply flag");
    let mut body = vec![0u8; word(8) as usize];
    s.read_exact(&mut body).expect("a reply body");
    body
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG.
fn valid_frontend(mut s: UnixStream) {
    request(&mut s, 1, &[]);
    let features = u64_at(&reply(&mut s, 1), 0);
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    request(&mut s, 15, &[]);
    let proto = u64_at(&reply(&mut s, 15), 0);
    let (mq, config) = (1u64, 1u64 << 9);
    assert_eq!(proto & (mq | config), mq | config);
    request(&mut s, 16, &(mq | config).to_le_bytes());
    request(&mut s, 17, &[]);
    assert_eq!(u64_at(&reply(&mut s, 17), 0), QUEUES as u64);
    let mut body: Vec<u8> = [0u32, 60, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    body.resize(12 + 60, 0);
    request(&mut s, 24, &body);
    let cfg = reply(&mut s, 24);
    assert_eq!(cfg.len(), 12 + 60);
    assert_eq!(u64_at(&cfg[12..], 0), DEVICE_SIZE as u64 / 512, "capacity");
    s.shutdown(std::net::Shutdown::Write)
        .expect("closing our side");
    read_to_close(&mut s);
}

/// Guest memory of the descriptor target: the rings at fixed places, data after them.
const MEM_LEN: usize = 64 << 10;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: usize = 0x3000;
const MAX_QUEUE: u16 = 256;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Makes a fuzzed number land inside the guest memory most of the time: values with the top
/// bit set are kept as they are (out of range on purpose), others are taken modulo `m`.
fn mostly_below(v: u64, top_bit: u64, m: u64) -> u64 {
    if v & top_bit != 0 { v } else { v % m }
}

/// A virtqueue whose descriptor table, available ring and data come from the bytes: every
/// chain taken off the ring is answered on the used ring (a malformed one with IOERR), the
/// used index counts them, and nothing panics or waits forever.
pub fn virtio_descriptors(data: &[u8]) {
    let mut inp = Input(data);
    let b = inp.u8();
    let size = if b & 0x80 != 0 {
        // Not a power of two, or zero: the queue must refuse to run.
        u16::from(inp.u8())
    } else {
        1 << (b % 9)
    };
    let f = inp.u8();
    let mut features = 0;
    if f & 1 != 0 {
        features |= VIRTIO_BLK_F_FLUSH;
    }
    if f & 2 != 0 {
        features |= VIRTIO_RING_F_EVENT_IDX;
    }
    let ring = u64::from(size.clamp(1, MAX_QUEUE));
    let mut mem = vec![0u8; MEM_LEN];
    // Descriptors: addr, len, flags, next.
    for i in 0..ring {
        if inp.is_empty() {
            break;
        }
        let addr = mostly_below(inp.u64(), 1 << 63, MEM_LEN as u64);
        let len = mostly_below(u64::from(inp.u32()), 1 << 31, 2 * MEM_LEN as u64) as u32;
        let flags = inp.u16();
        let next = mostly_below(u64::from(inp.u16()), 1 << 15, ring) as u16;
        let at = (DESC + 16 * i) as usize;
        mem[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        mem[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        mem[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        mem[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    }
    // The available ring: flags, idx, heads.
    let avail_flags = inp.u16();
    let idx = mostly_below(u64::from(inp.u16()), 1 << 15, ring + 1) as u16;
    let a = AVAIL as usize;
    mem[a..a + 2].copy_from_slice(&avail_flags.to_le_bytes());
    mem[a + 2..a + 4].copy_from_slice(&idx.to_le_bytes());
    for i in 0..ring as usize {
        let head = mostly_below(u64::from(inp.u16()), 1 << 15, ring) as u16;
        mem[a + 4 + 2 * i..a + 6 + 2 * i].copy_from_slice(&head.to_le_bytes());
    }
    let rest = inp.rest();
    let n = rest.len().min(MEM_LEN - DATA);
    mem[DATA..DATA + n].copy_from_slice(&rest[..n]);

    let device = Arc::new(MemDevice::new("fuzz", DEVICE_SIZE, false));
    let q = fuzzing::Queue {
        size,
        desc: DESC,
        avail: AVAIL,
        used: USED,
        features,
    };
    let out = fuzzing::kick(device, threaded().handle().clone(), &mem, q, MAX_QUEUE)
        .expect("the queue handler failed");
    // The queue keeps its maximum size when asked for one it cannot take (zero, not a power
    // of two).
    let size = if size.is_power_of_two() && size <= MAX_QUEUE {
        size
    } else {
        MAX_QUEUE
    };
    let ring = u64::from(size);
    // Chains with a head inside the table are completed; one pointing past it cannot be put
    // on the used ring (and no guest can be waiting for it).
    let head = |i: u16| {
        let at = a + 4 + 2 * (usize::from(i) % usize::from(size));
        u16::from_le_bytes([mem[at], mem[at + 1]])
    };
    let valid = (0..out.popped).filter(|&i| head(i) < size).count() as u64;
    assert_eq!(out.completed, valid, "{} chains popped", out.popped);
    let used_idx =
        u16::from_le_bytes([out.memory[USED as usize + 2], out.memory[USED as usize + 3]]);
    assert_eq!(u64::from(used_idx), out.completed, "used ring index");
    for i in 0..usize::from(used_idx) {
        let at = USED as usize + 4 + 8 * (i % ring as usize);
        let id = u32::from_le_bytes(out.memory[at..at + 4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(out.memory[at + 4..at + 8].try_into().expect("4 bytes"));
        assert!(id < u32::from(size), "used entry for head {id}");
        // Data read into the chain (at most the device) and the status byte.
        assert!(len as usize <= DEVICE_SIZE + 1, "used length {len}");
    }
}
