//! A pool: its backends and strategy, published as one immutable snapshot.
//!
//! The control task is the only writer: it builds a new `PoolSnapshot` (backends, balancer,
//! timeouts) and swaps it in whole. The connection path only loads the snapshot.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::backend::{Backend, Passive};

/// Failed connects in a row that mark a backend down in a pool without a health check.
pub const PASSIVE_FALL: u32 = 3;
use crate::balance::Balancer;
use crate::balance::Strategy;
use crate::config::{PoolConfig, Protocol};

pub struct PoolSnapshot {
    pub backends: Vec<Arc<Backend>>,
    pub balancer: Balancer,
    pub strategy: Strategy,
    pub connect_timeout: Duration,
    pub retries: u32,
    /// What failed connects from real traffic do: `fall` of them in a row (the health
    /// check's, or 3 without one) mark a backend down at once.
    pub passive_fall: Passive,
}

impl PoolSnapshot {
    pub fn new(config: &PoolConfig, backends: Vec<Arc<Backend>>) -> Self {
        PoolSnapshot {
            balancer: Balancer::new(config.strategy, &backends),
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
        }
    }

    /// An eligible backend for this client, skipping the indexes in `exclude`.
    #[inline]
    pub fn pick(&self, client: IpAddr, exclude: &[usize]) -> Option<usize> {
        self.balancer.pick(&self.backends, client, exclude)
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.name == name)
    }
}

pub struct Pool {
    pub name: String,
    pub protocol: Protocol,
    snapshot: ArcSwap<PoolSnapshot>,
}

impl Pool {
    pub fn new(name: &str, protocol: Protocol, snapshot: PoolSnapshot) -> Arc<Self> {
        Arc::new(Pool {
            name: name.to_string(),
            protocol,
            snapshot: ArcSwap::from_pointee(snapshot),
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
        self.snapshot.store(Arc::new(snapshot));
    }
}
