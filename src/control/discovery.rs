//! Backends from DNS (`discover`), on the control task's side: the follower tasks it runs
//! (one per pool with `discover`, `crate::discover::follow`), and each set they find
//! applied as a diff, exactly like a reload, by a pure plan (`plan_set`, unit-tested)
//! and its application:
//!
//! - A backend found again (same name and address) is the same `Arc<Backend>`: health,
//!   admin state, counters and open connections carry over. Its DNS (SRV) weight is
//!   applied when DNS changed it; an operator's `set weight` holds otherwise.
//! - A new one gets the pool's health check (down until its first probe passes) and its
//!   state-file entry, if any.
//! - One that left (or moved: the same name at another address) retires like a backend a
//!   reload removed: drained, kept until its last connection closes. A moved one's
//!   successor takes its admin state and weight.
//! - Backends listed in the file are never touched: a found name that is listed is
//!   ignored.
//!
//! A reload keeps the discovered backends of a pool that still has `discover` (`reload.rs`
//! appends them to the planned list) and restarts a follower only when its `discover` or
//! `resolvers` changed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ControlTask, joining, pool_backend};
use crate::backend::{Admin, Backend};
use crate::config::{Config, DiscoverConfig, PoolConfig};
use crate::discover::{self, Discovered, Found, Resolver};
use crate::pool::{Pool, PoolSnapshot};
use crate::state_file;
use crate::tables::Tables;

/// How long startup waits for the first lookups before serving without them.
const FIRST_ROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// A discovered backend and the weight DNS gave it.
#[derive(Clone, Debug)]
pub(super) struct Member {
    pub(super) backend: Arc<Backend>,
    pub(super) dns_weight: u32,
}

struct Follower {
    task: u64,
    spec: DiscoverConfig,
    stop: CancellationToken,
}

/// A follower's pool, and the listed backend whose host name it follows (None: the
/// pool's `discover`).
type FollowKey = (String, Option<String>);

/// What `config` has followed: every pool's `discover`, and every listed host name (as
/// A/AAAA on its port, on the pool's refresh schedule).
fn followed(config: &Config) -> BTreeMap<FollowKey, DiscoverConfig> {
    let mut wanted = BTreeMap::new();
    for pool in &config.pools {
        if let Some(spec) = &pool.discover {
            wanted.insert((pool.name.clone(), None), spec.clone());
        }
        for backend in &pool.backends {
            let Some(host) = &backend.host else { continue };
            let spec = DiscoverConfig {
                dns: host.name.clone(),
                port: Some(host.port),
                refresh: pool.dns_refresh(),
            };
            wanted.insert((pool.name.clone(), Some(backend.name.clone())), spec);
        }
    }
    wanted
}

/// The control task's discovery state.
pub(super) struct Discovery {
    resolver: Option<Arc<Resolver>>,
    resolvers: Vec<SocketAddr>,
    /// By pool and, for a listed backend's host name, backend.
    followers: BTreeMap<FollowKey, Follower>,
    next_task: u64,
    /// Per pool: its discovered backends (not retiring).
    pub(super) sets: BTreeMap<String, Vec<Member>>,
    /// A first lookup failed at start: the state file is not pruned (its entries for
    /// backends DNS has not given yet must survive).
    pub(super) incomplete: bool,
    tx: mpsc::Sender<Discovered>,
    pub(super) rx: Option<mpsc::Receiver<Discovered>>,
}

impl Discovery {
    pub(super) fn new() -> Self {
        let (tx, rx) = mpsc::channel(64);
        Discovery {
            resolver: None,
            resolvers: Vec::new(),
            followers: BTreeMap::new(),
            next_task: 0,
            sets: BTreeMap::new(),
            incomplete: false,
            tx,
            rx: Some(rx),
        }
    }

    /// Every discovered backend, of every pool.
    pub(super) fn backends(&self) -> Vec<Arc<Backend>> {
        (self.sets.values().flatten())
            .map(|m| Arc::clone(&m.backend))
            .collect()
    }

    /// The DNS weight of `pool/name` when it is a discovered backend.
    pub(super) fn weight(&self, pool: &str, name: &str) -> Option<u32> {
        let set = self.sets.get(pool)?;
        set.iter()
            .find(|m| m.backend.name == name)
            .map(|m| m.dns_weight)
    }

