//! Compaction: rewrites the live records of a segment whose garbage (overwritten and deleted
//! chunks, tombstones) passes a threshold, then removes the segment.

use std::sync::Arc;
use std::time::Duration;

use sov_common::worker::{Worker, WorkerState};

use crate::disk::Disk;

/// The compaction worker of one disk.
pub struct Compaction {
    disk: Arc<Disk>,
    /// Share of a segment that must be garbage before it is rewritten, in (0, 1].
    garbage_ratio: f64,
    interval: Duration,
}

impl Compaction {
    pub fn new(disk: Arc<Disk>, garbage_ratio: f64, interval: Duration) -> Compaction {
        Compaction {
            disk,
            garbage_ratio,
            interval,
        }
    }
}

impl Worker for Compaction {
    fn name(&self) -> &'static str {
        "compaction"
    }

    async fn step(&mut self) -> anyhow::Result<WorkerState> {
        let Some(c) = self.disk.compaction_candidate(self.garbage_ratio) else {
            return Ok(WorkerState::Idle(self.interval));
        };
        tracing::debug!(disk = %self.disk.name(), segment = c.segment, len = c.len, live = c.live, "compacting");
        self.disk.compact(c.segment).await?;
        Ok(WorkerState::Busy)
    }
}
