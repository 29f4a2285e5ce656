//! Raw types → the runtime `Config`: every value converted and checked, defaults filled
//! in, and the checks that span keys (a listener's pool exists, binds don't clash, a udp
//! pool's check sends something). Every problem is recorded; none stops the others.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::diag::{Cx, Mark, known, suggest};
use super::raw::{Pos, RawBackend, RawConfig, RawHealthCheck, RawListener, RawPool};
use super::runtime::{
    BackendConfig, Config, HealthCheckConfig, HostName, ListenerConfig, OnDown, PoolConfig,
    Protocol, SOCKET_PATH_MAX, admin_socket_staging,
};
use super::values::{
    BackendAddr, CHECK_INTERVAL, CHECK_TIMEOUT, CONNECT_TIMEOUT, HALF_CLOSE_TIMEOUT, IDLE_TIMEOUT,
    QUEUE_TIMEOUT, SHUTDOWN_TIMEOUT, SLOW_START, backend_addr, bind_addr, binds_clash, boolean,
    check_name, cidrs, duration, hex_bytes, literal_escapes, number, on_down, protocol,
    proxy_protocol, strategy,
};
use super::yaml::Scalar;
use crate::balance::{Strategy, WEIGHT_RANGE};

/// A pool being built, with what the listener pass needs to finish it.
struct PendingPool {
    config: PoolConfig,
    /// Where its name is.
    at: Mark,
    /// Where `health_check` is, when there is one without send/send_hex.
    check_without_send: Option<Mark>,
    /// The first listener that uses it, and that listener's protocol.
    used_by: Option<(String, Protocol)>,
    /// Where `proxy_protocol: v1` is (not possible for udp).
    proxy_v1_at: Option<Mark>,
}

/// The addresses bound so far: (protocol, address, listener name; "" for the metrics
/// endpoint).
type Binds = Vec<(Protocol, SocketAddr, String)>;

pub(super) fn validate(cx: &mut Cx, raw: RawConfig) -> Config {
    let socket = raw.admin.as_ref().and_then(|a| a.value.socket.as_ref());
    let admin_socket = path_setting(cx, socket, "admin.socket", "admin socket path is empty");
    if let (Some(path), Some(s)) = (&admin_socket, socket) {
        socket_path_fits(cx, path, &s.at);
    }
    let state_file = path_setting(
        cx,
        raw.admin.as_ref().and_then(|a| a.value.state_file.as_ref()),
        "admin.state_file",
        "admin state file path is empty",
    );
    let metrics_bind = raw
        .metrics
        .as_ref()
        .and_then(|m| m.value.bind.as_ref())
        .and_then(|b| match bind_addr(&b.value) {
            Ok(a) => Some(a),
            Err(why) => {
                cx.error(Some(&b.at), "metrics.bind", format!("metrics bind: {why}"));
                None
            }
        });
    let shutdown_timeout = duration(
        cx,
        &raw.shutdown_timeout,
        "shutdown_timeout",
        &SHUTDOWN_TIMEOUT,
        Duration::from_secs(30),
    );
    let mut pools = validate_pools(cx, &raw);
    let mut listeners = validate_listeners(cx, &raw, &mut pools, metrics_bind);
    let mut pools = finish_pools(cx, pools);
    listeners.sort_by(|a: &ListenerConfig, b| a.name.cmp(&b.name));
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let resolvers = super::discover::resolvers(cx, &raw);
    Config {
        resolvers,
        admin_socket,
        state_file,
        metrics_bind,
        shutdown_timeout,
        listeners,
        pools,
    }
}

/// A file path setting; an empty one is a problem.
fn path_setting(
    cx: &mut Cx,
    value: Option<&Pos<String>>,
    path: &str,
    empty: &str,
) -> Option<PathBuf> {
    let s = value?;
    if s.value.trim().is_empty() {
        cx.error(Some(&s.at), path, empty);
        None
    } else {
        Some(PathBuf::from(&s.value))
    }
}

