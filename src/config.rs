//! The config file: YAML → serde types (unknown keys rejected, positions kept) →
//! `validate()` → the runtime `Config` below, which the rest of weir uses.
//!
//! Every problem is reported, not just the first, as `FILE:LINE:COLUMN: message`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::marker::PhantomData;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_saphyr::{Location, MessageFormatter, Spanned};

/// Where `weir run`, `weir check` and `weir ctl -c` look when no `-c FILE` is given.
pub const DEFAULT_PATH: &str = "config/weir.yaml";

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    LeastConnections,
    WeightedRandom,
    SourceHash,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastConnections => "least-connections",
            Strategy::WeightedRandom => "weighted-random",
            Strategy::SourceHash => "source-hash",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub strategy: Strategy,
    /// The protocol of the listeners that use it (tcp when none does).
    pub protocol: Protocol,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub health_check: Option<HealthCheckConfig>,
    /// In file order.
    pub backends: Vec<BackendConfig>,
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
    /// Resolved at load time.
    pub addr: SocketAddr,
    pub weight: u32,
}

/// One problem in a config file, with its position when YAML has one.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based line and column; None where YAML has no position.
    pub position: Option<(u64, u64)>,
    /// Where there is no position: the key path, e.g. `pools.redis.backends`.
    pub key_path: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.position, &self.key_path) {
            (Some((line, col)), _) => write!(f, "{}:{}:{}: {}", self.file, line, col, self.message),
            (None, Some(path)) => write!(f, "{}: {}: {}", self.file, path, self.message),
            (None, None) => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found in a config; `Display` prints one per line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: file.clone(),
            position: None,
            key_path: None,
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(&text, &file)
}

/// Only `admin.socket` of the file at `path`, for `weir ctl -c`: nothing else is checked
/// and no backend name is resolved, so an operator can still drain a backend when another
/// one's name doesn't resolve or the file has a mistake elsewhere.
pub fn admin_socket(path: &Path) -> Result<Option<PathBuf>, ConfigErrors> {
    #[derive(Deserialize)]
    struct Only {
        admin: Option<Admin>,
    }
    #[derive(Deserialize)]
    struct Admin {
        socket: Option<String>,
    }
    let file = path.display().to_string();
    let mut cx = Cx {
        file: &file,
        diags: Vec::new(),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            cx.error(None, "", format!("cannot read: {e}"));
            return Err(cx.finish());
        }
    };
    match serde_saphyr::from_str::<Option<Only>>(&text) {
        Ok(only) => Ok(only
            .and_then(|o| o.admin)
            .and_then(|a| a.socket)
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from)),
        Err(e) => {
            cx.yaml_error(&e);
            Err(cx.finish())
        }
    }
}

/// Parses and validates config text; `file` is used in messages only.
///
/// Every problem found is reported. YAML syntax errors, unknown keys and values of the
/// wrong YAML shape stop deserialization, so only the first of those is reported; all
/// other problems (bad values, missing pools, clashing binds, unresolvable hosts, …) are
/// collected together.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let mut cx = Cx {
        file,
        diags: Vec::new(),
    };
    let raw = match serde_saphyr::from_str::<Option<RawConfig>>(text) {
        Ok(Some(raw)) => raw,
        Ok(None) => {
            cx.error(
                None,
                "",
                "the config is empty: it needs at least `listeners` and `pools`",
            );
            return Err(cx.finish());
        }
        Err(e) => {
            cx.yaml_error(&e);
            return Err(cx.finish());
        }
    };
    let config = validate(&mut cx, raw);
    if cx.diags.is_empty() {
        Ok(config)
    } else {
        Err(cx.finish())
    }
}

// ---------------------------------------------------------------------------------------
// Raw serde types: exactly the keys of the contract, every value kept with its position.
// Scalars are read as strings and converted during validation, so that a bad number or
// duration is one collected problem instead of the end of deserialization.
// ---------------------------------------------------------------------------------------

