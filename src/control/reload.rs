//! Applying a reload plan (`plan.rs`). Phase 1 does everything that can fail — reading and
//! validating the file, binding new listener sockets — with nothing changed yet; dropping
//! the bound sockets on an error is the rollback. Phase 2 commits, and cannot fail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::plan::{self, BackendStep, Checks, ListenerStep, PoolStep, PoolUpdate};
use super::{ControlError, ControlTask, build_pool, joining, new_backend};
use crate::backend::{Admin, Backend, Health};
use crate::config::{Config, OnDown, PoolConfig};
use crate::health;
use crate::pool::{Pool, PoolSnapshot};
use crate::proxy::{self, BoundSocket};
use crate::tables::Tables;

/// The first round of a pool added by a reload is waited for this much longer than its
/// longest check timeout, as at startup (`server.rs`): timers fire a little late on a busy
/// machine.
const FIRST_ROUND_SLACK: Duration = Duration::from_millis(250);

fn pool_config<'a>(new: &'a Config, name: &str) -> &'a PoolConfig {
    let config = new.pools.iter().find(|p| p.name == name);
    config.expect("the plan names pools of the new config")
}

impl ControlTask {
    /// Re-reads the config file and applies it; the reply summarises what changed.
    pub(super) async fn reload(&mut self) -> Result<String, ControlError> {
        let path = self.config_path.clone().ok_or(ControlError::NoConfigFile)?;
        // Phase 1: everything that can fail, with nothing changed yet.
        let loaded = tokio::task::spawn_blocking(move || crate::config::load(&path))
            .await
            .map_err(|e| ControlError::ReadFailed(e.to_string()))?;
        let mut new = loaded.map_err(ControlError::Invalid)?;
        self.resolve_listed(&mut new).await;
        let old = self.config.load_full();
        let current = self.tables.load_full();
        let discovered = self.discovery.backends();
        let mut plan = plan::plan_with(&current, &old, &new, &self.retiring, &discovered);
        plan.notes = plan::restart_notes(&self.fixed, &new);
        let mut sockets = BTreeMap::new();
        for step in &plan.listeners {
            if let ListenerStep::Bind(name) = step {
                let config = new.listeners.iter().find(|l| &l.name == name);
                let config = config.expect("the plan names listeners of the new config");
                sockets.insert(name.clone(), proxy::bind(config)?);
            }
        }

        // Phase 2: commit. Nothing below fails.
        let mut added = self.add_pools(&plan.pools, &new).await;
        let mut tables = Tables::default();
        for step in &plan.pools {
            let pool = match step {
                PoolStep::Add(name) => added.remove(name).expect("built by add_pools"),
                PoolStep::Update(update) => self.update_pool(update, &current, &new).await,
            };
            tables.pools.insert(pool.name.clone(), pool);
        }
        for name in &plan.pools_removed {
            self.checkers.stop_pool(name).await;
            self.retiring.retain(|b| b.pool != *name);
            self.discovery.sets.remove(name);
        }
        self.apply_listeners(&plan.listeners, sockets, &current, &new, &mut tables);
        for name in &plan.listeners_removed {
            if let Some(stop) = self.listener_stops.remove(name) {
                stop.cancel();
            }
        }
        self.tables.store(Arc::new(tables));
        self.follow_pools(&new);
        self.config.store(Arc::new(new));
        // A state file that cannot be written is logged; the reload is in force anyway.
        let _ = self.save_state();
        let mut summary = plan.changes.to_string();
        for note in plan.notes {
            summary.push_str("; ");
            summary.push_str(&note);
        }
        Ok(summary)
    }

    /// Builds the pools the reload adds and runs their first round of health checks
    /// before anything is published, bounded by their check timeout as at startup: a
    /// pool added by a reload serves as soon as its backends pass, never published with
    /// every backend down while its first probes are still out.
    async fn add_pools(&mut self, steps: &[PoolStep], new: &Config) -> BTreeMap<String, Arc<Pool>> {
        let mut pools = BTreeMap::new();
        let mut first_round = Vec::new();
        let mut longest = Duration::ZERO;
        for step in steps {
            let PoolStep::Add(name) = step else {
                continue;
            };
            let config = pool_config(new, name);
            // A pool whose protocol changed: the old pool's checkers (and discovered
            // backends: its follower finds them again) go with it.
            self.checkers.stop_pool(name).await;
            self.discovery.sets.remove(name);
            let pool = build_pool(config, &self.shutdown.hard);
            first_round.extend(self.start_checks(&pool, config));
            if let Some(check) = &config.health_check {
                longest = longest.max(check.timeout);
            }
            pools.insert(name.clone(), pool);
        }
        if !first_round.is_empty() {
            health::wait_first_round(first_round, longest + FIRST_ROUND_SLACK).await;
        }
        pools
    }

