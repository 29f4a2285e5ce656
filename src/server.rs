//! Startup: from a validated config to a serving instance, in the order that keeps every
//! promise of the contract:
//!
//! 1. the metrics recorder and `metrics.bind` (handles created before the recorder are
//!    no-ops, and a bind failure must stop startup before any listener runs);
//! 2. the admin socket (a second instance on the same socket is refused before anything
//!    is served), and the listed backends' host names resolved (bounded; one that does
//!    not resolve is a backend down, never a failed start);
//! 3. pools and backends, then the first DNS lookup of every pool with `discover` (bounded), and
//!    the state file's admin state and weights applied to listed and discovered backends;
//! 4. the first round of health checks, so every backend is decided before a client
//!    arrives;
//! 5. every listener bound and serving, the tables published, the control task, the HTTP
//!    endpoint and the admin socket started.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, AdminSocket};
use crate::backend::Backend;
use crate::config::Config;
use crate::control::{self, ControlHandle, ControlTask};
use crate::health;
use crate::http::Exporter;
use crate::pool::PoolSnapshot;
use crate::proxy;
use crate::shutdown::Shutdown;
use crate::state_file;
use crate::tables::Tables;

/// The first round of health checks is waited for this much longer than the longest
/// check timeout: timers fire a little late on a busy machine.
const FIRST_ROUND_SLACK: Duration = Duration::from_millis(250);

/// A running instance.
pub struct Server {
    pub handle: ControlHandle,
    pub shutdown: Shutdown,
    metrics_addr: Option<std::net::SocketAddr>,
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
        let result = build(config, config_path, options, &shutdown).await;
        if result.is_err() {
            // Whatever was started already (checkers, accept loops) stops.
            shutdown.stop_accepting.cancel();
            shutdown.hard.cancel();
        }
        result
    }

    /// The address a listener actually bound (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<std::net::SocketAddr> {
        self.handle.tables().listeners.get(name).map(|l| l.bind)
    }

    pub fn backend(&self, pool: &str, backend: &str) -> Option<Arc<Backend>> {
        self.handle.tables().backend(pool, backend)
    }

    /// The address `/metrics` is served on (None without `metrics.bind`).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
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

async fn build(
    mut config: Config,
    config_path: Option<PathBuf>,
    options: StartOptions,
    shutdown: &Shutdown,
) -> anyhow::Result<Server> {
    let exporter = Exporter::new(config.metrics_bind)?;
    let admin_socket = match &config.admin_socket {
        Some(path) => Some(AdminSocket::bind(path).await?),
        None => None,
    };
    let mut control = ControlTask::new(&config, config_path, shutdown);
    // Before anything is built from it: a name that does not resolve is a backend down.
    control.resolve_listed(&mut config).await;
    control.set_config(&config);
    let mut tables = Tables::default();
    for pool_config in &config.pools {
        let pool = control::build_pool(pool_config, &shutdown.hard);
        // Their first health results are the startup round: no slow-start ramp.
        (pool.load_full().backends.iter()).for_each(|b| b.in_startup_round());
        tables.pools.insert(pool_config.name.clone(), pool);
    }
    control.set_metrics_addr(exporter.addr());
    control.discover_first_round(&config, &tables).await;
    restore_state(&config, &tables);
    first_health_round(&mut control, &config, &tables).await;
    for listener_config in &config.listeners {
        let socket = proxy::bind(listener_config)?;
        let pool = Arc::clone(&tables.pools[&listener_config.pool]);
        let listener = control.start_listener(listener_config, socket, pool)?;
        let name = listener_config.name.clone();
        tables.listeners.insert(name, listener);
    }
    control.publish(tables);
    let handle = control.spawn();
    let metrics_addr = exporter.start(handle.clone(), shutdown);
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
        shutdown: shutdown.clone(),
        metrics_addr,
    })
}

/// Starts every pool's checkers and waits for their first probes (each bounded by its
/// timeout), then says how many backends of each pool are up.
async fn first_health_round(control: &mut ControlTask, config: &Config, tables: &Tables) {
    let mut first_round = Vec::new();
    let mut longest = Duration::ZERO;
    for pool_config in &config.pools {
        if let Some(check) = &pool_config.health_check {
            let pool = &tables.pools[&pool_config.name];
            first_round.extend(control.start_checks(pool, pool_config));
            longest = longest.max(check.timeout);
        }
    }
    if first_round.is_empty() {
        return;
    }
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

/// Applies the state file (when configured) to freshly built pools.
fn restore_state(config: &Config, tables: &Tables) {
    let Some(path) = &config.state_file else {
        return;
    };
    let state = match state_file::read(path) {
        Ok(state) => state,
        Err(e) => {
            // Loud: an operator's drain or disable may be lost with it. The file is
            // rewritten at the next admin change.
            tracing::error!(
                "state file: {e}; serving with the config's admin state (every backend enabled, the config's weights)"
            );
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
