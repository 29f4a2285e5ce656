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

/// The process's signals, installed once at start: a SIGTERM that arrives while weir is
/// still starting is then handled gracefully, not by the default action (instant death).
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal weir acts on.
    pub async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Signal::Terminate("SIGTERM"),
                _ = self.int.recv() => Signal::Terminate("SIGINT"),
                _ = self.hup.recv() => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Terminate("Ctrl-C")
        }
    }

    /// The next SIGTERM or SIGINT (a SIGHUP meanwhile is ignored); returns its name.
    pub async fn terminate(&mut self) -> &'static str {
        loop {
            if let Signal::Terminate(name) = self.next().await {
                return name;
            }
        }
    }
}

pub enum Signal {
    /// SIGTERM or SIGINT, by name.
    Terminate(&'static str),
    /// SIGHUP.
    Reload,
}