type Pos<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a weir config: a mapping with listeners, pools and optionally admin, metrics, shutdown_timeout"
)]
struct RawConfig {
    #[serde(default)]
    admin: Option<Pos<RawAdmin>>,
    #[serde(default)]
    metrics: Option<Pos<RawMetrics>>,
    #[serde(default)]
    shutdown_timeout: Option<Pos<String>>,
    #[serde(default)]
    listeners: Option<Pos<NamedMap<RawListener>>>,
    #[serde(default)]
    pools: Option<Pos<NamedMap<RawPool>>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "admin settings: a mapping with socket, state_file"
)]
struct RawAdmin {
    #[serde(default)]
    socket: Option<Pos<String>>,
    #[serde(default)]
    state_file: Option<Pos<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "metrics settings: a mapping with bind"
)]
struct RawMetrics {
    #[serde(default)]
    bind: Option<Pos<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a listener: a mapping with bind, pool and optionally protocol, max_connections, idle_timeout"
)]
struct RawListener {
    #[serde(default)]
    bind: Option<Pos<String>>,
    #[serde(default)]
    protocol: Option<Pos<String>>,
    #[serde(default)]
    pool: Option<Pos<String>>,
    #[serde(default)]
    max_connections: Option<Pos<String>>,
    #[serde(default)]
    idle_timeout: Option<Pos<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a pool: a mapping with backends and optionally strategy, connect_timeout, retries, health_check"
)]
struct RawPool {
    #[serde(default)]
    strategy: Option<Pos<String>>,
    #[serde(default)]
    connect_timeout: Option<Pos<String>>,
    #[serde(default)]
    retries: Option<Pos<String>>,
    /// `health_check:` with no value (null) means a check with every default.
    #[serde(default, deserialize_with = "present")]
    health_check: Option<Pos<Option<RawHealthCheck>>>,
    #[serde(default)]
    backends: Option<Pos<Vec<Pos<RawBackend>>>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a health check: a mapping with any of interval, timeout, rise, fall, port, send, send_hex, expect"
)]
struct RawHealthCheck {
    #[serde(default)]
    interval: Option<Pos<String>>,
    #[serde(default)]
    timeout: Option<Pos<String>>,
    #[serde(default)]
    rise: Option<Pos<String>>,
    #[serde(default)]
    fall: Option<Pos<String>>,
    #[serde(default)]
    port: Option<Pos<String>>,
    #[serde(default)]
    send: Option<Pos<String>>,
    #[serde(default)]
    send_hex: Option<Pos<String>>,
    #[serde(default)]
    expect: Option<Pos<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backend: a mapping with address and optionally name, weight"
)]
struct RawBackend {
    #[serde(default)]
    address: Option<Pos<String>>,
    #[serde(default)]
    name: Option<Pos<String>>,
    #[serde(default)]
    weight: Option<Pos<String>>,
}

/// For a field that is present: `Some`, even when its value is null.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A YAML mapping keyed by name, in file order, names and values with their positions.
/// A name with no value (`redis:`) gives `None`.
struct NamedMap<T>(Vec<(Pos<String>, Pos<Option<T>>)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NamedMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = NamedMap<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping from names to their settings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(name) = map.next_key::<Pos<String>>()? {
                    let value = map.next_value::<Pos<Option<T>>>()?;
                    entries.push((name, value));
                }
                Ok(NamedMap(entries))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

// ---------------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------------

struct Cx<'a> {
    file: &'a str,
    diags: Vec<Diagnostic>,
}

fn known(loc: &Location) -> Option<(u64, u64)> {
    (loc.line() > 0).then(|| (loc.line(), loc.column().max(1)))
}

