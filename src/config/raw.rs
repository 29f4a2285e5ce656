//! The config as read from the YAML tree: exactly the keys of the contract, every value
//! kept with its position. Scalars stay strings here and are converted during
//! validation, so that a bad number or duration is one collected problem.
//!
//! Reading never stops at a problem: an unknown key (named with the closest known one, if
//! any is close), a value of the wrong shape (a list where one value goes, …) is recorded
//! and the rest is read, so that `validate` can report its problems in the same run. Each
//! item keeps the keys whose problem was already reported (`reported`), so that a
//! misspelled or broken `bind` is not reported a second time as a missing one.

use super::diag::{Cx, Mark, suggest};
use super::yaml::{self, Kind, Node, Scalar};

/// A value and where it is in the file.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Pos<T> {
    pub(super) value: T,
    pub(super) at: Mark,
}

#[derive(Default)]
pub(super) struct RawConfig {
    pub(super) admin: Option<Pos<RawAdmin>>,
    pub(super) metrics: Option<Pos<RawMetrics>>,
    pub(super) shutdown_timeout: Option<Pos<String>>,
    pub(super) listeners: Option<Pos<NamedMap<RawListener>>>,
    pub(super) pools: Option<Pos<NamedMap<RawPool>>>,
    /// `resolvers: [ADDR:PORT, ...]`: the DNS servers asked for `discover`.
    pub(super) resolvers: Option<Pos<Vec<Pos<String>>>>,
}

#[derive(Default)]
pub(super) struct RawAdmin {
    pub(super) socket: Option<Pos<String>>,
    pub(super) state_file: Option<Pos<String>>,
}

#[derive(Default)]
pub(super) struct RawMetrics {
    pub(super) bind: Option<Pos<String>>,
}

#[derive(Default)]
pub(super) struct RawListener {
    pub(super) bind: Option<Pos<String>>,
    pub(super) protocol: Option<Pos<String>>,
    pub(super) pool: Option<Pos<String>>,
    pub(super) max_connections: Option<Pos<String>>,
    pub(super) idle_timeout: Option<Pos<String>>,
    pub(super) half_close_timeout: Option<Pos<String>>,
    pub(super) access_log: Option<Pos<String>>,
    pub(super) accept_proxy: Option<Pos<Vec<Pos<String>>>>,
    pub(super) reported: Vec<&'static str>,
}

#[derive(Default)]
pub(super) struct RawPool {
    pub(super) strategy: Option<Pos<String>>,
    pub(super) connect_timeout: Option<Pos<String>>,
    pub(super) retries: Option<Pos<String>>,
    pub(super) on_down: Option<Pos<String>>,
    pub(super) queue_timeout: Option<Pos<String>>,
    pub(super) slow_start: Option<Pos<String>>,
    pub(super) proxy_protocol: Option<Pos<String>>,
    /// `health_check:` with no value (null) means a check with every default.
    pub(super) health_check: Option<Pos<Option<RawHealthCheck>>>,
    pub(super) backends: Option<Pos<Vec<Pos<RawBackend>>>>,
    pub(super) discover: Option<Pos<RawDiscover>>,
    pub(super) reported: Vec<&'static str>,
}

#[derive(Default)]
pub(super) struct RawDiscover {
    pub(super) dns: Option<Pos<String>>,
    pub(super) port: Option<Pos<String>>,
    pub(super) refresh: Option<Pos<String>>,
    pub(super) reported: Vec<&'static str>,
}

#[derive(Default)]
pub(super) struct RawHealthCheck {
    pub(super) interval: Option<Pos<String>>,
    pub(super) timeout: Option<Pos<String>>,
    pub(super) rise: Option<Pos<String>>,
    pub(super) fall: Option<Pos<String>>,
    pub(super) port: Option<Pos<String>>,
    /// Kept as scalars: their exact bytes and whether YAML applied escapes matter.
    pub(super) send: Option<Pos<Scalar>>,
    pub(super) send_hex: Option<Pos<String>>,
    pub(super) expect: Option<Pos<Scalar>>,
    pub(super) expect_hex: Option<Pos<String>>,
}

#[derive(Default)]
pub(super) struct RawBackend {
    pub(super) address: Option<Pos<String>>,
    pub(super) name: Option<Pos<String>>,
    pub(super) weight: Option<Pos<String>>,
    pub(super) max_connections: Option<Pos<String>>,
    pub(super) backup: Option<Pos<String>>,
    pub(super) reported: Vec<&'static str>,
}

