//! A reload as a plan: what must change to go from the running tables (built from the old
//! config) to the new config, computed by a pure function and applied afterwards by the
//! control task (`reload.rs`). Computing it binds nothing, starts nothing and changes no
//! backend, so every rule of a reload is unit-tested here without sockets.
//!
//! The rules:
//! - A backend stays when its pool, name and resolved address stay: it is the same
//!   `Arc<Backend>` (health, admin state, counters, open connections carry over).
//! - A weight changed in the file wins over an operator's `set weight`; an unchanged one
//!   leaves the operator's value alone (the state file applies the same rule at a restart,
//!   by its `config_weight`).
//! - A removed backend with open connections is retired: drained, kept in its pool's
//!   snapshot until its last connection closes. One that comes back before that is
//!   enabled again.
//! - A listener is rebound when it is new, its protocol changed, or its address changed
//!   (the address it actually bound counts as unchanged: port 0 became a real port).
//! - A pool whose protocol changed is a new pool.
//! - Health checkers are per backend: while a pool's check stays the same, a backend that
//!   stays keeps its checker (and its rise/fall progress); one that comes (or comes back
//!   from retiring) gets one, one that goes or retires loses its own. A changed check
//!   restarts them all; a removed one stops them all before the backends are set up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::{BackendConfig, Config, ListenerConfig, PoolConfig};
use crate::tables::Tables;

/// What was bound at start and a reload cannot move: `metrics.bind` and `admin.socket`
/// as they are served (not as the config in force says: a reload that changed them took
/// no effect on them).
#[derive(Clone, Debug, Default)]
pub struct Fixed {
    /// `metrics.bind` as configured at start.
    pub metrics_bind: Option<SocketAddr>,
    /// The address the metrics endpoint actually bound (port 0 became a real port).
    pub metrics_addr: Option<SocketAddr>,
    pub admin_socket: Option<PathBuf>,
}

/// What a reload cannot apply, compared with what is served: said in its reply.
pub fn restart_notes(fixed: &Fixed, new: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    let metrics_same = new.metrics_bind == fixed.metrics_bind
        || (new.metrics_bind.is_some() && new.metrics_bind == fixed.metrics_addr);
    if !metrics_same {
        let serving = match fixed.metrics_addr.or(fixed.metrics_bind) {
            Some(addr) => format!("metrics are served on {addr} until then"),
            None => "no metrics endpoint until then".to_string(),
        };
        notes.push(format!(
            "metrics.bind changed: takes effect at the next restart ({serving})"
        ));
    }
    if new.admin_socket != fixed.admin_socket {
        notes.push("admin.socket changed: takes effect at the next restart".to_string());
    }
    notes
}

