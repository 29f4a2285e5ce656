//! The control task: the one writer of the routing tables.
//!
//! It builds pools, backends and listeners from a config, publishes them as `Tables`
//! (read by the admin socket and metrics), and applies changes that need a new pool
//! snapshot (weights, reload) one message at a time. Health and admin state are single
//! atomics on each backend and need no message.
//!
//! Reload is a diff of the running tables against the new config, applied in two phases:
//! first everything that can fail (reading and validating the file, binding new listener
//! sockets), with nothing changed yet; then the commit, which cannot fail. A backend that
//! stays (same pool, same name, same address) is the same `Arc<Backend>`, so its health,
//! admin state, counters and open connections carry over. A removed backend is drained
//! and stays visible until its last connection closes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use metrics::{Counter, Gauge, counter, gauge};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::backend::{Admin, Backend, Health};
use crate::config::{Config, ListenerConfig, PoolConfig, Protocol};
use crate::health;
use crate::pool::{Pool, PoolSnapshot};
use crate::proxy::{self, Listener};
use crate::shutdown::Shutdown;
use crate::state_file;

/// `Server::start` waits for the first round of health checks this much longer than the
/// longest check timeout: timers fire a little late on a busy machine.
const FIRST_ROUND_SLACK: Duration = Duration::from_millis(250);

/// How often the control task looks for removed backends whose last connection closed.
const RETIRE_EVERY: Duration = Duration::from_millis(500);

/// Everything live, as one immutable snapshot.
#[derive(Default, Clone)]
pub struct Tables {
    pub pools: BTreeMap<String, Arc<Pool>>,
    pub listeners: BTreeMap<String, Arc<Listener>>,
}

impl Tables {
    /// A backend named `POOL/BACKEND`.
    pub fn backend(&self, pool: &str, backend: &str) -> Option<Arc<Backend>> {
        self.pools.get(pool)?.snapshot().find(backend).cloned()
    }
}

pub enum Command {
    SetWeight {
        pool: String,
        backend: String,
        weight: u32,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Re-read the config file; the reply summarises what changed, or lists every problem.
    Reload {
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// An operator changed a backend's admin state: persist it.
    AdminChanged,
}

/// What the admin socket and metrics hold: read the tables, send commands.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Command>,
    tables: Arc<ArcSwap<Tables>>,
    config: Arc<ArcSwap<Config>>,
    pub config_path: Option<PathBuf>,
}

impl ControlHandle {
    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    /// The config in force (the last one loaded successfully).
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub async fn set_weight(&self, pool: &str, backend: &str, weight: u32) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SetWeight {
            pool: pool.into(),
            backend: backend.into(),
            weight,
            reply,
        })
        .await?;
        rx.await.map_err(|_| SHUTTING_DOWN.to_string())?
    }

    /// Re-reads the config file and applies it; `Err` lists every problem, and then
    /// nothing has changed.
    pub async fn reload(&self) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Reload { reply }).await?;
        rx.await.map_err(|_| SHUTTING_DOWN.to_string())?
    }

    /// Tells the control task that an admin state changed (for the state file).
    pub async fn admin_changed(&self) {
        let _ = self.tx.send(Command::AdminChanged).await;
    }

    async fn send(&self, command: Command) -> Result<(), String> {
        self.tx
            .send(command)
            .await
            .map_err(|_| SHUTTING_DOWN.to_string())
    }
}

const SHUTTING_DOWN: &str = "weir is shutting down";

/// A running instance.
pub struct Server {
    pub handle: ControlHandle,
    pub shutdown: Shutdown,
    metrics_addr: Option<SocketAddr>,
}

/// In-process knobs for `Server::start_with`; `Default` is what `weir run` uses.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// An admin client must send its command line within this long.
    pub admin_read_timeout: Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            admin_read_timeout: admin::READ_TIMEOUT,
        }
    }
}

impl Server {
    /// Builds everything from `config`, runs the first round of health checks, binds
    /// every listener and starts serving.
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Server> {
        Self::start_with(config, config_path, StartOptions::default()).await
    }

    pub async fn start_with(
        config: Config,
        config_path: Option<PathBuf>,
        options: StartOptions,
    ) -> anyhow::Result<Server> {
        let shutdown = Shutdown::new();
        let result = Self::build(config, config_path, options, &shutdown).await;
        if result.is_err() {
            // Whatever was started already (checkers, accept loops) stops.
            shutdown.stop_accepting.cancel();
            shutdown.hard.cancel();
        }
        result
    }