/// The widest process id (Linux's largest `pid_max`, 2^22), for the staging path.
const WIDEST_PID: u32 = 4_194_304;

/// Whether `weir run` can bind the admin socket at `path` and clients reach it: the path
/// and the staging path next to it (`admin_socket_staging`) fit in `sun_path`.
fn socket_path_fits(cx: &mut Cx, path: &Path, at: &Mark) {
    let len = path.as_os_str().len();
    let staging = admin_socket_staging(path, WIDEST_PID);
    let staging_len = staging.as_os_str().len();
    if len <= SOCKET_PATH_MAX && staging_len <= SOCKET_PATH_MAX {
        return;
    }
    let limit = format!(
        "a Unix socket path can be at most {SOCKET_PATH_MAX} bytes (sun_path is {} with its NUL)",
        SOCKET_PATH_MAX + 1
    );
    let message = if len > SOCKET_PATH_MAX {
        format!("admin socket path is too long ({len} bytes): {limit}")
    } else {
        let dir_len = path.parent().map_or(0, |p| p.as_os_str().len());
        let dir_max = SOCKET_PATH_MAX.saturating_sub(staging_len - dir_len);
        format!(
            "admin socket path is too long for its directory ({dir_len} bytes): weir binds the socket first as DIR/.weir-admin.PID/s ({staging_len} bytes with the longest PID) and then renames it into place, and {limit}, so its directory can be at most {dir_max} bytes"
        )
    };
    cx.error(Some(at), "admin.socket", message);
}

fn validate_pools(cx: &mut Cx, raw: &RawConfig) -> Vec<PendingPool> {
    let mut pools = Vec::new();
    match &raw.pools {
        None => cx.error(None, "pools", "no pools: at least one pool is needed"),
        Some(p) if p.value.0.is_empty() => cx.error(
            Some(&p.at),
            "pools",
            "no pools: at least one pool is needed",
        ),
        Some(p) => {
            for (name, body) in &p.value.0 {
                pools.push(validate_pool(cx, name, body));
            }
        }
    }
    pools
}

fn validate_listeners(
    cx: &mut Cx,
    raw: &RawConfig,
    pools: &mut [PendingPool],
    metrics_bind: Option<SocketAddr>,
) -> Vec<ListenerConfig> {
    let mut listeners = Vec::new();
    match &raw.listeners {
        None => cx.error(
            None,
            "listeners",
            "no listeners: at least one listener is needed",
        ),
        Some(l) if l.value.0.is_empty() => cx.error(
            Some(&l.at),
            "listeners",
            "no listeners: at least one listener is needed",
        ),
        Some(l) => {
            let mut binds: Binds = Vec::new();
            if let Some(m) = metrics_bind {
                binds.push((Protocol::Tcp, m, String::new()));
            }
            for (name, body) in &l.value.0 {
                if let Some(listener) = validate_listener(cx, name, body, pools, &mut binds) {
                    listeners.push(listener);
                }
            }
        }
    }
    listeners
}

/// The checks that need to know which listeners use a pool.
fn finish_pools(cx: &mut Cx, pools: Vec<PendingPool>) -> Vec<PoolConfig> {
    pools
        .into_iter()
        .map(|p| {
            if let (Some(loc), Some((listener, Protocol::Udp))) =
                (p.check_without_send, &p.used_by)
            {
                cx.error(
                    Some(&loc),
                    &format!("pools.{}.health_check", p.config.name),
                    format!(
                        "pool \"{}\" serves udp (listener \"{listener}\"), and a UDP health check needs a datagram to send: add send or send_hex",
                        p.config.name
                    ),
                );
            }
            if let (Some(loc), Some((listener, Protocol::Udp))) = (p.proxy_v1_at, &p.used_by) {
                cx.error(
                    Some(&loc),
                    &format!("pools.{}.proxy_protocol", p.config.name),
                    format!(
                        "pool \"{}\" serves udp (listener \"{listener}\"), and PROXY protocol v1 has no datagrams: use v2",
                        p.config.name
                    ),
                );
            }
            if p.used_by.is_none() {
                cx.warn(
                    Some(&p.at),
                    &format!("pools.{}", p.config.name),
                    format!(
                        "no listener uses pool \"{}\", so it takes no traffic",
                        p.config.name
                    ),
                );
            }
            p.config
        })
        .collect()
}