/// Everything a reload will do, in the order it is applied.
#[derive(Debug, Default)]
pub struct ReloadPlan {
    /// Settings read only at start that changed: said in the reply (`restart_notes`).
    pub notes: Vec<String>,
    /// One per listener of the new config, in its order.
    pub listeners: Vec<ListenerStep>,
    pub listeners_removed: Vec<String>,
    /// One per pool of the new config, in its order.
    pub pools: Vec<PoolStep>,
    pub pools_removed: Vec<String>,
    pub changes: Changes,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ListenerStep {
    /// The running listener stays; its settings and pool are updated in place.
    Keep(String),
    /// A new socket is bound first (phase 1); its accept loop replaces any old one.
    Bind(String),
}

#[derive(Debug)]
pub enum PoolStep {
    /// A new pool (or one whose protocol changed): built from its config.
    Add(String),
    Update(PoolUpdate),
}

/// A pool that stays.
#[derive(Debug)]
pub struct PoolUpdate {
    pub name: String,
    /// The new snapshot's backends, in order.
    pub backends: Vec<BackendStep>,
    /// Retiring backends that left for good (their last connection closed): no longer
    /// tracked.
    pub forget: Vec<Arc<Backend>>,
    /// What happens to the pool's health checkers.
    pub checks: Checks,
}

/// What a reload does to a pool's health checkers: one per backend that is not retiring
/// (a retiring backend is not checked), while the pool has a health check.
#[derive(Debug)]
pub enum Checks {
    /// No health check, before or after.
    Off,
    /// The same health check: every running checker goes on untouched, with its rise/fall
    /// progress.
    Keep {
        /// Positions in `backends` whose checker starts: backends that are new, or back
        /// from retiring. Their first probe comes after a random share of the interval,
        /// so that they are not all probed at once.
        start: Vec<usize>,
        /// Backends whose checker stops: removed by this reload (retiring or gone).
        stop: Vec<Arc<Backend>>,
    },
    /// The check changed or was added: every checker of the pool stops, and one starts
    /// (spread over the interval) for every backend that is not retiring. A backend that
    /// was checked before goes on by rise/fall from its current health.
    Restart,
    /// The check was removed: every checker stops, and only once they have all ended are
    /// the backends set up, so that no probe finishing in between can leave a backend down
    /// with no checker left to undo it.
    Remove,
}

#[derive(Debug)]
pub enum BackendStep {
    Keep {
        backend: Arc<Backend>,
        /// The file changed its weight.
        set_weight: Option<u32>,
        /// It was retiring (removed by an earlier reload) and is back.
        unretire: bool,
    },
    /// A new backend: the pool config's backend of this index.
    Add(usize),
    /// Removed, with open connections: drained and kept until the last one closes.
    Retire {
        backend: Arc<Backend>,
        /// Removed by this reload (not an earlier one).
        newly: bool,
    },
}

/// What a reload changed, for its reply and log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub pools_added: usize,
    pub pools_removed: usize,
    pub pools_changed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub backends_changed: usize,
    pub listeners_added: usize,
    pub listeners_removed: usize,
    pub listeners_rebound: usize,
    /// Listeners that stay, with another `max_connections`, `idle_timeout` or pool.
    pub listeners_changed: usize,
    /// Top-level settings applied as they are (`shutdown_timeout`, `admin.state_file`).
    pub settings: Vec<&'static str>,
}

/// The plan to go from `current` (running, built from `old`) to `new`. `retiring` are the
/// backends earlier reloads removed that still have open connections.
pub fn plan(current: &Tables, old: &Config, new: &Config, retiring: &[Arc<Backend>]) -> ReloadPlan {
    plan_with(current, old, new, retiring, &[])
}

/// `plan`, leaving out `discovered` (backends found by `discover`, which the file does
/// not list): the control task keeps or retires them itself (`discovery.rs`).
pub fn plan_with(
    current: &Tables,
    old: &Config,
    new: &Config,
    retiring: &[Arc<Backend>],
    discovered: &[Arc<Backend>],
) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    if new.shutdown_timeout != old.shutdown_timeout {
        plan.changes.settings.push("shutdown_timeout");
    }
    if new.state_file != old.state_file {
        plan.changes.settings.push("admin.state_file");
    }
    plan_listeners(&mut plan, current, old, new);
    plan_pools(&mut plan, current, old, new, retiring, discovered);
    plan
}

fn plan_listeners(plan: &mut ReloadPlan, current: &Tables, old: &Config, new: &Config) {
    let old_listeners: BTreeMap<&str, &ListenerConfig> =
        old.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
    for listener in &new.listeners {
        let running = current.listeners.get(&listener.name).map(|l| l.bind);
        let rebind = match old_listeners.get(listener.name.as_str()) {
            Some(was) => {
                (was.bind != listener.bind && running != Some(listener.bind))
                    || was.protocol != listener.protocol
            }
            None => true,
        };
        if !rebind {
            // Its settings are applied in place (max_connections, idle_timeout, pool, …):
            // every key but the address, which stays (or was port 0).
            let settings = |l: &ListenerConfig| ListenerConfig {
                bind: listener.bind,
                ..l.clone()
            };
            let was = old_listeners.get(listener.name.as_str());
            if was.is_none_or(|was| settings(was) != *listener) {
                plan.changes.listeners_changed += 1;
            }
            plan.listeners
                .push(ListenerStep::Keep(listener.name.clone()));
            continue;
        }
        if current.listeners.contains_key(&listener.name) {
            plan.changes.listeners_rebound += 1;
        } else {
            plan.changes.listeners_added += 1;
        }
        plan.listeners
            .push(ListenerStep::Bind(listener.name.clone()));
    }
    for name in current.listeners.keys() {
        if !new.listeners.iter().any(|l| &l.name == name) {
            plan.changes.listeners_removed += 1;
            plan.listeners_removed.push(name.clone());
        }
    }
}

