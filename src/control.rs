//! The control task: the one writer of the routing tables.
//!
//! It builds pools, backends and listeners from a config, publishes them as `Tables`
//! (read by the admin socket and metrics), and applies changes that need a new pool
//! snapshot (weights, reload) one message at a time. Health and admin state are single
//! atomics on each backend and need no message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::backend::Backend;
use crate::config::{Config, PoolConfig, Protocol};
use crate::health;
use crate::pool::{Pool, PoolSnapshot};
use crate::proxy::{self, Listener};
use crate::shutdown::Shutdown;

/// `Server::start` waits for the first round of health checks this much longer than the
/// longest check timeout: timers fire a little late on a busy machine.
const FIRST_ROUND_SLACK: Duration = Duration::from_millis(250);

/// Everything live, as one immutable snapshot.
#[derive(Default)]
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
}

/// What the admin socket and metrics hold: read the tables, send commands.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Command>,
    tables: Arc<ArcSwap<Tables>>,
    pub config_path: Option<PathBuf>,
}

impl ControlHandle {
    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    pub async fn set_weight(&self, pool: &str, backend: &str, weight: u32) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SetWeight {
                pool: pool.into(),
                backend: backend.into(),
                weight,
                reply,
            })
            .await
            .map_err(|_| "weir is shutting down".to_string())?;
        rx.await.map_err(|_| "weir is shutting down".to_string())?
    }
}

/// A running instance.
pub struct Server {
    pub handle: ControlHandle,
    pub shutdown: Shutdown,
    pub config: Arc<Config>,
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

        // Before anything is served: a second instance on the same socket is refused.
        let admin_socket = match &config.admin_socket {
            Some(path) => Some(admin::AdminSocket::bind(path).await?),
            None => None,
        };

        // The first round of checks decides every backend before a client can arrive.
        let mut first_round = Vec::new();
        let mut longest = Duration::ZERO;
        for pool_config in &config.pools {
            if let Some(check) = &pool_config.health_check {
                let pool = &tables.pools[&pool_config.name];
                // A reload that replaces this pool's checkers can hold on to this token.
                let stop = shutdown.stop_accepting.child_token();
                first_round.extend(health::spawn_pool(pool, check, &shutdown, &stop));
                longest = longest.max(check.timeout);
            }
        }
        if !first_round.is_empty() {
            health::wait_first_round(first_round, longest + FIRST_ROUND_SLACK).await;
            for pool in tables.pools.values() {
                let snapshot = pool.load_full();
                let up = snapshot.backends.iter().filter(|b| b.is_eligible()).count();
                tracing::info!(pool = %pool.name, "{up} of {} backends up", snapshot.backends.len());
            }
        }

        for listener_config in &config.listeners {
            let pool = Arc::clone(&tables.pools[&listener_config.pool]);
            let listener = match listener_config.protocol {
                Protocol::Tcp => {
                    let socket = proxy::tcp::bind(listener_config.bind).with_context(|| {
                        format!(
                            "listener {:?}: cannot bind {}",
                            listener_config.name, listener_config.bind
                        )
                    })?;
                    let bound: SocketAddr = socket.local_addr()?;
                    let listener = Listener::new(listener_config, bound, pool);
                    tracing::info!(listener = %listener.name, pool = %listener_config.pool, "accepting on {bound} (tcp)");
                    shutdown.tracker.spawn(proxy::tcp::accept_loop(
                        socket,
                        Arc::clone(&listener),
                        shutdown.clone(),
                        CancellationToken::new(),
                    ));
                    listener
                }
                Protocol::Udp => anyhow::bail!(
                    "listener {:?}: udp listeners are not supported yet",
                    listener_config.name
                ),
            };
            tables
                .listeners
                .insert(listener_config.name.clone(), listener);
        }

        let tables = Arc::new(ArcSwap::from_pointee(tables));
        let (tx, rx) = mpsc::channel(64);
        let config = Arc::new(config);
        let control = ControlTask {
            tables: Arc::clone(&tables),
            config: Arc::clone(&config),
        };
        // The control task stops with accepting: during the grace period nothing is rerouted.
        shutdown
            .tracker
            .spawn(control.run(rx, shutdown.stop_accepting.clone()));
        let handle = ControlHandle {
            tx,
            tables,
            config_path,
        };
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
            config,
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

    /// Graceful stop: stop accepting, let connections finish for up to
    /// `shutdown_timeout`, then close the rest.
    pub async fn stop(&self) -> usize {
        self.shutdown.run(self.config.shutdown_timeout).await
    }
}

fn build_pool(config: &PoolConfig) -> Arc<Pool> {
    let healthy_at_start = config.health_check.is_none();
    let backends = config
        .backends
        .iter()
        .map(|b| {
            Backend::new(
                &config.name,
                &b.name,
                &b.address,
                b.addr,
                b.weight,
                healthy_at_start,
            )
        })
        .collect();
    Pool::new(
        &config.name,
        config.protocol,
        PoolSnapshot::new(config, backends),
    )
}

struct ControlTask {
    tables: Arc<ArcSwap<Tables>>,
    config: Arc<Config>,
}

impl ControlTask {
    async fn run(self, mut rx: mpsc::Receiver<Command>, stop: CancellationToken) {
        loop {
            let command = tokio::select! {
                c = rx.recv() => match c { Some(c) => c, None => return },
                () = stop.cancelled() => return,
            };
            match command {
                Command::SetWeight {
                    pool,
                    backend,
                    weight,
                    reply,
                } => {
                    let _ = reply.send(self.set_weight(&pool, &backend, weight));
                }
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
        let pool_config = self
            .config
            .pools
            .iter()
            .find(|p| p.name == pool_name)
            .ok_or_else(|| format!("no pool {pool_name:?}"))?;
        pool.publish(PoolSnapshot::new(pool_config, snapshot.backends.clone()));
        tracing::info!("{pool_name}/{backend_name}: weight set to {weight}");
        Ok(())
    }
}
