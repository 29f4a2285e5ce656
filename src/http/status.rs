//! The status page (`GET /`) and its data (`GET /status.json`): listeners, pools and their
//! backends, and the process, as an operator coming from HAProxy's stats page expects. Read
//! only: it changes nothing and has no buttons. Plain server-rendered HTML with its CSS
//! inline, refreshing itself every 5 s; no script, nothing fetched from anywhere else.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::backend::Backend;
use crate::control::ControlHandle;
use crate::info::Info;
use crate::metrics::names::LISTENER_REJECTED;

#[derive(Serialize)]
pub struct Status {
    pub process: Info,
    pub listeners: Vec<ListenerStatus>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub protocol: &'static str,
    pub bind: String,
    pub pool: String,
    pub active: u64,
    pub total: u64,
    pub max_connections: Option<usize>,
    /// `weir_listener_rejected_total` by reason (only reasons that happened).
    pub rejected: BTreeMap<String, u64>,
}

#[derive(Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub strategy: &'static str,
    pub queued: usize,
    pub backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub name: String,
    /// As written in the config (may be a host name).
    pub address: String,
    /// Where connections go; null while a host name has not resolved.
    pub resolved: Option<String>,
    /// For the page: the address with where a host name resolves now.
    #[serde(skip)]
    pub shown_address: String,
    pub state: &'static str,
    pub weight: u32,
    pub effective_weight: u32,
    pub backup: bool,
    pub active: u64,
    pub max_connections: Option<u64>,
    pub total: u64,
    pub connect_errors: u64,
    pub last_check: Option<String>,
    /// How long ago that check ended, in ms.
    pub last_check_age_ms: Option<u64>,
}

impl BackendStatus {
    fn of(b: &Backend) -> BackendStatus {
        let last = b.last_check();
        BackendStatus {
            name: b.name.clone(),
            address: b.address.clone(),
            resolved: b.resolved_addr().map(|a| a.to_string()),
            shown_address: b.shown_address(),
            state: b.state().as_str(),
            weight: b.weight(),
            effective_weight: b.effective_weight(),
            backup: b.is_backup(),
            active: b.active(),
            max_connections: b.max_connections(),
            total: b.total(),
            connect_errors: b.metrics_connect_errors(),
            last_check: (!last.is_empty()).then(|| last.to_string()),
            last_check_age_ms: b.last_check_age().map(|a| a.as_millis() as u64),
        }
    }
}