fn validate_listener(
    cx: &mut Cx,
    name: &Pos<String>,
    body: &Pos<Option<RawListener>>,
    pools: &mut [PendingPool],
    binds: &mut Binds,
) -> Option<ListenerConfig> {
    let n = &name.value;
    let path = format!("listeners.{n}");
    check_name(cx, name, &path, "listener", true);
    let Some(raw) = &body.value else {
        cx.error(
            Some(&name.at),
            &path,
            format!("listener \"{n}\" has no settings: it needs bind and pool"),
        );
        return None;
    };
    let protocol = protocol(cx, &raw.protocol, &format!("{path}.protocol"));
    let bind = match &raw.bind {
        None => {
            if !raw.reported.contains(&"bind") {
                cx.error(
                    Some(&name.at),
                    &path,
                    format!("listener \"{n}\" has no bind: add bind: IP:PORT"),
                );
            }
            None
        }
        Some(b) => listener_bind(cx, n, &path, b, protocol, binds),
    };
    let pool = match &raw.pool {
        None => {
            if !raw.reported.contains(&"pool") {
                cx.error(
                    Some(&name.at),
                    &path,
                    format!("listener \"{n}\" has no pool: add pool: POOL_NAME"),
                );
            }
            None
        }
        Some(p) => listener_pool(cx, n, &path, p, protocol, pools),
    };
    let (max_connections, idle_timeout) = listener_limits(cx, raw, &path, protocol);
    let half_close_timeout = half_close_timeout(cx, raw, &path, protocol);
    let access_log = boolean(
        cx,
        &raw.access_log,
        &format!("{path}.access_log"),
        "access_log",
    );
    let accept_proxy = listener_accept_proxy(cx, raw, &path, protocol);
    let pool = pool?;
    let send_proxy =
        (pools.iter().find(|q| q.config.name == pool)).and_then(|q| q.config.proxy_protocol);
    Some(ListenerConfig {
        name: n.clone(),
        bind: bind?,
        protocol,
        pool,
        max_connections,
        idle_timeout,
        half_close_timeout,
        access_log,
        accept_proxy,
        send_proxy,
    })
}

/// `accept_proxy` (tcp only: a datagram carries no header weir could read).
fn listener_accept_proxy(
    cx: &mut Cx,
    raw: &RawListener,
    path: &str,
    protocol: Protocol,
) -> Vec<crate::proxy_protocol::Cidr> {
    let key = format!("{path}.accept_proxy");
    if let (Some(v), Protocol::Udp) = (&raw.accept_proxy, protocol) {
        cx.error(
            Some(&v.at),
            &key,
            "accept_proxy is for tcp listeners only (weir does not read PROXY headers from udp datagrams)",
        );
        return Vec::new();
    }
    cidrs(cx, &raw.accept_proxy, &key)
}

/// The listener's bind address, checked against those bound before it.
fn listener_bind(
    cx: &mut Cx,
    n: &str,
    path: &str,
    b: &Pos<String>,
    protocol: Protocol,
    binds: &mut Binds,
) -> Option<SocketAddr> {
    let addr = match bind_addr(&b.value) {
        Err(why) => {
            cx.error(Some(&b.at), &format!("{path}.bind"), why);
            return None;
        }
        Ok(addr) => addr,
    };
    let clash = binds
        .iter()
        .find(|(p, a, _)| *p == protocol && binds_clash(*a, addr));
    let Some((_, first_addr, first)) = clash else {
        binds.push((protocol, addr, n.to_string()));
        return Some(addr);
    };
    let what = if first.is_empty() {
        "the metrics endpoint (metrics.bind)".to_string()
    } else {
        format!("listener \"{first}\"")
    };
    let covers = if *first_addr == addr {
        String::new()
    } else {
        let (wide, narrow) = if first_addr.ip().is_unspecified() {
            (first_addr.ip(), addr.ip())
        } else {
            (addr.ip(), first_addr.ip())
        };
        format!(" ({first_addr}; {wide} includes {narrow})")
    };
    cx.error(
        Some(&b.at),
        &format!("{path}.bind"),
        format!(
            "listener \"{n}\" binds {} {addr}, which {what} already binds{covers}",
            protocol.as_str()
        ),
    );
    Some(addr)
}

