//! `resolvers` and `pools.NAME.discover` (backends from DNS): kept apart from `validate`
//! so that the rest of the pool's checks stay as they are.
//!
//! `port` is required for an A/AAAA name and refused for an SRV name (one starting with
//! `_`): the SRV records carry each target's port, and a `port` that is silently ignored
//! would mislead.

use std::net::SocketAddr;

use super::diag::Cx;
use super::raw::{Pos, RawConfig, RawDiscover};
use super::runtime::DiscoverConfig;
use super::values::{DISCOVER_REFRESH, duration, number};

/// `resolvers`: each an `IP:PORT` (`[V6]:PORT`); no names (they would need a resolver).
pub(super) fn resolvers(cx: &mut Cx, raw: &RawConfig) -> Vec<SocketAddr> {
    let Some(list) = &raw.resolvers else {
        return Vec::new();
    };
    let mut resolvers = Vec::new();
    for (i, item) in list.value.iter().enumerate() {
        match item.value.trim().parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => resolvers.push(addr),
            _ => cx.error(
                Some(&item.at),
                &format!("resolvers[{i}]"),
                format!(
                    "bad resolver \"{}\": expected IP:PORT, e.g. 10.96.0.10:53 or [::1]:53",
                    item.value
                ),
            ),
        }
    }
    resolvers
}

/// `pools.NAME.discover`; None when absent or when a problem was recorded.
pub(super) fn discover(
    cx: &mut Cx,
    raw: &Option<Pos<RawDiscover>>,
    path: &str,
) -> Option<DiscoverConfig> {
    let raw = raw.as_ref()?;
    let path = format!("{path}.discover");
    let refresh = duration(
        cx,
        &raw.value.refresh,
        &format!("{path}.refresh"),
        &DISCOVER_REFRESH,
        super::runtime::DNS_REFRESH,
    );
    let dns = match &raw.value.dns {
        Some(d) if !d.value.trim().is_empty() => d.value.trim().to_string(),
        Some(d) => {
            cx.error(
                Some(&d.at),
                &format!("{path}.dns"),
                "dns is empty: name the DNS name to follow",
            );
            return None;
        }
        None if raw.value.reported.contains(&"dns") => return None,
        None => {
            cx.error(
                Some(&raw.at),
                &path,
                "discover has no dns: add dns: NAME (SRV records when NAME starts with \"_\")",
            );
            return None;
        }
    };
    let port_key = format!("{path}.port");
    let port = match (&raw.value.port, dns.starts_with('_')) {
        (Some(p), true) => {
            cx.error(
                Some(&p.at),
                &port_key,
                format!(
                    "\"{dns}\" names SRV records, which carry each backend's port: remove port"
                ),
            );
            return None;
        }
        (None, true) => None,
        (None, false) if raw.value.reported.contains(&"port") => return None,
        (Some(p), false) => Some(number(cx, p, &port_key, "port", 1, 65535)? as u16),
        (None, false) => {
            cx.error(
                Some(&raw.at),
                &port_key,
                format!("discover of \"{dns}\" (A/AAAA records) needs the backends' port: add port: PORT"),
            );
            return None;
        }
    };
    Some(DiscoverConfig { dns, port, refresh })
}