/// A YAML mapping keyed by name, in file order, names and values with their positions.
/// A name with no value (`redis:`) gives `None`.
#[derive(Default)]
pub(super) struct NamedMap<T>(pub(super) Vec<(Pos<String>, Pos<Option<T>>)>);

/// The keys one kind of mapping allows, and how messages name it.
struct Schema {
    /// "a listener": what a value of the wrong shape should have been.
    what: &'static str,
    /// "in a listener": where an unknown key was found.
    place: &'static str,
    keys: &'static [&'static str],
}

const TOP: Schema = Schema {
    what: "a weir config",
    place: "at the top level",
    keys: &[
        "admin",
        "metrics",
        "shutdown_timeout",
        "listeners",
        "pools",
        "resolvers",
    ],
};
const ADMIN: Schema = Schema {
    what: "admin settings",
    place: "in admin",
    keys: &["socket", "state_file"],
};
const METRICS: Schema = Schema {
    what: "metrics settings",
    place: "in metrics",
    keys: &["bind"],
};
const LISTENER: Schema = Schema {
    what: "a listener",
    place: "in a listener",
    keys: &[
        "bind",
        "protocol",
        "pool",
        "max_connections",
        "idle_timeout",
        "half_close_timeout",
        "access_log",
        "accept_proxy",
    ],
};
const POOL: Schema = Schema {
    what: "a pool",
    place: "in a pool",
    keys: &[
        "strategy",
        "connect_timeout",
        "retries",
        "on_down",
        "queue_timeout",
        "slow_start",
        "proxy_protocol",
        "health_check",
        "backends",
        "discover",
    ],
};
const DISCOVER: Schema = Schema {
    what: "discover settings",
    place: "in discover",
    keys: &["dns", "port", "refresh"],
};
const CHECK: Schema = Schema {
    what: "a health check",
    place: "in a health_check",
    keys: &[
        "interval",
        "timeout",
        "rise",
        "fall",
        "port",
        "send",
        "send_hex",
        "expect",
        "expect_hex",
    ],
};
const BACKEND: Schema = Schema {
    what: "a backend",
    place: "in a backend",
    keys: &["address", "name", "weight", "max_connections", "backup"],
};

/// The config text as raw types; None (recorded) for a syntax error or an empty file.
pub(super) fn read(cx: &mut Cx, text: &str) -> Option<RawConfig> {
    let root = match yaml::parse(cx, text) {
        Some(root) if !matches!(root.kind, Kind::Null) => root,
        Some(_) | None => {
            if !cx.has_errors() {
                cx.error(
                    None,
                    "",
                    "the config is empty: it needs at least `listeners` and `pools`",
                );
            }
            return None;
        }
    };
    let mut raw = RawConfig::default();
    let Some(fields) = fields(cx, &root, &TOP) else {
        return Some(raw);
    };
    for (key, v) in fields.entries {
        match key {
            "admin" => raw.admin = mapping(cx, v, &ADMIN, admin),
            "metrics" => raw.metrics = mapping(cx, v, &METRICS, metrics),
            "shutdown_timeout" => raw.shutdown_timeout = scalar(cx, v, key),
            "listeners" => raw.listeners = named(cx, v, key, &LISTENER, listener),
            "pools" => raw.pools = named(cx, v, key, &POOL, pool),
            "resolvers" => raw.resolvers = scalars(cx, v, key),
            _ => {}
        }
    }
    Some(raw)
}

/// Only `admin.socket`, ignoring every other key, for `weir ctl -c`; Err (recorded) when
/// the text is not YAML or admin.socket is not a single value.
pub(super) fn read_admin_socket(cx: &mut Cx, text: &str) -> Result<Option<String>, ()> {
    let root = yaml::parse(cx, text);
    if cx.has_errors() {
        return Err(());
    }
    let socket = (root.as_ref())
        .and_then(|root| entry(root, "admin"))
        .and_then(|admin| entry(admin, "socket"));
    let Some(socket) = socket else {
        return Ok(None);
    };
    match &socket.kind {
        Kind::Null => Ok(None),
        Kind::Scalar(s) => Ok(Some(s.text.clone())),
        _ => {
            scalar(cx, socket, "socket");
            Err(())
        }
    }
}