impl Cx<'_> {
    /// Records a problem at `loc`, or at `path` when YAML has no position for it.
    fn error(&mut self, loc: Option<&Location>, path: &str, message: impl Into<String>) {
        let position = loc.and_then(known);
        let key_path = (position.is_none() && !path.is_empty()).then(|| path.to_string());
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            position,
            key_path,
            message: message.into(),
        });
    }

    fn yaml_error(&mut self, e: &serde_saphyr::Error) {
        use serde_saphyr::Error as E;
        let inner = e.without_snippet();
        let message = match inner {
            E::SerdeUnknownField {
                field, expected, ..
            } => format!(
                "unknown key \"{field}\" {} (expected one of: {})",
                key_context(expected),
                expected.join(", ")
            ),
            E::DuplicateMappingKey { key: Some(k), .. } => {
                format!("duplicate key \"{k}\": each name may appear once in a mapping")
            }
            E::DuplicateMappingKey { key: None, .. } => {
                "duplicate key: each name may appear once in a mapping".to_string()
            }
            E::Unexpected { expected, .. } => match *expected {
                "string scalar" => {
                    "expected a single value here, not a list or a mapping".to_string()
                }
                "mapping start" => "expected a mapping (`key: value` entries) here".to_string(),
                "sequence start" => "expected a list (`- ` entries) here".to_string(),
                other => format!("expected {other} here"),
            },
            E::MultipleDocuments { .. } => {
                "more than one YAML document (`---`): a config file holds one".to_string()
            }
            other => serde_saphyr::DefaultMessageFormatter
                .format_message(other)
                .escape_debug()
                .to_string(),
        };
        let loc = inner.location().or_else(|| e.location());
        self.error(loc.as_ref(), "", message);
    }

    fn finish(mut self) -> ConfigErrors {
        // In file order; problems without a position after those with one.
        self.diags
            .sort_by_key(|d| (d.position.is_none(), d.position, d.key_path.clone()));
        self.diags.dedup();
        ConfigErrors(self.diags)
    }
}

/// Which mapping an unknown key was found in, told from the keys it allows.
fn key_context(expected: &[&str]) -> &'static str {
    match expected.first().copied() {
        Some("admin") => "at the top level",
        Some("socket") => "in admin",
        Some("bind") if expected.len() == 1 => "in metrics",
        Some("bind") => "in a listener",
        Some("strategy") => "in a pool",
        Some("interval") => "in a health_check",
        Some("address") => "in a backend",
        _ => "here",
    }
}

// ---------------------------------------------------------------------------------------
// Value conversions
// ---------------------------------------------------------------------------------------

const DURATION_HINT: &str = "write a number and a unit, e.g. 250ms, 2s, 5m, 1h";

/// A duration such as `250ms`; `key` names the key in messages.
fn duration(
    cx: &mut Cx,
    value: &Option<Pos<String>>,
    path: &str,
    key: &str,
    default: Duration,
    allow_zero: bool,
) -> Duration {
    let Some(v) = value else { return default };
    let text = v.value.trim();
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() && !allow_zero => {
            cx.error(
                Some(&v.referenced),
                path,
                format!("{key} \"{}\" must be more than zero", v.value),
            );
            default
        }
        Ok(d) => d,
        Err(e) => {
            use humantime::DurationError as H;
            let why = match e {
                H::Empty => "it is empty".to_string(),
                H::UnknownUnit { unit, .. } if unit.is_empty() => "it has no unit".to_string(),
                H::UnknownUnit { unit, .. } => {
                    format!("unknown unit \"{unit}\" (use ns, us, ms, s, m, h, d)")
                }
                H::NumberOverflow => "it is too large".to_string(),
                H::InvalidCharacter(_) | H::NumberExpected(_) => {
                    "it is not a number followed by a unit".to_string()
                }
            };
            cx.error(
                Some(&v.referenced),
                path,
                format!(
                    "bad duration for {key}: \"{}\": {why}; {DURATION_HINT}",
                    v.value
                ),
            );
            default
        }
    }
}

/// A `\r`, `\n`, `\t`, `\0` or `\x` left as two characters: YAML applies escapes only
/// inside double quotes, so `send: PING\r\n` (plain or single-quoted) would send a
/// backslash and an `r`, and a Redis check would time out with nothing said at load.
fn literal_escapes(cx: &mut Cx, v: &Pos<String>, path: &str, key: &str) {
    let found = v
        .value
        .as_bytes()
        .windows(2)
        .find(|w| w[0] == b'\\' && matches!(w[1], b'r' | b'n' | b't' | b'0' | b'x'));
    if let Some(pair) = found {
        cx.error(
            Some(&v.referenced),
            path,
            format!(
                "{key} contains \"\\{}\" as two characters: YAML applies escapes only inside double quotes, so write {key}: \"{}\"",
                pair[1] as char,
                v.value
            ),
        );
    }
}

