//! A volume as a block device: [`VolumeHandle`] I/O behind the volume's QoS limits, with
//! per-operation metrics. Every front end (NBD connections, vhost-user queues) shares one
//! device per volume, so a FLUSH on any of them covers writes from all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sov_client::ClientError;
use sov_client::volume::VolumeHandle;
use tonic::Code;

use crate::export::{BlockDevice, BlockError};
use crate::metrics::Metrics;

/// A token bucket for IOPS and bytes per second. Tokens may go negative (a large request is
/// let through and the debt is waited off by the next ones), so no request waits forever.
pub struct Qos {
    iops: f64,
    bps: f64,
    state: Mutex<(f64, f64, Instant)>,
}

impl Qos {
    /// Limits of 0 mean unlimited.
    pub fn new(iops: u64, bytes_per_sec: u64) -> Qos {
        Qos {
            iops: iops as f64,
            bps: bytes_per_sec as f64,
            state: Mutex::new((iops as f64, bytes_per_sec as f64, Instant::now())),
        }
    }

    /// How long a request of `bytes` must wait before it may start.
    pub fn take(&self, bytes: u64) -> Duration {
        let mut s = self.state.lock().expect("qos lock");
        let now = Instant::now();
        let dt = now.duration_since(s.2).as_secs_f64();
        s.2 = now;
        let mut wait: f64 = 0.0;
        if self.iops > 0.0 {
            // At most one second of burst.
            s.0 = (s.0 + dt * self.iops).min(self.iops);
            if s.0 < 0.0 {
                wait = wait.max(-s.0 / self.iops);
            }
            s.0 -= 1.0;
        }
        if self.bps > 0.0 {
            s.1 = (s.1 + dt * self.bps).min(self.bps);
            if s.1 < 0.0 {
                wait = wait.max(-s.1 / self.bps);
            }
            s.1 -= bytes as f64;
        }
        Duration::from_secs_f64(wait)
    }
}

/// One attached volume.
pub struct VolumeDevice {
    pub handle: Arc<VolumeHandle>,
    qos: Qos,
    metrics: Metrics,
    detached: AtomicBool,
}

fn block_error(e: ClientError) -> BlockError {
    match &e {
        ClientError::Invalid(m) => BlockError::OutOfRange(m.clone()),
        ClientError::Meta(s) if s.code() == Code::PermissionDenied => {
            BlockError::NotPermitted(s.message().to_string())
        }
        _ => BlockError::Io(e.to_string()),
    }
}

impl VolumeDevice {
    pub fn new(handle: Arc<VolumeHandle>, iops: u64, bps: u64, metrics: Metrics) -> VolumeDevice {
        VolumeDevice {
            handle,
            qos: Qos::new(iops, bps),
            metrics,
            detached: AtomicBool::new(false),
        }
    }

    /// Refuses every later request (the volume is being detached).
    pub fn detach(&self) {
        self.detached.store(true, Ordering::Relaxed);
    }

    async fn admit(&self, bytes: u64) -> Result<Instant, BlockError> {
        if self.detached.load(Ordering::Relaxed) {
            return Err(BlockError::Io(format!(
                "volume {} is detached",
                self.handle.name()
            )));
        }
        let wait = self.qos.take(bytes);
        if !wait.is_zero() {
            self.metrics
                .qos_wait
                .with_label_values(&[self.handle.name()])
                .inc_by(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
        Ok(Instant::now())
    }

    fn done<T>(
        &self,
        op: &str,
        start: Instant,
        bytes: u64,
        r: Result<T, ClientError>,
    ) -> Result<T, BlockError> {
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics.requests.with_label_values(&[op, result]).inc();
        self.metrics
            .request_seconds
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        if r.is_ok() {
            self.metrics.bytes.with_label_values(&[op]).inc_by(bytes);
        }
        r.map_err(|e| {
            tracing::warn!(volume = %self.handle.name(), op, error = %e, "request failed");
            block_error(e)
        })
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.handle.size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let start = self.admit(len as u64).await?;
        let r = self.handle.read(offset, len as u64).await;
        self.done("read", start, len as u64, r)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let n = data.len() as u64;
        let start = self.admit(n).await?;
        let r = self.handle.write(offset, data, fua).await;
        self.done("write", start, n, r)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError> {
        let start = self.admit(0).await?;
        let r = self.handle.write_zeroes(offset, len as u64, fua).await;
        self.done("write_zeroes", start, len as u64, r)
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), BlockError> {
        let start = self.admit(0).await?;
        let r = self.handle.trim(offset, len as u64).await;
        self.done("trim", start, len as u64, r)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let start = self.admit(0).await?;
        let r = self.handle.flush().await;
        self.done("flush", start, 0, r)
    }

    fn id(&self) -> String {
        self.handle.id().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_lets_a_burst_through_then_paces() {
        let q = Qos::new(100, 0);
        let mut waited = Duration::ZERO;
        for _ in 0..100 {
            waited += q.take(4096);
        }
        assert!(
            waited < Duration::from_millis(50),
            "the burst waited {waited:?}"
        );
        // The next 50 owe half a second between them.
        let mut last = Duration::ZERO;
        for _ in 0..50 {
            last = q.take(4096);
        }
        assert!(last > Duration::from_millis(400), "{last:?}");
        let unlimited = Qos::new(0, 0);
        assert!(unlimited.take(1 << 30).is_zero());
        let bytes = Qos::new(0, 1 << 20);
        bytes.take(4 << 20);
        assert!(bytes.take(1) >= Duration::from_secs(2));
    }
}
