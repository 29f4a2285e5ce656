//! A pool: its backends and strategy, published as one immutable snapshot.
//!
//! The control task is the only writer: it builds a new `PoolSnapshot` (backends, balancer,
//! timeouts) and swaps it in whole. The connection path only loads the snapshot.
//!
//! The pool's wait queue (`queue_timeout`) lives on the `Pool`, not the snapshot, so that
//! a rebuild keeps its waiters; every backend published in a snapshot is attached to it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::backend::{Backend, ConnGuard, Passive};
use crate::metrics::PoolMetrics;
use crate::queue::WaitQueue;

/// Failed connects in a row that mark a backend down in a pool without a health check.
pub const PASSIVE_FALL: u32 = 3;
use crate::balance::Balancer;
use crate::balance::Strategy;
use crate::config::{PoolConfig, Protocol};

pub struct PoolSnapshot {
    pub backends: Vec<Arc<Backend>>,
    /// The backends that are not `backup`, balanced among themselves.
    primary: Tier,
    /// The `backup: true` ones, picked from only when no primary can take the connection.
    backup: Option<Tier>,
    pub strategy: Strategy,
    pub connect_timeout: Duration,
    pub retries: u32,
    /// What failed connects from real traffic do: `fall` of them in a row (the health
    /// check's, or 3 without one) mark a backend down at once.
    pub passive_fall: Passive,
    /// `queue_timeout`: 0 closes a connection at once when every eligible backend is full.
    pub queue_timeout: Duration,
}

/// Why no backend slot could be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// No backend is eligible (or each was tried).
    NoBackend,
    /// Some are eligible, and every one of them is at its `max_connections`.
    Full,
}

/// One tier of a pool (its primaries, or its backups) with a balancer of its own, so that
/// a pool without backups picks exactly as before, and one with backups asks the backup
/// tier only after the primary tier found nothing.
struct Tier {
    backends: Vec<Arc<Backend>>,
    balancer: Balancer,
    /// Tier index → index in the snapshot's `backends`; None when the tier is all of them
    /// in order (no backups).
    to_pool: Option<Box<[usize]>>,
}

impl Tier {
    /// The tier of `all` whose `backup` is `backup`.
    fn new(strategy: Strategy, all: &[Arc<Backend>], backup: bool) -> Tier {
        let to_pool: Vec<usize> = (0..all.len())
            .filter(|&i| all[i].is_backup() == backup)
            .collect();
        let backends: Vec<Arc<Backend>> = to_pool.iter().map(|&i| Arc::clone(&all[i])).collect();
        Tier {
            balancer: Balancer::new(strategy, &backends),
            to_pool: (backends.len() != all.len()).then(|| to_pool.into_boxed_slice()),
            backends,
        }
    }

    #[inline]
    fn pick(&self, client: IpAddr, exclude: &[usize]) -> Option<usize> {
        let Some(to_pool) = &self.to_pool else {
            return self.balancer.pick(&self.backends, client, exclude);
        };
        // Only after a failed connect is `exclude` non-empty (and this allocates).
        let local: Vec<usize> = (exclude.iter())
            .filter_map(|e| to_pool.iter().position(|i| i == e))
            .collect();
        let i = self.balancer.pick(&self.backends, client, &local)?;
        Some(to_pool[i])
    }
}

/// Picks that lose the race for a backend's last slot before giving up as `Full`.
const CLAIM_RACES: usize = 8;

impl PoolSnapshot {
    /// Also sets each backend's `max_connections` and `backup` from `config` (a backend
    /// found by discovery has neither): every snapshot build, so a reload changes them.
    pub fn new(config: &PoolConfig, backends: Vec<Arc<Backend>>) -> Self {
        let settings: HashMap<&str, _> = (config.backends.iter())
            .map(|b| (b.name.as_str(), (b.max_connections, b.backup)))
            .collect();
        for b in &backends {
            let (limit, backup) = settings.get(b.name.as_str()).copied().unwrap_or_default();
            b.set_max_connections(limit);
            b.set_backup(backup);
            b.set_slow_start(match config.strategy {
                Strategy::SourceHash => Duration::ZERO,
                _ => config.slow_start,
            });
        }
        PoolSnapshot {
            primary: Tier::new(config.strategy, &backends, false),
            backup: (backends.iter().any(|b| b.is_backup()))
                .then(|| Tier::new(config.strategy, &backends, true)),
            backends,
            strategy: config.strategy,
            connect_timeout: config.connect_timeout,
            retries: config.retries,
            passive_fall: Passive {
                fall: config
                    .health_check
                    .as_ref()
                    .map_or(PASSIVE_FALL, |h| h.fall),
                retry: config.health_check.is_none(),
            },
            queue_timeout: config.queue_timeout,
        }
    }