/// A whole number in `min..=max`.
fn number(cx: &mut Cx, v: &Pos<String>, path: &str, key: &str, min: u64, max: u64) -> Option<u64> {
    let text = v.value.trim();
    let parsed = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: too many of them is simply out of range.
        Some(text.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        None
    };
    match parsed {
        Some(n) if (min..=max).contains(&n) => Some(n),
        Some(n) if n >= min && max >= u64::from(u32::MAX) => {
            cx.error(
                Some(&v.referenced),
                path,
                format!("{key} {text} is out of range: it must be at most {max}"),
            );
            None
        }
        Some(_) if max >= u64::from(u32::MAX) => {
            cx.error(
                Some(&v.referenced),
                path,
                format!("{key} {text} is out of range: it must be at least {min}"),
            );
            None
        }
        Some(_) => {
            cx.error(
                Some(&v.referenced),
                path,
                format!("{key} {text} is out of range {min}..={max}"),
            );
            None
        }
        None => {
            let range = if max >= u64::from(u32::MAX) {
                format!("{min} or more")
            } else {
                format!("{min}..={max}")
            };
            cx.error(
                Some(&v.referenced),
                path,
                format!("{key} \"{}\" is not a whole number ({range})", v.value),
            );
            None
        }
    }
}

/// A listen address: an IP literal and a port, IPv6 in brackets.
fn bind_addr(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    let why = match split_host_port(t) {
        Err(why) => why,
        Ok((host, port)) => match port.parse::<u16>() {
            Err(_) => format!("port \"{port}\" is not a number 0..=65535"),
            Ok(_) if host.parse::<std::net::IpAddr>().is_err() => {
                format!("\"{host}\" is not an IP address (a bind address can't be a host name)")
            }
            Ok(_) => "it is not IP:PORT".to_string(),
        },
    };
    Err(format!(
        "bad address \"{text}\": {why}; expected IP:PORT or [IPv6]:PORT, e.g. 127.0.0.1:7379 or [::1]:7379"
    ))
}

/// Whether two sockets of one protocol can't both be bound: the same port (not 0, which
/// picks a free one) and the same address, or a wildcard (0.0.0.0, [::]) of the same
/// family. `[::]` also takes every IPv4 address (weir leaves IPV6_V6ONLY off, as Linux
/// does by default), so it clashes with IPv4 binds on its port too.
fn binds_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let takes = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv4() == other.is_ipv4() || wide.is_ipv6())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || takes(a, b) || takes(b, a))
}

/// Splits `HOST:PORT` / `[V6]:PORT`; the host is returned without brackets.
fn split_host_port(t: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = t.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err("a '[' without its ']'".to_string());
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err("no port after the ']'".to_string());
        };
        return Ok((host, port));
    }
    let Some((host, port)) = t.rsplit_once(':') else {
        return Err("no port".to_string());
    };
    if host.contains(':') {
        return Err("an IPv6 address needs brackets, e.g. [::1]:5432".to_string());
    }
    if host.is_empty() {
        return Err("no host before the ':'".to_string());
    }
    Ok((host, port))
}

/// A backend address `HOST:PORT`, HOST an IP literal or a DNS name, resolved now.
fn backend_addr(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    let bad = |why: String| {
        format!(
            "bad backend address \"{text}\": {why}; expected HOST:PORT, e.g. 127.0.0.1:6379, db.example.com:5432 or [::1]:5432"
        )
    };
    let (host, port) = split_host_port(t).map_err(bad)?;
    let port: u16 = match port.parse() {
        Ok(0) => return Err(bad("port 0 can't be connected to".to_string())),
        Ok(p) => p,
        Err(_) => return Err(bad(format!("port \"{port}\" is not a number 1..=65535"))),
    };
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if t.starts_with('[') {
        return Err(bad(format!("\"{host}\" is not an IPv6 address")));
    }
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| {
            format!("cannot resolve host \"{host}\" (in \"{text}\"): it has no addresses")
        }),
        Err(e) => Err(format!(
            "cannot resolve host \"{host}\" (in \"{text}\"): {e}"
        )),
    }
}