fn plan_pools(
    plan: &mut ReloadPlan,
    current: &Tables,
    old: &Config,
    new: &Config,
    retiring: &[Arc<Backend>],
    discovered: &[Arc<Backend>],
) {
    let listed = |b: &&Arc<Backend>| !discovered.iter().any(|d| Arc::ptr_eq(d, b));
    for config in &new.pools {
        let running = current
            .pools
            .get(&config.name)
            .filter(|p| p.protocol == config.protocol);
        let step = match running {
            Some(pool) => {
                let was = old.pools.iter().find(|p| p.name == config.name);
                let backends: Vec<Arc<Backend>> = pool
                    .load_full()
                    .backends
                    .iter()
                    .filter(listed)
                    .cloned()
                    .collect();
                PoolStep::Update(plan_pool(
                    &mut plan.changes,
                    &backends,
                    was,
                    config,
                    retiring,
                ))
            }
            None => {
                plan.changes.pools_added += 1;
                plan.changes.backends_added += config.backends.len();
                PoolStep::Add(config.name.clone())
            }
        };
        plan.pools.push(step);
    }
    for (name, pool) in &current.pools {
        if !new.pools.iter().any(|p| &p.name == name) {
            plan.changes.pools_removed += 1;
            plan.changes.backends_removed += pool.load_full().backends.len();
            plan.pools_removed.push(name.clone());
        }
    }
}

/// A pool that stays: which backends stay, come, retire or leave.
fn plan_pool(
    changes: &mut Changes,
    current: &[Arc<Backend>],
    was: Option<&PoolConfig>,
    config: &PoolConfig,
    retiring: &[Arc<Backend>],
) -> PoolUpdate {
    let is_retiring = |b: &Arc<Backend>| retiring.iter().any(|r| Arc::ptr_eq(r, b));
    let old_weight = |name: &str| {
        was.and_then(|w| w.backends.iter().find(|b| b.name == name))
            .map(|b| b.weight)
    };
    let mut update = PoolUpdate {
        name: config.name.clone(),
        backends: Vec::with_capacity(config.backends.len()),
        forget: Vec::new(),
        checks: Checks::Off,
    };
    let mut kept: Vec<&Arc<Backend>> = Vec::new();
    // Checkers to start (positions in the new list) and stop, when the check stays.
    let mut start = Vec::new();
    let mut stop = Vec::new();
    for (index, backend_config) in config.backends.iter().enumerate() {
        let found = (current.iter()).find(|b| same_backend(b, backend_config, is_retiring(b)));
        let Some(backend) = found else {
            changes.backends_added += 1;
            start.push(update.backends.len());
            update.backends.push(BackendStep::Add(index));
            continue;
        };
        kept.push(backend);
        let unretire = is_retiring(backend);
        if unretire {
            // Back in rotation: counted as added, as its removal was counted.
            changes.backends_added += 1;
            start.push(update.backends.len());
        }
        let weight_edited = old_weight(&backend_config.name) != Some(backend_config.weight);
        let set_weight = (weight_edited && backend.weight() != backend_config.weight)
            .then_some(backend_config.weight);
        if set_weight.is_some() {
            changes.backends_changed += 1;
        }
        update.backends.push(BackendStep::Keep {
            backend: Arc::clone(backend),
            set_weight,
            unretire,
        });
    }
    plan_removed(changes, current, &kept, retiring, &mut update, &mut stop);
    update.checks = checks(was, config, start, stop);
    // The pool's own settings (strategy, timeouts, health check, …); its backends are
    // counted one by one above.
    let settings = |p: &PoolConfig| PoolConfig {
        backends: Vec::new(),
        ..p.clone()
    };
    if was.is_none_or(|was| settings(was) != settings(config)) {
        changes.pools_changed += 1;
    }
    update
}