    /// A resolver for `servers` without making it the followers' one (`resolver` does
    /// that): the current one when they are the same. None (logged) when the system's
    /// config cannot be read.
    fn resolver_for(&self, servers: &[SocketAddr]) -> Option<Arc<Resolver>> {
        if self.resolver.is_some() && self.resolvers == servers {
            return self.resolver.clone();
        }
        match Resolver::new(servers) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                tracing::error!("backend host names: {e}; every one of them is down");
                None
            }
        }
    }

    /// The resolver for `servers`, built again when they changed; None (logged) when
    /// the system's config cannot be read.
    fn resolver(&mut self, servers: &[SocketAddr]) -> (Option<Arc<Resolver>>, bool) {
        let changed = self.resolver.is_none() || self.resolvers != servers;
        if changed {
            self.resolvers = servers.to_vec();
            self.resolver = match Resolver::new(servers) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::error!("discover: {e}; no backend is discovered");
                    None
                }
            };
        }
        (self.resolver.clone(), changed)
    }
}

/// What one found set does to a pool's discovered backends.
#[derive(Debug, Default)]
pub(super) struct SetPlan {
    /// Found again; `Some(w)`: DNS changed its weight to `w`.
    pub(super) keep: Vec<(Member, Option<u32>)>,
    /// Retiring (an earlier set dropped it), found again: back in rotation.
    pub(super) unretire: Vec<Member>,
    /// New; with the backend of the same name it replaces (moved), if any.
    pub(super) add: Vec<(Found, Option<Member>)>,
    /// Left DNS, or moved: retired.
    pub(super) gone: Vec<Arc<Backend>>,
}

impl SetPlan {
    fn changes_nothing(&self) -> bool {
        self.unretire.is_empty()
            && self.add.is_empty()
            && self.gone.is_empty()
            && self.keep.iter().all(|(_, w)| w.is_none())
    }
}

/// The diff from `current` (the pool's discovered backends) to `found`; `retiring` are
/// the pool's retiring backends, `listed` the names its config lists.
pub(super) fn plan_set(
    current: &[Member],
    retiring: &[Arc<Backend>],
    listed: &[&str],
    found: &[Found],
) -> SetPlan {
    let mut plan = SetPlan::default();
    let mut kept: Vec<&Arc<Backend>> = Vec::new();
    for f in found.iter().filter(|f| !listed.contains(&f.name.as_str())) {
        let same = |b: &Arc<Backend>| b.name == f.name && b.addr == f.addr;
        if let Some(m) = current.iter().find(|m| same(&m.backend)) {
            kept.push(&m.backend);
            let reweighed = (m.dns_weight != f.weight).then_some(f.weight);
            let member = Member {
                backend: Arc::clone(&m.backend),
                dns_weight: f.weight,
            };
            plan.keep.push((member, reweighed));
        } else if let Some(b) = retiring.iter().find(|b| same(b)) {
            plan.unretire.push(Member {
                backend: Arc::clone(b),
                dns_weight: f.weight,
            });
        } else {
            let moved = current.iter().find(|m| m.backend.name == f.name).cloned();
            plan.add.push((f.clone(), moved));
        }
    }
    for m in current {
        if !kept.iter().any(|k| Arc::ptr_eq(k, &m.backend)) {
            plan.gone.push(Arc::clone(&m.backend));
        }
    }
    plan
}

/// A backend found by discovery: named and addressed as found, healthy at once only
/// without a health check.
fn new_member(config: &PoolConfig, found: &Found, hard: &CancellationToken) -> Member {
    let backend = pool_backend(
        config,
        (&found.name, &found.name, found.addr),
        found.weight,
        hard,
    );
    Member {
        backend,
        dns_weight: found.weight,
    }
}