    async fn build(
        config: Config,
        config_path: Option<PathBuf>,
        options: StartOptions,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Server> {
        // First: metric handles created before the recorder is installed are no-ops, and a
        // metrics.bind failure must stop startup before any listener runs.
        let exporter = crate::metrics::Exporter::new(config.metrics_bind)?;
        let shutdown = shutdown.clone();
        let mut tables = Tables::default();
        for pool_config in &config.pools {
            tables
                .pools
                .insert(pool_config.name.clone(), build_pool(pool_config));
        }
        restore_state(&config, &tables);

        // Before anything is served: a second instance on the same socket is refused.
        let admin_socket = match &config.admin_socket {
            Some(path) => Some(admin::AdminSocket::bind(path).await?),
            None => None,
        };

        let mut control = ControlTask {
            tables: Arc::new(ArcSwap::from_pointee(Tables::default())),
            config: Arc::new(ArcSwap::from_pointee(config.clone())),
            config_path: config_path.clone(),
            shutdown: shutdown.clone(),
            pool_checks: BTreeMap::new(),
            listener_stops: BTreeMap::new(),
            retiring: Vec::new(),
            metrics: ReloadMetrics::new(),
        };

        // The first round of checks decides every backend before a client can arrive.
        let mut first_round = Vec::new();
        let mut longest = Duration::ZERO;
        for pool_config in &config.pools {
            if let Some(check) = &pool_config.health_check {
                first_round
                    .extend(control.start_checks(&tables.pools[&pool_config.name], pool_config));
                longest = longest.max(check.timeout);
            }
        }
        if !first_round.is_empty() {
            health::wait_first_round(first_round, longest + FIRST_ROUND_SLACK).await;
            for pool in tables.pools.values() {
                let snapshot = pool.load_full();
                let up = snapshot.backends.iter().filter(|b| b.is_eligible()).count();
                if up == 0 {
                    tracing::warn!(pool = %pool.name, "no backend is up: clients of this pool are closed at once until one is");
                } else {
                    tracing::info!(pool = %pool.name, "{up} of {} backends up", snapshot.backends.len());
                }
            }
        }

        for listener_config in &config.listeners {
            let socket = bind_listener(listener_config)?;
            let pool = Arc::clone(&tables.pools[&listener_config.pool]);
            let listener = control.start_listener(listener_config, socket, pool)?;
            tables
                .listeners
                .insert(listener_config.name.clone(), listener);
        }
        control.tables.store(Arc::new(tables));

        let (tx, rx) = mpsc::channel(64);
        let handle = ControlHandle {
            tx,
            tables: Arc::clone(&control.tables),
            config: Arc::clone(&control.config),
            config_path,
        };
        // The control task stops with accepting: during the grace period nothing is rerouted.
        shutdown
            .tracker
            .spawn(control.run(rx, shutdown.stop_accepting.clone()));
        let metrics_addr = exporter.start(handle.clone(), &shutdown);
        if let Some(socket) = admin_socket {
            shutdown.tracker.spawn(admin::serve(
                socket,
                handle.clone(),
                shutdown.clone(),
                options.admin_read_timeout,
            ));
        }
        Ok(Server {
            handle,
            shutdown,
            metrics_addr,
        })
    }

    /// The address a listener actually bound (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.handle.tables().listeners.get(name).map(|l| l.bind)
    }

    pub fn backend(&self, pool: &str, backend: &str) -> Option<Arc<Backend>> {
        self.handle.tables().backend(pool, backend)
    }

    /// The address `/metrics` is served on (None without `metrics.bind`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.handle.config()
    }

    /// Graceful stop: stop accepting, let connections finish for up to
    /// `shutdown_timeout`, then close the rest.
    pub async fn stop(&self) -> usize {
        self.shutdown.run(self.config().shutdown_timeout).await
    }
}

fn build_pool(config: &PoolConfig) -> Arc<Pool> {
    let backends = config
        .backends
        .iter()
        .map(|b| new_backend(config, b))
        .collect();
    Pool::new(
        &config.name,
        config.protocol,
        PoolSnapshot::new(config, backends),
    )
}

