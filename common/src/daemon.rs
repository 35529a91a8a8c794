//! What every sov daemon's `main` does the same way: exit code 2 for a bad config, a tokio
//! runtime, SIGTERM/SIGINT turned into a [`Shutdown`], exit 1 with a one-line reason on
//! failure; and the `--ready-file` tests wait for, written atomically.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use crate::shutdown::{self, Shutdown};

/// Runs a daemon: `config` is the parsed configuration (an error exits with 2), `serve` runs
/// until the shutdown it is given fires (on SIGTERM or SIGINT). Errors are printed as
/// `name: reason`.
pub fn main<C, F, Fut>(name: &str, config: anyhow::Result<C>, serve: F) -> ExitCode
where
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let cfg = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        let (trigger, sd) = shutdown::channel();
        tokio::spawn(async move {
            shutdown::signal().await;
            trigger.trigger();
        });
        serve(cfg, sd).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `ready` as JSON to `path` through a temporary file and a rename, so a reader never
/// sees half of it.
pub fn write_ready_file<T: serde::Serialize>(path: &Path, ready: &T) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(ready)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