impl ControlTask {
    /// At start, before the state file is applied and the first health round: the first
    /// lookup of every pool with `discover` (bounded by `FIRST_ROUND_TIMEOUT`), its
    /// backends added to the unpublished pools. A pool whose lookup fails starts with its
    /// listed backends only; its follower keeps trying.
    pub async fn discover_first_round(&mut self, config: &Config, tables: &Tables) {
        let (Some(resolver), _) = self.discovery.resolver(&config.resolvers) else {
            self.discovery.incomplete = true;
            return;
        };
        let mut lookups = tokio::task::JoinSet::new();
        for pool in config.pools.iter().filter(|p| p.discover.is_some()) {
            let (resolver, pool) = (Arc::clone(&resolver), pool.clone());
            lookups.spawn(async move {
                let spec = pool.discover.as_ref().expect("filtered");
                let answer = tokio::time::timeout(FIRST_ROUND_TIMEOUT, resolver.lookup(spec)).await;
                (pool, answer)
            });
        }
        while let Some(Ok((pool_config, answer))) = lookups.join_next().await {
            let found = match answer {
                Ok(Ok(answer)) => answer.found,
                Ok(Err(e)) => {
                    tracing::warn!(pool = %pool_config.name, "discover: {e}; starting with the listed backends only");
                    self.discovery.incomplete = true;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(pool = %pool_config.name, "discover: no answer within {FIRST_ROUND_TIMEOUT:?}; starting with the listed backends only");
                    self.discovery.incomplete = true;
                    continue;
                }
            };
            let pool = &tables.pools[&pool_config.name];
            let listed: Vec<&str> = pool_config
                .backends
                .iter()
                .map(|b| b.name.as_str())
                .collect();
            let plan = plan_set(&[], &[], &listed, &found);
            let members: Vec<Member> = (plan.add.iter())
                .map(|(f, _)| new_member(&pool_config, f, &self.shutdown.hard))
                .collect();
            // Found before weir serves: part of the startup round, no slow-start ramp.
            (members.iter()).for_each(|m| m.backend.in_startup_round());
            let mut backends = pool.load_full().backends.clone();
            backends.extend(members.iter().map(|m| Arc::clone(&m.backend)));
            pool.publish(PoolSnapshot::new(&pool_config, backends));
            tracing::info!(pool = %pool_config.name, "discover: {} backends from {}", members.len(), pool_config.discover.as_ref().map_or("", |d| d.dns.as_str()));
            self.discovery
                .sets
                .insert(pool_config.name.clone(), members);
        }
    }

    /// Resolves the listed backends' host names of `config`, read by a reload or at start
    /// (bounded by `FIRST_ROUND_TIMEOUT`); each one that does not resolve is logged, and
    /// its backend starts down.
    pub async fn resolve_listed(&mut self, config: &mut Config) {
        if !config.has_host_names() {
            return;
        }
        let Some(resolver) = self.discovery.resolver_for(&config.resolvers) else {
            return;
        };
        for unresolved in discover::resolve_listed(&resolver, config, FIRST_ROUND_TIMEOUT).await {
            tracing::warn!(pool = %unresolved.pool, backend = %unresolved.backend, "{unresolved}");
        }
    }

    /// Starts, restarts and stops followers so that each pool of `config` with `discover`
    /// has one for its current `discover`, and each listed backend with a host name one
    /// for that name (restarted when `resolvers` changed too).
    pub(super) fn follow_pools(&mut self, config: &Config) {
        let (resolver, resolver_changed) = self.discovery.resolver(&config.resolvers);
        let wanted = followed(config);
        let followers = &mut self.discovery.followers;
        followers.retain(|key, f| {
            let keep = !resolver_changed && wanted.get(key) == Some(&f.spec);
            if !keep {
                f.stop.cancel();
            }
            keep
        });
        let Some(resolver) = resolver else { return };
        for ((pool, backend), spec) in wanted {
            let key = (pool.clone(), backend.clone());
            if self.discovery.followers.contains_key(&key) {
                continue;
            }
            self.discovery.next_task += 1;
            let task = self.discovery.next_task;
            let stop = self.shutdown.stop_accepting.child_token();
            let what = discover::Following {
                pool,
                task,
                spec: spec.clone(),
                backend,
            };
            self.shutdown.tracker.spawn(discover::follow(
                Arc::clone(&resolver),
                what,
                self.discovery.tx.clone(),
                stop.clone(),
            ));
            let follower = Follower { task, spec, stop };
            self.discovery.followers.insert(key, follower);
        }
    }

