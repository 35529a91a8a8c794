//! A shutdown signal shared by every task of a daemon: SIGTERM or Ctrl-C trips it once, and
//! servers and workers wait on it to drain.

use tokio::sync::watch;

/// A cloneable handle that tells whether shutdown was requested and lets a task wait for it.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The side that trips the signal.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// Creates a connected trigger and handle.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Requests shutdown; every waiter wakes up.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// A new handle on this signal.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// True once shutdown was requested.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves when shutdown is requested (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means the trigger was dropped, which also means shutdown.
        let _ = self.rx.wait_for(|v| *v).await;
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, draining"),
        _ = int.recv() => tracing::info!("SIGINT received, draining"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_on_trigger() {
        let (trigger, shutdown) = channel();
        let mut a = shutdown.clone();
        let task = tokio::spawn(async move { a.wait().await });
        assert!(!shutdown.is_triggered());
        trigger.trigger();
        task.await.unwrap();
        assert!(shutdown.is_triggered());
        let mut late = trigger.subscribe();
        late.wait().await;
    }
}
