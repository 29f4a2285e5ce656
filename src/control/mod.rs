//! The control task: the one writer of the routing tables.
//!
//! It owns the pools, backends and listeners, publishes them as [`Tables`] (read by the
//! admin socket, the HTTP endpoint and the state file), and applies changes that need a
//! new pool snapshot (weights, reload) one message at a time. Health and admin state are
//! single atomics on each backend and need no message.
//!
//! - `handle.rs`: [`ControlHandle`], what others hold, and [`ControlError`].
//! - `checks.rs`: the health checkers it runs, one per backend.
//! - `discovery.rs`: backends from DNS (`discover`): the followers it runs, and each set
//!   they find applied as a diff like a reload.
//! - `plan.rs`: a reload as a plan, computed by a pure function (unit-tested without sockets).
//! - `reload.rs`: applying it, in two phases: first everything that can fail (reading and
//!   validating the file, binding new listener sockets), with nothing changed yet; then
//!   the commit, which cannot fail.
//!
//! A backend that stays is the same `Arc<Backend>`, so its health, admin state, counters
//! and open connections carry over. A removed backend is drained and stays visible until
//! its last connection closes.

mod checks;
mod discovery;
mod handle;
mod names;
pub mod plan;
mod reload;
mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use checks::Checkers;
use handle::Command;
pub use handle::{ControlError, ControlHandle, LoadStatus};

use crate::backend::Backend;
use crate::balance::WEIGHT_RANGE;
use crate::config::{BackendConfig, Config, ListenerConfig, OnDown, PoolConfig};
use crate::metrics::ReloadMetrics;
use crate::pool::{Pool, PoolSnapshot};
use crate::proxy::{self, BoundSocket, Listener};
use crate::shutdown::Shutdown;
use crate::state_file;
use crate::tables::Tables;

/// How often the control task looks for removed backends whose last connection closed.
const RETIRE_EVERY: Duration = Duration::from_millis(500);
/// How often it looks for pools that lost (or got back) their last eligible backend.
const WATCH_POOLS_EVERY: Duration = Duration::from_millis(200);

pub struct ControlTask {
    tables: Arc<ArcSwap<Tables>>,
    config: Arc<ArcSwap<Config>>,
    load: Arc<ArcSwap<LoadStatus>>,
    config_path: Option<PathBuf>,
    shutdown: Shutdown,
    /// One health checker per checked backend that isn't retiring.
    checkers: Checkers,
    /// Per listener: the token its accept or receive loop stops on.
    listener_stops: BTreeMap<String, CancellationToken>,
    /// Backends a reload removed that still have open connections. Held by identity, not
    /// by name: a reload may bring a backend of the same name at another address.
    retiring: Vec<Arc<Backend>>,
    /// What was bound at start, for the reload's reply.
    fixed: plan::Fixed,
    metrics: ReloadMetrics,
    pools_watched: watch::PoolWatch,
    discovery: discovery::Discovery,
}

impl ControlTask {
    /// A control task for `config`, with empty tables until [`ControlTask::publish`].
    pub fn new(config: &Config, config_path: Option<PathBuf>, shutdown: &Shutdown) -> Self {
        ControlTask {
            tables: Arc::new(ArcSwap::from_pointee(Tables::default())),
            config: Arc::new(ArcSwap::from_pointee(config.clone())),
            load: Arc::new(ArcSwap::from_pointee(LoadStatus::new())),
            config_path,
            shutdown: shutdown.clone(),
            checkers: Checkers::default(),
            listener_stops: BTreeMap::new(),
            retiring: Vec::new(),
            fixed: plan::Fixed {
                metrics_bind: config.metrics_bind,
                metrics_addr: None,
                admin_socket: config.admin_socket.clone(),
            },
            metrics: ReloadMetrics::default(),
            pools_watched: watch::PoolWatch::default(),
            discovery: discovery::Discovery::new(),
        }
    }

    /// The address the metrics endpoint bound (port 0 became a real port): a reload that
    /// writes it into `metrics.bind` changes nothing.
    pub fn set_metrics_addr(&mut self, addr: Option<std::net::SocketAddr>) {
        self.fixed.metrics_addr = addr;
    }

    /// Startup only, before anything is served: the config in force once its backends'
    /// host names are resolved.
    pub fn set_config(&self, config: &Config) {
        self.config.store(Arc::new(config.clone()));
    }

    pub fn publish(&self, tables: Tables) {
        self.tables.store(Arc::new(tables));
    }

