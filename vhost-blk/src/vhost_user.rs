//! vhost-user-blk front end: serves one [`BlockDevice`] to a VMM (QEMU, Cloud Hypervisor)
//! over a vhost-user socket, built on rust-vmm's `vhost-user-backend` 0.24.
//!
//! Threads: `vhost-user-backend` runs one thread for the vhost-user control socket and one
//! vring worker thread (all queues). The worker only pops descriptor chains, parses the
//! virtio-blk header and copies write payloads out of guest memory; every device call runs as
//! a task on the caller's tokio runtime, and that task writes the data and status back,
//! adds the chain to the used ring and signals the guest. Requests therefore complete out of
//! order and a queue depth > 1 overlaps on the device.
//!
//! Online resize: the config space reports `device.size()` live, but vhost 0.18's
//! `vhost_user::Backend` (the backend-to-frontend request channel handed to
//! `VhostUserBackend::set_backend_req_fd`) can only send SHARED_OBJECT_* and SHMEM_* messages:
//! it does not override `VhostUserFrontendReqHandler::handle_config_change` (the trait default
//! returns ENOSYS without sending anything), its `send_message` is private and it exposes no
//! fd. So `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` cannot be sent with these crate versions, and
//! a running guest only sees a new size after the frontend re-reads the config (QEMU does so on
//! reconnect/realize, i.e. a new `serve_vhost_user_blk` connection or a VM restart).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as ProtoError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{
    Bytes as _, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::export::{BlockDevice, BlockError};

type Mem = GuestMemoryMmap<()>;
type AtomicMem = GuestMemoryAtomic<Mem>;
type Vring = VringRwLock<AtomicMem>;

const SECTOR: u64 = 512;
/// virtio-blk request header: le32 type, le32 reserved/ioprio, le64 sector.
const HEADER_LEN: u64 = 16;
/// virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
const SEGMENT_LEN: u64 = 16;
/// GET_ID answers at most this many bytes.
const ID_LEN: usize = 20;
/// Largest data payload of one request; larger ones fail with IOERR (Linux sends <= 1.25 MiB
/// by default, at most a few MiB).
const MAX_IO_BYTES: u64 = 32 << 20;
/// Largest discard / write-zeroes segment, in sectors (fits a u32 byte length).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest number of discard / write-zeroes segments per request.
const MAX_DISCARD_SEGS: u32 = 32;
/// Size of the config space we answer from (struct virtio_blk_config is 60..=72 bytes in
/// current headers; anything beyond what we fill reads as zero).
const CONFIG_SPACE_LEN: usize = 256;
/// How long `GET_VRING_BASE` / the end of a connection waits for requests still on the device.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why serving a socket failed.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The options can't be served (zero queues, queue size not a power of two...).
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The socket could not be created or accepted on.
    #[error("socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    /// The vhost-user daemon could not be set up (threads, eventfds).
    #[error("vhost-user daemon setup: {0}")]
    Daemon(String),
    /// The frontend sent something the protocol layer rejected; the connection was closed.
    #[error("vhost-user protocol error: {0}")]
    Protocol(String),
}

/// Per-socket settings.
#[derive(Clone, Debug)]
pub struct VhostUserBlkOptions {
    /// Number of virtqueues offered (VIRTIO_BLK_F_MQ), 1..=64.
    pub num_queues: usize,
    /// Largest queue size the frontend may configure (power of two, <= 32768).
    pub queue_size: u16,
    /// Answer to VIRTIO_BLK_T_GET_ID (first 20 bytes); empty means `device.id()`.
    pub serial: String,
    /// Stops the server and observes it; clone it before passing the options in.
    pub control: ServeControl,
}

impl Default for VhostUserBlkOptions {
    fn default() -> Self {
        VhostUserBlkOptions {
            num_queues: 1,
            queue_size: 256,
            serial: String::new(),
            control: ServeControl::default(),
        }
    }
}

/// Handle to stop a running [`serve_vhost_user_blk`] and read its per-queue request counters.
/// Cheap to clone; one handle may be reused across reconnects (the counters accumulate), but
/// serves at most one `serve_vhost_user_blk` call at a time.
#[derive(Clone, Default)]
pub struct ServeControl {
    inner: Arc<ControlInner>,
}

#[derive(Default)]
struct ControlInner {
    stopped: AtomicBool,
    socket: Mutex<Option<PathBuf>>,
    shutdown: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
    per_queue: Mutex<Vec<Arc<AtomicU64>>>,
}