    /// Picks a backend for this client and takes one of its slots (`max_connections`).
    /// Lock-free: a lost race for a last slot picks again.
    pub fn claim(&self, client: IpAddr, exclude: &[usize]) -> Result<ConnGuard, NoSlot> {
        for _ in 0..CLAIM_RACES {
            let Some(i) = self.pick(client, exclude) else {
                return Err(self.why_none(exclude));
            };
            if let Some(guard) = self.backends[i].try_connect_guard() {
                return Ok(guard);
            }
        }
        Err(NoSlot::Full)
    }

    /// After a failed pick (off the fast path): were the eligible backends all full?
    #[cold]
    fn why_none(&self, exclude: &[usize]) -> NoSlot {
        let full = (self.backends.iter().enumerate())
            .any(|(i, b)| b.is_eligible() && !b.has_room() && !exclude.contains(&i));
        if full {
            NoSlot::Full
        } else {
            NoSlot::NoBackend
        }
    }

    /// The index of this backend in the snapshot.
    pub fn index_of(&self, backend: &Arc<Backend>) -> Option<usize> {
        self.backends.iter().position(|b| Arc::ptr_eq(b, backend))
    }

    /// An eligible backend for this client, skipping the indexes in `exclude`: a primary
    /// while one is eligible and not full, a backup only otherwise.
    ///
    /// A backend in its slow-start ramp is kept only as often as its ramp admits
    /// (`Backend::ramp_admits`); otherwise another of the same tier is picked, and when
    /// none is left the first pick stands: a ramp shifts load, it never refuses a
    /// connection.
    #[inline]
    pub fn pick(&self, client: IpAddr, exclude: &[usize]) -> Option<usize> {
        let i = self.pick_by_tier(client, exclude)?;
        if !self.backends[i].is_ramping() {
            return Some(i);
        }
        self.pick_ramped(client, exclude, i)
    }

    #[inline]
    fn pick_by_tier(&self, client: IpAddr, exclude: &[usize]) -> Option<usize> {
        (self.primary.pick(client, exclude)).or_else(|| self.backup.as_ref()?.pick(client, exclude))
    }

    /// `pick` when its first choice is ramping (off the fast path: it may allocate).
    #[cold]
    fn pick_ramped(&self, client: IpAddr, exclude: &[usize], first: usize) -> Option<usize> {
        let tier = self.backends[first].is_backup();
        let mut tried = exclude.to_vec();
        let mut candidate = first;
        loop {
            if self.backends[candidate].ramp_admits() {
                return Some(candidate);
            }
            tried.push(candidate);
            match self.pick_by_tier(client, &tried) {
                Some(next) if self.backends[next].is_backup() != tier => return Some(first),
                Some(next) if self.backends[next].is_ramping() => candidate = next,
                Some(next) => return Some(next),
                None => return Some(first),
            }
        }
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.name == name)
    }
}

pub struct Pool {
    pub name: String,
    pub protocol: Protocol,
    snapshot: ArcSwap<PoolSnapshot>,
    /// Connections waiting for a backend slot (`queue_timeout`), oldest first.
    pub queue: Arc<WaitQueue<ConnGuard>>,
    /// Owns the pool's series: they go with it.
    _metrics: PoolMetrics,
}

impl Pool {
    pub fn new(name: &str, protocol: Protocol, snapshot: PoolSnapshot) -> Arc<Self> {
        let metrics = PoolMetrics::new(name);
        let queue = WaitQueue::new(metrics.queue_length.clone());
        for b in &snapshot.backends {
            b.attach_queue(&queue);
        }
        Arc::new(Pool {
            name: name.to_string(),
            protocol,
            snapshot: ArcSwap::from_pointee(snapshot),
            queue,
            _metrics: metrics,
        })
    }

    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<PoolSnapshot>> {
        self.snapshot.load()
    }

    pub fn load_full(&self) -> Arc<PoolSnapshot> {
        self.snapshot.load_full()
    }