    /// Applies a set a follower found (ignored when that follower was stopped since).
    pub(super) async fn apply_discovered(&mut self, discovered: Discovered) {
        let key = (discovered.pool.clone(), discovered.backend.clone());
        let current_task = self.discovery.followers.get(&key).map(|f| f.task);
        if current_task != Some(discovered.task) {
            return;
        }
        if let Some(backend) = &discovered.backend {
            self.apply_host(&discovered.pool, backend, &discovered.found)
                .await;
            return;
        }
        let config = self.config.load_full();
        let tables = self.tables.load_full();
        let (Some(pool_config), Some(pool)) = (
            config.pools.iter().find(|p| p.name == discovered.pool),
            tables.pools.get(&discovered.pool),
        ) else {
            return;
        };
        let current = self
            .discovery
            .sets
            .get(&pool.name)
            .cloned()
            .unwrap_or_default();
        let retiring: Vec<Arc<Backend>> = (self.retiring.iter())
            .filter(|b| b.pool == pool.name)
            .cloned()
            .collect();
        let listed: Vec<&str> = pool_config
            .backends
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        let plan = plan_set(&current, &retiring, &listed, &discovered.found);
        if plan.changes_nothing() {
            return;
        }
        let summary = format!(
            "{} backends: {} added, {} removed",
            plan.keep.len() + plan.unretire.len() + plan.add.len(),
            plan.add.len() + plan.unretire.len(),
            plan.gone.len()
        );
        self.apply_set(pool_config, pool, &current, plan).await;
        tracing::info!(pool = %pool.name, "discover: {summary}");
        // A failure is logged by save_state; the change is in force anyway.
        let _ = self.save_state();
    }

    async fn apply_set(
        &mut self,
        config: &PoolConfig,
        pool: &Pool,
        current: &[Member],
        plan: SetPlan,
    ) {
        let mut members = Vec::new();
        let mut starting = Vec::new();
        for (member, reweighed) in plan.keep {
            if let Some(w) = reweighed {
                member.backend.set_weight(w);
            }
            members.push(member);
        }
        for member in plan.unretire {
            self.stop_retiring(&member.backend);
            member.backend.set_retiring(false);
            member.backend.set_admin(Admin::Enabled);
            starting.push(Arc::clone(&member.backend));
            members.push(member);
        }
        let mut added = Vec::new();
        for (found, moved) in &plan.add {
            let member = new_member(config, found, &self.shutdown.hard);
            joining(&member.backend, config);
            match moved {
                Some(old) => {
                    member.backend.set_admin(old.backend.admin());
                    if old.backend.weight() != old.dns_weight {
                        member.backend.set_weight(old.backend.weight());
                    }
                }
                None => added.push(Arc::clone(&member.backend)),
            }
            starting.push(Arc::clone(&member.backend));
            members.push(member);
        }
        self.restore_discovered(&added);
        self.checkers.stop(&plan.gone).await;
        let mut staying = Vec::new();
        for backend in &plan.gone {
            if backend.active() > 0 {
                self.retire(backend);
                staying.push(Arc::clone(backend));
            }
        }
        let snapshot = pool.load_full();
        let was_member = |b: &Arc<Backend>| current.iter().any(|m| Arc::ptr_eq(&m.backend, b));
        let is_member = |b: &Arc<Backend>| members.iter().any(|m| Arc::ptr_eq(&m.backend, b));
        let mut backends: Vec<Arc<Backend>> = (snapshot.backends.iter())
            .filter(|b| !was_member(b) && !is_member(b))
            .cloned()
            .collect();
        backends.extend(members.iter().map(|m| Arc::clone(&m.backend)));
        backends.extend(staying);
        if let Some(check) = &config.health_check {
            for backend in &starting {
                let _first = self.checkers.start(
                    backend,
                    check,
                    pool.protocol,
                    &self.shutdown,
                    Duration::ZERO,
                );
            }
        }
        pool.publish(PoolSnapshot::new(config, backends));
        self.discovery.sets.insert(pool.name.clone(), members);
    }

    /// Applies the state file's entries (drain, disable, weight) to newly discovered
    /// backends, as a restart applies them to listed ones.
    fn restore_discovered(&self, added: &[Arc<Backend>]) {
        let config = self.config.load();
        let (Some(path), false) = (&config.state_file, added.is_empty()) else {
            return;
        };
        let Ok(mut state) = state_file::read(path) else {
            return;
        };
        let key = |b: &Arc<Backend>| format!("{}/{}", b.pool, b.name);
        let keys: Vec<String> = added.iter().map(key).collect();
        state.backends.retain(|k, _| keys.contains(k));
        state_file::restore(&state, |pool, name| {
            added
                .iter()
                .find(|b| b.pool == pool && b.name == name)
                .cloned()
        });
    }

