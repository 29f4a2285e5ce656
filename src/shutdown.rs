//! Shutdown: every spawned task belongs to one `TaskTracker` and watches two tokens.
//!
//! `stop_accepting` fires first (SIGTERM/SIGINT): listeners close at once, open
//! connections go on. `hard` fires when the grace period (`shutdown_timeout`) has passed:
//! whatever is still open is closed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    pub stop_accepting: CancellationToken,
    pub hard: CancellationToken,
    pub tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops accepting, waits up to `grace` for open connections, then closes the rest.
    /// Returns how many tasks were still running when the grace period ended.
    pub async fn run(&self, grace: Duration) -> usize {
        self.stop_accepting.cancel();
        self.tracker.close();
        let left = match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        };
        self.hard.cancel();
        // Tasks watch `hard` and finish promptly; bound the wait anyway.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        left
    }
}

/// Waits for the first SIGTERM or SIGINT.
#[cfg(unix)]
pub async fn terminate_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(not(unix))]
pub async fn terminate_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}