/// The listener's pool: it must exist, and serve one protocol.
fn listener_pool(
    cx: &mut Cx,
    n: &str,
    path: &str,
    p: &Pos<String>,
    protocol: Protocol,
    pools: &mut [PendingPool],
) -> Option<String> {
    let Some(q) = pools.iter_mut().find(|q| q.config.name == p.value) else {
        let mut known: Vec<&str> = pools.iter().map(|q| q.config.name.as_str()).collect();
        known.sort_unstable();
        let hint = match suggest(&p.value, known.iter().copied()) {
            Some(h) => format!("; did you mean \"{h}\"?"),
            None => String::new(),
        };
        let known = if known.is_empty() {
            "none is defined".to_string()
        } else {
            format!("defined: {}", known.join(", "))
        };
        cx.error(
            Some(&p.at),
            &format!("{path}.pool"),
            format!(
                "listener \"{n}\" uses pool \"{}\", which is not defined ({known}){hint}",
                p.value
            ),
        );
        return None;
    };
    match &q.used_by {
        None => {
            q.used_by = Some((n.to_string(), protocol));
            q.config.protocol = protocol;
        }
        Some((other, other_protocol)) if *other_protocol != protocol => cx.error(
            Some(&p.at),
            &format!("{path}.pool"),
            format!(
                "pool \"{}\" is used by {} listener \"{other}\" and by {} listener \"{n}\"; a pool serves one protocol",
                p.value,
                other_protocol.as_str(),
                protocol.as_str()
            ),
        ),
        Some(_) => {}
    }
    Some(p.value.clone())
}

/// `max_connections` and `idle_timeout`, whose defaults depend on the protocol.
fn listener_limits(
    cx: &mut Cx,
    raw: &RawListener,
    path: &str,
    protocol: Protocol,
) -> (Option<usize>, Duration) {
    let max_connections = match &raw.max_connections {
        None => match protocol {
            Protocol::Tcp => None,
            Protocol::Udp => Some(65536),
        },
        Some(v) => number(
            cx,
            v,
            &format!("{path}.max_connections"),
            "max_connections",
            1,
            usize::MAX as u64,
        )
        .map(|m| m as usize),
    };
    let idle_default = match protocol {
        Protocol::Tcp => Duration::from_secs(3600),
        Protocol::Udp => Duration::from_secs(30),
    };
    let idle_timeout = duration(
        cx,
        &raw.idle_timeout,
        &format!("{path}.idle_timeout"),
        &IDLE_TIMEOUT,
        idle_default,
    );
    (max_connections, idle_timeout)
}

/// `half_close_timeout` (tcp only: a udp listener has no half-closed connections).
fn half_close_timeout(cx: &mut Cx, raw: &RawListener, path: &str, protocol: Protocol) -> Duration {
    let key = format!("{path}.half_close_timeout");
    let timeout = duration(
        cx,
        &raw.half_close_timeout,
        &key,
        &HALF_CLOSE_TIMEOUT,
        Duration::from_secs(60),
    );
    if let (Some(v), Protocol::Udp) = (&raw.half_close_timeout, protocol) {
        cx.warn(
            Some(&v.at),
            &key,
            "half_close_timeout has no effect on a udp listener (only tcp connections are half-closed)",
        );
    }
    timeout
}

