//! Scrub: re-reads every chunk of a disk at a bounded rate, verifies it, and records what fails
//! so repair can find it. Its position survives restarts.

use std::sync::Arc;
use std::time::Duration;

use sov_common::worker::{Worker, WorkerState};

use crate::disk::Disk;
use crate::error::StoreError;

/// Chunks checked per step (a step is the unit between shutdown checks).
const STEP_CHUNKS: usize = 32;

/// The scrub worker of one disk.
pub struct Scrub {
    disk: Arc<Disk>,
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    /// Pause between passes.
    interval: Duration,
}

impl Scrub {
    pub fn new(disk: Arc<Disk>, rate: u64, interval: Duration) -> Scrub {
        Scrub {
            disk,
            rate,
            interval,
        }
    }
}

impl Worker for Scrub {
    fn name(&self) -> &'static str {
        "scrub"
    }

    async fn step(&mut self) -> anyhow::Result<WorkerState> {
        let mut state = self.disk.scrub_state();
        let entries = self.disk.index().list("", &state.cursor, STEP_CHUNKS)?;
        let name = self.disk.name().to_string();
        let m = self.disk.metrics().clone();
        if entries.is_empty() {
            tracing::info!(disk = %name, pass = state.passes + 1, checked = state.checked_in_pass, "scrub pass done");
            state.passes += 1;
            state.checked_in_pass = 0;
            state.cursor.clear();
            self.disk.set_scrub_state(state)?;
            m.scrub_passes.with_label_values(&[&name]).inc();
            return Ok(WorkerState::Idle(self.interval));
        }
        let mut bytes = 0u64;
        for (id, loc) in entries {
            match self.disk.read_at(&id, loc, "scrub").await {
                Ok(_) => {
                    // A chunk that verifies is not corrupt, whatever an older mark says, as
                    // long as what was verified is still the chunk's current record.
                    if self.disk.index().get(&id)? == Some(loc) {
                        self.disk.index().clear_corrupt(&id)?;
                    }
                }
                Err(StoreError::Corrupt { .. }) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            bytes += loc.record_len();
            state.checked_in_pass += 1;
            state.cursor = id;
            m.scrub_chunks.with_label_values(&[&name]).inc();
        }
        m.scrub_bytes.with_label_values(&[&name]).inc_by(bytes);
        self.disk.set_scrub_state(state)?;
        if self.rate == 0 {
            return Ok(WorkerState::Busy);
        }
        Ok(WorkerState::Idle(Duration::from_secs_f64(
            bytes as f64 / self.rate as f64,
        )))
    }
}
