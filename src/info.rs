//! `show info`: the instance at a glance — version, pid, uptime, config file and its last
//! (re)load, what is configured, what is open, file descriptors against their limit.

use std::time::{Duration, SystemTime};

use crate::config::Protocol;
use crate::control::ControlHandle;

/// `show info --json`; the text form shows the same, one `key: value` a line.
#[derive(serde::Serialize)]
pub struct Info {
    pub version: &'static str,
    pub pid: u32,
    pub uptime_seconds: u64,
    /// None: started without one (tests, `weir demo`).
    pub config_file: Option<String>,
    /// The last load or reload attempt, RFC 3339 UTC.
    pub loaded_at: String,
    pub load_ok: bool,
    /// Why the last reload failed (the config before it stays in force).
    pub load_error: Option<String>,
    pub reloads: u64,
    pub listeners: usize,
    pub pools: usize,
    pub backends: usize,
    /// Open client connections of tcp listeners.
    pub connections: u64,
    pub udp_sessions: u64,
    /// None where /proc is not there.
    pub fds_open: Option<u64>,
    pub fds_max: Option<u64>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Open file descriptors (Linux: /proc/self/fd).
fn open_fds() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    // Minus one: the descriptor read_dir itself holds open.
    Some((dir.count() as u64).saturating_sub(1))
}

fn max_fds() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

impl Info {
    pub fn of(control: &ControlHandle) -> Info {
        let tables = control.tables();
        let load = control.load_status();
        let open = |protocol: Protocol| {
            let listeners = tables.listeners.values();
            listeners
                .filter(|l| l.protocol == protocol)
                .map(|l| l.active())
                .sum()
        };
        Info {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            uptime_seconds: load.started_at.elapsed().as_secs(),
            config_file: control
                .config_path
                .as_ref()
                .map(|p| p.display().to_string()),
            loaded_at: rfc3339(load.at),
            load_ok: load.error.is_none(),
            load_error: load.error.clone(),
            reloads: load.reloads,
            listeners: tables.listeners.len(),
            pools: tables.pools.len(),
            backends: tables.backends().len(),
            connections: open(Protocol::Tcp),
            udp_sessions: open(Protocol::Udp),
            fds_open: open_fds(),
            fds_max: max_fds(),
        }
    }

    pub fn text(&self) -> String {
        let or_dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let load = match &self.load_error {
            None => format!("{} (ok)", self.loaded_at),
            Some(e) => format!(
                "{} (failed, the config before stays in force: {})",
                self.loaded_at,
                e.lines().next().unwrap_or_default()
            ),
        };
        let uptime = humantime::format_duration(Duration::from_secs(self.uptime_seconds));
        let rows = [
            ("version", self.version.to_string()),
            ("pid", self.pid.to_string()),
            ("uptime", uptime.to_string()),
            (
                "config file",
                self.config_file.clone().unwrap_or("-".into()),
            ),
            ("last load", load),
            ("reloads", self.reloads.to_string()),
            ("listeners", self.listeners.to_string()),
            ("pools", self.pools.to_string()),
            ("backends", self.backends.to_string()),
            ("connections", self.connections.to_string()),
            ("udp sessions", self.udp_sessions.to_string()),
            (
                "file descriptors",
                format!("{} of {}", or_dash(self.fds_open), or_dash(self.fds_max)),
            ),
        ];
        rows.iter()
            .map(|(k, v)| format!("{:<18}{v}\n", format!("{k}:")))
            .collect()
    }
}
