//! The runtime config: what `validate` produces and the rest of weir reads. Every value
//! here has been checked (ranges, addresses, names) and has its default filled in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::balance::Strategy;

/// A validated config, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub admin_socket: Option<PathBuf>,
    /// Where drained/disabled backends and changed weights are kept across restarts
    /// (`admin.state_file`; off unless set).
    pub state_file: Option<PathBuf>,
    pub metrics_bind: Option<SocketAddr>,
    pub shutdown_timeout: Duration,
    /// Sorted by name.
    pub listeners: Vec<ListenerConfig>,
    /// Sorted by name.
    pub pools: Vec<PoolConfig>,
    /// `resolvers`: the DNS servers asked for `discover` (UDP, then TCP); empty: the
    /// system's (/etc/resolv.conf).
    pub resolvers: Vec<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: Protocol,
    pub pool: String,
    /// tcp: open client connections at once (None: unlimited); udp: sessions (default 65536).
    pub max_connections: Option<usize>,
    /// tcp default 1h, udp default 30s.
    pub idle_timeout: Duration,
    /// tcp: once one side has finished sending, the connection is closed when the other
    /// side sends nothing for this long (default 60s). Unused by udp.
    pub half_close_timeout: Duration,
    /// One log line (target `weir::access`) per finished connection (udp: ended session).
    pub access_log: bool,
    /// `accept_proxy`: sources whose connections must begin with a PROXY header (tcp
    /// only; empty: off).
    pub accept_proxy: Vec<crate::proxy_protocol::Cidr>,
    /// The `proxy_protocol` of its pool, copied here so the data path finds it on the
    /// listener (None: off).
    pub send_proxy: Option<crate::proxy_protocol::Version>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub strategy: Strategy,
    /// The protocol of the listeners that use it (tcp when none does).
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    pub retries: u32,
    /// What happens to the open connections (udp: sessions) of a backend marked down.
    pub on_down: OnDown,
    /// How long a connection waits for a slot when every eligible backend is at its
    /// `max_connections` (0: closed at once).
    pub queue_timeout: Duration,
    /// A backend that comes up (or back) takes new connections at a share ramped from
    /// small to its weight's over this long (0: off). Not for source-hash.
    pub slow_start: Duration,
    /// `proxy_protocol`: the PROXY header written first on every backend connection
    /// (udp: v2 on every datagram); None: off.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    pub health_check: Option<HealthCheckConfig>,
    /// In file order.
    pub backends: Vec<BackendConfig>,
    /// `discover`: backends from DNS besides those listed.
    pub discover: Option<DiscoverConfig>,
}

impl Config {
    /// Whether any listed backend's address is a host name (to be resolved by weir).
    pub fn has_host_names(&self) -> bool {
        (self.pools.iter()).any(|p| p.backends.iter().any(|b| b.host.is_some()))
    }
}

/// `discover.refresh` when absent.
pub const DNS_REFRESH: Duration = Duration::from_secs(30);

impl PoolConfig {
    /// How often the pool's listed host names are resolved again: its `discover.refresh`,
    /// else `DNS_REFRESH` (a record's shorter TTL wins either way).
    pub fn dns_refresh(&self) -> Duration {
        self.discover.as_ref().map_or(DNS_REFRESH, |d| d.refresh)
    }
}

/// `pools.NAME.discover`: backends found in DNS, re-resolved every `refresh` (or the
/// records' shortest TTL when shorter, at least 1 s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoverConfig {
    /// The name asked for: SRV records when it starts with `_`, else A and AAAA.
    pub dns: String,
    /// The backends' port for an A/AAAA name (None for SRV: the records carry it).
    pub port: Option<u16>,
    pub refresh: Duration,
}

impl DiscoverConfig {
    /// Whether `dns` names SRV records (`_service._proto.name`).
    pub fn is_srv(&self) -> bool {
        self.dns.starts_with('_')
    }
}

/// `on_down:` what a backend being marked down does to its open connections (udp:
/// sessions). Draining or disabling a backend never closes anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnDown {
    /// Left alone: they end as they would have (the default).
    #[default]
    Keep,
    /// Closed at once (tcp: both sides reset).
    Close,
}

impl OnDown {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDown::Keep => "keep",
            OnDown::Close => "close",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub port: Option<u16>,
    /// From `send` (YAML escapes applied) or `send_hex`.
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    /// `name`, or the address as written.
    pub name: String,
    /// The address as written (HOST:PORT; HOST may be a DNS name).
    pub address: String,
    /// Where connections go: the IP as written, or what `host` resolved to (while it has
    /// not, a placeholder that nothing connects to: the backend is down).
    pub addr: SocketAddr,
    /// When HOST is a DNS name: loading a config never asks DNS; weir resolves it
    /// (`discover::resolve_listed`) at start and reload, and follows it while it runs.
    pub host: Option<HostName>,
    pub weight: u32,
    /// Open connections (udp: sessions) at once; None: unlimited.
    pub max_connections: Option<u64>,
    /// Gets new connections only while no other backend of the pool is eligible.
    pub backup: bool,
}

impl BackendConfig {
    /// A host name that has not resolved (yet): the backend is down until it does.
    pub fn is_unresolved(&self) -> bool {
        self.host.as_ref().is_some_and(|h| !h.resolved)
    }
}

/// A backend's host name, and where it is written (for `weir check`'s warning when it
/// does not resolve).
#[derive(Clone, Debug, PartialEq)]
pub struct HostName {
    pub name: String,
    pub port: u16,
    /// Whether `addr` holds what it resolved to.
    pub resolved: bool,
    /// 1-based line and column of the address in the file, when YAML has them.
    pub position: Option<(u64, u64)>,
    /// `pools.NAME.backends[I].address`.
    pub key_path: String,
}

/// The longest path a Unix socket can be bound or connected at: `sun_path` less its NUL
/// (108 bytes on Linux, 104 on the BSDs and macOS).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub const SOCKET_PATH_MAX: usize = 107;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub const SOCKET_PATH_MAX: usize = 103;

/// Where the admin socket is bound before it is renamed to `socket` (so that it is 0600
/// from the first moment it can be reached): `DIR/.weir-admin.PID/s`, next to it.
/// `weir check` uses it to check the length `weir run` needs; `AdminSocket::bind` should
/// use it too, so that the two can't drift apart.
pub fn admin_socket_staging(socket: &Path, pid: u32) -> PathBuf {
    let parent = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    parent.join(format!(".weir-admin.{pid}")).join("s")
}