/// A backend with a health check starts down: its first probe decides.
fn new_backend(pool: &PoolConfig, backend: &crate::config::BackendConfig) -> Arc<Backend> {
    Backend::new(
        &pool.name,
        &backend.name,
        &backend.address,
        backend.addr,
        backend.weight,
        pool.health_check.is_none(),
    )
}

/// Applies the state file (when configured) to freshly built pools.
fn restore_state(config: &Config, tables: &Tables) {
    let Some(path) = &config.state_file else {
        return;
    };
    let state = match state_file::read(path) {
        Ok(state) => state,
        Err(e) => {
            tracing::warn!("state file: {e}; starting with every backend enabled");
            return;
        }
    };
    let weights_changed = state_file::restore(&state, |pool, name| tables.backend(pool, name));
    if weights_changed {
        for pool_config in &config.pools {
            let pool = &tables.pools[&pool_config.name];
            let backends = pool.load_full().backends.clone();
            pool.publish(PoolSnapshot::new(pool_config, backends));
        }
    }
}

/// A listener's socket, bound before anything changes (reload binds first, commits after).
enum BoundSocket {
    Tcp(tokio::net::TcpListener),
    /// One socket per worker thread, all on the listener's address (`proxy::udp::bind`).
    Udp(Vec<tokio::net::UdpSocket>),
}

fn bind_listener(config: &ListenerConfig) -> anyhow::Result<BoundSocket> {
    match config.protocol {
        Protocol::Tcp => proxy::tcp::bind(config.bind)
            .map(BoundSocket::Tcp)
            .with_context(|| format!("listener {:?}: cannot bind {}", config.name, config.bind)),
        Protocol::Udp => proxy::udp::bind(config.bind)
            .map(BoundSocket::Udp)
            .with_context(|| format!("listener {:?}: cannot bind {}", config.name, config.bind)),
    }
}

struct ReloadMetrics {
    success: Counter,
    failure: Counter,
    last_success: Gauge,
}

impl ReloadMetrics {
    fn new() -> Self {
        ReloadMetrics {
            success: counter!("weir_config_reloads_total", "result" => "success"),
            failure: counter!("weir_config_reloads_total", "result" => "failure"),
            last_success: gauge!("weir_config_last_reload_success_timestamp_seconds"),
        }
    }

    fn record(&self, ok: bool) {
        if ok {
            self.success.increment(1);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.last_success.set(now.as_secs_f64());
        } else {
            self.failure.increment(1);
        }
    }
}

struct ControlTask {
    tables: Arc<ArcSwap<Tables>>,
    config: Arc<ArcSwap<Config>>,
    config_path: Option<PathBuf>,
    shutdown: Shutdown,
    /// Per pool: the token its health checkers stop on (a reload replaces them).
    pool_checks: BTreeMap<String, CancellationToken>,
    /// Per listener: the token its accept or receive loop stops on.
    listener_stops: BTreeMap<String, CancellationToken>,
    /// Backends a reload removed that still have open connections. Held by identity, not
    /// by name: a reload may bring a backend of the same name at another address.
    retiring: Vec<Arc<Backend>>,
    metrics: ReloadMetrics,
}