    /// A pool that stays: its new snapshot, and its checkers as the plan says.
    async fn update_pool(
        &mut self,
        update: &PoolUpdate,
        current: &Tables,
        new: &Config,
    ) -> Arc<Pool> {
        let config = pool_config(new, &update.name);
        let pool = Arc::clone(&current.pools[&update.name]);
        if let Checks::Remove = update.checks {
            // Stopped (and ended) before anything is set up: a probe finishing in between
            // could otherwise leave a backend down with no checker left to undo it.
            self.checkers.stop_pool(&update.name).await;
        }
        let mut backends = Vec::with_capacity(update.backends.len());
        for step in &update.backends {
            backends.push(match step {
                BackendStep::Keep {
                    backend,
                    set_weight,
                    unretire,
                } => {
                    if *unretire {
                        // Removed by an earlier reload, back before its last connection
                        // closed.
                        self.stop_retiring(backend);
                        backend.set_retiring(false);
                        backend.set_admin(Admin::Enabled);
                    }
                    if let Some(weight) = set_weight {
                        backend.set_weight(*weight);
                    }
                    Arc::clone(backend)
                }
                BackendStep::Add(index) => {
                    let added = new_backend(config, &config.backends[*index], &self.shutdown.hard);
                    joining(&added, config);
                    added
                }
                BackendStep::Retire { backend, newly } => {
                    if *newly {
                        self.retire(backend);
                    }
                    Arc::clone(backend)
                }
            });
        }
        for backend in &update.forget {
            self.stop_retiring(backend);
        }
        // Discovered backends are not in the file: kept while the pool has `discover`.
        backends.extend(self.discovered_after_reload(config).await);
        // The pool's on_down applies to the backends that stay (and their open
        // connections) too.
        let close_on_down = config.on_down == OnDown::Close;
        for backend in &backends {
            backend.set_close_on_down(close_on_down);
        }
        self.apply_checks(&update.checks, config, pool.protocol, &backends)
            .await;
        pool.publish(PoolSnapshot::new(config, backends));
        pool
    }

    /// Starts and stops a pool's checkers as `checks` says; `backends` is its new list.
    async fn apply_checks(
        &mut self,
        checks: &Checks,
        config: &PoolConfig,
        protocol: crate::config::Protocol,
        backends: &[Arc<Backend>],
    ) {
        let Some(check) = &config.health_check else {
            if let Checks::Remove = checks {
                // Without a health check, backends are up unless connects fail.
                for backend in backends {
                    backend.set_health(Health::Up);
                }
            }
            return;
        };
        let starting: Vec<&Arc<Backend>> = match checks {
            Checks::Off | Checks::Remove => return,
            Checks::Keep { start, stop } => {
                self.checkers.stop(stop).await;
                start.iter().map(|&i| &backends[i]).collect()
            }
            Checks::Restart => {
                self.checkers.stop_pool(&config.name).await;
                backends.iter().filter(|b| !self.is_retiring(b)).collect()
            }
        };
        for backend in starting {
            let delay = health::spread(check.interval);
            // Nobody waits for these: the pool serves meanwhile on its other backends.
            let _first_round = self
                .checkers
                .start(backend, check, protocol, &self.shutdown, delay);
        }
    }

    fn apply_listeners(
        &mut self,
        steps: &[ListenerStep],
        mut sockets: BTreeMap<String, BoundSocket>,
        current: &Tables,
        new: &Config,
        tables: &mut Tables,
    ) {
        for step in steps {
            let (ListenerStep::Keep(name) | ListenerStep::Bind(name)) = step;
            let config = new.listeners.iter().find(|l| &l.name == name);
            let config = config.expect("the plan names listeners of the new config");
            let pool = Arc::clone(&tables.pools[&config.pool]);
            let listener = match sockets.remove(name) {
                // Replaces (and stops) the old accept loop of the same name, if any.
                Some(socket) => match self.start_listener(config, socket, pool) {
                    Ok(listener) => listener,
                    Err(e) => {
                        // local_addr() on a socket just bound: not expected to fail.
                        tracing::error!("reload: listener {name:?}: {e}");
                        continue;
                    }
                },
                None => {
                    let listener = Arc::clone(&current.listeners[name]);
                    listener.pool.store(pool);
                    listener.apply(config);
                    listener
                }
            };
            tables.listeners.insert(name.clone(), listener);
        }
    }
}
