//! Conversions of single values (durations, numbers, addresses, names, hex), each
//! recording a problem that names the key and what was written.

use std::net::SocketAddr;
use std::time::Duration;

use super::diag::Cx;
use super::raw::Pos;
use super::runtime::{OnDown, Protocol};
use super::yaml::Scalar;
use crate::balance::Strategy;

const DURATION_HINT: &str = "write a number and a unit, e.g. 250ms, 2s, 5m, 1h";

/// A duration key and the durations it takes. Every duration has an upper bound, so that
/// whatever `weir check` accepts can be added to an `Instant` and jittered without
/// overflowing, and a lower bound where zero (or less than the timers' millisecond) makes
/// no sense. docs/operations.md lists them; keep the two in step.
pub(super) struct DurationKey {
    pub(super) key: &'static str,
    pub(super) min: Duration,
    pub(super) max: Duration,
}

const MS: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A drain can take long (long-lived connections) but not unboundedly; 0 stops at once.
pub(super) const SHUTDOWN_TIMEOUT: DurationKey = DurationKey {
    key: "shutdown_timeout",
    min: Duration::ZERO,
    max: DAY,
};
/// HAProxy's ceiling for its timeouts (2^31 ms, 24.8 days), rounded down.
pub(super) const IDLE_TIMEOUT: DurationKey = DurationKey {
    key: "idle_timeout",
    min: MS,
    max: Duration::from_secs(24 * 24 * 3600),
};
/// Like idle_timeout: it is the same kind of inactivity timeout, for one direction.
pub(super) const HALF_CLOSE_TIMEOUT: DurationKey = DurationKey {
    key: "half_close_timeout",
    min: MS,
    max: Duration::from_secs(24 * 24 * 3600),
};
/// 0 is the default (closed at once); a client waiting longer than an hour has gone.
pub(super) const QUEUE_TIMEOUT: DurationKey = DurationKey {
    key: "queue_timeout",
    min: Duration::ZERO,
    max: Duration::from_secs(3600),
};
/// 0 is the default (off); a ramp longer than a day is a mistake.
pub(super) const SLOW_START: DurationKey = DurationKey {
    key: "slow_start",
    min: Duration::ZERO,
    max: DAY,
};
/// Linux gives up on a SYN after about two minutes anyway.
pub(super) const CONNECT_TIMEOUT: DurationKey = DurationKey {
    key: "connect_timeout",
    min: MS,
    max: HOUR,
};
/// Asking DNS more than once a second is no use (TTLs are in seconds).
pub(super) const DISCOVER_REFRESH: DurationKey = DurationKey {
    key: "refresh",
    min: Duration::from_secs(1),
    max: DAY,
};
pub(super) const CHECK_INTERVAL: DurationKey = DurationKey {
    key: "interval",
    min: MS,
    max: DAY,
};
pub(super) const CHECK_TIMEOUT: DurationKey = DurationKey {
    key: "timeout",
    min: MS,
    max: HOUR,
};

impl DurationKey {
    /// `1ms..=1h`, as messages and docs write it.
    pub(super) fn range(&self) -> String {
        format!("{}..={}", show(self.min), show(self.max))
    }
}

/// A round duration the way a config would write it: `0s`, `1ms`, `90s`, `24h`, `24d`
/// (days only from two on: `24h` reads better than `1d`).
pub(super) fn show(d: Duration) -> String {
    let ms = d.as_millis();
    let units = [
        (2 * 86_400_000, 86_400_000, "d"),
        (3_600_000, 3_600_000, "h"),
        (60_000, 60_000, "m"),
        (1000, 1000, "s"),
    ];
    for (at_least, unit, name) in units {
        if ms >= at_least && ms.is_multiple_of(unit) {
            return format!("{}{name}", ms / unit);
        }
    }
    if ms == 0 {
        "0s".to_string()
    } else {
        format!("{ms}ms")
    }
}

/// A duration such as `250ms` within `spec`'s range; `default` when absent or bad.
pub(super) fn duration(
    cx: &mut Cx,
    value: &Option<Pos<String>>,
    path: &str,
    spec: &DurationKey,
    default: Duration,
) -> Duration {
    let Some(v) = value else { return default };
    let key = spec.key;
    let text = v.value.trim();
    let problem = match humantime::parse_duration(text) {
        Ok(d) if (spec.min..=spec.max).contains(&d) => return d,
        Ok(d) if d.is_zero() => format!(
            "{key} \"{}\" must be more than zero (it may be {})",
            v.value,
            spec.range()
        ),
        Ok(d) => format!(
            "{key} \"{}\" is too {}: it must be within {}",
            v.value,
            if d < spec.min { "short" } else { "long" },
            spec.range()
        ),
        Err(e) => {
            use humantime::DurationError as H;
            let why = match e {
                H::Empty => "it is empty".to_string(),
                H::UnknownUnit { unit, .. } if unit.is_empty() => "it has no unit".to_string(),
                H::UnknownUnit { unit, .. } => {
                    format!("unknown unit \"{unit}\" (use ns, us, ms, s, m, h, d)")
                }
                H::NumberOverflow => {
                    format!("it is too large (it must be within {})", spec.range())
                }
                H::InvalidCharacter(_) | H::NumberExpected(_) => {
                    "it is not a number followed by a unit".to_string()
                }
            };
            format!(
                "bad duration for {key}: \"{}\": {why}; {DURATION_HINT}",
                v.value
            )
        }
    };
    cx.error(Some(&v.at), path, problem);
    default
}

