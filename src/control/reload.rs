//! Applying a reload plan (`plan.rs`). Phase 1 does everything that can fail — reading and
//! validating the file, binding new listener sockets — with nothing changed yet; dropping
//! the bound sockets on an error is the rollback. Phase 2 commits, and cannot fail.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::plan::{self, BackendStep, ListenerStep, PoolStep, PoolUpdate};
use super::{ControlError, ControlTask, build_pool, new_backend};
use crate::backend::{Admin, Health};
use crate::config::{Config, OnDown};
use crate::pool::{Pool, PoolSnapshot};
use crate::proxy::{self, BoundSocket};
use crate::tables::Tables;

impl ControlTask {
    /// Re-reads the config file and applies it; the reply summarises what changed.
    pub(super) async fn reload(&mut self) -> Result<String, ControlError> {
        let path = self.config_path.clone().ok_or(ControlError::NoConfigFile)?;
        // Phase 1: everything that can fail, with nothing changed yet.
        let loaded = tokio::task::spawn_blocking(move || crate::config::load(&path))
            .await
            .map_err(|e| ControlError::ReadFailed(e.to_string()))?;
        let new = loaded.map_err(ControlError::Invalid)?;
        let old = self.config.load_full();
        let current = self.tables.load_full();
        let plan = plan::plan(&current, &old, &new, &self.retiring);
        let mut sockets = BTreeMap::new();
        for step in &plan.listeners {
            if let ListenerStep::Bind(name) = step {
                let config = new.listeners.iter().find(|l| &l.name == name);
                let config = config.expect("the plan names listeners of the new config");
                sockets.insert(name.clone(), proxy::bind(config)?);
            }
        }

        // Phase 2: commit. Nothing below fails.
        let mut tables = Tables::default();
        for step in &plan.pools {
            let pool = self.apply_pool(step, &current, &new);
            tables.pools.insert(pool.name.clone(), pool);
        }
        for name in &plan.pools_removed {
            if let Some(stop) = self.pool_checks.remove(name) {
                stop.cancel();
            }
            self.retiring.retain(|b| b.pool != *name);
        }
        self.apply_listeners(&plan.listeners, sockets, &current, &new, &mut tables);
        for name in &plan.listeners_removed {
            if let Some(stop) = self.listener_stops.remove(name) {
                stop.cancel();
            }
        }
        self.tables.store(Arc::new(tables));
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

    fn apply_pool(&mut self, step: &PoolStep, current: &Tables, new: &Config) -> Arc<Pool> {
        let name = match step {
            PoolStep::Add(name) | PoolStep::Update(PoolUpdate { name, .. }) => name,
        };
        let config = new.pools.iter().find(|p| &p.name == name);
        let config = config.expect("the plan names pools of the new config");
        match step {
            PoolStep::Add(_) => {
                let pool = build_pool(config);
                self.start_checks(&pool, config);
                pool
            }
            PoolStep::Update(update) => {
                let pool = Arc::clone(&current.pools[name]);
                let mut backends = Vec::with_capacity(update.backends.len());
                for step in &update.backends {
                    backends.push(match step {
                        BackendStep::Keep {
                            backend,
                            set_weight,
                            unretire,
                        } => {
                            if *unretire {
                                // Removed by an earlier reload, back before its last
                                // connection closed.
                                self.stop_retiring(backend);
                                backend.set_admin(Admin::Enabled);
                            }
                            if let Some(weight) = set_weight {
                                backend.set_weight(*weight);
                            }
                            Arc::clone(backend)
                        }
                        BackendStep::Add(index) => new_backend(config, &config.backends[*index]),
                        BackendStep::Retire { backend, newly } => {
                            if *newly {
                                self.retiring.push(Arc::clone(backend));
                                backend.set_admin(Admin::Drain);
                            }
                            Arc::clone(backend)
                        }
                    });
                }
                for backend in &update.forget {
                    self.stop_retiring(backend);
                }
                // The pool's on_down applies to the backends that stay (and their open
                // connections) too.
                let close_on_down = config.on_down == OnDown::Close;
                for backend in &backends {
                    backend.set_close_on_down(close_on_down);
                }
                pool.publish(PoolSnapshot::new(config, backends));
                if update.mark_all_up {
                    // Without a health check, backends are up unless connects fail.
                    for backend in &pool.load_full().backends {
                        backend.set_health(Health::Up);
                    }
                }
                if update.restart_checks {
                    self.start_checks(&pool, config);
                }
                pool
            }
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
