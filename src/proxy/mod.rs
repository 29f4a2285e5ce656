//! The data path: a listener's live state ([`Listener`]), binding and serving it, TCP
//! accept loops, connects and splicing ([`tcp`], [`connect`], [`splice`]), UDP sessions
//! ([`udp`]).

pub mod access;
pub mod connect;
pub mod splice;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::{ListenerConfig, Protocol};
use crate::metrics::ListenerMetrics;
use crate::pool::Pool;
use crate::shutdown::Shutdown;

/// A listener's socket, bound before anything changes (a reload binds first, commits after).
pub enum BoundSocket {
    Tcp(tokio::net::TcpListener),
    /// One socket per worker thread, all on the listener's address (`udp::bind`).
    Udp(Vec<tokio::net::UdpSocket>),
}

#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: cannot bind {addr}: {source}")]
pub struct BindError {
    listener: String,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the socket(s) of the listener `config`.
pub fn bind(config: &ListenerConfig) -> Result<BoundSocket, BindError> {
    let bound = match config.protocol {
        Protocol::Tcp => crate::net::bind_tcp(config.bind).map(BoundSocket::Tcp),
        Protocol::Udp => udp::bind(config.bind).map(BoundSocket::Udp),
    };
    bound.map_err(|source| BindError {
        listener: config.name.clone(),
        addr: config.bind,
        source,
    })
}

/// Starts serving a bound socket as the listener `config` (its accept or receive loops
/// run in the shutdown's tracker until `stop`); returns the listener's live state.
pub fn serve(
    config: &ListenerConfig,
    socket: BoundSocket,
    pool: Arc<Pool>,
    shutdown: &Shutdown,
    stop: &CancellationToken,
) -> std::io::Result<Arc<Listener>> {
    match socket {
        BoundSocket::Tcp(socket) => {
            let bound = socket.local_addr()?;
            let listener = Listener::new(config, bound, pool);
            tracing::info!(listener = %listener.name, pool = %config.pool, "accepting on {bound} (tcp)");
            shutdown.tracker.spawn(tcp::accept_loop(
                socket,
                Arc::clone(&listener),
                shutdown.clone(),
                stop.clone(),
            ));
            Ok(listener)
        }
        BoundSocket::Udp(sockets) => {
            let first = sockets
                .first()
                .ok_or_else(|| std::io::Error::other("a udp listener has at least one socket"))?;
            let bound = first.local_addr()?;
            let listener = Listener::new(config, bound, pool);
            if let Some(stats) = &listener.udp {
                stats.set_sockets(sockets.len());
            }
            tracing::info!(listener = %listener.name, pool = %config.pool, sockets = sockets.len(), "receiving on {bound} (udp)");
            for socket in sockets {
                shutdown.tracker.spawn(udp::receive_loop(
                    socket,
                    Arc::clone(&listener),
                    shutdown.clone(),
                    stop.clone(),
                ));
            }
            Ok(listener)
        }
    }
}

/// A listener's live state, shared by its accept loop, the admin socket and metrics.
pub struct Listener {
    pub name: String,
    pub protocol: Protocol,
    /// The address actually bound (port 0 in the config becomes the real port).
    pub bind: SocketAddr,
    pub pool: ArcSwap<Pool>,
    /// `max_connections` (u64::MAX: unlimited), `idle_timeout` and `half_close_timeout` in
    /// milliseconds: atomics, so a reload changes them for the next connection without a
    /// new listener.
    max_connections: AtomicU64,
    idle_timeout_ms: AtomicU64,
    half_close_timeout_ms: AtomicU64,
    access_log: AtomicBool,
    /// `accept_proxy`: whether any source is trusted (checked first, so that a listener
    /// without it pays one relaxed load per connection), and which.
    accept_proxy_on: AtomicBool,
    accept_proxy: ArcSwap<Vec<crate::proxy_protocol::Cidr>>,
    /// Its pool's `proxy_protocol`: 0 off, 1 v1, 2 v2.
    send_proxy: AtomicU8,
    /// When the next `proxy_header` refusal may be a warning (`proxy_warning_due`).
    next_proxy_warning_ms: AtomicU64,
    /// `max_connections` rejections not yet in a warning, and when the next may be logged
    /// (`Listener::rejected_over_max`).
    rejected_unlogged: AtomicU64,
    next_reject_warning_ms: AtomicU64,
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
            max_connections: AtomicU64::new(0),
            idle_timeout_ms: AtomicU64::new(0),
            half_close_timeout_ms: AtomicU64::new(0),
            access_log: AtomicBool::new(false),
            accept_proxy_on: AtomicBool::new(false),
            accept_proxy: ArcSwap::from_pointee(Vec::new()),
            send_proxy: AtomicU8::new(0),
            next_proxy_warning_ms: AtomicU64::new(0),
            rejected_unlogged: AtomicU64::new(0),
            next_reject_warning_ms: AtomicU64::new(0),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            metrics: ListenerMetrics::new(&config.name),
            udp: (config.protocol == Protocol::Udp).then(|| udp::UdpStats::new(&config.name)),
        })
        .with_settings(config)
    }

    fn with_settings(self: Arc<Self>, config: &ListenerConfig) -> Arc<Self> {
        self.apply(config);
        self
    }

    /// Takes `max_connections`, `idle_timeout`, `half_close_timeout` and `access_log` from
    /// `config` (reload).
    pub fn apply(&self, config: &ListenerConfig) {
        let max = config.max_connections.map_or(u64::MAX, |m| m as u64);
        self.max_connections.store(max, Ordering::Relaxed);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        (self.idle_timeout_ms).store(ms(config.idle_timeout), Ordering::Relaxed);
        (self.half_close_timeout_ms).store(ms(config.half_close_timeout), Ordering::Relaxed);
        (self.access_log).store(config.access_log, Ordering::Relaxed);
        self.accept_proxy
            .store(Arc::new(config.accept_proxy.clone()));
        (self.accept_proxy_on).store(!config.accept_proxy.is_empty(), Ordering::Relaxed);
        let send = match config.send_proxy {
            None => 0,
            Some(crate::proxy_protocol::Version::V1) => 1,
            Some(crate::proxy_protocol::Version::V2) => 2,
        };
        self.send_proxy.store(send, Ordering::Relaxed);
    }

    /// Whether `accept_proxy` is set: then every connection's first bytes are looked at.
    pub fn accept_proxy_on(&self) -> bool {
        self.accept_proxy_on.load(Ordering::Relaxed)
    }

    /// Whether a client at `ip` must (and may) begin with a PROXY header.
    pub fn trusts_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.accept_proxy.load().iter().any(|c| c.contains(ip))
    }

    /// The PROXY header version written first to the backend (its pool's `proxy_protocol`).
    pub fn send_proxy(&self) -> Option<crate::proxy_protocol::Version> {
        match self.send_proxy.load(Ordering::Relaxed) {
            1 => Some(crate::proxy_protocol::Version::V1),
            2 => Some(crate::proxy_protocol::Version::V2),
            _ => None,
        }
    }

    pub fn max_connections(&self) -> Option<usize> {
        match self.max_connections.load(Ordering::Relaxed) {
            u64::MAX => None,
            max => Some(max as usize),
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }

    pub fn half_close_timeout(&self) -> Duration {
        Duration::from_millis(self.half_close_timeout_ms.load(Ordering::Relaxed))
    }

    /// Whether finished connections are logged (`access_log`).
    pub fn access_log(&self) -> bool {
        self.access_log.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// A tcp connection was refused for `max_connections`: a warning at most every
    /// `REJECT_WARN_EVERY` per listener, counting those since the last one (the others
    /// at debug). Two atomics on a rejection, nothing on the accept path.
    pub fn rejected_over_max(&self, client: SocketAddr) {
        self.rejected_unlogged.fetch_add(1, Ordering::Relaxed);
        let now = elapsed_ms();
        let next = self.next_reject_warning_ms.load(Ordering::Relaxed);
        let due = now >= next
            && self
                .next_reject_warning_ms
                .compare_exchange(
                    next,
                    now + REJECT_WARN_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if !due {
            tracing::debug!(listener = %self.name, client = %client, "rejected: max_connections reached");
            return;
        }
        let rejected = self.rejected_unlogged.swap(0, Ordering::Relaxed).max(1);
        let max = self.max_connections().unwrap_or(0);
        tracing::warn!(
            listener = %self.name, client = %client, reason = "max_connections", rejected, max_connections = max,
            "connections rejected: {max} open (max_connections); {rejected} rejected since the last warning (the next in 10s at the earliest)"
        );
    }

    /// Whether a `proxy_header` refusal is logged as a warning: at most one every
    /// `REJECT_WARN_EVERY` per listener (the others at debug; all are counted), so that a
    /// scanner or a misconfigured load balancer cannot flood the log.
    pub fn proxy_warning_due(&self) -> bool {
        let now = elapsed_ms();
        let next = self.next_proxy_warning_ms.load(Ordering::Relaxed);
        now >= next
            && (self.next_proxy_warning_ms)
                .compare_exchange(
                    next,
                    now + REJECT_WARN_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Admits one connection (or UDP session) unless `max_connections` is reached.
    pub fn admit(self: &Arc<Self>) -> Option<ListenerGuard> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_connections.load(Ordering::Relaxed) {
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

/// `max_connections` warnings per listener: at most one this often.
const REJECT_WARN_EVERY_MS: u64 = 10_000;

/// Milliseconds since the first call (monotonic).
fn elapsed_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
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