/// Names end up in admin commands (`POOL/BACKEND`) and metric labels.
fn check_name(cx: &mut Cx, name: &Pos<String>, path: &str, kind: &str, slash_ok: bool) {
    let n = &name.value;
    let why = if n.is_empty() {
        Some("is empty")
    } else if n.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace (names are typed in admin commands)")
    } else if !slash_ok && n.contains('/') {
        Some("contains '/' (backends are named POOL/BACKEND)")
    } else {
        None
    };
    if let Some(why) = why {
        cx.error(
            Some(&name.referenced),
            path,
            format!("{kind} name \"{n}\" {why}"),
        );
    }
}

fn strategy(cx: &mut Cx, v: &Option<Pos<String>>, path: &str) -> Strategy {
    const ALL: [Strategy; 4] = [
        Strategy::RoundRobin,
        Strategy::LeastConnections,
        Strategy::WeightedRandom,
        Strategy::SourceHash,
    ];
    let Some(v) = v else {
        return Strategy::RoundRobin;
    };
    if let Some(s) = ALL.iter().find(|s| s.as_str() == v.value.trim()) {
        return *s;
    }
    let names: Vec<&str> = ALL.iter().map(|s| s.as_str()).collect();
    cx.error(
        Some(&v.referenced),
        path,
        format!(
            "unknown strategy \"{}\" (expected one of: {})",
            v.value,
            names.join(", ")
        ),
    );
    Strategy::RoundRobin
}

fn protocol(cx: &mut Cx, v: &Option<Pos<String>>, path: &str) -> Protocol {
    let Some(v) = v else { return Protocol::Tcp };
    match v.value.trim() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => {
            cx.error(
                Some(&v.referenced),
                path,
                format!(
                    "unknown protocol \"{}\" (expected one of: tcp, udp)",
                    v.value
                ),
            );
            Protocol::Tcp
        }
    }
}

fn hex_bytes(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if let Some(bad) = digits.iter().find(|b| !b.is_ascii_hexdigit()) {
        return Err(format!("'{}' is not a hex digit", char::from(*bad)));
    }
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", digits.len()));
    }
    let nibble = |b: u8| char::from(b).to_digit(16).unwrap_or(0) as u8;
    Ok(digits
        .chunks(2)
        .map(|p| (nibble(p[0]) << 4) | nibble(p[1]))
        .collect())
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// A pool being built, with what the listener pass needs to finish it.
struct PendingPool {
    config: PoolConfig,
    /// Where `health_check` is, when there is one without send/send_hex.
    check_without_send: Option<Location>,
    /// The first listener that uses it, and that listener's protocol.
    used_by: Option<(String, Protocol)>,
}

