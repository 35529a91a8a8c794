//! Disk I/O engines: io_uring (the `io-uring` crate) on its own thread, or a pool of threads
//! doing pread/pwritev/fdatasync. The engine is chosen at start-up; `auto` probes io_uring and
//! falls back to the thread pool when the kernel refuses it.
//!
//! Callers hand an [`IoOp`] to the engine and get the result through a oneshot channel, so
//! both async tasks (reads) and the per-disk writer threads (blocking) can use either engine.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;

/// Which engine performs disk I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoEngineKind {
    /// io_uring, one submission thread.
    IoUring,
    /// pread/pwritev on a thread pool.
    Pread,
}

impl std::fmt::Display for IoEngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoEngineKind::IoUring => "io_uring",
            IoEngineKind::Pread => "pread",
        })
    }
}

/// One disk operation.
#[derive(Debug)]
pub enum IoOp {
    /// Reads up to `len` bytes at `offset`; fewer only at end of file.
    Read {
        file: Arc<File>,
        offset: u64,
        len: usize,
    },
    /// Writes all of `bufs`, back to back, starting at `offset`.
    Write {
        file: Arc<File>,
        offset: u64,
        bufs: Vec<Bytes>,
    },
    /// fdatasync.
    Sync { file: Arc<File> },
}

/// What a finished operation gives back.
#[derive(Debug)]
pub enum IoDone {
    Read(Vec<u8>),
    Written(usize),
    Synced,
}

type Reply = oneshot::Sender<io::Result<IoDone>>;

/// A running I/O engine; cheap to clone.
#[derive(Clone)]
pub struct Io {
    inner: Arc<Engine>,
}

enum Engine {
    Uring(UringEngine),
    Pool(PoolEngine),
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Io({})", self.kind())
    }
}

/// Largest number of iovecs one write takes (Linux IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

impl Io {
    /// Starts the requested engine.
    pub fn start(kind: IoEngineKind) -> io::Result<Io> {
        let inner = match kind {
            IoEngineKind::IoUring => Engine::Uring(UringEngine::start()?),
            IoEngineKind::Pread => Engine::Pool(PoolEngine::start(4)),
        };
        Ok(Io {
            inner: Arc::new(inner),
        })
    }