    /// After a reload: the discovered backends of `update`'s pool, when its new config
    /// still has `discover` (kept as they are), else retired.
    pub(super) async fn discovered_after_reload(
        &mut self,
        config: &PoolConfig,
    ) -> Vec<Arc<Backend>> {
        let members = self
            .discovery
            .sets
            .get(&config.name)
            .cloned()
            .unwrap_or_default();
        if config.discover.is_some() {
            return members.into_iter().map(|m| m.backend).collect();
        }
        self.discovery.sets.remove(&config.name);
        let gone: Vec<Arc<Backend>> = members.into_iter().map(|m| m.backend).collect();
        self.checkers.stop(&gone).await;
        let mut staying = Vec::new();
        for backend in gone.into_iter().filter(|b| b.active() > 0) {
            self.retire(&backend);
            staying.push(backend);
        }
        staying
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(name: &str, addr: &str, weight: u32) -> Found {
        Found {
            name: name.into(),
            addr: addr.parse().unwrap(),
            weight,
        }
    }

    fn member(name: &str, addr: &str, weight: u32) -> Member {
        Member {
            backend: Backend::new("p", name, name, addr.parse().unwrap(), weight, true),
            dns_weight: weight,
        }
    }

    #[test]
    fn found_again_is_kept_new_is_added_missing_is_gone() {
        let a = member("10.0.0.1:80", "10.0.0.1:80", 1);
        let b = member("10.0.0.2:80", "10.0.0.2:80", 1);
        let current = vec![a.clone(), b.clone()];
        let set = [
            found("10.0.0.1:80", "10.0.0.1:80", 1),
            found("10.0.0.3:80", "10.0.0.3:80", 1),
        ];
        let plan = plan_set(&current, &[], &[], &set);
        assert_eq!(plan.keep.len(), 1);
        assert!(
            Arc::ptr_eq(&plan.keep[0].0.backend, &a.backend),
            "the same Arc<Backend>"
        );
        assert_eq!(plan.keep[0].1, None);
        assert_eq!(plan.add.len(), 1);
        assert!(plan.add[0].1.is_none());
        assert!(matches!(&plan.gone[..], [g] if Arc::ptr_eq(g, &b.backend)));
        // The same set again changes nothing.
        let same = [
            found("10.0.0.1:80", "10.0.0.1:80", 1),
            found("10.0.0.2:80", "10.0.0.2:80", 1),
        ];
        assert!(plan_set(&current, &[], &[], &same).changes_nothing());
    }

    #[test]
    fn a_moved_target_replaces_its_backend_and_a_reweighed_one_stays() {
        let t = member("db1.test:5432", "10.0.0.1:5432", 10);
        let current = vec![t.clone()];
        let moved = [found("db1.test:5432", "10.0.0.9:5432", 10)];
        let plan = plan_set(&current, &[], &[], &moved);
        assert!(matches!(&plan.add[..], [(_, Some(m))] if Arc::ptr_eq(&m.backend, &t.backend)));
        assert_eq!(plan.gone.len(), 1);
        let reweighed = [found("db1.test:5432", "10.0.0.1:5432", 20)];
        let plan = plan_set(&current, &[], &[], &reweighed);
        assert_eq!(plan.keep[0].1, Some(20));
        assert!(!plan.changes_nothing());
    }

    #[test]
    fn listed_names_are_left_alone_and_retiring_ones_come_back() {
        let r = member("10.0.0.5:80", "10.0.0.5:80", 1);
        let set = [
            found("10.0.0.5:80", "10.0.0.5:80", 1),
            found("10.0.0.6:80", "10.0.0.6:80", 1),
        ];
        let plan = plan_set(
            &[],
            std::slice::from_ref(&r.backend),
            &["10.0.0.6:80"],
            &set,
        );
        assert!(matches!(&plan.unretire[..], [m] if Arc::ptr_eq(&m.backend, &r.backend)));
        assert!(plan.add.is_empty(), "the listed name is not discovered");
    }
}