impl ControlTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, stop: CancellationToken) {
        let mut retire = tokio::time::interval(RETIRE_EVERY);
        retire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let command = tokio::select! {
                c = rx.recv() => match c { Some(c) => c, None => return },
                _ = retire.tick(), if !self.retiring.is_empty() => {
                    self.retire_idle_backends();
                    continue;
                }
                () = stop.cancelled() => return,
            };
            match command {
                Command::SetWeight {
                    pool,
                    backend,
                    weight,
                    reply,
                } => {
                    let result = self.set_weight(&pool, &backend, weight);
                    if result.is_ok() {
                        self.save_state();
                    }
                    let _ = reply.send(result);
                }
                Command::Reload { reply } => {
                    let result = self.reload().await;
                    self.metrics.record(result.is_ok());
                    match &result {
                        Ok(summary) => tracing::info!("reload: {summary}"),
                        Err(problems) => {
                            tracing::error!("reload failed, nothing changed:\n{problems}")
                        }
                    }
                    let _ = reply.send(result);
                }
                Command::AdminChanged => self.save_state(),
            }
        }
    }

    fn set_weight(&self, pool_name: &str, backend_name: &str, weight: u32) -> Result<(), String> {
        if !(1..=1000).contains(&weight) {
            return Err(format!("weight {weight} is out of range 1..=1000"));
        }
        let tables = self.tables.load();
        let pool = tables
            .pools
            .get(pool_name)
            .ok_or_else(|| format!("no pool {pool_name:?}"))?;
        let snapshot = pool.load_full();
        let backend = snapshot
            .find(backend_name)
            .ok_or_else(|| format!("no backend {backend_name:?} in pool {pool_name:?}"))?;
        backend.set_weight(weight);
        let config = self.config.load();
        let pool_config = config
            .pools
            .iter()
            .find(|p| p.name == pool_name)
            .ok_or_else(|| format!("no pool {pool_name:?}"))?;
        pool.publish(PoolSnapshot::new(pool_config, snapshot.backends.clone()));
        tracing::info!("{pool_name}/{backend_name}: weight set to {weight}");
        Ok(())
    }

    /// Writes the state file, when one is configured. A failure is logged, never fatal.
    fn save_state(&self) {
        let config = self.config.load();
        let Some(path) = &config.state_file else {
            return;
        };
        let state = state_file::capture(&self.tables.load(), &config);
        if let Err(e) = state_file::write(path, &state) {
            tracing::error!("state file {}: cannot write: {e}", path.display());
        }
    }

    /// Starts the health checkers of `pool` (replacing any running ones); returns the
    /// first-round receivers. Retiring backends are not checked.
    fn start_checks(&mut self, pool: &Pool, config: &PoolConfig) -> Vec<oneshot::Receiver<()>> {
        if let Some(old) = self.pool_checks.remove(&pool.name) {
            old.cancel();
        }
        let Some(check) = &config.health_check else {
            return Vec::new();
        };
        let stop = self.shutdown.stop_accepting.child_token();
        let receivers = pool
            .load_full()
            .backends
            .iter()
            .filter(|b| !self.is_retiring(b))
            .map(|backend| {
                health::spawn_checker(
                    Arc::clone(backend),
                    check.clone(),
                    pool.protocol,
                    &self.shutdown,
                    stop.clone(),
                )
            })
            .collect();
        self.pool_checks.insert(pool.name.clone(), stop);
        receivers
    }

    fn start_listener(
        &mut self,
        config: &ListenerConfig,
        socket: BoundSocket,
        pool: Arc<Pool>,
    ) -> anyhow::Result<Arc<Listener>> {
        let stop = self.shutdown.stop_accepting.child_token();
        let listener = match socket {
            BoundSocket::Tcp(socket) => {
                let bound = socket.local_addr()?;
                let listener = Listener::new(config, bound, pool);
                tracing::info!(listener = %listener.name, pool = %config.pool, "accepting on {bound} (tcp)");
                self.shutdown.tracker.spawn(proxy::tcp::accept_loop(
                    socket,
                    Arc::clone(&listener),
                    self.shutdown.clone(),
                    stop.clone(),
                ));
                listener
            }
            BoundSocket::Udp(sockets) => {
                let bound = sockets
                    .first()
                    .context("a udp listener has at least one socket")?
                    .local_addr()?;
                let listener = Listener::new(config, bound, pool);
                if let Some(stats) = &listener.udp {
                    stats.set_sockets(sockets.len());
                }
                tracing::info!(listener = %listener.name, pool = %config.pool, sockets = sockets.len(), "receiving on {bound} (udp)");
                for socket in sockets {
                    self.shutdown.tracker.spawn(proxy::udp::receive_loop(
                        socket,
                        Arc::clone(&listener),
                        self.shutdown.clone(),
                        stop.clone(),
                    ));
                }
                listener
            }
        };
        if let Some(old) = self.listener_stops.insert(config.name.clone(), stop) {
            old.cancel();
        }
        Ok(listener)
    }

    async fn reload(&mut self) -> Result<String, String> {
        let Some(path) = self.config_path.clone() else {
            return Err("this instance was started without a config file".into());
        };
        // Phase 1: everything that can fail, with nothing changed yet.
        let loaded = tokio::task::spawn_blocking(move || crate::config::load(&path))
            .await
            .map_err(|e| format!("reading the config failed: {e}"))?;
        let new = loaded.map_err(|errors| errors.to_string())?;
        let old = self.config.load_full();
        let mut notes = Vec::new();
        if new.metrics_bind != old.metrics_bind {
            notes.push("metrics.bind changed: takes effect at the next restart".to_string());
        }
        if new.admin_socket != old.admin_socket {
            notes.push("admin.socket changed: takes effect at the next restart".to_string());
        }

        let old_listeners: BTreeMap<&str, &ListenerConfig> =
            old.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
        let mut sockets = BTreeMap::new();
        for listener in &new.listeners {
            // Unchanged when the file names the same address as before, or the address the
            // listener actually bound (a port 0 that became a real port).
            let running = self
                .tables
                .load()
                .listeners
                .get(&listener.name)
                .map(|l| l.bind);
            let rebind = match old_listeners.get(listener.name.as_str()) {
                Some(was) => {
                    (was.bind != listener.bind && running != Some(listener.bind))
                        || was.protocol != listener.protocol
                }
                None => true,
            };
            if rebind {
                // Dropping `sockets` on an error closes whatever this reload bound: rollback.
                let socket =
                    bind_listener(listener).map_err(|e| format!("{e:#}; nothing changed"))?;
                sockets.insert(listener.name.clone(), socket);
            }
        }

        // Phase 2: commit. Nothing below fails.
        let current = self.tables.load_full();
        let mut tables = Tables::default();
        let mut changes = Changes::default();
        let old_pools: BTreeMap<&str, &PoolConfig> =
            old.pools.iter().map(|p| (p.name.as_str(), p)).collect();
        for pool_config in &new.pools {
            let existing = current
                .pools
                .get(&pool_config.name)
                .filter(|p| p.protocol == pool_config.protocol);
            let pool = match existing {
                Some(pool) => {
                    let was = old_pools.get(pool_config.name.as_str()).copied();
                    self.update_pool(pool, was, pool_config, &mut changes);
                    Arc::clone(pool)
                }
                None => {
                    changes.pools_added += 1;
                    changes.backends_added += pool_config.backends.len();
                    let pool = build_pool(pool_config);
                    self.start_checks(&pool, pool_config);
                    pool
                }
            };
            tables.pools.insert(pool_config.name.clone(), pool);
        }
        for (name, pool) in &current.pools {
            if !tables.pools.contains_key(name) {
                changes.pools_removed += 1;
                changes.backends_removed += pool.load_full().backends.len();
                if let Some(stop) = self.pool_checks.remove(name) {
                    stop.cancel();
                }
                self.retiring.retain(|b| b.pool != *name);
            }
        }

        for listener_config in &new.listeners {
            let pool = Arc::clone(&tables.pools[&listener_config.pool]);
            let listener = match sockets.remove(&listener_config.name) {
                Some(socket) => {
                    if current.listeners.contains_key(&listener_config.name) {
                        changes.listeners_rebound += 1;
                    } else {
                        changes.listeners_added += 1;
                    }
                    // Replaces (and stops) the old accept loop of the same name, if any.
                    match self.start_listener(listener_config, socket, pool) {
                        Ok(listener) => listener,
                        Err(e) => {
                            // local_addr() on a socket just bound: not expected to fail.
                            tracing::error!("reload: listener {:?}: {e:#}", listener_config.name);
                            continue;
                        }
                    }
                }
                None => {
                    let listener = Arc::clone(&current.listeners[&listener_config.name]);
                    listener.pool.store(pool);
                    listener.apply(listener_config);
                    listener
                }
            };
            tables
                .listeners
                .insert(listener_config.name.clone(), listener);
        }
        for name in current.listeners.keys() {
            if !tables.listeners.contains_key(name) {
                changes.listeners_removed += 1;
                if let Some(stop) = self.listener_stops.remove(name) {
                    stop.cancel();
                }
            }
        }

        self.tables.store(Arc::new(tables));
        self.config.store(Arc::new(new));
        self.save_state();
        let mut summary = changes.to_string();
        for note in notes {
            summary.push_str("; ");
            summary.push_str(&note);
        }
        Ok(summary)
    }

    /// Reload of a pool that stays: keeps backends by name (and address), adds new ones,
    /// retires removed ones, applies strategy/timeouts/weights/health-check changes.
    fn update_pool(
        &mut self,
        pool: &Arc<Pool>,
        was: Option<&PoolConfig>,
        config: &PoolConfig,
        changes: &mut Changes,
    ) {
        let current = pool.load_full();
        let old_weights: BTreeMap<&str, u32> = was
            .map(|w| {
                w.backends
                    .iter()
                    .map(|b| (b.name.as_str(), b.weight))
                    .collect()
            })
            .unwrap_or_default();
        let mut backends = Vec::with_capacity(config.backends.len());
        let mut set_changed = false;
        for backend_config in &config.backends {
            let kept = current
                .backends
                .iter()
                .find(|b| b.name == backend_config.name && b.addr == backend_config.addr)
                .cloned();
            match kept {
                Some(backend) => {
                    if self.stop_retiring(&backend) {
                        // Removed by an earlier reload, back before its last connection closed.
                        backend.set_admin(Admin::Enabled);
                        set_changed = true;
                    }
                    // A weight changed in the file wins; otherwise an operator's `set weight` stays.
                    if old_weights.get(backend_config.name.as_str()) != Some(&backend_config.weight)
                        && backend.weight() != backend_config.weight
                    {
                        backend.set_weight(backend_config.weight);
                        changes.backends_changed += 1;
                    }
                    backends.push(backend);
                }
                None => {
                    changes.backends_added += 1;
                    set_changed = true;
                    backends.push(new_backend(config, backend_config));
                }
            }
        }
        // Removed backends stay in the snapshot, drained, until their last connection closes.
        for backend in &current.backends {
            let stays = backends.iter().any(|b| Arc::ptr_eq(b, backend));
            if !stays {
                set_changed = true;
                if backend.active() > 0 {
                    if !self.is_retiring(backend) {
                        self.retiring.push(Arc::clone(backend));
                        changes.backends_removed += 1;
                        backend.set_admin(Admin::Drain);
                    }
                    backends.push(Arc::clone(backend));
                } else if !self.stop_retiring(backend) {
                    changes.backends_removed += 1;
                }
            }
        }
        let settings_changed = was != Some(config);
        pool.publish(PoolSnapshot::new(config, backends));
        if settings_changed || set_changed {
            let check_changed = was.map(|w| &w.health_check) != Some(&config.health_check);
            if check_changed && config.health_check.is_none() {
                // Without a health check, backends are up unless connects fail.
                for backend in &pool.load_full().backends {
                    backend.set_health(Health::Up);
                }
            }
            if check_changed || set_changed {
                self.start_checks(pool, config);
            }
            if settings_changed && !set_changed {
                changes.pools_changed += 1;
            }
        }
    }

    fn is_retiring(&self, backend: &Arc<Backend>) -> bool {
        self.retiring.iter().any(|b| Arc::ptr_eq(b, backend))
    }

    /// Takes `backend` off the retiring list; false when it was not on it.
    fn stop_retiring(&mut self, backend: &Arc<Backend>) -> bool {
        let before = self.retiring.len();
        self.retiring.retain(|b| !Arc::ptr_eq(b, backend));
        self.retiring.len() != before
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
                "{}/{}: removed by reload, last connection closed",
                backend.pool,
                backend.name
            );
            false
        });
    }
}