fn validate_pool(cx: &mut Cx, name: &Pos<String>, body: &Pos<Option<RawPool>>) -> PendingPool {
    let n = &name.value;
    let path = format!("pools.{n}");
    check_name(cx, name, &path, "pool", false);
    let mut pending = PendingPool {
        config: PoolConfig {
            name: n.clone(),
            strategy: Strategy::RoundRobin,
            protocol: Protocol::Tcp,
            connect_timeout: Duration::from_secs(3),
            retries: 2,
            on_down: OnDown::Keep,
            queue_timeout: Duration::ZERO,
            slow_start: Duration::ZERO,
            proxy_protocol: None,
            health_check: None,
            backends: Vec::new(),
            discover: None,
        },
        at: name.at,
        check_without_send: None,
        used_by: None,
        proxy_v1_at: None,
    };
    let Some(raw) = &body.value else {
        cx.error(
            Some(&name.at),
            &path,
            format!("pool \"{n}\" has no settings: it needs backends"),
        );
        return pending;
    };
    let c = &mut pending.config;
    c.strategy = strategy(cx, &raw.strategy, &format!("{path}.strategy"));
    c.connect_timeout = duration(
        cx,
        &raw.connect_timeout,
        &format!("{path}.connect_timeout"),
        &CONNECT_TIMEOUT,
        Duration::from_secs(3),
    );
    if let Some(r) = &raw.retries {
        // A huge number of retries is fine: it is bounded by the backends there are.
        if let Some(r) = number(cx, r, &format!("{path}.retries"), "retries", 0, u64::MAX) {
            c.retries = u32::try_from(r).unwrap_or(u32::MAX);
        }
    }
    c.on_down = on_down(cx, &raw.on_down, &format!("{path}.on_down"));
    c.queue_timeout = duration(
        cx,
        &raw.queue_timeout,
        &format!("{path}.queue_timeout"),
        &QUEUE_TIMEOUT,
        Duration::ZERO,
    );
    c.slow_start = slow_start(cx, raw, c.strategy, &path);
    c.proxy_protocol = proxy_protocol(cx, &raw.proxy_protocol, &format!("{path}.proxy_protocol"));
    if c.proxy_protocol == Some(crate::proxy_protocol::Version::V1) {
        pending.proxy_v1_at = raw.proxy_protocol.as_ref().map(|v| v.at);
    }
    if let Some(hc) = &raw.health_check {
        let (check, without_send) = validate_check(cx, hc, &format!("{path}.health_check"));
        c.health_check = Some(check);
        pending.check_without_send = without_send;
    }
    pending.config.discover = super::discover::discover(cx, &raw.discover, &path);
    pending.config.backends = validate_backends(cx, name, raw, &path);
    pending
}

/// `slow_start`: a warning with source-hash, where a client's backend is fixed by its
/// address and a ramp would move clients away and back.
fn slow_start(cx: &mut Cx, raw: &RawPool, strategy: Strategy, path: &str) -> Duration {
    let key = format!("{path}.slow_start");
    let ramp = duration(cx, &raw.slow_start, &key, &SLOW_START, Duration::ZERO);
    if strategy == Strategy::SourceHash
        && !ramp.is_zero()
        && let Some(at) = &raw.slow_start
    {
        cx.warn(
            Some(&at.at),
            &key,
            "slow_start does not apply to strategy source-hash (a client's backend is fixed by its address; a ramp would move clients away and back): it is ignored",
        );
    }
    ramp
}