    /// io_uring when the kernel allows it, else the thread pool.
    ///
    /// The environment variable `SOV_FAILPOINT_NO_IO_URING=1` makes the probe fail, so tests
    /// can take the fallback path on a kernel that has io_uring.
    pub fn start_auto() -> Io {
        let probe = if std::env::var_os("SOV_FAILPOINT_NO_IO_URING").is_some_and(|v| v == "1") {
            Err(io::Error::other("io_uring disabled by failpoint"))
        } else {
            Io::start(IoEngineKind::IoUring)
        };
        match probe {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable, using pread/pwrite threads");
                Io::start(IoEngineKind::Pread).expect("the thread pool engine cannot fail to start")
            }
        }
    }

    pub fn kind(&self) -> IoEngineKind {
        match &*self.inner {
            Engine::Uring(_) => IoEngineKind::IoUring,
            Engine::Pool(_) => IoEngineKind::Pread,
        }
    }

    fn submit(&self, op: IoOp) -> oneshot::Receiver<io::Result<IoDone>> {
        let (tx, rx) = oneshot::channel();
        match &*self.inner {
            Engine::Uring(e) => e.submit(op, tx),
            Engine::Pool(e) => e.submit(op, tx),
        }
        rx
    }

    fn finish(rx: Result<io::Result<IoDone>, oneshot::error::RecvError>) -> io::Result<IoDone> {
        rx.unwrap_or_else(|_| Err(io::Error::other("I/O engine stopped")))
    }

    /// Reads from an async task.
    pub async fn read(&self, file: Arc<File>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        match Self::finish(self.submit(IoOp::Read { file, offset, len }).await)? {
            IoDone::Read(buf) => Ok(buf),
            other => Err(io::Error::other(format!("unexpected completion {other:?}"))),
        }
    }

    /// Reads from a plain thread.
    pub fn read_blocking(&self, file: Arc<File>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        match Self::finish(
            self.submit(IoOp::Read { file, offset, len })
                .blocking_recv(),
        )? {
            IoDone::Read(buf) => Ok(buf),
            other => Err(io::Error::other(format!("unexpected completion {other:?}"))),
        }
    }

    /// Writes every buffer from a plain thread; at most [`MAX_IOVECS`] buffers.
    pub fn write_blocking(&self, file: Arc<File>, offset: u64, bufs: Vec<Bytes>) -> io::Result<()> {
        debug_assert!(bufs.len() <= MAX_IOVECS);
        Self::finish(
            self.submit(IoOp::Write { file, offset, bufs })
                .blocking_recv(),
        )
        .map(|_| ())
    }

    /// Writes every buffer from an async task; at most [`MAX_IOVECS`] buffers.
    pub async fn write(&self, file: Arc<File>, offset: u64, bufs: Vec<Bytes>) -> io::Result<()> {
        debug_assert!(bufs.len() <= MAX_IOVECS);
        Self::finish(self.submit(IoOp::Write { file, offset, bufs }).await).map(|_| ())
    }

    /// fdatasync from an async task.
    pub async fn sync(&self, file: Arc<File>) -> io::Result<()> {
        Self::finish(self.submit(IoOp::Sync { file }).await).map(|_| ())
    }

    /// fdatasync from a plain thread.
    pub fn sync_blocking(&self, file: Arc<File>) -> io::Result<()> {
        Self::finish(self.submit(IoOp::Sync { file }).blocking_recv()).map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// The thread-pool engine.

struct PoolEngine {
    tx: Option<crossbeam_channel::Sender<(IoOp, Reply)>>,
    threads: Vec<JoinHandle<()>>,
}

impl PoolEngine {
    fn start(n: usize) -> PoolEngine {
        let (tx, rx) = crossbeam_channel::unbounded::<(IoOp, Reply)>();
        let threads = (0..n)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("io-pread-{i}"))
                    .spawn(move || {
                        for (op, reply) in rx {
                            let _ = reply.send(run_blocking(op));
                        }
                    })
                    .expect("spawning an I/O thread")
            })
            .collect();
        PoolEngine {
            tx: Some(tx),
            threads,
        }
    }

    fn submit(&self, op: IoOp, reply: Reply) {
        if let Some(tx) = &self.tx
            && let Err(e) = tx.send((op, reply))
        {
            let (_, reply) = e.into_inner();
            let _ = reply.send(Err(io::Error::other("I/O engine stopped")));
        }
    }
}

