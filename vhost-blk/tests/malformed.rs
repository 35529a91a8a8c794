//! Malformed vhost-user messages on the control socket: the backend must close the
//! connection (returning an error or Ok) without panicking, and a new serve call must then
//! handshake normally with a well-behaved frontend.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{MemDevice, runtime, temp_socket, wait_for_socket};
use vhost_blk::vhost_user::{
    ServeControl, VhostUserBlkOptions, VhostUserError, serve_vhost_user_blk,
};

const VERSION_FLAG: u32 = 0x1;
const REPLY_FLAG: u32 = 0x4;

fn hdr(request: u32, flags: u32, size: u32) -> Vec<u8> {
    [request, flags, size]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn start_server(
    socket: &Path,
    device: Arc<MemDevice>,
    rt: &tokio::runtime::Runtime,
    control: ServeControl,
) -> JoinHandle<Result<(), VhostUserError>> {
    let _ = std::fs::remove_file(socket);
    let opts = VhostUserBlkOptions {
        num_queues: 2,
        queue_size: 128,
        serial: String::new(),
        control,
    };
    let (socket2, handle) = (socket.to_path_buf(), rt.handle().clone());
    let t = std::thread::spawn(move || serve_vhost_user_blk(&socket2, device, handle, opts));
    wait_for_socket(socket);
    t
}

/// Sends `bytes`, then reads until the backend closes the connection (bounded).
fn send_and_expect_close(socket: &Path, bytes: &[u8], half_close: bool) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("backend did not close the connection")
            }
            Err(_) => return,
        }
    }
}

fn request(s: &mut UnixStream, code: u32, body: &[u8]) {
    let mut msg = hdr(code, VERSION_FLAG, body.len() as u32);
    msg.extend_from_slice(body);
    s.write_all(&msg).unwrap();
}

fn reply(s: &mut UnixStream, code: u32) -> Vec<u8> {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).unwrap();
    let req = u32::from_le_bytes(h[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(h[4..8].try_into().unwrap());
    let size = u32::from_le_bytes(h[8..12].try_into().unwrap());
    assert_eq!(req, code);
    assert_eq!(flags & REPLY_FLAG, REPLY_FLAG);
    let mut body = vec![0u8; size as usize];
    s.read_exact(&mut body).unwrap();
    body
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn malformed_messages_then_proper_frontend() {
    let rt = runtime();
    let device = Arc::new(MemDevice::new(64 << 20, 0));
    let socket = temp_socket("malformed");

    let garbage: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "random garbage",
            (0..200u32).map(|i| (i * 37 + 11) as u8).collect(),
            false,
        ),
        ("truncated header", vec![1, 0, 0, 0, 1, 0], true),
        ("unknown request code", hdr(9999, VERSION_FLAG, 0), false),
        ("bad version flags", hdr(1, 0x7, 0), false),
        (
            "oversized body length",
            hdr(1, VERSION_FLAG, 0x7fff_ffff),
            false,
        ),
        (
            // SET_VRING_NUM for a queue that does not exist.
            "bad queue index",
            {
                let mut m = hdr(8, VERSION_FLAG, 8);
                m.extend_from_slice(&[200, 0, 0, 0, 128, 0, 0, 0]);
                m
            },
            false,
        ),
        (
            // GET_CONFIG whose declared payload size disagrees with the message size.
            "inconsistent GET_CONFIG",
            {
                let mut m = hdr(24, VERSION_FLAG, 12);
                m.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                m
            },
            false,
        ),
    ];
    for (what, bytes, half_close) in garbage {
        let server = start_server(&socket, device.clone(), &rt, ServeControl::new());
        send_and_expect_close(&socket, &bytes, half_close);
        let result = server.join().expect("serve thread panicked");
        eprintln!("{what}: serve returned {result:?}");
    }

    // A well-behaved frontend on a fresh serve call.
    let control = ServeControl::new();
    let server = start_server(&socket, device.clone(), &rt, control.clone());
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    request(&mut s, 1, &[]); // GET_FEATURES
    let features = u64_at(&reply(&mut s, 1), 0);
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    assert_ne!(features & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");
    assert_ne!(features & (1 << 12), 0, "VIRTIO_BLK_F_MQ");
    assert_ne!(features & (1 << 13), 0, "VIRTIO_BLK_F_DISCARD");
    request(&mut s, 15, &[]); // GET_PROTOCOL_FEATURES
    let proto = u64_at(&reply(&mut s, 15), 0);
    let (mq, reply_ack, config) = (1u64 << 0, 1u64 << 3, 1u64 << 9);
    assert_eq!(proto & (mq | reply_ack | config), mq | reply_ack | config);
    request(&mut s, 16, &(mq | config).to_le_bytes()); // SET_PROTOCOL_FEATURES
    request(&mut s, 17, &[]); // GET_QUEUE_NUM
    assert_eq!(u64_at(&reply(&mut s, 17), 0), 2);
    // GET_CONFIG offset 0, size 60.
    let mut body: Vec<u8> = [0u32, 60, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    body.resize(12 + 60, 0);
    request(&mut s, 24, &body);
    let cfg = reply(&mut s, 24);
    assert_eq!(cfg.len(), 12 + 60);
    let space = &cfg[12..];
    assert_eq!(u64_at(space, 0), (64 << 20) / 512, "capacity");
    assert_eq!(
        u32::from_le_bytes(space[20..24].try_into().unwrap()),
        4096,
        "blk_size"
    );
    assert_eq!(
        u16::from_le_bytes(space[34..36].try_into().unwrap()),
        2,
        "num_queues"
    );

    // stop() ends the connection; serve returns Ok.
    control.stop();
    assert!(server.join().unwrap().is_ok());

    // stop() also wakes a serve call that is still waiting for a frontend.
    let control = ServeControl::new();
    let server = start_server(&socket, device, &rt, control.clone());
    std::thread::sleep(Duration::from_millis(100));
    control.stop();
    assert!(server.join().unwrap().is_ok());
}