/// The value of `key` in a mapping node.
fn entry<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    let Kind::Map(entries) = &node.kind else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k.text() == Some(key))
        .map(|(_, v)| v)
}

/// What a node is, for messages about a value of the wrong shape.
fn shape(node: &Node) -> &'static str {
    match node.kind {
        Kind::Null => "an empty value",
        Kind::Scalar(_) => "a single value",
        Kind::Seq(_) => "a list",
        Kind::Map(_) => "a mapping",
    }
}

/// A mapping's entries whose keys the schema knows, each key as the schema spells it.
struct Fields<'n> {
    entries: Vec<(&'static str, &'n Node)>,
    /// Known keys that are absent because a problem with them was reported: a
    /// misspelling of them.
    reported: Vec<&'static str>,
}

/// The known entries of a mapping node; every unknown key is reported, with the closest
/// known key when one is close. None (recorded) when the node is not a mapping.
fn fields<'n>(cx: &mut Cx, node: &'n Node, schema: &Schema) -> Option<Fields<'n>> {
    let Kind::Map(map) = &node.kind else {
        cx.error(
            Some(&node.at),
            "",
            format!(
                "expected a mapping (`key: value` entries) here for {}, found {}",
                schema.what,
                shape(node)
            ),
        );
        return None;
    };
    let mut fields = Fields {
        entries: Vec::new(),
        reported: Vec::new(),
    };
    for (key, value) in map {
        let Some(name) = key.text() else {
            cx.error(
                Some(&key.at),
                "",
                "a key must be a name, not a list or a mapping",
            );
            continue;
        };
        if let Some(&known) = schema.keys.iter().find(|&&k| k == name) {
            fields.entries.push((known, value));
            continue;
        }
        let hint = suggest(name, schema.keys.iter().copied());
        let did_you_mean = match hint {
            Some(h) => format!("; did you mean \"{h}\"?"),
            None => String::new(),
        };
        cx.error(
            Some(&key.at),
            "",
            format!(
                "unknown key \"{name}\" {}{did_you_mean} (expected one of: {})",
                schema.place,
                schema.keys.join(", ")
            ),
        );
        if let Some(h) = hint.and_then(|h| schema.keys.iter().find(|&&k| k == h)) {
            fields.reported.push(h);
        }
    }
    // A hint names a key that is present after all: its absence was not the problem.
    let present: Vec<&str> = fields.entries.iter().map(|(k, _)| *k).collect();
    fields.reported.retain(|k| !present.contains(k));
    Some(fields)
}

/// A single value; None for an empty one, and (recorded) for a list or a mapping.
fn scalar(cx: &mut Cx, node: &Node, key: &str) -> Option<Pos<String>> {
    scalar_node(cx, node, key).map(|s| Pos {
        value: s.value.text,
        at: s.at,
    })
}

fn scalar_node(cx: &mut Cx, node: &Node, key: &str) -> Option<Pos<Scalar>> {
    match &node.kind {
        Kind::Null => None,
        Kind::Scalar(s) => Some(Pos {
            value: s.clone(),
            at: node.at,
        }),
        _ => {
            cx.error(
                Some(&node.at),
                "",
                format!(
                    "expected a single value here for {key}, found {}",
                    shape(node)
                ),
            );
            None
        }
    }
}

/// A mapping read by `read`; None when it is empty (null) or not a mapping (recorded).
fn mapping<T>(
    cx: &mut Cx,
    node: &Node,
    schema: &Schema,
    read: fn(&mut Cx, Fields) -> T,
) -> Option<Pos<T>> {
    if matches!(node.kind, Kind::Null) {
        return None;
    }
    let fields = fields(cx, node, schema)?;
    Some(Pos {
        value: read(cx, fields),
        at: node.at,
    })
}

