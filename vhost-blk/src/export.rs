//! What a protocol front end (NBD, vhost-user-blk) needs from a volume. The volume layer
//! (replication, encryption, leases) implements it; the front ends know nothing else.

use std::future::Future;

use bytes::Bytes;

/// Why a block request failed. Front ends map each to their protocol's errno.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Offset or length past the end of the device, or not allowed (EINVAL / NBD_EINVAL).
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// A write past the end of the device (ENOSPC / NBD_ENOSPC).
    #[error("no space: {0}")]
    NoSpace(String),
    /// The device may not be written (read-only, or our writer lease was taken over) (EPERM).
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// Anything else: storage unavailable, integrity failure (EIO / NBD_EIO).
    #[error("i/o error: {0}")]
    Io(String),
}

/// One exported block device. All methods may be called concurrently from many connections
/// and queues; offsets and lengths are in bytes and need not be sector aligned (the device
/// does read-modify-write where it must).
pub trait BlockDevice: Send + Sync + 'static {
    /// Current size in bytes (it can grow while attached: online resize).
    fn size(&self) -> u64;
    /// Preferred I/O granularity in bytes (4096).
    fn block_size(&self) -> u32 {
        4096
    }
    /// True when the device refuses writes.
    fn read_only(&self) -> bool {
        false
    }
    /// Reads `len` bytes at `offset`. Must return exactly `len` bytes.
    fn read(&self, offset: u64, len: u32)
    -> impl Future<Output = Result<Bytes, BlockError>> + Send;
    /// Writes `data` at `offset`. With `fua` the data is durable on return.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// Makes `len` bytes at `offset` read back as zeroes. With `fua` durable on return.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// Discards a range: afterwards it reads as zeroes (our devices guarantee that).
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// A stable identifier of the device (virtio-blk GET_ID: at most 20 bytes are used).
    fn id(&self) -> String;
}

/// The set of devices a server exports, looked up by name at connect time.
pub trait Exports: Send + Sync + 'static {
    type Device: BlockDevice;
    /// The device named `name`, or None if no such export exists.
    fn open(&self, name: &str)
    -> impl Future<Output = Option<std::sync::Arc<Self::Device>>> + Send;
    /// Names (and a one-line description) of every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}