fn validate_backends(
    cx: &mut Cx,
    name: &Pos<String>,
    raw: &RawPool,
    path: &str,
) -> Vec<BackendConfig> {
    let n = &name.value;
    let mut backends = Vec::new();
    match &raw.backends {
        None if raw.reported.contains(&"backends") => {}
        // Backends from DNS only: the pool may have none listed.
        None if raw.discover.is_some() => {}
        Some(b) if b.value.is_empty() && raw.discover.is_some() => {}
        None => cx.error(
            Some(&name.at),
            &format!("{path}.backends"),
            format!("pool \"{n}\" has no backends: add at least one under backends"),
        ),
        Some(b) if b.value.is_empty() => cx.error(
            Some(&b.at),
            &format!("{path}.backends"),
            format!("pool \"{n}\" has no backends: add at least one under backends"),
        ),
        Some(b) => {
            let mut names: HashMap<String, Mark> = HashMap::new();
            for (i, backend) in b.value.iter().enumerate() {
                let bpath = format!("{path}.backends[{i}]");
                if let Some(be) = validate_backend(cx, n, backend, &bpath, &mut names) {
                    backends.push(be);
                }
            }
        }
    }
    backends
}

fn validate_check(
    cx: &mut Cx,
    hc: &Pos<Option<RawHealthCheck>>,
    path: &str,
) -> (HealthCheckConfig, Option<Mark>) {
    let mut check = HealthCheckConfig {
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 3,
        port: None,
        send: None,
        expect: None,
    };
    let Some(raw) = &hc.value else {
        return (check, Some(hc.at));
    };
    let key = |k: &str| format!("{path}.{k}");
    check.interval = duration(
        cx,
        &raw.interval,
        &key("interval"),
        &CHECK_INTERVAL,
        check.interval,
    );
    check.timeout = duration(
        cx,
        &raw.timeout,
        &key("timeout"),
        &CHECK_TIMEOUT,
        check.timeout,
    );
    if check.timeout > check.interval {
        let at = raw
            .timeout
            .as_ref()
            .or(raw.interval.as_ref())
            .map_or(hc.at, |v| v.at);
        let each = humantime::format_duration(check.timeout + check.interval);
        cx.warn(
            Some(&at),
            &key("timeout"),
            format!(
                "timeout {} is longer than interval {}: a backend that stops answering is probed only every {each} (timeout + interval), so marking it down takes fall × {each}",
                humantime::format_duration(check.timeout),
                humantime::format_duration(check.interval)
            ),
        );
    }
    let max = u64::from(u32::MAX);
    if let Some(v) = &raw.rise {
        check.rise = number(cx, v, &key("rise"), "rise", 1, max).map_or(check.rise, |r| r as u32);
    }
    if let Some(v) = &raw.fall {
        check.fall = number(cx, v, &key("fall"), "fall", 1, max).map_or(check.fall, |r| r as u32);
    }
    if let Some(v) = &raw.port {
        check.port = number(cx, v, &key("port"), "port", 1, 65535).map(|p| p as u16);
    }
    check.send = probe_send(cx, raw, path);
    check.expect = probe_expect(cx, raw, path);
    let without_send = (raw.send.is_none() && raw.send_hex.is_none()).then_some(hc.at);
    (check, without_send)
}

/// The bytes a check sends, from `send` or `send_hex`.
fn probe_send(cx: &mut Cx, raw: &RawHealthCheck, path: &str) -> Option<Vec<u8>> {
    probe_bytes(
        cx,
        &raw.send,
        &raw.send_hex,
        path,
        "send",
        "leave it out for a plain connect check",
    )
}

/// The bytes a check's reply must contain, from `expect` or `expect_hex`. Without
/// `send` it checks the greeting of a server that speaks first (SSH, SMTP, MySQL).
fn probe_expect(cx: &mut Cx, raw: &RawHealthCheck, path: &str) -> Option<Vec<u8>> {
    probe_bytes(
        cx,
        &raw.expect,
        &raw.expect_hex,
        path,
        "expect",
        "every reply would match",
    )
}