impl fmt::Debug for ServeControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeControl")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl ServeControl {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the server to stop: closes the frontend connection if there is one, or wakes the
    /// pending accept. `serve_vhost_user_blk` then returns `Ok(())`. Sticky: a later call to
    /// `serve_vhost_user_blk` with this handle returns at once.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        if let Some(handle) = lock(&self.inner.shutdown).as_ref() {
            handle.shutdown();
        }
        // Wake a blocked accept(); the daemon then sees an immediate hang-up.
        if let Some(path) = lock(&self.inner.socket).clone() {
            let _ = UnixStream::connect(path);
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Requests completed so far on each queue (index = queue number).
    pub fn completed_per_queue(&self) -> Vec<u64> {
        lock(&self.inner.per_queue)
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    fn counters(&self, num_queues: usize) -> Vec<Arc<AtomicU64>> {
        let mut v = lock(&self.inner.per_queue);
        while v.len() < num_queues {
            v.push(Arc::new(AtomicU64::new(0)));
        }
        v[..num_queues].to_vec()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves one vhost-user-blk socket for `device` until the frontend disconnects or
/// `opts.control.stop()` is called; may be called again to accept a reconnect. Blocks the
/// calling thread (do not call it from inside a tokio worker thread). Returns `Ok(())` on a
/// clean disconnect or stop, `Err(Protocol)` when the frontend sent something invalid.
pub fn serve_vhost_user_blk<D: BlockDevice>(
    socket_path: &Path,
    device: Arc<D>,
    rt: tokio::runtime::Handle,
    opts: VhostUserBlkOptions,
) -> Result<(), VhostUserError> {
    if opts.num_queues == 0 || opts.num_queues > 64 {
        return Err(VhostUserError::InvalidOptions(format!(
            "num_queues {} not in 1..=64",
            opts.num_queues
        )));
    }
    if !opts.queue_size.is_power_of_two() {
        return Err(VhostUserError::InvalidOptions(format!(
            "queue_size {} is not a power of two",
            opts.queue_size
        )));
    }
    let control = opts.control.clone();
    if control.is_stopped() {
        return Ok(());
    }

    let backend = Arc::new(BlkBackend::new(device, rt, &opts));
    let mut daemon = VhostUserDaemon::new(
        "vhost-user-blk".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserError::Daemon(e.to_string()))?;

    let socket_err = |reason: String| VhostUserError::Socket {
        path: socket_path.to_path_buf(),
        reason,
    };
    let mut listener = Listener::new(socket_path, true).map_err(|e| socket_err(e.to_string()))?;
    *lock(&control.inner.socket) = Some(socket_path.to_path_buf());
    if control.is_stopped() {
        *lock(&control.inner.socket) = None;
        return Ok(());
    }

    // Blocks until a frontend connects (or stop() connects to wake us).
    let started = daemon.start(&mut listener);
    *lock(&control.inner.socket) = None;
    drop(listener);
    if let Err(e) = started {
        return Err(socket_err(e.to_string()));
    }
    *lock(&control.inner.shutdown) = daemon.shutdown_handle();
    if control.is_stopped() {
        daemon.request_shutdown();
    }
    tracing::debug!(socket = %socket_path.display(), "vhost-user-blk frontend connected");

    let result = daemon.wait();
    *lock(&control.inner.shutdown) = None;
    // Dropping the daemon stops and joins the vring worker threads.
    drop(daemon);
    if !backend.inflight.wait_all_idle(DRAIN_TIMEOUT) {
        tracing::warn!("vhost-user-blk: requests still on the device after disconnect");
    }

    match result {
        Ok(()) => Ok(()),
        Err(_) if control.is_stopped() => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            ProtoError::Disconnected | ProtoError::PartialMessage | ProtoError::SocketBroken(_),
        )) => Ok(()),
        Err(e) => Err(VhostUserError::Protocol(e.to_string())),
    }
}

/// Requests popped from each queue and not yet added to the used ring.
struct Inflight {
    counts: Mutex<Vec<usize>>,
    idle: Condvar,
}

impl Inflight {
    fn new(n: usize) -> Self {
        Inflight {
            counts: Mutex::new(vec![0; n]),
            idle: Condvar::new(),
        }
    }

    fn enter(self: &Arc<Self>, queue: usize) -> InflightGuard {
        lock(&self.counts)[queue] += 1;
        InflightGuard {
            inflight: self.clone(),
            queue,
        }
    }

    fn wait_idle(&self, pred: impl Fn(&[usize]) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut counts = lock(&self.counts);
        while !pred(&counts) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            counts = match self.idle.wait_timeout(counts, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    fn wait_queue_idle(&self, queue: usize, timeout: Duration) -> bool {
        self.wait_idle(|c| c.get(queue).is_none_or(|&n| n == 0), timeout)
    }

    fn wait_all_idle(&self, timeout: Duration) -> bool {
        self.wait_idle(|c| c.iter().all(|&n| n == 0), timeout)
    }
}

struct InflightGuard {
    inflight: Arc<Inflight>,
    queue: usize,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut counts = lock(&self.inflight.counts);
        counts[self.queue] -= 1;
        drop(counts);
        self.inflight.idle.notify_all();
    }
}

/// The `VhostUserBackend` implementation (shared as `Arc<BlkBackend<D>>`).
struct BlkBackend<D: BlockDevice> {
    device: Arc<D>,
    rt: tokio::runtime::Handle,
    num_queues: usize,
    queue_size: u16,
    serial: [u8; ID_LEN],
    mem: RwLock<Option<AtomicMem>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    inflight: Arc<Inflight>,
    completed: Vec<Arc<AtomicU64>>,
    /// The read ends of the exit events handed out by `exit_event`: vhost-user-backend 0.24
    /// registers each in its epoll with `into_raw_fd` and never closes it (one descriptor per
    /// connection, so a long-lived exporter would run out). Closed when the backend goes,
    /// which is after the daemon and its worker threads. Remove on the next upgrade.
    exit_fds: Mutex<Vec<RawFd>>,
}

impl<D: BlockDevice> Drop for BlkBackend<D> {
    fn drop(&mut self) {
        for fd in lock(&self.exit_fds).drain(..) {
            // SAFETY: the library turned the descriptor into a raw one and dropped every
            // handler (and its epoll) that used it; nothing else owns or closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl<D: BlockDevice> BlkBackend<D> {
    fn new(device: Arc<D>, rt: tokio::runtime::Handle, opts: &VhostUserBlkOptions) -> Self {
        let id = if opts.serial.is_empty() {
            device.id()
        } else {
            opts.serial.clone()
        };
        let mut serial = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        BlkBackend {
            device,
            rt,
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            serial,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            inflight: Arc::new(Inflight::new(opts.num_queues)),
            completed: opts.control.counters(opts.num_queues),
            exit_fds: Mutex::new(Vec::new()),
        }
    }

    fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).clamp(1, 254)
    }

    fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        let blk_size = self.device.block_size().max(SECTOR as u32);
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.device.size() / SECTOR).to_le_bytes()); // capacity
        put(12, &self.seg_max().to_le_bytes()); // seg_max
        put(20, &blk_size.to_le_bytes()); // blk_size
        put(32, &[1]); // wce: write-back cache (we offer FLUSH)
        put(34, &(self.num_queues as u16).to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEGS.to_le_bytes()); // max_discard_seg
        put(44, &(blk_size / SECTOR as u32).to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEGS.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    fn memory(&self) -> Option<AtomicMem> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Pops every available chain of `vring` and starts it. False when there is no guest
    /// memory or the queue refuses the available ring (an index too far ahead of ours).
    fn process_queue(&self, queue: usize, vring: &Vring) -> bool {
        let Some(atomic) = self.memory() else {
            return false;
        };
        let mem = atomic.memory();
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            match state.get_queue_mut().iter(mem.clone()) {
                Ok(iter) => iter.collect(),
                Err(e) => {
                    tracing::warn!(queue, "vhost-user-blk: bad avail ring: {e}");
                    return false;
                }
            }
        };
        let mem = mem.into_inner();
        for chain in chains {
            self.start_request(queue, vring, &mem, chain);
        }
        true
    }

    fn start_request<M>(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &Arc<Mem>,
        chain: DescriptorChain<M>,
    ) where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let completion = Completion {
            vring: vring.clone(),
            mem: mem.clone(),
            head,
            status: None,
            done: false,
            counter: self.completed[queue].clone(),
            _inflight: self.inflight.enter(queue),
        };
        let parsed = match Chain::parse(mem, chain) {
            Ok(p) => p,
            Err(status) => {
                tracing::debug!(queue, head, "vhost-user-blk: malformed descriptor chain");
                let mut completion = completion;
                completion.status = status;
                completion.finish(VIRTIO_BLK_S_IOERR as u8, 0);
                return;
            }
        };
        let mut completion = completion;
        completion.status = Some(parsed.status);
        match self.prepare(mem, &parsed) {
            Prepared::Done(status, data_len) => completion.finish(status, data_len),
            Prepared::Io(io) => {
                let device = self.device.clone();
                self.rt.spawn(async move {
                    let (status, data_len) = io.run(&*device, &completion.mem).await;
                    completion.finish(status, data_len);
                });
            }
        }
    }

    /// Decodes the request; answers what needs no device call right away.
    fn prepare(&self, mem: &Mem, chain: &Chain) -> Prepared {
        let mut header = [0u8; HEADER_LEN as usize];
        if !chain.read(mem, 0, &mut header) {
            return Prepared::Done(VIRTIO_BLK_S_IOERR as u8, 0);
        }
        let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let ioerr = Prepared::Done(VIRTIO_BLK_S_IOERR as u8, 0);
        let out_len = chain.readable_len - HEADER_LEN; // payload after the header
        let in_len = chain.writable_len - 1; // room before the status byte
        let read_only = self.device.read_only();
        let fua = self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_FLUSH) == 0;

        match req_type {
            VIRTIO_BLK_T_IN => {
                let Some(offset) = self.check_range(sector, in_len) else {
                    return ioerr;
                };
                Prepared::Io(Io::Read {
                    offset,
                    len: in_len as u32,
                    dst: chain.writable.clone(),
                })
            }
            VIRTIO_BLK_T_OUT => {
                if read_only {
                    return ioerr;
                }
                let Some(offset) = self.check_range(sector, out_len) else {
                    return ioerr;
                };
                let mut data = vec![0u8; out_len as usize];
                if !chain.read(mem, HEADER_LEN, &mut data) {
                    return ioerr;
                }
                Prepared::Io(Io::Write {
                    offset,
                    data: Bytes::from(data),
                    fua,
                })
            }
            VIRTIO_BLK_T_FLUSH => Prepared::Io(Io::Flush),
            VIRTIO_BLK_T_GET_ID => {
                let n = (in_len as usize).min(ID_LEN);
                if !chain.write(mem, 0, &self.serial[..n]) {
                    return ioerr;
                }
                Prepared::Done(VIRTIO_BLK_S_OK as u8, n as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
                if read_only {
                    return ioerr;
                }
                if out_len == 0
                    || !out_len.is_multiple_of(SEGMENT_LEN)
                    || out_len / SEGMENT_LEN > u64::from(MAX_DISCARD_SEGS)
                {
                    return ioerr;
                }
                let mut raw = vec![0u8; out_len as usize];
                if !chain.read(mem, HEADER_LEN, &mut raw) {
                    return ioerr;
                }
                let mut ranges = Vec::with_capacity(raw.len() / SEGMENT_LEN as usize);
                for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
                    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                    let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                    // UNMAP is a hint (allowed for write-zeroes, tolerated on discard); both
                    // paths leave zeroes behind. Any other flag bit is reserved.
                    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                        return Prepared::Done(VIRTIO_BLK_S_UNSUPP as u8, 0);
                    }
                    if sectors > MAX_DISCARD_SECTORS {
                        return ioerr;
                    }
                    let len = u64::from(sectors) * SECTOR;
                    let Some(offset) = self.check_range_unbounded(sector, len) else {
                        return ioerr;
                    };
                    ranges.push((offset, len as u32));
                }
                Prepared::Io(if zeroes {
                    Io::WriteZeroes { ranges, fua }
                } else {
                    Io::Discard { ranges }
                })
            }
            other => {
                tracing::debug!(req_type = other, "vhost-user-blk: unsupported request");
                Prepared::Done(VIRTIO_BLK_S_UNSUPP as u8, 0)
            }
        }
    }

    /// Byte offset of `sector` if `len` bytes from there fit in the device and one request.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        if len > MAX_IO_BYTES {
            return None;
        }
        self.check_range_unbounded(sector, len)
    }

    fn check_range_unbounded(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len)?;
        (end <= self.device.size()).then_some(offset)
    }
}

