//! The `Worker` trait that every background job (scrub, compaction, later repair and
//! rebalance) implements, and the loop that runs one until shutdown.

use std::future::Future;
use std::time::Duration;

use crate::shutdown::Shutdown;

/// What a worker wants after one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// More work is ready: call `step` again at once.
    Busy,
    /// Nothing to do now: call `step` again after this long.
    Idle(Duration),
    /// The worker has finished for good.
    Done,
}

/// A background job made of small steps, so that shutdown is noticed between them.
pub trait Worker: Send {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Does one bounded piece of work.
    fn step(&mut self) -> impl Future<Output = anyhow::Result<WorkerState>> + Send;
}

/// Runs `worker` until it is done or shutdown is requested. A failed step is logged and retried
/// after `retry_after`; a worker never takes its daemon down.
pub async fn run<W: Worker>(mut worker: W, mut shutdown: Shutdown, retry_after: Duration) {
    loop {
        if shutdown.is_triggered() {
            return;
        }
        let pause = match worker.step().await {
            Ok(WorkerState::Busy) => {
                tokio::task::yield_now().await;
                continue;
            }
            Ok(WorkerState::Idle(pause)) => pause,
            Ok(WorkerState::Done) => return,
            Err(e) => {
                tracing::warn!(worker = worker.name(), error = %format!("{e:#}"), "worker step failed");
                retry_after
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown;

    struct Counter {
        steps: u32,
    }

    impl Worker for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }
        async fn step(&mut self) -> anyhow::Result<WorkerState> {
            self.steps += 1;
            match self.steps {
                1 => anyhow::bail!("first step fails"),
                2..=4 => Ok(WorkerState::Busy),
                5 => Ok(WorkerState::Idle(Duration::from_millis(1))),
                _ => Ok(WorkerState::Done),
            }
        }
    }

    #[tokio::test]
    async fn runs_until_done_and_survives_errors() {
        let (_trigger, sd) = shutdown::channel();
        let w = Counter { steps: 0 };
        run(w, sd, Duration::from_millis(1)).await;
    }

    #[tokio::test]
    async fn stops_on_shutdown() {
        struct Forever;
        impl Worker for Forever {
            fn name(&self) -> &'static str {
                "forever"
            }
            async fn step(&mut self) -> anyhow::Result<WorkerState> {
                Ok(WorkerState::Idle(Duration::from_secs(3600)))
            }
        }
        let (trigger, sd) = shutdown::channel();
        let task = tokio::spawn(run(Forever, sd, Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        trigger.trigger();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("worker stopped")
            .unwrap();
    }
}