/// `listeners` or `pools`: names, each with its settings read by `read`. Settings that
/// are not a mapping are reported and read as a mapping with every key's problem
/// reported, so that nothing is reported missing from them.
fn named<T: Default + Reported>(
    cx: &mut Cx,
    node: &Node,
    key: &str,
    schema: &Schema,
    read: fn(&mut Cx, Fields) -> T,
) -> Option<Pos<NamedMap<T>>> {
    let map = match &node.kind {
        Kind::Null => return None,
        Kind::Map(map) => map,
        _ => {
            cx.error(
                Some(&node.at),
                "",
                format!(
                    "expected a mapping (`name: settings` entries) here for {key}, found {}",
                    shape(node)
                ),
            );
            return None;
        }
    };
    let mut entries = Vec::new();
    for (name, body) in map {
        let Some(name) = scalar(cx, name, "a name") else {
            continue;
        };
        let value = match &body.kind {
            Kind::Null => None,
            _ => Some(match fields(cx, body, schema) {
                Some(fields) => read(cx, fields),
                None => T::all_reported(schema),
            }),
        };
        let value = Pos { value, at: body.at };
        entries.push((name, value));
    }
    Some(Pos {
        value: NamedMap(entries),
        at: node.at,
    })
}

/// An item that remembers which of its keys' problems were reported.
trait Reported: Default {
    fn reported(&mut self) -> &mut Vec<&'static str>;

    fn all_reported(schema: &Schema) -> Self {
        let mut item = Self::default();
        *item.reported() = schema.keys.to_vec();
        item
    }
}

impl Reported for RawListener {
    fn reported(&mut self) -> &mut Vec<&'static str> {
        &mut self.reported
    }
}

impl Reported for RawPool {
    fn reported(&mut self) -> &mut Vec<&'static str> {
        &mut self.reported
    }
}

impl Reported for RawBackend {
    fn reported(&mut self) -> &mut Vec<&'static str> {
        &mut self.reported
    }
}

/// A single value; a list or a mapping is reported and `key` marked as reported.
fn required(
    cx: &mut Cx,
    node: &Node,
    key: &'static str,
    reported: &mut Vec<&'static str>,
) -> Option<Pos<String>> {
    let value = scalar(cx, node, key);
    if value.is_none() && !matches!(node.kind, Kind::Null) {
        reported.push(key);
    }
    value
}

fn admin(cx: &mut Cx, f: Fields) -> RawAdmin {
    let mut r = RawAdmin::default();
    for (key, v) in f.entries {
        match key {
            "socket" => r.socket = scalar(cx, v, key),
            "state_file" => r.state_file = scalar(cx, v, key),
            _ => {}
        }
    }
    r
}

fn metrics(cx: &mut Cx, f: Fields) -> RawMetrics {
    let mut r = RawMetrics::default();
    for (key, v) in f.entries {
        if key == "bind" {
            r.bind = scalar(cx, v, key);
        }
    }
    r
}

fn listener(cx: &mut Cx, f: Fields) -> RawListener {
    let mut r = RawListener {
        reported: f.reported,
        ..RawListener::default()
    };
    for (key, v) in f.entries {
        match key {
            "bind" => r.bind = required(cx, v, key, &mut r.reported),
            "protocol" => r.protocol = scalar(cx, v, key),
            "pool" => r.pool = required(cx, v, key, &mut r.reported),
            "max_connections" => r.max_connections = scalar(cx, v, key),
            "idle_timeout" => r.idle_timeout = scalar(cx, v, key),
            "half_close_timeout" => r.half_close_timeout = scalar(cx, v, key),
            "access_log" => r.access_log = scalar(cx, v, key),
            "accept_proxy" => r.accept_proxy = one_or_more(cx, v, key),
            _ => {}
        }
    }
    r
}

fn pool(cx: &mut Cx, f: Fields) -> RawPool {
    let mut r = RawPool {
        reported: f.reported,
        ..RawPool::default()
    };
    for (key, v) in f.entries {
        match key {
            "strategy" => r.strategy = scalar(cx, v, key),
            "connect_timeout" => r.connect_timeout = scalar(cx, v, key),
            "retries" => r.retries = scalar(cx, v, key),
            "on_down" => r.on_down = scalar(cx, v, key),
            "queue_timeout" => r.queue_timeout = scalar(cx, v, key),
            "slow_start" => r.slow_start = scalar(cx, v, key),
            "proxy_protocol" => r.proxy_protocol = scalar(cx, v, key),
            "health_check" => r.health_check = health_check(cx, v),
            "backends" => r.backends = backends(cx, v, &mut r.reported),
            "discover" => r.discover = mapping(cx, v, &DISCOVER, discover),
            _ => {}
        }
    }
    r
}