enum Prepared {
    /// Answer now with (status, bytes written before the status byte).
    Done(u8, u32),
    /// Needs the device.
    Io(Io),
}

enum Io {
    Read {
        offset: u64,
        len: u32,
        dst: Vec<Seg>,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Discard {
        ranges: Vec<(u64, u32)>,
    },
    WriteZeroes {
        ranges: Vec<(u64, u32)>,
        fua: bool,
    },
}

impl Io {
    async fn run<D: BlockDevice>(self, device: &D, mem: &Mem) -> (u8, u32) {
        let ok = VIRTIO_BLK_S_OK as u8;
        let result: Result<u32, BlockError> = match self {
            Io::Read { offset, len, dst } => match device.read(offset, len).await {
                Ok(data) if data.len() == len as usize => {
                    if write_segs(mem, &dst, 0, &data) {
                        Ok(len)
                    } else {
                        Err(BlockError::Io("guest memory write failed".into()))
                    }
                }
                Ok(data) => Err(BlockError::Io(format!(
                    "device returned {} bytes, wanted {len}",
                    data.len()
                ))),
                Err(e) => Err(e),
            },
            Io::Write { offset, data, fua } => device.write(offset, data, fua).await.map(|()| 0),
            Io::Flush => device.flush().await.map(|()| 0),
            Io::Discard { ranges } => {
                let mut r = Ok(0);
                for (offset, len) in ranges {
                    if let Err(e) = device.trim(offset, len).await {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
            Io::WriteZeroes { ranges, fua } => {
                let mut r = Ok(0);
                for (offset, len) in ranges {
                    if let Err(e) = device.write_zeroes(offset, len, fua).await {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
        };
        match result {
            Ok(n) => (ok, n),
            Err(e) => {
                tracing::debug!("vhost-user-blk: request failed: {e}");
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        }
    }
}

/// One guest buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// A validated descriptor chain: device-readable buffers, then device-writable buffers whose
/// last byte is the status.
struct Chain {
    readable: Vec<Seg>,
    readable_len: u64,
    writable: Vec<Seg>,
    writable_len: u64,
    status: GuestAddress,
}

impl Chain {
    /// On failure returns where a status byte could still be written, if anywhere.
    fn parse<M>(mem: &Mem, chain: DescriptorChain<M>) -> Result<Chain, Option<GuestAddress>>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let (mut readable_len, mut writable_len) = (0u64, 0u64);
        let mut bad = false;
        for desc in chain {
            let seg = Seg {
                addr: desc.addr(),
                len: u64::from(desc.len()),
            };
            if seg.len == 0 {
                continue;
            }
            if !range_ok(mem, seg) {
                bad = true;
                continue;
            }
            if desc.is_write_only() {
                writable_len += seg.len;
                writable.push(seg);
            } else {
                // A readable buffer after a writable one breaks the virtio layout.
                bad |= !writable.is_empty();
                readable_len += seg.len;
                readable.push(seg);
            }
        }
        let status = writable.last().map(|s| GuestAddress(s.addr.0 + s.len - 1));
        if bad || readable_len < HEADER_LEN || writable_len == 0 {
            return Err(status);
        }
        let mut chain = Chain {
            readable,
            readable_len,
            writable,
            writable_len,
            status: status.unwrap_or_default(),
        };
        // The status byte is not part of the data area.
        if let Some(last) = chain.writable.last_mut() {
            last.len -= 1;
            if last.len == 0 {
                chain.writable.pop();
            }
        }
        Ok(chain)
    }

    fn read(&self, mem: &Mem, offset: u64, buf: &mut [u8]) -> bool {
        read_segs(mem, &self.readable, offset, buf)
    }

    fn write(&self, mem: &Mem, offset: u64, data: &[u8]) -> bool {
        write_segs(mem, &self.writable, offset, data)
    }
}

fn range_ok(mem: &Mem, seg: Seg) -> bool {
    usize::try_from(seg.len).is_ok_and(|len| {
        seg.addr
            .0
            .checked_add(seg.len)
            .is_some_and(|_| mem.check_range(seg.addr, len, vm_memory::Permissions::ReadWrite))
    })
}

/// Walks `segs` as one byte stream from `offset`, calling `f(addr, start, n)` per piece.
fn for_each_piece(
    segs: &[Seg],
    mut offset: u64,
    total: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
) -> bool {
    let mut done = 0usize;
    for seg in segs {
        if done == total {
            break;
        }
        if offset >= seg.len {
            offset -= seg.len;
            continue;
        }
        let n = ((seg.len - offset) as usize).min(total - done);
        if !f(GuestAddress(seg.addr.0 + offset), done, n) {
            return false;
        }
        done += n;
        offset = 0;
    }
    done == total
}

fn read_segs(mem: &Mem, segs: &[Seg], offset: u64, buf: &mut [u8]) -> bool {
    let total = buf.len();
    for_each_piece(segs, offset, total, |addr, start, n| {
        mem.read_slice(&mut buf[start..start + n], addr).is_ok()
    })
}

fn write_segs(mem: &Mem, segs: &[Seg], offset: u64, data: &[u8]) -> bool {
    for_each_piece(segs, offset, data.len(), |addr, start, n| {
        mem.write_slice(&data[start..start + n], addr).is_ok()
    })
}

/// Owns one popped chain until it is on the used ring. Dropped unfinished (device future
/// cancelled, runtime shut down) it still completes the chain with IOERR so the guest never
/// waits forever.
struct Completion {
    vring: Vring,
    mem: Arc<Mem>,
    head: u16,
    status: Option<GuestAddress>,
    done: bool,
    counter: Arc<AtomicU64>,
    // Dropped after `Drop::drop` ran, i.e. after the chain is on the used ring.
    _inflight: InflightGuard,
}

impl Completion {
    fn finish(mut self, status: u8, data_len: u32) {
        self.complete(status, data_len);
    }

    fn complete(&mut self, status: u8, data_len: u32) {
        if self.done {
            return;
        }
        self.done = true;
        let used_len = match self.status {
            Some(addr) if self.mem.write_obj(status, addr).is_ok() => data_len.saturating_add(1),
            _ => 0,
        };
        let mut state = self.vring.get_mut();
        if let Err(e) = state.add_used(self.head, used_len) {
            tracing::warn!(head = self.head, "vhost-user-blk: add_used failed: {e}");
            return;
        }
        self.counter.fetch_add(1, Ordering::Relaxed);
        // needs_notification() is always true without EVENT_IDX.
        if state.needs_notification().unwrap_or(true)
            && let Err(e) = state.signal_used_queue()
        {
            tracing::debug!("vhost-user-blk: signal_used_queue failed: {e}");
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.complete(VIRTIO_BLK_S_IOERR as u8, 0);
    }
}

impl<D: BlockDevice> VhostUserBackend for BlkBackend<D> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.device.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let (offset, size) = (offset as usize, size as usize);
        let mut out = vec![0u8; size.min(CONFIG_SPACE_LEN)];
        if offset < CONFIG_SPACE_LEN {
            let n = out.len().min(CONFIG_SPACE_LEN - offset);
            out[..n].copy_from_slice(&space[offset..offset + n]);
        }
        // A length mismatch makes the library answer with an empty (error) payload.
        out
    }

    fn update_memory(&self, mem: AtomicMem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                lock(&self.exit_fds).push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                tracing::error!("vhost-user-blk: exit eventfd: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend will read next_avail; every popped request must be on
        // the used ring by then.
        if self
            .inflight
            .wait_queue_idle(queue_index as usize, DRAIN_TIMEOUT)
        {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "requests still in flight on the device",
            ))
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // One worker thread serves all queues, so the event index is the queue index.
        let queue = usize::from(device_event);
        let Some(vring) = vrings.get(queue) else {
            return Ok(());
        };
        if evset != EventSet::IN {
            return Ok(());
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let usable = self.process_queue(queue, vring);
            // With EVENT_IDX, re-enable notifications and look again for chains that raced in.
            // A refused ring looks non-empty forever: wait for the next kick instead of
            // spinning on it.
            if !event_idx || !vring.enable_notification().unwrap_or(false) || !usable {
                break;
            }
        }
        Ok(())
    }
}

/// Entry points for the fuzz targets (`sov-fuzz-targets`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// One split virtqueue laid out in guest memory.
    #[derive(Debug, Clone, Copy)]
    pub struct Queue {
        /// Queue size the frontend set (SET_VRING_NUM).
        pub size: u16,
        /// Guest addresses of the descriptor table, the available ring and the used ring.
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        /// Features the frontend acked (SET_FEATURES), EVENT_IDX included.
        pub features: u64,
    }

    /// What one run of the queue handler did.
    #[derive(Debug)]
    pub struct Outcome {
        /// Chains taken off the available ring.
        pub popped: u16,
        /// Chains put on the used ring (counted by the backend).
        pub completed: u64,
        /// Guest memory afterwards.
        pub memory: Vec<u8>,
    }

    /// Serves one kick of a virtqueue in a guest memory that holds `image` at address 0, the
    /// way the vring worker does (the backend's `handle_event`), then waits until every
    /// request popped is on the used ring. `rt` must be a runtime running on other threads.
    pub fn kick<D: BlockDevice>(
        device: Arc<D>,
        rt: tokio::runtime::Handle,
        image: &[u8],
        q: Queue,
        max_queue_size: u16,
    ) -> Result<Outcome, String> {
        let mem = Mem::from_ranges(&[(GuestAddress(0), image.len())]).map_err(|e| e.to_string())?;
        mem.write_slice(image, GuestAddress(0))
            .map_err(|e| e.to_string())?;
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let opts = VhostUserBlkOptions {
            queue_size: max_queue_size,
            ..Default::default()
        };
        let backend = BlkBackend::new(device, rt, &opts);
        backend
            .update_memory(atomic.clone())
            .map_err(|e| e.to_string())?;
        backend.acked_features(q.features);
        let event_idx = q.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        backend.set_event_idx(event_idx);
        let vring = Vring::new(atomic, max_queue_size).map_err(|e| e.to_string())?;
        vring.set_queue_size(q.size);
        vring
            .set_queue_info(q.desc, q.avail, q.used)
            .map_err(|e| e.to_string())?;
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .map_err(|e| e.to_string())?;
        if !backend.inflight.wait_all_idle(Duration::from_secs(10)) {
            return Err("requests still in flight after 10 s".into());
        }
        let mut memory = vec![0u8; image.len()];
        mem.read_slice(&mut memory, GuestAddress(0))
            .map_err(|e| e.to_string())?;
        Ok(Outcome {
            popped: vring.queue_next_avail(),
            completed: backend.completed[0].load(Ordering::Relaxed),
            memory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    const QSIZE: u16 = 64;
    const DATA: u64 = 0x10_0000;

    /// 1 MiB device; reads at offset 0 take 200 ms so later requests overtake them.
    struct TestDevice {
        data: Mutex<Vec<u8>>,
        ro: bool,
    }

    impl BlockDevice for TestDevice {
        fn size(&self) -> u64 {
            lock(&self.data).len() as u64
        }
        fn read_only(&self) -> bool {
            self.ro
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
            if offset == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let d = lock(&self.data);
            Ok(Bytes::copy_from_slice(
                &d[offset as usize..][..len as usize],
            ))
        }
        async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BlockError> {
            lock(&self.data)[offset as usize..][..data.len()].copy_from_slice(&data);
            Ok(())
        }
        async fn write_zeroes(&self, offset: u64, len: u32, _: bool) -> Result<(), BlockError> {
            lock(&self.data)[offset as usize..][..len as usize].fill(0);
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u32) -> Result<(), BlockError> {
            self.write_zeroes(offset, len, false).await
        }
        async fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn id(&self) -> String {
            "test-device-id".into()
        }
    }

    struct Harness {
        rt: tokio::runtime::Runtime,
        mem: Mem,
        backend: BlkBackend<TestDevice>,
        vring: Vring,
        device: Arc<TestDevice>,
        next_desc: u16,
        used_seen: u16,
        avail_addr: GuestAddress,
        used_addr: GuestAddress,
    }

    impl Harness {
        fn new(ro: bool) -> Harness {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let mem = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            let device = Arc::new(TestDevice {
                data: Mutex::new((0..1 << 20).map(|i| (i % 251) as u8).collect()),
                ro,
            });
            let opts = VhostUserBlkOptions {
                serial: "serial-0123456789abcdefXYZ".into(),
                ..Default::default()
            };
            let backend = BlkBackend::new(device.clone(), rt.handle().clone(), &opts);
            backend.update_memory(atomic.clone()).unwrap();
            let mock = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
            let vring = Vring::new(atomic, QSIZE).unwrap();
            vring.set_queue_size(QSIZE);
            vring
                .set_queue_info(
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                )
                .unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let (avail_addr, used_addr) = (mock.avail_addr(), mock.used_addr());
            Harness {
                avail_addr,
                used_addr,
                rt,
                mem,
                backend,
                vring,
                device,
                next_desc: 0,
                used_seen: 0,
            }
        }

        /// Queues one chain of (addr, len, device-writable) buffers; returns its head.
        fn push(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            let descs: Vec<RawDescriptor> = bufs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, w))| {
                    let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                    if i + 1 < bufs.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    let next = head + i as u16 + 1;
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
                })
                .collect();
            for (i, d) in descs.iter().enumerate() {
                let at = GuestAddress(16 * u64::from(head + i as u16));
                self.mem.write_obj(*d, at).unwrap();
            }
            let idx: u16 = self.mem.read_obj(self.avail_addr.unchecked_add(2)).unwrap();
            let slot = u64::from(idx % QSIZE);
            self.mem
                .write_obj(head, self.avail_addr.unchecked_add(4 + 2 * slot))
                .unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), self.avail_addr.unchecked_add(2))
                .unwrap();
            self.next_desc += bufs.len() as u16;
            head
        }

        fn kick(&self) {
            self.backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
                .unwrap();
        }

        /// Waits for `n` more used entries; returns (head, len) in used-ring order.
        fn used(&mut self, n: u16) -> Vec<(u16, u32)> {
            let used_addr = self.used_addr;
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let idx: u16 = self.mem.read_obj(used_addr.unchecked_add(2)).unwrap();
                if idx.wrapping_sub(self.used_seen) >= n {
                    break;
                }
                assert!(Instant::now() < deadline, "timed out waiting for used ring");
                std::thread::sleep(Duration::from_millis(5));
            }
            let out = (0..n)
                .map(|k| {
                    let slot = u64::from((self.used_seen + k) % QSIZE);
                    let e = used_addr.unchecked_add(4 + slot * 8);
                    let id: u32 = self.mem.read_obj(e).unwrap();
                    let len: u32 = self.mem.read_obj(e.unchecked_add(4)).unwrap();
                    (id as u16, len)
                })
                .collect();
            self.used_seen += n;
            out
        }

        fn header(&self, addr: u64, ty: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
        }

        fn byte(&self, addr: u64) -> u8 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }
    }

