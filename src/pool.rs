//! A pool: its backends and strategy, published as one immutable snapshot.
//!
//! The control task is the only writer: it builds a new `PoolSnapshot` (backends, balancer,
//! timeouts) and swaps it in whole. The connection path only loads the snapshot.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::backend::Backend;
use crate::balance::Balancer;
use crate::balance::Strategy;
use crate::config::{PoolConfig, Protocol};

pub struct PoolSnapshot {
    pub backends: Vec<Arc<Backend>>,
    pub balancer: Balancer,
    pub strategy: Strategy,
    pub connect_timeout: Duration,
    pub retries: u32,
    /// With a health check: this many failed connects from real traffic in a row mark
    /// a backend down at once (the probes bring it back). None: no passive checking.
    pub passive_fall: Option<u32>,
}

impl PoolSnapshot {
    pub fn new(config: &PoolConfig, backends: Vec<Arc<Backend>>) -> Self {
        PoolSnapshot {
            balancer: Balancer::new(config.strategy, &backends),
            backends,
            strategy: config.strategy,
            connect_timeout: config.connect_timeout,
            retries: config.retries,
            passive_fall: config.health_check.as_ref().map(|h| h.fall),
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