fn validate(cx: &mut Cx, raw: RawConfig) -> Config {
    let admin_socket = raw
        .admin
        .as_ref()
        .and_then(|a| a.value.socket.as_ref())
        .and_then(|s| {
            if s.value.trim().is_empty() {
                cx.error(
                    Some(&s.referenced),
                    "admin.socket",
                    "admin socket path is empty",
                );
                None
            } else {
                Some(PathBuf::from(&s.value))
            }
        });
    let state_file = raw
        .admin
        .as_ref()
        .and_then(|a| a.value.state_file.as_ref())
        .and_then(|s| {
            if s.value.trim().is_empty() {
                cx.error(
                    Some(&s.referenced),
                    "admin.state_file",
                    "admin state file path is empty",
                );
                None
            } else {
                Some(PathBuf::from(&s.value))
            }
        });
    let metrics_bind = raw
        .metrics
        .as_ref()
        .and_then(|m| m.value.bind.as_ref())
        .and_then(|b| match bind_addr(&b.value) {
            Ok(a) => Some(a),
            Err(why) => {
                cx.error(
                    Some(&b.referenced),
                    "metrics.bind",
                    format!("metrics bind: {why}"),
                );
                None
            }
        });
    let shutdown_timeout = duration(
        cx,
        &raw.shutdown_timeout,
        "shutdown_timeout",
        "shutdown_timeout",
        Duration::from_secs(30),
        true,
    );

    let mut pools: Vec<PendingPool> = Vec::new();
    match &raw.pools {
        None => cx.error(None, "pools", "no pools: at least one pool is needed"),
        Some(p) if p.value.0.is_empty() => cx.error(
            Some(&p.referenced),
            "pools",
            "no pools: at least one pool is needed",
        ),
        Some(p) => {
            for (name, body) in &p.value.0 {
                pools.push(validate_pool(cx, name, body));
            }
        }
    }

    let mut listeners = Vec::new();
    match &raw.listeners {
        None => cx.error(
            None,
            "listeners",
            "no listeners: at least one listener is needed",
        ),
        Some(l) if l.value.0.is_empty() => cx.error(
            Some(&l.referenced),
            "listeners",
            "no listeners: at least one listener is needed",
        ),
        Some(l) => {
            // (protocol, address, listener name; "" for the metrics endpoint)
            let mut binds: Vec<(Protocol, SocketAddr, String)> = Vec::new();
            if let Some(m) = metrics_bind {
                binds.push((Protocol::Tcp, m, String::new()));
            }
            for (name, body) in &l.value.0 {
                if let Some(listener) = validate_listener(cx, name, body, &mut pools, &mut binds) {
                    listeners.push(listener);
                }
            }
        }
    }

    let mut pools: Vec<PoolConfig> = pools
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
            p.config
        })
        .collect();
    listeners.sort_by(|a: &ListenerConfig, b| a.name.cmp(&b.name));
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    Config {
        admin_socket,
        state_file,
        metrics_bind,
        shutdown_timeout,
        listeners,
        pools,
    }
}

fn validate_listener(
    cx: &mut Cx,
    name: &Pos<String>,
    body: &Pos<Option<RawListener>>,
    pools: &mut [PendingPool],
    binds: &mut Vec<(Protocol, SocketAddr, String)>,
) -> Option<ListenerConfig> {
    let n = &name.value;
    let path = format!("listeners.{n}");
    check_name(cx, name, &path, "listener", true);
    let Some(raw) = &body.value else {
        cx.error(
            Some(&name.referenced),
            &path,
            format!("listener \"{n}\" has no settings: it needs bind and pool"),
        );
        return None;
    };
    let protocol = protocol(cx, &raw.protocol, &format!("{path}.protocol"));

    let bind = match &raw.bind {
        None => {
            cx.error(
                Some(&name.referenced),
                &path,
                format!("listener \"{n}\" has no bind: add bind: IP:PORT"),
            );
            None
        }
        Some(b) => match bind_addr(&b.value) {
            Err(why) => {
                cx.error(Some(&b.referenced), &format!("{path}.bind"), why);
                None
            }
            Ok(addr) => {
                let clash = binds
                    .iter()
                    .find(|(p, a, _)| *p == protocol && binds_clash(*a, addr));
                if let Some((_, first_addr, first)) = clash {
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
                        Some(&b.referenced),
                        &format!("{path}.bind"),
                        format!(
                            "listener \"{n}\" binds {} {addr}, which {what} already binds{covers}",
                            protocol.as_str()
                        ),
                    );
                } else {
                    binds.push((protocol, addr, n.clone()));
                }
                Some(addr)
            }
        },
    };

    let pool = match &raw.pool {
        None => {
            cx.error(
                Some(&name.referenced),
                &path,
                format!("listener \"{n}\" has no pool: add pool: POOL_NAME"),
            );
            None
        }
        Some(p) => match pools.iter_mut().find(|q| q.config.name == p.value) {
            None => {
                let mut known: Vec<&str> = pools.iter().map(|q| q.config.name.as_str()).collect();
                known.sort_unstable();
                let known = if known.is_empty() {
                    "none is defined".to_string()
                } else {
                    format!("defined: {}", known.join(", "))
                };
                cx.error(
                    Some(&p.referenced),
                    &format!("{path}.pool"),
                    format!(
                        "listener \"{n}\" uses pool \"{}\", which is not defined ({known})",
                        p.value
                    ),
                );
                None
            }
            Some(q) => {
                match &q.used_by {
                    None => {
                        q.used_by = Some((n.clone(), protocol));
                        q.config.protocol = protocol;
                    }
                    Some((other, other_protocol)) if *other_protocol != protocol => cx.error(
                        Some(&p.referenced),
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
        },
    };

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
        "idle_timeout",
        idle_default,
        false,
    );

    Some(ListenerConfig {
        name: n.clone(),
        bind: bind?,
        protocol,
        pool: pool?,
        max_connections,
        idle_timeout,
    })
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
            health_check: None,
            backends: Vec::new(),
        },
        check_without_send: None,
        used_by: None,
    };
    let Some(raw) = &body.value else {
        cx.error(
            Some(&name.referenced),
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
        "connect_timeout",
        Duration::from_secs(3),
        false,
    );
    if let Some(r) = &raw.retries {
        // A huge number of retries is fine: it is bounded by the backends there are.
        if let Some(r) = number(cx, r, &format!("{path}.retries"), "retries", 0, u64::MAX) {
            c.retries = u32::try_from(r).unwrap_or(u32::MAX);
        }
    }
    if let Some(hc) = &raw.health_check {
        let (check, without_send) = validate_check(cx, hc, &format!("{path}.health_check"));
        c.health_check = Some(check);
        pending.check_without_send = without_send;
    }
    let c = &mut pending.config;

    match &raw.backends {
        None => cx.error(
            Some(&name.referenced),
            &format!("{path}.backends"),
            format!("pool \"{n}\" has no backends: add at least one under backends"),
        ),
        Some(b) if b.value.is_empty() => cx.error(
            Some(&b.referenced),
            &format!("{path}.backends"),
            format!("pool \"{n}\" has no backends: add at least one under backends"),
        ),
        Some(b) => {
            let mut names: HashMap<String, Location> = HashMap::new();
            for (i, backend) in b.value.iter().enumerate() {
                let bpath = format!("{path}.backends[{i}]");
                if let Some(be) = validate_backend(cx, n, backend, &bpath, &mut names) {
                    c.backends.push(be);
                }
            }
        }
    }
    pending
}

