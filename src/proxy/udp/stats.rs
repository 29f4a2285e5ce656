//! A UDP listener's counters (datagrams each way, drops by reason), the clock session
//! activity is kept on, and how often a warning may repeat.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::UdpListenerMetrics;
use crate::proxy::Listener;

/// At most one warning of a kind per listener this often; the rest are counted and logged
/// at debug level.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why a datagram was dropped: the `reason` label of `weir_udp_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A new session would exceed `max_connections`.
    MaxConnections,
    /// No eligible backend for a new session.
    NoBackend,
    /// The upstream socket for a new session could not be opened (out of file descriptors?).
    UpstreamSocket,
    /// A socket's send buffer was full.
    BufferFull,
    /// The kernel refused the send for another reason.
    SendError,
    /// weir is out of file descriptors, socket buffers or memory: never the backend's fault.
    Resources,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::MaxConnections,
        DropReason::NoBackend,
        DropReason::UpstreamSocket,
        DropReason::BufferFull,
        DropReason::SendError,
        DropReason::Resources,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MaxConnections => "max_connections",
            DropReason::NoBackend => "no_backend",
            DropReason::UpstreamSocket => "upstream_socket",
            DropReason::BufferFull => "buffer_full",
            DropReason::SendError => "send_error",
            DropReason::Resources => "resources",
        }
    }
}

/// A UDP listener's counters: readable in-process (admin, tests) and exported as metrics.
pub struct UdpStats {
    to_backend: AtomicU64,
    to_client: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    metrics: UdpListenerMetrics,
    /// When the next "backend unreachable" warning may be logged (`Clock` ms).
    pub(super) next_unreachable_warning: AtomicU64,
    /// When the next "out of descriptors or memory" warning from a reply task may be
    /// logged (`Clock` ms).
    pub(super) next_resources_warning: AtomicU64,
    /// Sockets the listener receives on (one per worker thread).
    sockets: AtomicUsize,
}

impl UdpStats {
    pub fn new(listener: &str) -> Self {
        UdpStats {
            to_backend: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            dropped: Default::default(),
            metrics: UdpListenerMetrics::new(listener, &DropReason::ALL.map(DropReason::as_str)),
            next_unreachable_warning: AtomicU64::new(0),
            next_resources_warning: AtomicU64::new(0),
            sockets: AtomicUsize::new(0),
        }
    }

    /// How many sockets (and receive loops) the listener receives on.
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    pub(crate) fn set_sockets(&self, count: usize) {
        self.sockets.store(count, Ordering::Relaxed);
    }

    /// Client datagrams sent to backends.
    pub fn datagrams_to_backend(&self) -> u64 {
        self.to_backend.load(Ordering::Relaxed)
    }

    /// Backend datagrams sent to clients.
    pub fn datagrams_to_client(&self) -> u64 {
        self.to_client.load(Ordering::Relaxed)
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    pub(super) fn count_drop(&self, reason: DropReason) {
        self.count_drops(reason, 1);
    }

    pub(super) fn count_drops(&self, reason: DropReason, count: u64) {
        self.dropped[reason as usize].fetch_add(count, Ordering::Relaxed);
        self.metrics.dropped[reason as usize].increment(count);
    }

    pub(super) fn count_to_backend(&self) {
        self.to_backend.fetch_add(1, Ordering::Relaxed);
        self.metrics.datagrams_to_backend.increment(1);
    }

    pub(super) fn count_to_client(&self, count: u64) {
        if count > 0 {
            self.to_client.fetch_add(count, Ordering::Relaxed);
            self.metrics.datagrams_to_client.increment(count);
        }
    }
}

/// Whether a warning rate-limited by `next` (shared by tasks) may be logged now; if so the
/// next one may come `WARN_EVERY` later.
pub fn warning_due(next: &AtomicU64, clock: Clock) -> bool {
    let now = clock.now();
    if now < next.load(Ordering::Relaxed) {
        return false;
    }
    next.store(now + WARN_EVERY.as_millis() as u64, Ordering::Relaxed);
    true
}

pub fn stats(listener: &Listener) -> &UdpStats {
    listener.udp.as_ref().expect("a udp listener has udp stats")
}

/// Milliseconds since a fixed start: session activity is one `AtomicU64` of these, written
/// by the receive loop and the reply task without a lock.
#[derive(Clone, Copy)]
pub struct Clock(pub Instant);

impl Clock {
    pub fn now(self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}