    /// Starts the task; it stops with accepting (during the grace period nothing is
    /// rerouted). The handle is what everyone else holds.
    pub fn spawn(mut self) -> ControlHandle {
        self.prune_state_file();
        let config = self.config.load_full();
        self.follow_pools(&config);
        let (tx, rx) = mpsc::channel(64);
        let handle = ControlHandle {
            tx,
            tables: Arc::clone(&self.tables),
            config: Arc::clone(&self.config),
            load: Arc::clone(&self.load),
            config_path: self.config_path.clone(),
        };
        let stop = self.shutdown.stop_accepting.clone();
        self.shutdown.tracker.clone().spawn(self.run(rx, stop));
        handle
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, stop: CancellationToken) {
        let mut found = self.discovery.rx.take().expect("taken once, here");
        let mut retire = tokio::time::interval(RETIRE_EVERY);
        retire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut watch = tokio::time::interval(WATCH_POOLS_EVERY);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let command = tokio::select! {
                c = rx.recv() => match c { Some(c) => c, None => return },
                _ = retire.tick(), if !self.retiring.is_empty() => {
                    self.retire_idle_backends();
                    continue;
                }
                Some(discovered) = found.recv() => {
                    self.apply_discovered(discovered).await;
                    continue;
                }
                _ = watch.tick() => {
                    self.pools_watched.observe(&self.tables.load());
                    continue;
                }
                () = stop.cancelled() => return,
            };
            self.handle(command).await;
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::SetWeight {
                pool,
                backend,
                weight,
                reply,
            } => {
                let result = self.set_weight(&pool, &backend, weight);
                let result = result.and_then(|()| self.save_state());
                let _ = reply.send(result);
            }
            Command::Reload { reply } => {
                let result = self.reload().await;
                self.metrics.record(result.is_ok());
                let error = result.as_ref().err().map(|e| e.to_string());
                self.load.store(Arc::new(self.load.load().reloaded(error)));
                match &result {
                    Ok(summary) => tracing::info!("reload: {summary}"),
                    Err(problems) => {
                        tracing::error!("reload failed, nothing changed:\n{problems}")
                    }
                }
                let _ = reply.send(result);
            }
            Command::AdminChanged { reply } => {
                let _ = reply.send(self.save_state());
            }
        }
    }

    fn set_weight(
        &self,
        pool_name: &str,
        backend_name: &str,
        weight: u32,
    ) -> Result<(), ControlError> {
        if !WEIGHT_RANGE.contains(&weight) {
            return Err(ControlError::WeightOutOfRange(weight));
        }
        let tables = self.tables.load();
        let no_pool = || ControlError::NoPool(pool_name.to_string());
        let pool = tables.pools.get(pool_name).ok_or_else(no_pool)?;
        let snapshot = pool.load_full();
        let backend = snapshot
            .find(backend_name)
            .ok_or_else(|| ControlError::NoBackend {
                pool: pool_name.to_string(),
                backend: backend_name.to_string(),
            })?;
        backend.set_weight(weight);
        let config = self.config.load();
        let pool_config = config
            .pools
            .iter()
            .find(|p| p.name == pool_name)
            .ok_or_else(no_pool)?;
        pool.publish(PoolSnapshot::new(pool_config, snapshot.backends.clone()));
        tracing::info!("{pool_name}/{backend_name}: weight set to {weight}");
        Ok(())
    }

    /// At start: writes the state file back when what startup restored differs from it
    /// (the restore dropped a weight whose file value has changed since it was set, or an
    /// entry for a backend no longer in the config), so that a dropped weight cannot come
    /// back at a later restart when the file returns to its old value. A file that cannot
    /// be read is left as it is for the operator; the next admin change rewrites it.
    fn prune_state_file(&self) {
        let config = self.config.load();
        let Some(path) = &config.state_file else {
            return;
        };
        if self.discovery.incomplete {
            // Entries of backends DNS has not given yet stay for when it does.
            return;
        }
        let Ok(on_disk) = state_file::read(path) else {
            return;
        };
        if on_disk != self.capture_state(&config) {
            // A failure is logged by save_state; startup goes on.
            let _ = self.save_state();
        }
    }

    /// Writes the state file, when one is configured, and returns once it is on disk.
    /// A failure is logged (and counted by `state_file`), never fatal: the change stays in
    /// force, and the caller says it was not saved.
    fn save_state(&self) -> Result<(), ControlError> {
        let config = self.config.load();
        let Some(path) = &config.state_file else {
            return Ok(());
        };
        let state = self.capture_state(&config);
        state_file::write(path, &state).map_err(|e| {
            tracing::error!("state file: {e}");
            ControlError::NotSaved(e)
        })
    }

    /// The state file's content: listed and discovered backends.
    fn capture_state(&self, config: &Config) -> state_file::StateFile {
        state_file::capture_with(&self.tables.load(), config, |pool, name| {
            self.discovery.weight(pool, name)
        })
    }

    /// Starts a health checker for every backend of `pool`, each probing at once (a new
    /// pool: at startup or added by a reload); returns the first-round receivers.
    pub fn start_checks(&mut self, pool: &Pool, config: &PoolConfig) -> Vec<oneshot::Receiver<()>> {
        let Some(check) = &config.health_check else {
            return Vec::new();
        };
        let mut receivers = Vec::new();
        for backend in &pool.load_full().backends {
            let rx = self.checkers.start(
                backend,
                check,
                pool.protocol,
                &self.shutdown,
                Duration::ZERO,
            );
            receivers.push(rx);
        }
        receivers
    }

    /// Starts serving `socket` as the listener `config`, replacing (and stopping) the
    /// running listener of that name, if any.
    pub fn start_listener(
        &mut self,
        config: &ListenerConfig,
        socket: BoundSocket,
        pool: Arc<Pool>,
    ) -> std::io::Result<Arc<Listener>> {
        let stop = self.shutdown.stop_accepting.child_token();
        let listener = proxy::serve(config, socket, pool, &self.shutdown, &stop)?;
        if let Some(old) = self.listener_stops.insert(config.name.clone(), stop) {
            old.cancel();
        }
        Ok(listener)
    }

    fn is_retiring(&self, backend: &Arc<Backend>) -> bool {
        self.retiring.iter().any(|b| Arc::ptr_eq(b, backend))
    }

    /// `backend` leaves its pool (a reload removed it, it left DNS, or its host name moved)
    /// while connections are open: drained, listed as retiring until the last one closes.
    fn retire(&mut self, backend: &Arc<Backend>) {
        self.retiring.push(Arc::clone(backend));
        backend.set_retiring(true);
        backend.set_admin(crate::backend::Admin::Drain);
    }

    /// Takes `backend` off the retiring list.
    fn stop_retiring(&mut self, backend: &Arc<Backend>) {
        self.retiring.retain(|b| !Arc::ptr_eq(b, backend));
    }

    /// Drops removed backends whose last connection has closed from their pool.
    fn retire_idle_backends(&mut self) {
        let tables = self.tables.load_full();
        let config = self.config.load_full();
        self.retiring.retain(|backend| {
            let Some(pool) = tables.pools.get(&backend.pool) else {
                return false;
            };
            let snapshot = pool.load_full();
            if !snapshot.backends.iter().any(|b| Arc::ptr_eq(b, backend)) {
                return false;
            }
            if backend.active() > 0 {
                return true;
            }
            let Some(pool_config) = config.pools.iter().find(|p| p.name == backend.pool) else {
                return true;
            };
            let backends = snapshot
                .backends
                .iter()
                .filter(|b| !Arc::ptr_eq(b, backend))
                .cloned()
                .collect();
            pool.publish(PoolSnapshot::new(pool_config, backends));
            tracing::info!(
                "{}/{}: removed (by a reload or from DNS), last connection closed",
                backend.pool,
                backend.name
            );
            false
        });
    }
}