fn validate_check(
    cx: &mut Cx,
    hc: &Pos<Option<RawHealthCheck>>,
    path: &str,
) -> (HealthCheckConfig, Option<Location>) {
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
        return (check, Some(hc.referenced));
    };
    let key = |k: &str| format!("{path}.{k}");
    check.interval = duration(
        cx,
        &raw.interval,
        &key("interval"),
        "interval",
        check.interval,
        false,
    );
    check.timeout = duration(
        cx,
        &raw.timeout,
        &key("timeout"),
        "timeout",
        check.timeout,
        false,
    );
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
    match (&raw.send, &raw.send_hex) {
        (Some(_), Some(h)) => cx.error(
            Some(&h.referenced),
            &key("send_hex"),
            "send and send_hex are both set: use one of them",
        ),
        (Some(s), None) => {
            if s.value.is_empty() {
                cx.error(
                    Some(&s.referenced),
                    &key("send"),
                    "send is empty (leave it out for a plain connect check)",
                );
            }
            literal_escapes(cx, s, &key("send"), "send");
            check.send = Some(s.value.clone().into_bytes());
        }
        (None, Some(h)) => match hex_bytes(&h.value) {
            Ok(b) if b.is_empty() => cx.error(
                Some(&h.referenced),
                &key("send_hex"),
                "send_hex is empty (leave it out for a plain connect check)",
            ),
            Ok(b) => check.send = Some(b),
            Err(why) => cx.error(
                Some(&h.referenced),
                &key("send_hex"),
                format!("bad send_hex \"{}\": {why}", h.value),
            ),
        },
        (None, None) => {}
    }
    if let Some(e) = &raw.expect {
        if e.value.is_empty() {
            cx.error(
                Some(&e.referenced),
                &key("expect"),
                "expect is empty: every reply would match",
            );
        } else if raw.send.is_none() && raw.send_hex.is_none() {
            cx.error(
                Some(&e.referenced),
                &key("expect"),
                format!(
                    "expect \"{}\" without send: a check that expects a reply must send something first (add send or send_hex)",
                    e.value.escape_debug()
                ),
            );
        }
        literal_escapes(cx, e, &key("expect"), "expect");
        check.expect = Some(e.value.clone().into_bytes());
    }
    let without_send = (raw.send.is_none() && raw.send_hex.is_none()).then_some(hc.referenced);
    (check, without_send)
}