    /// Control task only.
    pub fn publish(&self, snapshot: PoolSnapshot) {
        for b in &snapshot.backends {
            b.attach_queue(&self.queue);
        }
        self.snapshot.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;
    use crate::balance::testutil::{backends, ip0};

    #[test]
    fn backups_only_when_no_primary_can_take_it_with_exclude_in_pool_indexes() {
        let all = backends(&[1, 1, 1, 1]);
        all[1].set_backup(true);
        all[3].set_backup(true);
        let primary = Tier::new(Strategy::RoundRobin, &all, false);
        let backup = Tier::new(Strategy::RoundRobin, &all, true);
        let pick = |exclude: &[usize]| {
            (primary.pick(ip0(), exclude)).or_else(|| backup.pick(ip0(), exclude))
        };
        for _ in 0..20 {
            assert!(matches!(pick(&[]), Some(0 | 2)));
        }
        assert_eq!(pick(&[0]), Some(2));
        assert!(matches!(pick(&[0, 2]), Some(1 | 3)), "all primaries tried");
        assert_eq!(pick(&[0, 2, 1]), Some(3));
        all[0].set_health(Health::Down);
        all[2].set_max_connections(Some(1));
        let _full = all[2].try_connect_guard().unwrap();
        assert!(matches!(pick(&[]), Some(1 | 3)), "down and full primaries");
        assert_eq!(pick(&[3]), Some(1));
        all[0].set_health(Health::Up);
        assert_eq!(pick(&[]), Some(0), "back to the primary at once");
    }

    fn pool_config(strategy: Strategy, slow_start: Duration, n: usize) -> PoolConfig {
        let mut config: PoolConfig = crate::config::parse(
            "listeners: {l: {bind: '127.0.0.1:1', pool: p}}\npools: {p: {backends: [{address: '127.0.0.1:2'}]}}\n",
            "t.yaml",
        )
        .unwrap()
        .pools
        .remove(0);
        config.strategy = strategy;
        config.slow_start = slow_start;
        config.backends = (0..n)
            .map(|i| {
                let mut b = config.backends[0].clone();
                b.name = format!("b{i}");
                b
            })
            .collect();
        config
    }

    #[test]
    fn a_ramping_backend_gets_a_small_share_and_never_loses_a_connection() {
        let all = backends(&[10, 10]);
        let config = pool_config(Strategy::RoundRobin, Duration::from_secs(3600), 2);
        let snapshot = PoolSnapshot::new(&config, all.clone());
        all[1].set_health(Health::Down);
        all[1].set_health(Health::Up);
        assert!(all[1].is_ramping());
        assert_eq!(
            all[1].effective_weight(),
            1,
            "at the start of an hour's ramp"
        );
        assert_eq!(all[1].ramp_percent(), Some(0));
        let to_b1 = (0..1000)
            .filter(|_| snapshot.pick(ip0(), &[]) == Some(1))
            .count();
        assert!(to_b1 < 20, "{to_b1} of 1000 picks at the ramp's start");
        all[0].set_health(Health::Down);
        for _ in 0..100 {
            assert_eq!(
                snapshot.pick(ip0(), &[]),
                Some(1),
                "alone, it takes everything"
            );
        }
    }

    #[test]
    fn a_ramp_never_sends_a_connection_to_a_backup_and_ends_by_itself() {
        let all = backends(&[1, 1]);
        all[1].set_backup(true);
        let mut config = pool_config(Strategy::LeastConnections, Duration::from_millis(200), 2);
        config.backends[1].backup = true;
        let snapshot = PoolSnapshot::new(&config, all.clone());
        all[0].set_health(Health::Down);
        all[0].set_health(Health::Up);
        assert!(all[0].is_ramping());
        for _ in 0..200 {
            assert_eq!(
                snapshot.pick(ip0(), &[]),
                Some(0),
                "the primary, ramping or not"
            );
        }
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while all[0].ramp_percent().is_some() {
            assert!(std::time::Instant::now() < end, "the ramp ends");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!all[0].is_ramping(), "cleared once over");
    }

    #[test]
    fn source_hash_never_ramps_and_the_startup_round_does_not_either() {
        let all = backends(&[1, 1]);
        let config = pool_config(Strategy::SourceHash, Duration::from_secs(60), 2);
        let _snapshot = PoolSnapshot::new(&config, all.clone());
        all[0].set_health(Health::Down);
        all[0].set_health(Health::Up);
        assert!(
            !all[0].is_ramping(),
            "source-hash: a ramp would move clients"
        );
        let config = pool_config(Strategy::RoundRobin, Duration::from_secs(60), 2);
        let _snapshot = PoolSnapshot::new(&config, all.clone());
        all[1].set_health(Health::Down);
        all[1].in_startup_round();
        all[1].set_health(Health::Up);
        assert!(!all[1].is_ramping(), "its first result at startup");
        all[1].set_admin(crate::backend::Admin::Drain);
        all[1].set_admin(crate::backend::Admin::Enabled);
        assert!(all[1].is_ramping(), "back from a drain");
    }
}