/// What a reload changed, for its reply and log line.
#[derive(Default)]
struct Changes {
    pools_added: usize,
    pools_removed: usize,
    pools_changed: usize,
    backends_added: usize,
    backends_removed: usize,
    backends_changed: usize,
    listeners_added: usize,
    listeners_removed: usize,
    listeners_rebound: usize,
}

impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            (self.pools_added, "pool added", "pools added"),
            (self.pools_removed, "pool removed", "pools removed"),
            (self.pools_changed, "pool changed", "pools changed"),
            (self.backends_added, "backend added", "backends added"),
            (self.backends_removed, "backend removed", "backends removed"),
            (self.backends_changed, "weight changed", "weights changed"),
            (self.listeners_added, "listener added", "listeners added"),
            (
                self.listeners_removed,
                "listener removed",
                "listeners removed",
            ),
            (
                self.listeners_rebound,
                "listener rebound",
                "listeners rebound",
            ),
        ]
        .into_iter()
        .filter(|(n, _, _)| *n > 0)
        .map(|(n, one, many)| format!("{n} {}", if n == 1 { one } else { many }))
        .collect();
        if parts.is_empty() {
            f.write_str("reloaded, nothing changed")
        } else {
            write!(f, "reloaded: {}", parts.join(", "))
        }
    }
}
