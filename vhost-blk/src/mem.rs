//! In-memory block devices for testing the NBD server.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::export::{BlockDevice, BlockError, Exports};

/// A RAM-backed device.
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    id: String,
}

impl MemDevice {
    pub fn new(id: &str, size: usize, read_only: bool) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            read_only,
            id: id.to_owned(),
        }
    }

    fn range(
        &self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<std::ops::Range<usize>, BlockError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ if write => Err(BlockError::NoSpace(format!("{offset}+{len} > {size}"))),
            _ => Err(BlockError::OutOfRange(format!("{offset}+{len} > {size}"))),
        }
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            Err(BlockError::NotPermitted("read-only".into()))
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let r = self.range(offset, len.into(), false)?;
        let d = self
            .data
            .lock()
            .map_err(|e| BlockError::Io(e.to_string()))?;
        Ok(Bytes::copy_from_slice(&d[r]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        let r = self.range(offset, data.len() as u64, true)?;
        let mut d = self
            .data
            .lock()
            .map_err(|e| BlockError::Io(e.to_string()))?;
        d[r].copy_from_slice(&data);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        let r = self.range(offset, len.into(), true)?;
        let mut d = self
            .data
            .lock()
            .map_err(|e| BlockError::Io(e.to_string()))?;
        d[r].fill(0);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, false).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn id(&self) -> String {
        self.id.clone()
    }
}

/// A fixed set of named in-memory exports.
pub struct MemExports {
    devices: HashMap<String, (Arc<MemDevice>, String)>,
}

impl MemExports {
    /// These devices, each under its name with its description.
    pub fn new(devices: Vec<(MemDevice, &str)>) -> Self {
        let devices = devices
            .into_iter()
            .map(|(d, desc)| (d.id.clone(), (Arc::new(d), desc.to_owned())))
            .collect();
        Self { devices }
    }

    /// `disk` (64 MiB, rw) and `ro` (1 MiB, read-only, filled with 0x5a).
    pub fn standard() -> Self {
        let ro = MemDevice::new("ro", 1 << 20, true);
        if let Ok(mut d) = ro.data.lock() {
            d.fill(0x5a);
        }
        Self::new(vec![
            (MemDevice::new("disk", 64 << 20, false), "64 MiB RAM disk"),
            (ro, "read-only 1 MiB"),
        ])
    }
}

impl Exports for MemExports {
    type Device = MemDevice;
    async fn open(&self, name: &str) -> Option<Arc<MemDevice>> {
        self.devices.get(name).map(|(d, _)| d.clone())
    }
    fn list(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .devices
            .iter()
            .map(|(n, (_, d))| (n.clone(), d.clone()))
            .collect();
        v.sort();
        v
    }
}