/// The rejections per listener and reason, read back from the rendered metrics (the
/// counters are write-only handles; the exposition is their one readable form).
fn rejections(metrics: &str) -> BTreeMap<(String, String), u64> {
    let label = |line: &str, key: &str| -> Option<String> {
        let start = line.find(&format!("{key}=\""))? + key.len() + 2;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_string())
    };
    (metrics.lines())
        .filter(|l| {
            l.starts_with(LISTENER_REJECTED)
                && l.as_bytes().get(LISTENER_REJECTED.len()) == Some(&b'{')
        })
        .filter_map(|l| {
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some(((label(l, "listener")?, label(l, "reason")?), value))
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

impl Status {
    /// Everything now; `metrics` is the rendered exposition (for the rejection counts).
    pub fn of(control: &ControlHandle, metrics: &str) -> Status {
        let tables = control.tables();
        let rejected = rejections(metrics);
        let listeners = (tables.listeners.values())
            .map(|l| ListenerStatus {
                name: l.name.clone(),
                protocol: l.protocol.as_str(),
                bind: l.bind.to_string(),
                pool: l.pool.load().name.clone(),
                active: l.active(),
                total: l.total(),
                max_connections: l.max_connections(),
                rejected: (rejected.iter())
                    .filter(|((listener, _), _)| *listener == l.name)
                    .map(|((_, reason), n)| (reason.clone(), *n))
                    .collect(),
            })
            .collect();
        let pools = (tables.pools.values())
            .map(|p| {
                let snapshot = p.snapshot();
                PoolStatus {
                    name: p.name.clone(),
                    strategy: snapshot.strategy.as_str(),
                    queued: p.queue.len(),
                    backends: snapshot
                        .backends
                        .iter()
                        .map(|b| BackendStatus::of(b))
                        .collect(),
                }
            })
            .collect();
        Status {
            process: Info::of(control),
            listeners,
            pools,
        }
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into()) + "\n"
    }

    pub fn html(&self) -> String {
        let mut page = String::with_capacity(8 * 1024);
        page.push_str(HEAD);
        self.process_html(&mut page);
        self.listeners_html(&mut page);
        for pool in &self.pools {
            pool_html(&mut page, pool);
        }
        page.push_str("<p class=\"foot\">Read only; refreshes every 5 s. The same as JSON: <a href=\"/status.json\">/status.json</a>, metrics: <a href=\"/metrics\">/metrics</a>.</p>\n</body>\n</html>\n");
        page
    }

    fn process_html(&self, page: &mut String) {
        let p = &self.process;
        let load = match &p.load_error {
            None => format!("<span class=\"ok\">ok</span> at {}", escape(&p.loaded_at)),
            Some(e) => format!(
                "<span class=\"bad\">failed</span> at {}: {}",
                escape(&p.loaded_at),
                escape(e)
            ),
        };
        let fds = match (p.fds_open, p.fds_max) {
            (Some(open), Some(max)) => format!("{open} of {max}"),
            (Some(open), None) => open.to_string(),
            _ => "-".into(),
        };
        let _ = write!(
            page,
            "<h1>weir {version}</h1>\n<table class=\"kv\">\n<tr><th>pid</th><td>{pid}</td><th>uptime</th><td>{uptime}</td><th>config</th><td>{config}</td></tr>\n<tr><th>last (re)load</th><td colspan=\"3\">{load} ({reloads} reloads)</td><th>file descriptors</th><td>{fds}</td></tr>\n<tr><th>open connections</th><td>{conns}</td><th>udp sessions</th><td>{udp}</td><th>listeners / pools / backends</th><td>{l} / {po} / {b}</td></tr>\n</table>\n",
            version = escape(p.version),
            pid = p.pid,
            uptime = humantime::format_duration(std::time::Duration::from_secs(p.uptime_seconds)),
            config = escape(p.config_file.as_deref().unwrap_or("-")),
            reloads = p.reloads,
            conns = p.connections,
            udp = p.udp_sessions,
            l = p.listeners,
            po = p.pools,
            b = p.backends,
        );
    }

    fn listeners_html(&self, page: &mut String) {
        page.push_str("<h2>Listeners</h2>\n<table>\n<tr><th>listener</th><th>protocol</th><th>bind</th><th>pool</th><th>active</th><th>max</th><th>total</th><th>rejected</th></tr>\n");
        for l in &self.listeners {
            let rejected = if l.rejected.is_empty() {
                "-".to_string()
            } else {
                (l.rejected.iter())
                    .map(|(reason, n)| format!("{}: {n}", escape(reason)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{rejected}</td></tr>",
                escape(&l.name),
                l.protocol,
                escape(&l.bind),
                escape(&l.pool),
                l.active,
                l.max_connections.map_or("-".into(), |m| m.to_string()),
                l.total,
            );
        }
        page.push_str("</table>\n");
    }
}

fn pool_html(page: &mut String, pool: &PoolStatus) {
    let _ = write!(
        page,
        "<h2>Pool {} <small>{} · queued {}</small></h2>\n<table>\n<tr><th>backend</th><th>address</th><th>state</th><th>weight</th><th>effective</th><th>active</th><th>max</th><th>total</th><th>connect errors</th><th>last check</th></tr>\n",
        escape(&pool.name),
        pool.strategy,
        pool.queued
    );
    for b in &pool.backends {
        let _ = writeln!(
            page,
            "<tr><td>{name}{backup}</td><td>{address}</td><td class=\"state {state}\">{state}</td><td>{weight}</td><td>{eff}</td><td>{active}</td><td>{max}</td><td>{total}</td><td>{errors}</td><td>{last}</td></tr>",
            name = escape(&b.name),
            backup = if b.backup {
                " <small>(backup)</small>"
            } else {
                ""
            },
            address = escape(&b.shown_address),
            state = b.state,
            weight = b.weight,
            eff = b.effective_weight,
            active = b.active,
            max = b.max_connections.map_or("-".into(), |m| m.to_string()),
            total = b.total,
            errors = b.connect_errors,
            last = last_check_cell(b),
        );
    }
    page.push_str("</table>\n");
}

/// The last check's result and how long ago it ended ("pass 0.2ms, 1.3 s ago").
fn last_check_cell(b: &BackendStatus) -> String {
    match (&b.last_check, b.last_check_age_ms) {
        (Some(result), Some(ms)) => format!("{}, {:.1} s ago", escape(result), ms as f64 / 1e3),
        (Some(result), None) => escape(result),
        _ => "-".to_string(),
    }
}

/// Text for HTML: every character that could end an element or attribute, escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The state colours follow `State` (checked by a test below).
const HEAD: &str = "<!doctype html>
<html lang=\"en\">
<head>
<meta charset=\"utf-8\">
<meta http-equiv=\"refresh\" content=\"5\">
<title>weir status</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .5em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
h2 small, td small { color: #666; font-weight: normal; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; font-weight: 600; }
table.kv th { background: #fafafa; }
td.state { font-weight: 600; color: white; }
td.up { background: #2e7d32; }
td.down { background: #c62828; }
td.draining, td.drained { background: #ef6c00; }
td.disabled { background: #757575; }
td.retiring { background: #6a1b9a; }
.ok { color: #2e7d32; font-weight: 600; }
.bad { color: #c62828; font-weight: 600; }
.foot { color: #666; margin-top: 2em; }
</style>
</head>
<body>
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::State;

    #[test]
    fn every_state_has_a_colour_and_text_is_escaped() {
        for state in State::ALL {
            assert!(HEAD.contains(&format!("td.{}", state.as_str())), "{state}");
        }
        assert_eq!(
            escape("<b a=\"1\">&'"),
            "&lt;b a=&quot;1&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn rejections_are_read_back_per_listener_and_reason() {
        let text = "# TYPE weir_listener_rejected_total counter\n\
            weir_listener_rejected_total{listener=\"pg\",reason=\"max_connections\"} 3\n\
            weir_listener_rejected_total{listener=\"pg\",reason=\"no_backend\"} 0\n\
            weir_listener_rejected_totalx{listener=\"pg\",reason=\"x\"} 9\n";
        let got = rejections(text);
        assert_eq!(got.len(), 1);
        assert_eq!(got[&("pg".to_string(), "max_connections".to_string())], 3);
    }
}