/// Whether `backend` (of the pool now) is the one `config` lists. An IP address is the
/// same when name and address are. A host name is when name and name as written are,
/// wherever it resolves now (its follower moves it), unless it had not resolved and now
/// has (a new backend at the address found); a retiring one is an old address it left.
fn same_backend(backend: &Backend, config: &BackendConfig, retiring: bool) -> bool {
    if backend.name != config.name {
        return false;
    }
    match &config.host {
        None => backend.addr == config.addr && !backend.is_unresolved(),
        Some(_) => {
            let resolved_since = backend.is_unresolved() && !config.is_unresolved();
            backend.address == config.address && !retiring && !resolved_since
        }
    }
}

/// The backends of `current` that the new config no longer has (not `kept`): retired
/// when connections are open, else gone (forgotten when an earlier reload removed them).
/// Their checkers stop (`stop`).
fn plan_removed(
    changes: &mut Changes,
    current: &[Arc<Backend>],
    kept: &[&Arc<Backend>],
    retiring: &[Arc<Backend>],
    update: &mut PoolUpdate,
    stop: &mut Vec<Arc<Backend>>,
) {
    for backend in current {
        if kept.iter().any(|k| Arc::ptr_eq(k, backend)) {
            continue;
        }
        let newly = !retiring.iter().any(|r| Arc::ptr_eq(r, backend));
        if newly {
            changes.backends_removed += 1;
            stop.push(Arc::clone(backend));
        }
        if backend.active() > 0 {
            update.backends.push(BackendStep::Retire {
                backend: Arc::clone(backend),
                newly,
            });
        } else if !newly {
            update.forget.push(Arc::clone(backend));
        }
    }
}

