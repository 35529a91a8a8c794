//! What the targets share: runtimes built once per process, and scratch folders.

use std::path::PathBuf;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

/// A current-thread runtime with a paused clock: when every task waits, time jumps to the
/// next timer, so a timeout fires at once when a server waits for bytes that never come (a
/// hang is reported in microseconds instead of after the timeout's real length).
pub fn paused() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime")
    })
}

/// A runtime on its own threads, for code that blocks its caller while tasks run (the
/// vhost-user backend) and for storaged's async calls.
pub fn threaded() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// A fresh scratch folder, on tmpfs where there is one (fsync and syncfs cost nothing there).
pub fn scratch() -> tempfile::TempDir {
    static BASE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        tempfile::tempdir_in(&shm).ok().map(|_| shm)
    });
    match base {
        Some(b) => tempfile::Builder::new()
            .prefix("sov-fuzz-")
            .tempdir_in(b)
            .expect("a scratch folder"),
        None => tempfile::Builder::new()
            .prefix("sov-fuzz-")
            .tempdir()
            .expect("a scratch folder"),
    }
}

/// Reads fields off the front of a fuzz input; past its end everything reads as zero.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn u8(&mut self) -> u8 {
        let v = self.0.first().copied().unwrap_or(0);
        self.0 = self.0.get(1..).unwrap_or_default();
        v
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