/// A `\r`, `\n`, `\t`, `\0` or `\x` left as two characters: YAML applies escapes only
/// inside double quotes, so `send: PING\r\n` (plain or single-quoted) would send a
/// backslash and an `r`, and a Redis check would time out with nothing said at load.
/// (Inside double quotes, such a pair can only come from a deliberate `\\`.)
pub(super) fn literal_escapes(cx: &mut Cx, v: &Pos<Scalar>, path: &str, key: &str) {
    if v.value.double_quoted {
        return;
    }
    let text = &v.value.text;
    let found = (text.as_bytes().windows(2))
        .find(|w| w[0] == b'\\' && matches!(w[1], b'r' | b'n' | b't' | b'0' | b'x'));
    if let Some(pair) = found {
        cx.error(
            Some(&v.at),
            path,
            format!(
                "{key} contains \"\\{}\" as two characters: YAML applies escapes only inside double quotes, so write {key}: \"{}\"",
                pair[1] as char,
                text
            ),
        );
    }
}

/// A whole number in `min..=max`.
pub(super) fn number(
    cx: &mut Cx,
    v: &Pos<String>,
    path: &str,
    key: &str,
    min: u64,
    max: u64,
) -> Option<u64> {
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
                Some(&v.at),
                path,
                format!("{key} {text} is out of range: it must be at most {max}"),
            );
            None
        }
        Some(_) if max >= u64::from(u32::MAX) => {
            cx.error(
                Some(&v.at),
                path,
                format!("{key} {text} is out of range: it must be at least {min}"),
            );
            None
        }
        Some(_) => {
            cx.error(
                Some(&v.at),
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
                Some(&v.at),
                path,
                format!("{key} \"{}\" is not a whole number ({range})", v.value),
            );
            None
        }
    }
}

/// A listen address: an IP literal and a port, IPv6 in brackets.
pub(super) fn bind_addr(text: &str) -> Result<SocketAddr, String> {
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
pub(super) fn binds_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let takes = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv4() == other.is_ipv4() || wide.is_ipv6())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || takes(a, b) || takes(b, a))
}

/// Splits `HOST:PORT` / `[V6]:PORT`; the host is returned without brackets.
pub(super) fn split_host_port(t: &str) -> Result<(&str, &str), String> {
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

/// A backend address as written: an IP literal, or a DNS name (with its port) that weir
/// resolves when it starts, reloads and on the pool's refresh schedule, never here: a
/// config is read the same whatever DNS says at that moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum BackendAddr {
    Ip(SocketAddr),
    Name(String, u16),
}

/// A backend address `HOST:PORT`, HOST an IP literal or a DNS name (checked for shape,
/// not looked up).
pub(super) fn backend_addr(text: &str) -> Result<BackendAddr, String> {
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
        return Ok(BackendAddr::Ip(SocketAddr::new(ip, port)));
    }
    if t.starts_with('[') {
        return Err(bad(format!("\"{host}\" is not an IPv6 address")));
    }
    host_name(host).map_err(bad)?;
    Ok(BackendAddr::Name(host.to_string(), port))
}

/// The shape of a DNS name (RFC 1123 labels; `_` allowed, as some internal zones use
/// it): what can never resolve is an error now rather than a backend down forever.
fn host_name(host: &str) -> Result<(), String> {
    if host.starts_with('_') {
        return Err(format!(
            "\"{host}\" names SRV records: follow them with discover: {{dns: {host}}} instead"
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err(format!(
            "host name \"{host}\" is longer than 253 characters"
        ));
    }
    for label in name.split('.') {
        let ok = (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && (label.bytes()).all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!(
                "\"{host}\" is not a host name (labels of 1 to 63 letters, digits and '-', separated by dots)"
            ));
        }
    }
    Ok(())
}

/// Names end up in admin commands (`POOL/BACKEND`) and metric labels.
pub(super) fn check_name(cx: &mut Cx, name: &Pos<String>, path: &str, kind: &str, slash_ok: bool) {
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
        cx.error(Some(&name.at), path, format!("{kind} name \"{n}\" {why}"));
    }
}
/// `strategy:`, parsed by `balance` (which owns the names and the message).
pub(super) fn strategy(cx: &mut Cx, v: &Option<Pos<String>>, path: &str) -> Strategy {
    let Some(v) = v else {
        return Strategy::RoundRobin;
    };
    v.value
        .parse()
        .unwrap_or_else(|unknown: crate::balance::UnknownStrategy| {
            cx.error(Some(&v.at), path, unknown.to_string());
            Strategy::RoundRobin
        })
}