fn validate_backend(
    cx: &mut Cx,
    pool: &str,
    backend: &Pos<RawBackend>,
    path: &str,
    names: &mut HashMap<String, Location>,
) -> Option<BackendConfig> {
    let raw = &backend.value;
    let Some(address) = &raw.address else {
        cx.error(
            Some(&backend.referenced),
            path,
            format!("a backend of pool \"{pool}\" has no address: add address: HOST:PORT"),
        );
        return None;
    };
    let addr = match backend_addr(&address.value) {
        Ok(a) => Some(a),
        Err(why) => {
            cx.error(Some(&address.referenced), &format!("{path}.address"), why);
            None
        }
    };
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
        cx.error(Some(&name.referenced), &format!("{path}.name"), msg);
    } else {
        names.insert(name.value.clone(), name.referenced);
    }
    let weight = match &raw.weight {
        None => 1,
        Some(w) => number(cx, w, &format!("{path}.weight"), "weight", 1, 1000).unwrap_or(1) as u32,
    };
    Some(BackendConfig {
        name: name.value.clone(),
        address: address.value.clone(),
        addr: addr?,
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_bytes_ignores_whitespace_and_case() {
        assert_eq!(
            hex_bytes("DE ad\nbE\tef").unwrap(),
            [0xde, 0xad, 0xbe, 0xef]
        );
        assert_eq!(hex_bytes("").unwrap(), Vec::<u8>::new());
        assert!(hex_bytes("abc").unwrap_err().contains("odd number"));
        assert!(hex_bytes("0x12").unwrap_err().contains("'x'"));
    }

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(split_host_port("db:5432").unwrap(), ("db", "5432"));
        assert_eq!(split_host_port("[::1]:5432").unwrap(), ("::1", "5432"));
        assert!(
            split_host_port("::1:5432")
                .unwrap_err()
                .contains("brackets")
        );
        assert!(
            split_host_port("[::1]5432")
                .unwrap_err()
                .contains("no port")
        );
        assert!(split_host_port("[::1:5432").unwrap_err().contains("']'"));
        assert!(split_host_port(":5432").unwrap_err().contains("no host"));
        assert!(split_host_port("db").unwrap_err().contains("no port"));
    }

    #[test]
    fn bind_clashes() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(binds_clash(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(binds_clash(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(binds_clash(a("127.0.0.2:80"), a("0.0.0.0:80")));
        assert!(binds_clash(a("[::]:80"), a("[::1]:80")));
        assert!(!binds_clash(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!binds_clash(a("127.0.0.1:80"), a("127.0.0.1:81")));
        // [::] is dual-stack: it takes IPv4 addresses too; 0.0.0.0 doesn't take IPv6 ones.
        assert!(binds_clash(a("[::]:80"), a("127.0.0.1:80")));
        assert!(binds_clash(a("0.0.0.0:80"), a("[::]:80")));
        assert!(!binds_clash(a("0.0.0.0:80"), a("[::1]:80")));
        // Port 0 picks a free port each time.
        assert!(!binds_clash(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }

    #[test]
    fn backend_addresses() {
        assert_eq!(
            backend_addr("127.0.0.1:6379").unwrap(),
            "127.0.0.1:6379".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            backend_addr("[::1]:5432").unwrap(),
            "[::1]:5432".parse::<SocketAddr>().unwrap()
        );
        assert!(backend_addr("localhost:1").unwrap().ip().is_loopback());
        assert!(backend_addr("h:70000").unwrap_err().contains("\"70000\""));
    }

    #[test]
    fn bind_addresses() {
        assert!(bind_addr("0.0.0.0:1").is_ok());
        assert!(bind_addr("[::]:1").is_ok());
        assert!(
            bind_addr("localhost:1")
                .unwrap_err()
                .contains("not an IP address")
        );
        assert!(bind_addr("1.2.3.4").unwrap_err().contains("no port"));
    }
}
