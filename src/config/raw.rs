//! The config as parsed from YAML: exactly the keys of the contract, every value kept
//! with its position. Scalars are read as strings and converted during validation, so
//! that a bad number or duration is one collected problem instead of the end of
//! deserialization.

use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_saphyr::{MessageFormatter, Spanned};

use super::diag::Cx;

pub(super) type Pos<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a weir config: a mapping with listeners, pools and optionally admin, metrics, shutdown_timeout"
)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) admin: Option<Pos<RawAdmin>>,
    #[serde(default)]
    pub(super) metrics: Option<Pos<RawMetrics>>,
    #[serde(default)]
    pub(super) shutdown_timeout: Option<Pos<String>>,
    #[serde(default)]
    pub(super) listeners: Option<Pos<NamedMap<RawListener>>>,
    #[serde(default)]
    pub(super) pools: Option<Pos<NamedMap<RawPool>>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "admin settings: a mapping with socket, state_file"
)]
pub(super) struct RawAdmin {
    #[serde(default)]
    pub(super) socket: Option<Pos<String>>,
    #[serde(default)]
    pub(super) state_file: Option<Pos<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "metrics settings: a mapping with bind"
)]
pub(super) struct RawMetrics {
    #[serde(default)]
    pub(super) bind: Option<Pos<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a listener: a mapping with bind, pool and optionally protocol, max_connections, idle_timeout"
)]
pub(super) struct RawListener {
    #[serde(default)]
    pub(super) bind: Option<Pos<String>>,
    #[serde(default)]
    pub(super) protocol: Option<Pos<String>>,
    #[serde(default)]
    pub(super) pool: Option<Pos<String>>,
    #[serde(default)]
    pub(super) max_connections: Option<Pos<String>>,
    #[serde(default)]
    pub(super) idle_timeout: Option<Pos<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a pool: a mapping with backends and optionally strategy, connect_timeout, retries, health_check"
)]
pub(super) struct RawPool {
    #[serde(default)]
    pub(super) strategy: Option<Pos<String>>,
    #[serde(default)]
    pub(super) connect_timeout: Option<Pos<String>>,
    #[serde(default)]
    pub(super) retries: Option<Pos<String>>,
    /// `health_check:` with no value (null) means a check with every default.
    #[serde(default, deserialize_with = "present")]
    pub(super) health_check: Option<Pos<Option<RawHealthCheck>>>,
    #[serde(default)]
    pub(super) backends: Option<Pos<Vec<Pos<RawBackend>>>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a health check: a mapping with any of interval, timeout, rise, fall, port, send, send_hex, expect"
)]
pub(super) struct RawHealthCheck {
    #[serde(default)]
    pub(super) interval: Option<Pos<String>>,
    #[serde(default)]
    pub(super) timeout: Option<Pos<String>>,
    #[serde(default)]
    pub(super) rise: Option<Pos<String>>,
    #[serde(default)]
    pub(super) fall: Option<Pos<String>>,
    #[serde(default)]
    pub(super) port: Option<Pos<String>>,
    #[serde(default)]
    pub(super) send: Option<Pos<String>>,
    #[serde(default)]
    pub(super) send_hex: Option<Pos<String>>,
    #[serde(default)]
    pub(super) expect: Option<Pos<String>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backend: a mapping with address and optionally name, weight"
)]
pub(super) struct RawBackend {
    #[serde(default)]
    pub(super) address: Option<Pos<String>>,
    #[serde(default)]
    pub(super) name: Option<Pos<String>>,
    #[serde(default)]
    pub(super) weight: Option<Pos<String>>,
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
pub(super) struct NamedMap<T>(pub(super) Vec<(Pos<String>, Pos<Option<T>>)>);

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

impl Cx<'_> {
    pub(super) fn yaml_error(&mut self, e: &serde_saphyr::Error) {
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

/// The config text as raw types, or None (with the problem recorded) when it is not YAML
/// of the right shape or is empty.
pub(super) fn read(cx: &mut Cx, text: &str) -> Option<RawConfig> {
    match serde_saphyr::from_str::<Option<RawConfig>>(text) {
        Ok(Some(raw)) => Some(raw),
        Ok(None) => {
            cx.error(
                None,
                "",
                "the config is empty: it needs at least `listeners` and `pools`",
            );
            None
        }
        Err(e) => {
            cx.yaml_error(&e);
            None
        }
    }
}

/// Only `admin.socket`, ignoring every other key; Err (recorded) when the text is not YAML.
pub(super) fn read_admin_socket(cx: &mut Cx, text: &str) -> Result<Option<String>, ()> {
    #[derive(Deserialize)]
    struct Only {
        admin: Option<Admin>,
    }
    #[derive(Deserialize)]
    struct Admin {
        socket: Option<String>,
    }
    match serde_saphyr::from_str::<Option<Only>>(text) {
        Ok(only) => Ok(only.and_then(|o| o.admin).and_then(|a| a.socket)),
        Err(e) => {
            cx.yaml_error(&e);
            Err(())
        }
    }
}