fn discover(cx: &mut Cx, f: Fields) -> RawDiscover {
    let mut r = RawDiscover {
        reported: f.reported,
        ..RawDiscover::default()
    };
    for (key, v) in f.entries {
        match key {
            "dns" => r.dns = scalar(cx, v, key),
            "port" => r.port = scalar(cx, v, key),
            "refresh" => r.refresh = scalar(cx, v, key),
            _ => {}
        }
    }
    r
}

/// A list of single values (`resolvers`); None for an empty value, and (recorded) for
/// anything but a list; an item that is not a single value is recorded and left out.
fn scalars(cx: &mut Cx, node: &Node, key: &str) -> Option<Pos<Vec<Pos<String>>>> {
    let items = match &node.kind {
        Kind::Null => return None,
        Kind::Seq(items) => items,
        _ => {
            cx.error(
                Some(&node.at),
                "",
                format!(
                    "expected a list (`- ` entries or `[A, B]`) here for {key}, found {}",
                    shape(node)
                ),
            );
            return None;
        }
    };
    let value = items.iter().filter_map(|i| scalar(cx, i, key)).collect();
    Some(Pos { value, at: node.at })
}

fn health_check(cx: &mut Cx, node: &Node) -> Option<Pos<Option<RawHealthCheck>>> {
    let value = match &node.kind {
        Kind::Null => None,
        _ => {
            let fields = fields(cx, node, &CHECK)?;
            Some(check(cx, fields))
        }
    };
    Some(Pos { value, at: node.at })
}

fn check(cx: &mut Cx, f: Fields) -> RawHealthCheck {
    let mut r = RawHealthCheck::default();
    for (key, v) in f.entries {
        match key {
            "interval" => r.interval = scalar(cx, v, key),
            "timeout" => r.timeout = scalar(cx, v, key),
            "rise" => r.rise = scalar(cx, v, key),
            "fall" => r.fall = scalar(cx, v, key),
            "port" => r.port = scalar(cx, v, key),
            "send" => r.send = scalar_node(cx, v, key),
            "send_hex" => r.send_hex = scalar(cx, v, key),
            "expect" => r.expect = scalar_node(cx, v, key),
            "expect_hex" => r.expect_hex = scalar(cx, v, key),
            _ => {}
        }
    }
    r
}

fn backends(
    cx: &mut Cx,
    node: &Node,
    reported: &mut Vec<&'static str>,
) -> Option<Pos<Vec<Pos<RawBackend>>>> {
    let items = match &node.kind {
        Kind::Null => return None,
        Kind::Seq(items) => items,
        _ => {
            cx.error(
                Some(&node.at),
                "",
                format!(
                    "expected a list (`- ` entries) here for backends, found {}",
                    shape(node)
                ),
            );
            reported.push("backends");
            return None;
        }
    };
    let value = (items.iter())
        .map(|item| Pos {
            value: match fields(cx, item, &BACKEND) {
                Some(f) => backend(cx, f),
                None => RawBackend::all_reported(&BACKEND),
            },
            at: item.at,
        })
        .collect();
    Some(Pos { value, at: node.at })
}

fn backend(cx: &mut Cx, f: Fields) -> RawBackend {
    let mut r = RawBackend {
        reported: f.reported,
        ..RawBackend::default()
    };
    for (key, v) in f.entries {
        match key {
            "address" => r.address = required(cx, v, key, &mut r.reported),
            "name" => r.name = scalar(cx, v, key),
            "weight" => r.weight = scalar(cx, v, key),
            "max_connections" => r.max_connections = scalar(cx, v, key),
            "backup" => r.backup = scalar(cx, v, key),
            _ => {}
        }
    }
    r
}

/// A list of single values (`accept_proxy: [10.0.0.0/8, ...]`); a single value is taken as
/// a list of one.
fn one_or_more(cx: &mut Cx, node: &Node, key: &str) -> Option<Pos<Vec<Pos<String>>>> {
    let value = match &node.kind {
        Kind::Null => return None,
        Kind::Seq(items) => items.iter().filter_map(|i| scalar(cx, i, key)).collect(),
        Kind::Scalar(_) => scalar(cx, node, key).into_iter().collect(),
        Kind::Map(_) => {
            cx.error(
                Some(&node.at),
                "",
                format!("expected a list here for {key}, found {}", shape(node)),
            );
            return None;
        }
    };
    Some(Pos { value, at: node.at })
}