pub(super) fn protocol(cx: &mut Cx, v: &Option<Pos<String>>, path: &str) -> Protocol {
    let Some(v) = v else { return Protocol::Tcp };
    match v.value.trim() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => {
            cx.error(
                Some(&v.at),
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

/// `true` or `false` (YAML's other spellings, `yes`/`on`, are refused as ambiguous).
pub(super) fn boolean(cx: &mut Cx, v: &Option<Pos<String>>, path: &str, key: &str) -> bool {
    let Some(v) = v else { return false };
    match v.value.trim() {
        "true" => true,
        "false" => false,
        _ => {
            cx.error(
                Some(&v.at),
                path,
                format!("{key} \"{}\" must be true or false", v.value),
            );
            false
        }
    }
}

pub(super) fn on_down(cx: &mut Cx, v: &Option<Pos<String>>, path: &str) -> OnDown {
    let Some(v) = v else { return OnDown::Keep };
    match v.value.trim() {
        "keep" => OnDown::Keep,
        "close" => OnDown::Close,
        _ => {
            cx.error(
                Some(&v.at),
                path,
                format!(
                    "unknown on_down \"{}\" (expected one of: keep, close)",
                    v.value
                ),
            );
            OnDown::Keep
        }
    }
}

pub(super) fn hex_bytes(text: &str) -> Result<Vec<u8>, String> {
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
pub(super) fn proxy_protocol(
    cx: &mut Cx,
    v: &Option<Pos<String>>,
    path: &str,
) -> Option<crate::proxy_protocol::Version> {
    use crate::proxy_protocol::Version;
    let v = v.as_ref()?;
    match v.value.trim() {
        "v1" => Some(Version::V1),
        "v2" => Some(Version::V2),
        _ => {
            cx.error(
                Some(&v.at),
                path,
                format!(
                    "unknown proxy_protocol \"{}\" (expected one of: v1, v2)",
                    v.value
                ),
            );
            None
        }
    }
}

/// `accept_proxy`: the trusted source ranges, each checked.
pub(super) fn cidrs(
    cx: &mut Cx,
    v: &Option<Pos<Vec<Pos<String>>>>,
    path: &str,
) -> Vec<crate::proxy_protocol::Cidr> {
    let Some(list) = v else { return Vec::new() };
    let mut out = Vec::new();
    for item in &list.value {
        match crate::proxy_protocol::Cidr::parse(&item.value) {
            Ok(c) => out.push(c),
            Err(e) => cx.error(Some(&item.at), path, format!("accept_proxy: {e}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_ranges_as_docs_write_them() {
        assert_eq!(show(Duration::ZERO), "0s");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(90)), "90s");
        assert_eq!(show(Duration::from_secs(86_400)), "24h");
        let ranges: Vec<(&str, String)> = [
            &SHUTDOWN_TIMEOUT,
            &IDLE_TIMEOUT,
            &HALF_CLOSE_TIMEOUT,
            &CONNECT_TIMEOUT,
            &CHECK_INTERVAL,
            &CHECK_TIMEOUT,
            &QUEUE_TIMEOUT,
            &SLOW_START,
        ]
        .iter()
        .map(|k| (k.key, k.range()))
        .collect();
        // docs/operations.md lists these: change both together.
        assert_eq!(
            ranges,
            [
                ("shutdown_timeout", "0s..=24h".to_string()),
                ("idle_timeout", "1ms..=24d".to_string()),
                ("half_close_timeout", "1ms..=24d".to_string()),
                ("connect_timeout", "1ms..=1h".to_string()),
                ("interval", "1ms..=24h".to_string()),
                ("timeout", "1ms..=1h".to_string()),
                ("queue_timeout", "0s..=1h".to_string()),
                ("slow_start", "0s..=24h".to_string()),
            ]
        );
    }

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
        let ip = |a: &str| BackendAddr::Ip(a.parse().unwrap());
        assert_eq!(
            backend_addr("127.0.0.1:6379").unwrap(),
            ip("127.0.0.1:6379")
        );
        assert_eq!(backend_addr("[::1]:5432").unwrap(), ip("[::1]:5432"));
        // A name is kept as written, never looked up while the config is read.
        assert_eq!(
            backend_addr("no-such-host.invalid:1").unwrap(),
            BackendAddr::Name("no-such-host.invalid".into(), 1)
        );
        assert!(backend_addr("db.internal.:5432").is_ok());
        assert!(backend_addr("h:70000").unwrap_err().contains("\"70000\""));
        for bad in ["db..internal:1", "-db:1", "db_ok.x-:1", "d b:1", "db/x:1"] {
            assert!(
                backend_addr(bad)
                    .unwrap_err()
                    .contains("is not a host name"),
                "{bad}"
            );
        }
        let long = format!("{}:1", vec!["a".repeat(63); 4].join("."));
        assert!(backend_addr(&long).unwrap_err().contains("longer than 253"));
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