/// A pool built from its config, every backend new; `hard` is shutdown's hard token (the
/// parent of the backends' down signals).
pub fn build_pool(config: &PoolConfig, hard: &CancellationToken) -> Arc<Pool> {
    let backends = config
        .backends
        .iter()
        .map(|b| new_backend(config, b, hard))
        .collect();
    Pool::new(
        &config.name,
        config.protocol,
        PoolSnapshot::new(config, backends),
    )
}

/// A listed backend of `pool`.
fn new_backend(
    pool: &PoolConfig,
    backend: &BackendConfig,
    hard: &CancellationToken,
) -> Arc<Backend> {
    let new = pool_backend(
        pool,
        (&backend.name, &backend.address, backend.addr),
        backend.weight,
        hard,
    );
    if let (Some(host), true) = (&backend.host, backend.is_unresolved()) {
        new.mark_unresolved(&format!("{} does not resolve", host.name));
    }
    new
}

/// A backend of `pool` (listed or discovered; `who` is its name, address as written and
/// address), with the pool's settings that live on each backend (`on_down`,
/// `slow_start`). With a health check it starts down: its first probe decides.
fn pool_backend(
    pool: &PoolConfig,
    (name, address, addr): (&str, &str, std::net::SocketAddr),
    weight: u32,
    hard: &CancellationToken,
) -> Arc<Backend> {
    let new = Backend::new_under(
        hard,
        &pool.name,
        name,
        address,
        addr,
        weight,
        pool.health_check.is_none(),
    );
    new.set_close_on_down(pool.on_down == OnDown::Close);
    new.set_slow_start(pool.slow_start);
    new
}

/// `backend` joins `pool` while it serves (a reload or DNS added it): without a health
/// check it is up at once, so its slow-start ramp starts now; with one, the probe that
/// brings it up starts it.
fn joining(backend: &Backend, pool: &PoolConfig) {
    if pool.health_check.is_none() {
        backend.start_ramp();
    }
}
