//! The data path: TCP accept loops and splicing, UDP sessions.

pub mod connect;
pub mod splice;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{ListenerConfig, Protocol};
use crate::metrics::ListenerMetrics;
use crate::pool::Pool;

/// A listener's live state, shared by its accept loop, the admin socket and metrics.
pub struct Listener {
    pub name: String,
    pub protocol: Protocol,
    /// The address actually bound (port 0 in the config becomes the real port).
    pub bind: SocketAddr,
    pub pool: ArcSwap<Pool>,
    pub max_connections: Option<usize>,
    pub idle_timeout: Duration,
    active: AtomicU64,
    total: AtomicU64,
    pub metrics: ListenerMetrics,
    /// UDP listeners only: datagram and drop counters.
    pub udp: Option<udp::UdpStats>,
}

impl Listener {
    pub fn new(config: &ListenerConfig, bind: SocketAddr, pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(Listener {
            name: config.name.clone(),
            protocol: config.protocol,
            bind,
            pool: ArcSwap::new(pool),
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            metrics: ListenerMetrics::new(&config.name),
            udp: (config.protocol == Protocol::Udp).then(|| udp::UdpStats::new(&config.name)),
        })
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Admits one connection (or UDP session) unless `max_connections` is reached.
    pub fn admit(self: &Arc<Self>) -> Option<ListenerGuard> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if let Some(max) = self.max_connections
            && prev >= max as u64
        {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.metrics.rejected_max_connections.increment(1);
            return None;
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        self.metrics.connections_total.increment(1);
        self.metrics.connections_active.increment(1.0);
        Some(ListenerGuard {
            listener: Arc::clone(self),
        })
    }
}

/// One admitted connection or session; released on drop.
pub struct ListenerGuard {
    listener: Arc<Listener>,
}

impl ListenerGuard {
    pub fn listener(&self) -> &Arc<Listener> {
        &self.listener
    }
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.listener.active.fetch_sub(1, Ordering::AcqRel);
        self.listener.metrics.connections_active.decrement(1.0);
    }
}