impl Drop for PoolEngine {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run_blocking(op: IoOp) -> io::Result<IoDone> {
    match op {
        IoOp::Read { file, offset, len } => {
            let mut buf = vec![0u8; len];
            let mut done = 0;
            while done < len {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(done);
            Ok(IoDone::Read(buf))
        }
        IoOp::Write { file, offset, bufs } => {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut done = 0usize;
            while done < total {
                let iov = iovecs_from(&bufs, done);
                // SAFETY: every iovec points into a live `Bytes` in `bufs`, which outlives the
                // call; the fd is open for the lifetime of `file`.
                let n = unsafe {
                    libc::pwritev(
                        file.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len() as libc::c_int,
                        (offset + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote 0"));
                }
                done += n as usize;
            }
            Ok(IoDone::Written(total))
        }
        IoOp::Sync { file } => {
            file.sync_data()?;
            Ok(IoDone::Synced)
        }
    }
}

/// iovecs covering `bufs` from byte `skip` on.
fn iovecs_from(bufs: &[Bytes], mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        out.push(libc::iovec {
            iov_base: b[skip..].as_ptr() as *mut libc::c_void,
            iov_len: b.len() - skip,
        });
        skip = 0;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The io_uring engine: one thread owns the ring; submitters queue work and poke an eventfd that
// the ring itself watches, so the thread sleeps in one place for both new work and completions.

struct UringEngine {
    tx: Option<crossbeam_channel::Sender<(IoOp, Reply)>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

const WAKE: u64 = u64::MAX;
/// Most operations handed to the kernel at once. Well under the submission queue (256) and the
/// completion queue (512), so the submission queue never fills and completions never overflow
/// (which older kernels drop); further work waits in the channel.
const MAX_INFLIGHT: usize = 128;

impl UringEngine {
    fn start() -> io::Result<UringEngine> {
        let mut ring = io_uring::IoUring::new(256)?;
        // Prove the ring works (a seccomp filter or io_uring_disabled can refuse it late).
        // SAFETY: a NOP has no buffers.
        unsafe {
            ring.submission()
                .push(&io_uring::opcode::Nop::new().build().user_data(1))
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("io_uring NOP did not complete"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh fd we own.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = crossbeam_channel::unbounded::<(IoOp, Reply)>();
        let wake2 = wake.clone();
        let thread = std::thread::Builder::new()
            .name("io-uring".into())
            .spawn(move || uring_loop(ring, rx, wake2))?;
        Ok(UringEngine {
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
    }

    fn poke(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }

    fn submit(&self, op: IoOp, reply: Reply) {
        match &self.tx {
            Some(tx) => match tx.send((op, reply)) {
                Ok(()) => self.poke(),
                Err(e) => {
                    let (_, reply) = e.into_inner();
                    let _ = reply.send(Err(io::Error::other("I/O engine stopped")));
                }
            },
            None => {
                let _ = reply.send(Err(io::Error::other("I/O engine stopped")));
            }
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.tx.take();
        self.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An operation in flight, with everything the kernel points into.
struct InFlight {
    op: IoOp,
    reply: Reply,
    /// Bytes done so far (short reads and writes are resubmitted for the rest).
    done: usize,
    read_buf: Vec<u8>,
    iovecs: Vec<libc::iovec>,
}

fn uring_loop(
    ring: io_uring::IoUring,
    rx: crossbeam_channel::Receiver<(IoOp, Reply)>,
    wake: Arc<OwnedFd>,
) {
    use io_uring::{opcode, types};
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let mut next_id: u64 = 1;
    let mut wake_buf = Box::new([0u8; 8]);
    let mut wake_armed = false;
    let mut closed = false;

    // Declared after `wake_buf` so the ring (and any read it still has pending on the eventfd)
    // goes away before the buffer does.
    let mut ring = ring;
    loop {
        // Take new work, up to the in-flight cap.
        while inflight.len() < MAX_INFLIGHT {
            match rx.try_recv() {
                Ok((op, reply)) => {
                    let id = next_id;
                    next_id += 1;
                    let mut f = InFlight {
                        op,
                        reply,
                        done: 0,
                        read_buf: Vec::new(),
                        iovecs: Vec::new(),
                    };
                    if let IoOp::Read { len, .. } = &f.op {
                        f.read_buf = Vec::with_capacity(*len);
                    }
                    let sqe = build_sqe(&mut f, id);
                    inflight.insert(id, f);
                    push(&mut ring, &sqe);
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && inflight.is_empty() {
            return;
        }
        if !wake_armed && !closed {
            let sqe = opcode::Read::new(types::Fd(wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE);
            push(&mut ring, &sqe);
            wake_armed = true;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            let transient = e.kind() == io::ErrorKind::Interrupted
                || matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN));
            if !transient {
                // A broken ring. The kernel may still be using the buffers of what it accepted,
                // so they are leaked, never freed; the callers get an error.
                tracing::error!(error = %e, "io_uring submit failed; engine stopped");
                for (_, f) in inflight.drain() {
                    let InFlight {
                        op,
                        reply,
                        read_buf,
                        iovecs,
                        ..
                    } = f;
                    std::mem::forget((op, read_buf, iovecs));
                    let _ = reply.send(Err(io::Error::other(format!("io_uring failed: {e}"))));
                }
                std::mem::forget(ring);
                std::mem::forget(wake_buf);
                return;
            }
            // Busy or interrupted: reap what has completed, then go round again.
        }
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in cqes {
            if id == WAKE {
                wake_armed = false;
                continue;
            }
            let Some(mut f) = inflight.remove(&id) else {
                continue;
            };
            if res < 0 {
                let err = io::Error::from_raw_os_error(-res);
                if err.kind() == io::ErrorKind::Interrupted
                    || err.raw_os_error() == Some(libc::EAGAIN)
                {
                    let sqe = build_sqe(&mut f, id);
                    inflight.insert(id, f);
                    push(&mut ring, &sqe);
                } else {
                    let _ = f.reply.send(Err(err));
                }
                continue;
            }
            let n = res as usize;
            match &f.op {
                IoOp::Sync { .. } => {
                    let _ = f.reply.send(Ok(IoDone::Synced));
                }
                IoOp::Read { len, .. } => {
                    let len = *len;
                    f.done += n;
                    // SAFETY: the kernel initialised bytes [0, done) of the spare capacity.
                    unsafe { f.read_buf.set_len(f.done) };
                    if n == 0 || f.done >= len {
                        let buf = std::mem::take(&mut f.read_buf);
                        let _ = f.reply.send(Ok(IoDone::Read(buf)));
                    } else {
                        let sqe = build_sqe(&mut f, id);
                        inflight.insert(id, f);
                        push(&mut ring, &sqe);
                    }
                }
                IoOp::Write { bufs, .. } => {
                    let total: usize = bufs.iter().map(|b| b.len()).sum();
                    f.done += n;
                    if f.done >= total {
                        let _ = f.reply.send(Ok(IoDone::Written(total)));
                    } else if n == 0 {
                        let _ = f.reply.send(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "write returned 0",
                        )));
                    } else {
                        let sqe = build_sqe(&mut f, id);
                        inflight.insert(id, f);
                        push(&mut ring, &sqe);
                    }
                }
            }
        }
    }
}

fn push(ring: &mut io_uring::IoUring, sqe: &io_uring::squeue::Entry) {
    loop {
        // SAFETY: every buffer an entry points to is owned by an `InFlight` kept in the map (or
        // the boxed wake buffer) until its completion is reaped.
        let pushed = unsafe { ring.submission().push(sqe) };
        if pushed.is_ok() {
            return;
        }
        // Queue full: hand what is queued to the kernel and retry.
        let _ = ring.submit();
    }
}

fn build_sqe(f: &mut InFlight, id: u64) -> io_uring::squeue::Entry {
    use io_uring::{opcode, types};
    match &f.op {
        IoOp::Read { file, offset, len } => {
            let ptr = f.read_buf.as_mut_ptr().wrapping_add(f.done);
            opcode::Read::new(
                types::Fd(file.as_raw_fd()),
                ptr,
                (*len - f.done).min(u32::MAX as usize) as u32,
            )
            .offset(offset + f.done as u64)
            .build()
            .user_data(id)
        }
        IoOp::Write { file, offset, bufs } => {
            f.iovecs = iovecs_from(bufs, f.done);
            opcode::Writev::new(
                types::Fd(file.as_raw_fd()),
                f.iovecs.as_ptr(),
                f.iovecs.len() as u32,
            )
            .offset(offset + f.done as u64)
            .build()
            .user_data(id)
        }
        IoOp::Sync { file } => opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(kind: IoEngineKind) {
        let io = Io::start(kind).expect("engine starts");
        assert_eq!(io.kind(), kind);
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        let bufs: Vec<Bytes> = (0..300u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8; 1000 + i as usize]))
            .collect();
        let expect: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        io.write_blocking(file.clone(), 4096, bufs).unwrap();
        io.sync_blocking(file.clone()).unwrap();
        let got = io
            .read_blocking(file.clone(), 4096, expect.len() + 100)
            .unwrap();
        assert_eq!(got, expect, "read returns what was written, short at EOF");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got = rt.block_on(io.read(file.clone(), 4096 + 10, 20)).unwrap();
        assert_eq!(got, expect[10..30]);
        // Many concurrent reads complete, each with its own bytes.
        let results = rt.block_on(async {
            // Far more than the in-flight cap: the rest wait their turn.
            let futs = (0..2000u64).map(|i| io.read(file.clone(), 4096 + (i % 64) * 100, 100));
            futures::future::join_all(futs).await
        });
        for (i, r) in results.into_iter().enumerate() {
            let i = i % 64;
            assert_eq!(r.unwrap(), expect[i * 100..i * 100 + 100]);
        }
        // Errors come back as errors: a read-only file refuses writes.
        let ro = Arc::new(std::fs::File::open(dir.path().join("f")).unwrap());
        assert!(
            io.write_blocking(ro, 0, vec![Bytes::from_static(b"x")])
                .is_err()
        );
    }

    #[test]
    fn io_uring_engine_reads_writes_and_syncs() {
        exercise(IoEngineKind::IoUring);
    }

    #[test]
    fn pread_engine_reads_writes_and_syncs() {
        exercise(IoEngineKind::Pread);
    }
}