    const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
    const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn reads_complete_out_of_order() {
        let mut h = Harness::new(false);
        // Slow read of sector 0, then fast read of sector 8, both 4 KiB.
        h.header(DATA, VIRTIO_BLK_T_IN, 0);
        let slow = h.push(&[
            (DATA, 16, false),
            (DATA + 0x1000, 4096, true),
            (DATA + 0x2000, 1, true),
        ]);
        h.header(DATA + 0x3000, VIRTIO_BLK_T_IN, 8);
        let fast = h.push(&[
            (DATA + 0x3000, 16, false),
            (DATA + 0x4000, 4096, true),
            (DATA + 0x5000, 1, true),
        ]);
        h.kick();
        assert_eq!(h.used(2), vec![(fast, 4097), (slow, 4097)]);
        assert_eq!(h.byte(DATA + 0x2000), S_OK);
        assert_eq!(h.byte(DATA + 0x5000), S_OK);
        let mut got = vec![0u8; 4096];
        h.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x4000))
            .unwrap();
        assert_eq!(got[..], lock(&h.device.data)[4096..8192]);
        assert_eq!(h.backend.completed[0].load(Ordering::Relaxed), 2);
        assert!(h.backend.inflight.wait_all_idle(Duration::from_secs(1)));
    }

    #[test]
    fn write_split_buffers_flush_get_id() {
        let mut h = Harness::new(false);
        // Header and payload in one readable buffer plus a second payload buffer.
        h.header(DATA, VIRTIO_BLK_T_OUT, 2);
        h.mem
            .write_slice(&[0xab; 512], GuestAddress(DATA + 16))
            .unwrap();
        h.mem
            .write_slice(&[0xcd; 512], GuestAddress(DATA + 0x1000))
            .unwrap();
        h.push(&[
            (DATA, 16 + 512, false),
            (DATA + 0x1000, 512, false),
            (DATA + 0x2000, 1, true),
        ]);
        h.header(DATA + 0x3000, VIRTIO_BLK_T_FLUSH, 0);
        h.push(&[(DATA + 0x3000, 16, false), (DATA + 0x3100, 1, true)]);
        h.header(DATA + 0x4000, VIRTIO_BLK_T_GET_ID, 0);
        let id = h.push(&[
            (DATA + 0x4000, 16, false),
            (DATA + 0x5000, 20, true),
            (DATA + 0x5100, 1, true),
        ]);
        h.kick();
        let used = h.used(3);
        assert!(used.contains(&(id, 21)), "{used:?}");
        assert_eq!(h.byte(DATA + 0x2000), S_OK);
        assert_eq!(h.byte(DATA + 0x3100), S_OK);
        assert_eq!(h.byte(DATA + 0x5100), S_OK);
        let d = lock(&h.device.data);
        assert!(d[1024..1536].iter().all(|&b| b == 0xab));
        assert!(d[1536..2048].iter().all(|&b| b == 0xcd));
        let mut serial = [0u8; 20];
        h.mem
            .read_slice(&mut serial, GuestAddress(DATA + 0x5000))
            .unwrap();
        assert_eq!(&serial, b"serial-0123456789abc");
    }

    #[test]
    fn errors_and_malformed_chains() {
        let mut h = Harness::new(false);
        let size_sectors = (1u64 << 20) / 512;
        let cases: Vec<(u32, u64, u8)> = vec![
            (VIRTIO_BLK_T_IN, size_sectors, S_IOERR), // starts at the end
            (VIRTIO_BLK_T_IN, size_sectors - 1, S_IOERR), // runs past the end
            (VIRTIO_BLK_T_OUT, size_sectors - 1, S_IOERR),
            (VIRTIO_BLK_T_IN, u64::MAX / 256, S_IOERR), // sector * 512 overflows
            (99, 0, S_UNSUPP),
        ];
        for (i, &(ty, sector, _)) in cases.iter().enumerate() {
            let base = DATA + i as u64 * 0x2000;
            h.header(base, ty, sector);
            let dir = ty != VIRTIO_BLK_T_IN; // payload readable for OUT
            h.push(&[
                (base, 16, false),
                (base + 0x100, 1024, !dir),
                (base + 0x1000, 1, true),
            ]);
        }
        h.kick();
        h.used(cases.len() as u16);
        for (i, &(_, _, want)) in cases.iter().enumerate() {
            assert_eq!(h.byte(DATA + i as u64 * 0x2000 + 0x1000), want, "case {i}");
        }

        let base = DATA + 0x10_0000;
        h.mem
            .write_obj(0xffu8, GuestAddress(base + 0x1000))
            .unwrap();
        h.mem
            .write_obj(0xffu8, GuestAddress(base + 0x3000))
            .unwrap();
        h.mem
            .write_obj(0xffu8, GuestAddress(base + 0x5000))
            .unwrap();
        // Header too short (8 bytes) -> IOERR in the status byte.
        h.header(base, VIRTIO_BLK_T_IN, 0);
        h.push(&[(base, 8, false), (base + 0x1000, 1, true)]);
        // Readable buffer after a writable one -> IOERR.
        h.header(base + 0x2000, VIRTIO_BLK_T_OUT, 0);
        h.push(&[
            (base + 0x2000, 16, false),
            (base + 0x2100, 512, true),
            (base + 0x2200, 512, false),
            (base + 0x3000, 1, true),
        ]);
        // Buffer outside guest memory -> IOERR.
        h.header(base + 0x4000, VIRTIO_BLK_T_IN, 0);
        h.push(&[
            (base + 0x4000, 16, false),
            (0x7000_0000, 4096, true),
            (base + 0x5000, 1, true),
        ]);
        // No writable byte at all -> dropped with used len 0.
        h.header(base + 0x6000, VIRTIO_BLK_T_FLUSH, 0);
        let nostatus = h.push(&[(base + 0x6000, 16, false)]);
        h.kick();
        let used = h.used(4);
        assert!(used.contains(&(nostatus, 0)), "{used:?}");
        assert_eq!(h.byte(base + 0x1000), S_IOERR);
        assert_eq!(h.byte(base + 0x3000), S_IOERR);
        assert_eq!(h.byte(base + 0x5000), S_IOERR);
        assert!(h.backend.inflight.wait_all_idle(Duration::from_secs(1)));
        drop(h.rt);
    }

    #[test]
    fn discard_write_zeroes_and_read_only() {
        let mut h = Harness::new(false);
        let seg = |sector: u64, n: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&n.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            s
        };
        // Discard two segments; write-zeroes with UNMAP; discard with a reserved flag bit.
        h.header(DATA, VIRTIO_BLK_T_DISCARD, 0);
        let mut segs = seg(8, 8, 0).to_vec();
        segs.extend_from_slice(&seg(64, 16, 0));
        h.mem.write_slice(&segs, GuestAddress(DATA + 16)).unwrap();
        h.push(&[(DATA, 48, false), (DATA + 0x100, 1, true)]);
        h.header(DATA + 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        h.mem
            .write_slice(
                &seg(128, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
                GuestAddress(DATA + 0x1010),
            )
            .unwrap();
        h.push(&[(DATA + 0x1000, 32, false), (DATA + 0x1100, 1, true)]);
        h.header(DATA + 0x2000, VIRTIO_BLK_T_DISCARD, 0);
        h.mem
            .write_slice(&seg(0, 8, 0x2), GuestAddress(DATA + 0x2010))
            .unwrap();
        h.push(&[(DATA + 0x2000, 32, false), (DATA + 0x2100, 1, true)]);
        // Discard past the end.
        h.header(DATA + 0x3000, VIRTIO_BLK_T_DISCARD, 0);
        h.mem
            .write_slice(&seg(2040, 16, 0), GuestAddress(DATA + 0x3010))
            .unwrap();
        h.push(&[(DATA + 0x3000, 32, false), (DATA + 0x3100, 1, true)]);
        h.kick();
        h.used(4);
        assert_eq!(h.byte(DATA + 0x100), S_OK);
        assert_eq!(h.byte(DATA + 0x1100), S_OK);
        assert_eq!(h.byte(DATA + 0x2100), S_UNSUPP);
        assert_eq!(h.byte(DATA + 0x3100), S_IOERR);
        {
            let d = lock(&h.device.data);
            assert!(d[4096..8192].iter().all(|&b| b == 0));
            assert!(d[32768..40960].iter().all(|&b| b == 0));
            assert!(d[65536..69632].iter().all(|&b| b == 0));
            assert_ne!(d[8192..12288], [0u8; 4096][..]);
        }

        let mut ro = Harness::new(true);
        assert_ne!(ro.backend.features() & (1 << VIRTIO_BLK_F_RO), 0);
        ro.header(DATA, VIRTIO_BLK_T_OUT, 0);
        ro.push(&[(DATA, 16 + 512, false), (DATA + 0x1000, 1, true)]);
        ro.header(DATA + 0x2000, VIRTIO_BLK_T_IN, 1);
        ro.push(&[
            (DATA + 0x2000, 16, false),
            (DATA + 0x2100, 512, true),
            (DATA + 0x3000, 1, true),
        ]);
        ro.kick();
        ro.used(2);
        assert_eq!(ro.byte(DATA + 0x1000), S_IOERR);
        assert_eq!(ro.byte(DATA + 0x3000), S_OK);
    }

    #[test]
    fn config_space_layout() {
        let h = Harness::new(false);
        let c = h.backend.get_config(0, 60);
        assert_eq!(c.len(), 60);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 1);
        assert_eq!(h.backend.get_config(8, 4), c[8..12].to_vec());
        assert_eq!(h.backend.get_config(1000, 4), vec![0; 4]);
    }
}