/// What happens to the checkers of a pool that stays (`start` and `stop` apply when its
/// check is unchanged).
fn checks(
    was: Option<&PoolConfig>,
    config: &PoolConfig,
    start: Vec<usize>,
    stop: Vec<Arc<Backend>>,
) -> Checks {
    let had_check = was.is_some_and(|w| w.health_check.is_some());
    let check_changed = was.map(|w| &w.health_check) != Some(&config.health_check);
    match &config.health_check {
        None if had_check => Checks::Remove,
        None => Checks::Off,
        Some(_) if check_changed => Checks::Restart,
        Some(_) => Checks::Keep { start, stop },
    }
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
            (
                self.listeners_changed,
                "listener changed",
                "listeners changed",
            ),
        ]
        .into_iter()
        .filter(|(n, _, _)| *n > 0)
        .map(|(n, one, many)| format!("{n} {}", if n == 1 { one } else { many }))
        .chain(self.settings.iter().map(|s| format!("{s} changed")))
        .collect();
        if parts.is_empty() {
            f.write_str("reloaded, nothing changed")
        } else {
            write!(f, "reloaded: {}", parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::build_pool;
    use crate::proxy::Listener;

    fn config(yaml: &str) -> Config {
        crate::config::parse(yaml, "test.yaml").unwrap()
    }

    /// A config of one tcp listener on `bind` and pool `p` with `backends` (name, port, weight).
    fn yaml(bind: &str, backends: &[(&str, u16, u32)], extra: &str) -> Config {
        let mut text = format!(
            "listeners:\n  l:\n    bind: {bind}\n    pool: p\npools:\n  p:\n{extra}    backends:\n"
        );
        for (name, port, weight) in backends {
            text.push_str(&format!(
                "      - {{ name: {name}, address: 127.0.0.1:{port}, weight: {weight} }}\n"
            ));
        }
        config(&text)
    }

    /// Tables as the server builds them from `config`, with listeners "bound" at `bind`.
    fn tables(config: &Config, bind: &str) -> Tables {
        let mut tables = Tables::default();
        for pool in &config.pools {
            tables
                .pools
                .insert(pool.name.clone(), build_pool(pool, &Default::default()));
        }
        for listener in &config.listeners {
            let pool = Arc::clone(&tables.pools[&listener.pool]);
            let live = Listener::new(listener, bind.parse().unwrap(), pool);
            tables.listeners.insert(listener.name.clone(), live);
        }
        tables
    }

    fn update(plan: &ReloadPlan) -> &PoolUpdate {
        match &plan.pools[..] {
            [PoolStep::Update(update)] => update,
            other => panic!("expected one pool update, got {other:?}"),
        }
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1), ("b", 2, 1)], "");
        let current = tables(&old, "127.0.0.1:7000");
        let plan = plan(&current, &old, &old.clone(), &[]);
        assert_eq!(plan.changes, Changes::default());
        assert_eq!(plan.listeners, vec![ListenerStep::Keep("l".into())]);
        let update = update(&plan);
        assert!(matches!(update.checks, Checks::Off));
        let kept: Vec<_> = update
            .backends
            .iter()
            .map(|step| match step {
                BackendStep::Keep {
                    backend,
                    set_weight: None,
                    unretire: false,
                } => Arc::clone(backend),
                other => panic!("expected an untouched backend, got {other:?}"),
            })
            .collect();
        let running = current.pools["p"].load_full().backends.clone();
        assert!(
            kept.iter().zip(&running).all(|(a, b)| Arc::ptr_eq(a, b)),
            "the same Arc<Backend>s"
        );
    }

    #[test]
    fn a_port_zero_that_became_a_real_port_is_not_rebound() {
        let old = yaml("127.0.0.1:0", &[("a", 1, 1)], "");
        let current = tables(&old, "127.0.0.1:41000");
        let new = yaml("127.0.0.1:41000", &[("a", 1, 1)], "");
        assert_eq!(
            plan(&current, &old, &new, &[]).listeners,
            vec![ListenerStep::Keep("l".into())]
        );
        let moved = yaml("127.0.0.1:41001", &[("a", 1, 1)], "");
        let plan = plan(&current, &old, &moved, &[]);
        assert_eq!(plan.listeners, vec![ListenerStep::Bind("l".into())]);
        assert_eq!(plan.changes.listeners_rebound, 1);
    }

    #[test]
    fn an_edited_weight_wins_and_an_unedited_one_keeps_the_operators() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1), ("b", 2, 1)], "");
        let current = tables(&old, "127.0.0.1:7000");
        let running = current.pools["p"].load_full().backends.clone();
        running[0].set_weight(5); // set weight p/a 5
        running[1].set_weight(5); // set weight p/b 5
        let new = yaml("127.0.0.1:7000", &[("a", 1, 1), ("b", 2, 3)], "");
        let plan = plan(&current, &old, &new, &[]);
        let weights: Vec<Option<u32>> = update(&plan)
            .backends
            .iter()
            .map(|step| match step {
                BackendStep::Keep { set_weight, .. } => *set_weight,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(weights, vec![None, Some(3)]);
        assert_eq!(plan.changes.backends_changed, 1);
    }

    #[test]
    fn a_removed_backend_with_connections_retires_and_an_idle_one_goes() {
        let old = yaml(
            "127.0.0.1:7000",
            &[("a", 1, 1), ("b", 2, 1), ("c", 3, 1)],
            "",
        );
        let current = tables(&old, "127.0.0.1:7000");
        let running = current.pools["p"].load_full().backends.clone();
        let _open = running[1].connect_guard(); // b has a connection open
        let new = yaml("127.0.0.1:7000", &[("a", 1, 1)], "");
        let plan = plan(&current, &old, &new, &[]);
        let update = update(&plan);
        assert_eq!(plan.changes.backends_removed, 2);
        assert!(matches!(
            &update.backends[..],
            [BackendStep::Keep { .. }, BackendStep::Retire { backend, newly: true }] if Arc::ptr_eq(backend, &running[1])
        ));
    }

    #[test]
    fn a_retiring_backend_that_comes_back_is_unretired_and_one_that_closed_is_forgotten() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1)], "");
        let current = tables(&old, "127.0.0.1:7000");
        let a = current.pools["p"].load_full().backends[0].clone();
        let idle = Backend::new(
            "p",
            "gone",
            "127.0.0.1:9",
            "127.0.0.1:9".parse().unwrap(),
            1,
            true,
        );
        current.pools["p"].publish(crate::pool::PoolSnapshot::new(
            &old.pools[0],
            vec![Arc::clone(&a), Arc::clone(&idle)],
        ));
        let retiring = vec![Arc::clone(&a), Arc::clone(&idle)];
        let plan = plan(&current, &old, &old.clone(), &retiring);
        let update = update(&plan);
        assert!(matches!(
            &update.backends[..],
            [BackendStep::Keep { unretire: true, .. }]
        ));
        assert_eq!(update.forget.len(), 1);
        assert!(Arc::ptr_eq(&update.forget[0], &idle));
        assert_eq!(
            plan.changes.backends_removed, 0,
            "counted by the reload that removed it"
        );
    }

    #[test]
    fn a_moved_backend_is_a_new_backend() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1)], "");
        let current = tables(&old, "127.0.0.1:7000");
        let new = yaml("127.0.0.1:7000", &[("a", 2, 1)], "");
        let plan = plan(&current, &old, &new, &[]);
        assert!(matches!(&update(&plan).backends[..], [BackendStep::Add(0)]));
        assert_eq!(
            (plan.changes.backends_added, plan.changes.backends_removed),
            (1, 1)
        );
    }

    #[test]
    fn a_host_name_is_the_same_backend_wherever_it_resolves_unless_it_resolved_since() {
        let text = "listeners:\n  l:\n    bind: 127.0.0.1:7000\n    pool: p\npools:\n  p:\n    backends:\n      - { address: \"db.test:5432\", name: db }\n";
        let unresolved = config(text);
        let mut resolved = unresolved.clone();
        let listed = &mut resolved.pools[0].backends[0];
        listed.addr = "10.0.0.2:5432".parse().unwrap();
        listed.host.as_mut().unwrap().resolved = true;
        let listed = resolved.pools[0].backends[0].clone();
        let here =
            |addr: &str| Backend::new("p", "db", "db.test:5432", addr.parse().unwrap(), 1, true);
        // Its follower moved it: the reload keeps it where it is.
        assert!(same_backend(&here("10.0.0.9:5432"), &listed, false));
        // An old address it moved away from, still finishing connections, is not it.
        assert!(!same_backend(&here("10.0.0.2:5432"), &listed, true));
        // Unresolved until now: a new backend at the address found.
        let down = here("0.0.0.0:5432");
        down.mark_unresolved("db.test does not resolve");
        assert!(!same_backend(&down, &listed, false));
        assert!(same_backend(&down, &unresolved.pools[0].backends[0], false));
        // The name as written changed: another backend.
        let mut renamed = listed.clone();
        renamed.address = "db2.test:5432".into();
        assert!(!same_backend(&here("10.0.0.2:5432"), &renamed, false));
    }

    #[test]
    fn removing_the_health_check_stops_the_checkers() {
        let check = "    health_check: { interval: 1s }\n";
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1)], check);
        let current = tables(&old, "127.0.0.1:7000");
        let new = yaml("127.0.0.1:7000", &[("a", 1, 1)], "");
        let plan = plan(&current, &old, &new, &[]);
        let update = update(&plan);
        assert!(matches!(update.checks, Checks::Remove));
        assert_eq!(plan.changes.pools_changed, 1);
    }

    const CHECK: &str = "    health_check: { interval: 1s, rise: 3 }\n";

    fn positions_and_stopped(checks: &Checks) -> (Vec<usize>, Vec<String>) {
        match checks {
            Checks::Keep { start, stop } => {
                (start.clone(), stop.iter().map(|b| b.name.clone()).collect())
            }
            other => panic!("expected the checkers kept, got {other:?}"),
        }
    }

    #[test]
    fn an_unchanged_check_keeps_every_checker_of_a_backend_that_stays() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1), ("b", 2, 1)], CHECK);
        let current = tables(&old, "127.0.0.1:7000");
        // The same file: nothing starts, nothing stops.
        let same = plan(&current, &old, &old.clone(), &[]);
        assert_eq!(
            positions_and_stopped(&update(&same).checks),
            (vec![], vec![])
        );
        // A backend added in the middle: only its checker starts.
        let added = yaml(
            "127.0.0.1:7000",
            &[("a", 1, 1), ("c", 3, 1), ("b", 2, 1)],
            CHECK,
        );
        let plan_added = plan(&current, &old, &added, &[]);
        assert_eq!(
            positions_and_stopped(&update(&plan_added).checks),
            (vec![1], vec![])
        );
        // Another strategy, the same check: the checkers stay.
        let strategy = CHECK.to_string() + "    strategy: least-connections\n";
        let restrategised = yaml("127.0.0.1:7000", &[("a", 1, 1), ("b", 2, 1)], &strategy);
        let plan_strategy = plan(&current, &old, &restrategised, &[]);
        assert_eq!(
            positions_and_stopped(&update(&plan_strategy).checks),
            (vec![], vec![])
        );
        assert_eq!(plan_strategy.changes.pools_changed, 1);
    }

    #[test]
    fn a_removed_backend_loses_its_checker_whether_it_retires_or_goes() {
        let old = yaml(
            "127.0.0.1:7000",
            &[("a", 1, 1), ("b", 2, 1), ("c", 3, 1)],
            CHECK,
        );
        let current = tables(&old, "127.0.0.1:7000");
        let running = current.pools["p"].load_full().backends.clone();
        let _open = running[1].connect_guard(); // b retires, c goes at once
        let new = yaml("127.0.0.1:7000", &[("a", 1, 1)], CHECK);
        let plan = plan(&current, &old, &new, &[]);
        assert_eq!(
            positions_and_stopped(&update(&plan).checks),
            (vec![], vec!["b".to_string(), "c".to_string()])
        );
    }

    #[test]
    fn a_backend_back_from_retiring_gets_a_checker_and_one_still_retiring_none() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1), ("b", 2, 1)], CHECK);
        let current = tables(&old, "127.0.0.1:7000");
        let running = current.pools["p"].load_full().backends.clone();
        let _open = running[1].connect_guard();
        // a and b were removed by an earlier reload and are still retiring.
        let retiring = running.clone();
        let new = yaml("127.0.0.1:7000", &[("a", 1, 1)], CHECK);
        let plan = plan(&current, &old, &new, &retiring);
        let update = update(&plan);
        assert_eq!(positions_and_stopped(&update.checks), (vec![0], vec![]));
        assert!(matches!(
            &update.backends[..],
            [
                BackendStep::Keep { unretire: true, .. },
                BackendStep::Retire { newly: false, .. }
            ]
        ));
    }

    #[test]
    fn a_changed_or_added_check_restarts_the_checkers() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1)], CHECK);
        let current = tables(&old, "127.0.0.1:7000");
        let changed = yaml(
            "127.0.0.1:7000",
            &[("a", 1, 1)],
            "    health_check: { interval: 2s, rise: 3 }\n",
        );
        let plan_changed = plan(&current, &old, &changed, &[]);
        assert!(matches!(update(&plan_changed).checks, Checks::Restart));
        let unchecked = yaml("127.0.0.1:7000", &[("a", 1, 1)], "");
        let current = tables(&unchecked, "127.0.0.1:7000");
        let plan_added = plan(&current, &unchecked, &old, &[]);
        assert!(matches!(update(&plan_added).checks, Checks::Restart));
    }

    #[test]
    fn pools_and_listeners_added_and_removed() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1)], "");
        let current = tables(&old, "127.0.0.1:7000");
        let new = config(
            "listeners:\n  m:\n    bind: 127.0.0.1:7001\n    pool: q\npools:\n  q:\n    backends:\n      - address: 127.0.0.1:5\n",
        );
        let plan = plan(&current, &old, &new, &[]);
        assert_eq!(plan.listeners, vec![ListenerStep::Bind("m".into())]);
        assert_eq!(plan.listeners_removed, vec!["l".to_string()]);
        assert!(matches!(&plan.pools[..], [PoolStep::Add(name)] if name == "q"));
        assert_eq!(plan.pools_removed, vec!["p".to_string()]);
        assert_eq!(
            plan.changes.to_string(),
            "reloaded: 1 pool added, 1 pool removed, 1 backend added, 1 backend removed, 1 listener added, 1 listener removed"
        );
    }

    #[test]
    fn the_reply_lists_settings_applied_in_place() {
        let old = yaml("127.0.0.1:7000", &[("a", 1, 1)], "");
        let current = tables(&old, "127.0.0.1:7000");
        let mut new = old.clone();
        new.listeners[0].max_connections = Some(7);
        assert_eq!(
            plan(&current, &old, &new, &[]).changes.to_string(),
            "reloaded: 1 listener changed"
        );
        let mut new = old.clone();
        new.listeners[0].idle_timeout = std::time::Duration::from_secs(5);
        new.shutdown_timeout = std::time::Duration::from_secs(1);
        assert_eq!(
            plan(&current, &old, &new, &[]).changes.to_string(),
            "reloaded: 1 listener changed, shutdown_timeout changed"
        );
        // A weight is a backend's change, not the pool's.
        let reweighed = yaml("127.0.0.1:7000", &[("a", 1, 4)], "");
        assert_eq!(
            plan(&current, &old, &reweighed, &[]).changes.to_string(),
            "reloaded: 1 weight changed"
        );
        // The pool's own settings count, even when its backends change too.
        let both = yaml(
            "127.0.0.1:7000",
            &[("a", 1, 1), ("b", 2, 1)],
            "    retries: 5\n",
        );
        assert_eq!(
            plan(&current, &old, &both, &[]).changes.to_string(),
            "reloaded: 1 pool changed, 1 backend added"
        );
    }

    #[test]
    fn restart_notes_compare_with_what_is_served() {
        let with_metrics = |bind: Option<&str>| Config {
            metrics_bind: bind.map(|b| b.parse().unwrap()),
            ..yaml("127.0.0.1:7000", &[("a", 1, 1)], "")
        };
        let fixed = Fixed {
            metrics_bind: Some("127.0.0.1:0".parse().unwrap()),
            metrics_addr: Some("127.0.0.1:9100".parse().unwrap()),
            admin_socket: None,
        };
        // As configured at start, or the port it became: nothing to say.
        assert!(restart_notes(&fixed, &with_metrics(Some("127.0.0.1:0"))).is_empty());
        assert!(restart_notes(&fixed, &with_metrics(Some("127.0.0.1:9100"))).is_empty());
        let moved = restart_notes(&fixed, &with_metrics(Some("127.0.0.1:9200")));
        assert_eq!(
            moved,
            vec![
                "metrics.bind changed: takes effect at the next restart (metrics are served on 127.0.0.1:9100 until then)"
            ]
        );
        assert_eq!(restart_notes(&fixed, &with_metrics(None)).len(), 1);
        let unserved = Fixed::default();
        assert!(restart_notes(&unserved, &with_metrics(None)).is_empty());
        assert_eq!(
            restart_notes(&unserved, &with_metrics(Some("127.0.0.1:9100"))),
            vec![
                "metrics.bind changed: takes effect at the next restart (no metrics endpoint until then)"
            ]
        );
    }
}
