//! The health checkers the control task runs: one per checked backend, keyed by the
//! backend's identity (`Arc` pointer), not by pool or name, so that a reload can keep the
//! checker of each backend that stays (and its rise/fall progress) while it starts one
//! for a backend that comes and stops the one of a backend that goes. A backend of the
//! same name at another address is another backend with its own checker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::config::{HealthCheckConfig, Protocol};
use crate::health::{self, Checker};
use crate::shutdown::Shutdown;

/// A running checker and the backend it checks (held, so that the key stays that
/// backend's while the entry exists).
struct Entry {
    backend: Arc<Backend>,
    checker: Checker,
}

#[derive(Default)]
pub(super) struct Checkers {
    running: BTreeMap<usize, Entry>,
}

fn key(backend: &Arc<Backend>) -> usize {
    Arc::as_ptr(backend) as usize
}

impl Checkers {
    /// Starts a checker for `backend`; its first probe comes after `first_delay`. The
    /// receiver fires when that probe has finished. A backend has one checker at most:
    /// callers stop the old one first (a running one found here is only cancelled).
    pub(super) fn start(
        &mut self,
        backend: &Arc<Backend>,
        check: &HealthCheckConfig,
        protocol: Protocol,
        shutdown: &Shutdown,
        first_delay: Duration,
    ) -> oneshot::Receiver<()> {
        if backend.is_unresolved() {
            // Nothing to probe: it is down until its host name resolves (then a successor
            // at the address found gets a checker). A closed receiver: nobody waits.
            return oneshot::channel().1;
        }
        let (checker, first_round) = health::spawn_checker(
            Arc::clone(backend),
            check.clone(),
            protocol,
            shutdown,
            first_delay,
        );
        let entry = Entry {
            backend: Arc::clone(backend),
            checker,
        };
        if let Some(old) = self.running.insert(key(backend), entry) {
            old.checker.cancel();
        }
        first_round
    }

    /// Stops the checkers of `backends` (those that have one) and returns once every one
    /// of them has ended.
    pub(super) async fn stop<'a>(&mut self, backends: impl IntoIterator<Item = &'a Arc<Backend>>) {
        let stopping: Vec<Entry> = backends
            .into_iter()
            .filter_map(|b| self.running.remove(&key(b)))
            .collect();
        Self::stop_all(stopping).await;
    }

    /// Stops every checker of the pool `pool` and returns once every one has ended.
    pub(super) async fn stop_pool(&mut self, pool: &str) {
        let keys: Vec<usize> = self
            .running
            .iter()
            .filter(|(_, e)| e.backend.pool == pool)
            .map(|(k, _)| *k)
            .collect();
        let stopping = keys.iter().filter_map(|k| self.running.remove(k)).collect();
        Self::stop_all(stopping).await;
    }

    /// All cancelled first, then waited for: they end concurrently.
    async fn stop_all(entries: Vec<Entry>) {
        for entry in &entries {
            entry.checker.cancel();
        }
        for entry in entries {
            entry.checker.stopped().await;
        }
    }
}
