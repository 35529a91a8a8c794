//! Runs real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io, qemu-img, fio) and raw malformed
//! traffic against the `nbd-memory` binary. Needs: libnbd-bin qemu-utils fio.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Server {
    child: Child,
    addr: String,
    sock: String,
    dir: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start() -> Server {
    let dir = format!("/tmp/nbd-memory-test-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let sock = format!("{dir}/nbd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbd-memory"))
        .args(["127.0.0.1:0", &sock])
        .env("RUST_LOG", "vhost_blk=warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    // "listening on 127.0.0.1:PORT and SOCK"
    let addr = line
        .split_whitespace()
        .nth(2)
        .expect("listen line")
        .to_owned();
    // Keep draining the server's log so it never blocks; echo it for debugging.
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            eprintln!("[server] {l}");
        }
    });
    Server {
        child,
        addr,
        sock,
        dir,
    }
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install libnbd-bin qemu-utils fio): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ {cmd} {}\n{text}", args.join(" "));
    (out.status.success(), text)
}

fn raw_connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Greets and sends client flags; returns the stream.
fn raw_greet(addr: &str) -> TcpStream {
    let mut s = raw_connect(addr);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// Enters transmission on `disk` with NBD_OPT_EXPORT_NAME (simple replies).
fn raw_transmission(addr: &str) -> TcpStream {
    let mut s = raw_greet(addr);
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"disk");
    s.write_all(&opt).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 64 << 20);
    s
}

fn raw_request(s: &mut TcpStream, magic: u32, cmd: u16, cookie: u64, off: u64, len: u32) {
    let mut b = Vec::new();
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&off.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    s.write_all(&b).unwrap();
}

fn raw_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..].try_into().unwrap()),
    )
}

fn assert_closed(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected close, got {e}"),
        }
    }
}

#[test]
fn real_clients_and_malformed_input() {
    let srv = start();
    let base = format!("nbd://{}", srv.addr);
    let disk = format!("{base}/disk");

    // nbdinfo: size, list, unknown export, unix socket.
    let (ok, out) = run("nbdinfo", &["--size", &disk]);
    assert!(ok);
    assert_eq!(out.trim(), "67108864");
    let (ok, out) = run("nbdinfo", &[&disk]);
    assert!(ok && out.contains("can_multi_conn: true") && out.contains("is_read_only: false"));
    let (ok, out) = run("nbdinfo", &["--list", &base]);
    assert!(ok && out.contains("export=\"disk\"") && out.contains("export=\"ro\""));
    let (ok, out) = run("nbdinfo", &[&format!("{base}/nope")]);
    assert!(!ok && !out.contains("panic"));
    let unix = format!("nbd+unix:///ro?socket={}", srv.sock);
    let (ok, out) = run("nbdinfo", &[&unix]);
    assert!(ok && out.contains("export-size: 1048576") && out.contains("is_read_only: true"));

    // qemu-io: patterns, zeroes, discard, flush, unaligned I/O.
    let (ok, out) = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -z 1M 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "discard 2M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "flush",
            "-c",
            "write -P 0x11 513 1000",
            "-c",
            "read -P 0x11 513 1000",
            "-c",
            "read -P 0xab 0 513",
            "-c",
            "read -P 0xab 1513 1000",
            "-c",
            "write -P 0x22 -f 4M 64k",
            "-c",
            "read -P 0x22 4M 64k",
            &disk,
        ],
    );
    assert!(ok, "qemu-io failed");
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "{out}"
    );
    // The read-only export refuses to be opened for writing (over the unix socket).
    let (_, out) = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &unix]);
    assert!(out.contains("failed") || out.contains("ermission") || out.contains("read-only"));
    // Read-only opening works (the ro export is filled with 0x5a).
    let (ok, out) = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &unix],
    );
    assert!(ok && out.contains("read 1048576/1048576") && !out.contains("Pattern"));

    // nbdcopy + qemu-img compare.
    let out_raw = format!("{}/out.raw", srv.dir);
    let (ok, _) = run("nbdcopy", &[&disk, &out_raw]);
    assert!(ok);
    let (ok, out) = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &out_raw, &disk],
    );
    assert!(ok && out.contains("identical"));
    // And the other direction, with several connections.
    let (ok, _) = run("nbdcopy", &["--connections=4", &out_raw, &disk]);
    assert!(ok);

    // fio with the nbd engine (libnbd), queue depth 16, verifying.
    let (ok, out) = run(
        "fio",
        &[
            "--name=t",
            "--ioengine=nbd",
            &format!("--uri={disk}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
        ],
    );
    assert!(ok && !out.contains("verify: bad"), "fio failed");

    // Malformed traffic.
    // 1. Garbage right after the greeting.
    let mut s = raw_connect(&srv.addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nmore garbage here")
        .unwrap();
    assert_closed(&mut s);
    // 2. Garbage instead of an option.
    let mut s = raw_greet(&srv.addr);
    s.write_all(&[0xffu8; 64]).unwrap();
    assert_closed(&mut s);
    // 3. Oversized option: NBD_REP_ERR_TOO_BIG, then close.
    let mut s = raw_greet(&srv.addr);
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        u32::from_be_bytes(r[12..16].try_into().unwrap()),
        (1 << 31) + 9
    );
    assert_closed(&mut s);
    // 4. Read past the end, unknown command, zero-length read: error replies, stays usable.
    let mut s = raw_transmission(&srv.addr);
    raw_request(&mut s, 0x2560_9513, 0, 1, (64 << 20) - 512, 1024);
    assert_eq!(raw_reply(&mut s), (22, 1));
    raw_request(&mut s, 0x2560_9513, 77, 2, 0, 0);
    assert_eq!(raw_reply(&mut s), (22, 2));
    raw_request(&mut s, 0x2560_9513, 0, 3, 0, 0);
    assert_eq!(raw_reply(&mut s), (22, 3));
    raw_request(&mut s, 0x2560_9513, 1, 4, 64 << 20, 8);
    s.write_all(&[0u8; 8]).unwrap();
    assert_eq!(raw_reply(&mut s), (28, 4));
    raw_request(&mut s, 0x2560_9513, 0, 5, 0, 512);
    assert_eq!(raw_reply(&mut s), (0, 5));
    let mut data = [0u8; 512];
    s.read_exact(&mut data).unwrap();
    // 5. Bad request magic: connection closed.
    raw_request(&mut s, 0xdead_beef, 0, 6, 0, 512);
    assert_closed(&mut s);
    // 6. Client vanishes mid-request with reads in flight.
    let mut s = raw_transmission(&srv.addr);
    for i in 0..32 {
        raw_request(&mut s, 0x2560_9513, 0, i, 0, 1 << 20);
    }
    drop(s);
    // 7. Client without fixed newstyle.
    let mut s = raw_connect(&srv.addr);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert_closed(&mut s);

    // The server is still alive and serving.
    std::thread::sleep(Duration::from_millis(200));
    let (ok, out) = run("nbdinfo", &["--size", &disk]);
    assert!(ok && out.trim() == "67108864");
    let (ok, out) = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 777 3000",
            "-c",
            "read -P 0x33 777 3000",
            &disk,
        ],
    );
    assert!(ok && !out.contains("Pattern verification failed"));
}