/// `KEY` (a YAML string, escapes as bytes) or `KEY_hex`: at most one, not empty.
fn probe_bytes(
    cx: &mut Cx,
    text: &Option<Pos<Scalar>>,
    hex: &Option<Pos<String>>,
    path: &str,
    key: &str,
    empty: &str,
) -> Option<Vec<u8>> {
    let hex_key = format!("{key}_hex");
    let (bytes, at, written_as) = match (text, hex) {
        (Some(_), Some(h)) => {
            cx.error(
                Some(&h.at),
                &format!("{path}.{hex_key}"),
                format!("{key} and {hex_key} are both set: use one of them"),
            );
            return None;
        }
        (Some(s), None) => {
            literal_escapes(cx, s, &format!("{path}.{key}"), key);
            (s.value.bytes(), s.at, key)
        }
        (None, Some(h)) => match hex_bytes(&h.value) {
            Ok(b) => (b, h.at, hex_key.as_str()),
            Err(why) => {
                cx.error(
                    Some(&h.at),
                    &format!("{path}.{hex_key}"),
                    format!("bad {hex_key} \"{}\": {why}", h.value),
                );
                return None;
            }
        },
        (None, None) => return None,
    };
    if bytes.is_empty() {
        cx.error(
            Some(&at),
            &format!("{path}.{written_as}"),
            format!("{written_as} is empty ({empty})"),
        );
        return None;
    }
    Some(bytes)
}

fn validate_backend(
    cx: &mut Cx,
    pool: &str,
    backend: &Pos<RawBackend>,
    path: &str,
    names: &mut HashMap<String, Mark>,
) -> Option<BackendConfig> {
    let raw = &backend.value;
    let Some(address) = &raw.address else {
        if !raw.reported.contains(&"address") {
            cx.error(
                Some(&backend.at),
                path,
                format!("a backend of pool \"{pool}\" has no address: add address: HOST:PORT"),
            );
        }
        return None;
    };
    let (addr, host) = backend_target(cx, address, path);
    let name = raw.name.as_ref().unwrap_or(address);
    if raw.name.is_some() {
        check_name(cx, name, &format!("{path}.name"), "backend", true);
    }
    if let Some(first) = names.get(&name.value) {
        let mut msg = format!(
            "duplicate backend name \"{}\" in pool \"{pool}\"",
            name.value
        );
        if let Some((line, col)) = known(first) {
            let _ = write!(msg, " (first at line {line}, column {col})");
        }
        msg.push_str("; give each backend its own name");
        cx.error(Some(&name.at), &format!("{path}.name"), msg);
    } else {
        names.insert(name.value.clone(), name.at);
    }
    let (min, max) = (*WEIGHT_RANGE.start(), *WEIGHT_RANGE.end());
    let weight = match &raw.weight {
        None => 1,
        Some(w) => number(
            cx,
            w,
            &format!("{path}.weight"),
            "weight",
            u64::from(min),
            u64::from(max),
        )
        .map_or(1, |w| w as u32),
    };
    let max_connections = raw.max_connections.as_ref().and_then(|m| {
        let key = format!("{path}.max_connections");
        number(cx, m, &key, "max_connections", 1, u64::from(u32::MAX))
    });
    Some(BackendConfig {
        name: name.value.clone(),
        address: address.value.clone(),
        addr: addr?,
        host,
        weight,
        max_connections,
        backup: boolean(cx, &raw.backup, &format!("{path}.backup"), "backup"),
    })
}

/// A backend's `address`: where it connects (for a host name, a placeholder until weir
/// resolves it) and its host name, if it has one; (None, None) when a problem was recorded.
fn backend_target(
    cx: &mut Cx,
    address: &Pos<String>,
    path: &str,
) -> (Option<SocketAddr>, Option<HostName>) {
    let key_path = format!("{path}.address");
    match backend_addr(&address.value) {
        Ok(BackendAddr::Ip(addr)) => (Some(addr), None),
        Ok(BackendAddr::Name(name, port)) => {
            // Nothing connects here: the backend is down until `name` resolves.
            let placeholder = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
            let host = HostName {
                name,
                port,
                resolved: false,
                position: known(&address.at),
                key_path,
            };
            (Some(placeholder), Some(host))
        }
        Err(why) => {
            cx.error(Some(&address.at), &key_path, why);
            (None, None)
        }
    }
}
