//! In-memory BlockDevice for the tests.
#![allow(dead_code)]

use std::sync::Mutex;

use bytes::Bytes;
use vhost_blk::export::{BlockDevice, BlockError};

pub struct MemDevice {
    pub data: Mutex<Vec<u8>>,
    pub read_only: bool,
}

impl MemDevice {
    pub fn new(size: usize, fill: u8) -> Self {
        MemDevice {
            data: Mutex::new(vec![fill; size]),
            read_only: false,
        }
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BlockError> {
        let size = self.data.lock().unwrap().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(BlockError::OutOfRange(format!("{offset}+{len} > {size}"))),
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let r = self.range(offset, u64::from(len))?;
        // Yield so that requests really overlap and complete out of order.
        tokio::task::yield_now().await;
        Ok(Bytes::copy_from_slice(&self.data.lock().unwrap()[r]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::NotPermitted("read-only".into()));
        }
        let r = self.range(offset, data.len() as u64)?;
        tokio::task::yield_now().await;
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), BlockError> {
        let r = self.range(offset, u64::from(len))?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn id(&self) -> String {
        "sov-mem-device-0123456789".into()
    }
}

/// `yes WORD | head -c len`
pub fn yes_pattern(word: &str, len: usize) -> Vec<u8> {
    let line = format!("{word}\n");
    line.bytes().cycle().take(len).collect()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn temp_socket(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vub-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("vhost-user-blk.sock")
}

pub fn wait_for_socket(path: &std::path::Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("socket {} never appeared", path.display());
}
