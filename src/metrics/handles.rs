//! Metric handles, registered once when their owner (a backend, a listener, the control
//! task) is built. The connection path only bumps them: no lookup by name, no label
//! allocation, no lock.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::names::*;

/// How many live `BackendMetrics` write the series of each (pool, backend name). A series
/// is named by its labels only, so a backend that a reload moves to another address under
/// the same name shares its predecessor's series while that one retires: the one that
/// goes must leave them alone when a successor still owns them.
static OWNERS: Mutex<BTreeMap<(String, String), usize>> = Mutex::new(BTreeMap::new());

/// Per-backend handles, created once when the backend is built.
pub struct BackendMetrics {
    /// (pool, backend name): the labels, the key in `OWNERS`.
    owner: (String, String),
    pub connections_total: Counter,
    pub connections_active: Gauge,
    pub connect_errors: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub connect_duration: Histogram,
    pub connection_duration: Histogram,
    /// For the health checker: `weir_health_checks_total{result="pass"}` and `"fail"`,
    /// and how long each probe took.
    pub health_checks_pass: Counter,
    pub health_checks_fail: Counter,
    pub health_check_duration: Histogram,
    /// Connections (udp: sessions) ended because the backend was marked down under
    /// `on_down: close`.
    pub closed_on_down: Counter,
    /// Written by the refresh task only (`show_state`).
    up: Gauge,
    /// One per `BACKEND_STATES`, in that order.
    states: [Gauge; BACKEND_STATES.len()],
    weight: Gauge,
}

impl BackendMetrics {
    pub fn new(pool: &str, backend: &str) -> Self {
        let labels = [("pool", pool.to_string()), ("backend", backend.to_string())];
        let state = |s: &'static str| gauge!(BACKEND_STATE, "pool" => pool.to_string(), "backend" => backend.to_string(), "state" => s);
        let check = |result: &'static str| counter!(HEALTH_CHECKS, "pool" => pool.to_string(), "backend" => backend.to_string(), "result" => result);
        let owner = (pool.to_string(), backend.to_string());
        let mut owners = OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
        *owners.entry(owner.clone()).or_insert(0) += 1;
        BackendMetrics {
            owner,
            connections_total: counter!(BACKEND_CONNECTIONS, &labels),
            connections_active: gauge!(BACKEND_CONNECTIONS_ACTIVE, &labels),
            connect_errors: counter!(BACKEND_CONNECT_ERRORS, &labels),
            bytes_sent: counter!(BACKEND_BYTES_SENT, &labels),
            bytes_received: counter!(BACKEND_BYTES_RECEIVED, &labels),
            connect_duration: histogram!(BACKEND_CONNECT_DURATION, &labels),
            connection_duration: histogram!(CONNECTION_DURATION, &labels),
            health_checks_pass: check("pass"),
            health_checks_fail: check("fail"),
            health_check_duration: histogram!(HEALTH_CHECK_DURATION, &labels),
            closed_on_down: counter!(BACKEND_CLOSED_ON_DOWN, &labels),
            up: gauge!(BACKEND_UP, &labels),
            states: BACKEND_STATES.map(state),
            weight: gauge!(BACKEND_WEIGHT, &labels),
        }
    }

    /// The derived gauges: `state` indexes `BACKEND_STATES` (0 is `up`).
    pub fn show_state(&self, state: usize, weight: u32) {
        self.up.set(if state == 0 { 1.0 } else { 0.0 });
        for (i, gauge) in self.states.iter().enumerate() {
            gauge.set(if i == state { 1.0 } else { 0.0 });
        }
        self.weight.set(f64::from(weight));
    }
}

/// A backend that is gone (removed by a reload or by discovery, its last connection
/// closed; its pool removed; its server stopped) takes its series with it: left behind they
/// would grow memory and scrape size with every reload, and its last `up 1` would hide a
/// pool with no backend left. Not while another live backend of the same pool and name
/// (moved to a new address) still owns them.
impl Drop for BackendMetrics {
    fn drop(&mut self) {
        let mut owners = OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
        let left = match owners.get_mut(&self.owner) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left > 0 {
            return;
        }
        owners.remove(&self.owner);
        // Under the lock: a successor registering now gets fresh series, not ones deleted
        // under it. This backend's own handles go with it and write nothing more.
        let (pool, backend) = &self.owner;
        super::recorder::forget(None, &[("pool", pool), ("backend", backend)]);
    }
}

/// Per-listener handles.
pub struct ListenerMetrics {
    pub connections_total: Counter,
    pub connections_active: Gauge,
    pub rejected_no_backend: Counter,
    pub rejected_max_connections: Counter,
    /// Every eligible backend was at its `max_connections` (and no queue, or it was full).
    pub rejected_backend_full: Counter,
    /// Waited in the pool's queue for `queue_timeout` without a slot.
    pub rejected_queue_timeout: Counter,
    /// weir was out of descriptors or memory when connecting to a backend.
    pub rejected_resources: Counter,
    /// `accept_proxy`: a missing, malformed or late PROXY header from a trusted source, or
    /// one from a source that is not.
    pub rejected_proxy_header: Counter,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> Self {
        let l = listener.to_string();
        ListenerMetrics {
            connections_total: counter!(LISTENER_CONNECTIONS, "listener" => l.clone()),
            connections_active: gauge!(LISTENER_CONNECTIONS_ACTIVE, "listener" => l.clone()),
            rejected_no_backend: counter!(LISTENER_REJECTED, "listener" => l.clone(), "reason" => "no_backend"),
            rejected_max_connections: counter!(LISTENER_REJECTED, "listener" => l.clone(), "reason" => "max_connections"),
            rejected_backend_full: counter!(LISTENER_REJECTED, "listener" => l.clone(), "reason" => "backend_full"),
            rejected_queue_timeout: counter!(LISTENER_REJECTED, "listener" => l.clone(), "reason" => "queue_timeout"),
            rejected_resources: counter!(LISTENER_REJECTED, "listener" => l.clone(), "reason" => "resources"),
            rejected_proxy_header: counter!(LISTENER_REJECTED, "listener" => l, "reason" => "proxy_header"),
        }
    }
}

/// Per-UDP-listener handles: datagrams forwarded each way and datagrams dropped, by reason.
/// Registered once when the listener is built; the datagram path only increments them.
pub struct UdpListenerMetrics {
    /// `weir_udp_datagrams_total{direction="to_backend"}`: client datagrams sent upstream.
    pub datagrams_to_backend: Counter,
    /// `weir_udp_datagrams_total{direction="to_client"}`: backend replies sent to clients.
    pub datagrams_to_client: Counter,
    /// `weir_udp_dropped_total{reason}`, one handle per reason, in the caller's order.
    pub dropped: Vec<Counter>,
}

impl UdpListenerMetrics {
    pub fn new(listener: &str, drop_reasons: &[&'static str]) -> Self {
        let l = listener.to_string();
        UdpListenerMetrics {
            datagrams_to_backend: counter!(UDP_DATAGRAMS, "listener" => l.clone(), "direction" => "to_backend"),
            datagrams_to_client: counter!(UDP_DATAGRAMS, "listener" => l.clone(), "direction" => "to_client"),
            dropped: drop_reasons
                .iter()
                .map(|reason| counter!(UDP_DROPPED, "listener" => l.clone(), "reason" => *reason))
                .collect(),
        }
    }
}

/// The control task's reload counters.
pub struct ReloadMetrics {
    success: Counter,
    failure: Counter,
    last_success: Gauge,
}

impl Default for ReloadMetrics {
    fn default() -> Self {
        ReloadMetrics {
            success: counter!(CONFIG_RELOADS, "result" => "success"),
            failure: counter!(CONFIG_RELOADS, "result" => "failure"),
            last_success: gauge!(CONFIG_LAST_RELOAD_SUCCESS),
        }
    }
}

impl ReloadMetrics {
    pub fn record(&self, ok: bool) {
        if ok {
            self.success.increment(1);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.last_success.set(now.as_secs_f64());
        } else {
            self.failure.increment(1);
        }
    }
}

/// Live pools by name, counted like `OWNERS`: the same name may be served twice at once
/// (a reload's new pool before the old one goes; two servers in one test process).
static POOL_OWNERS: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Per-pool handles, created once when the pool is built; a pool that is gone takes its
/// series with it (as `BackendMetrics` does).
pub struct PoolMetrics {
    pool: String,
    /// `weir_pool_queue_length`.
    pub queue_length: Gauge,
}

impl PoolMetrics {
    pub fn new(pool: &str) -> Self {
        let mut owners = POOL_OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
        *owners.entry(pool.to_string()).or_insert(0) += 1;
        PoolMetrics {
            pool: pool.to_string(),
            queue_length: gauge!(POOL_QUEUE_LENGTH, "pool" => pool.to_string()),
        }
    }
}

impl Drop for PoolMetrics {
    fn drop(&mut self) {
        let mut owners = POOL_OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
        let left = owners.get_mut(&self.pool).map_or(0, |n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left > 0 {
            return;
        }
        owners.remove(&self.pool);
        super::recorder::forget(Some(POOL_QUEUE_LENGTH), &[("pool", &self.pool)]);
    }
}

/// `weir_listener_max_connections` of one listener. A lookup by name: called once a
/// second per listener by the refresh task, off the connection path, so it follows a
/// reload that changes the limit.
pub fn listener_max_connections(listener: &str) -> Gauge {
    gauge!(LISTENER_MAX_CONNECTIONS, "listener" => listener.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up_of(text: &str, pool: &str) -> Option<String> {
        let prefix = format!("weir_backend_up{{pool=\"{pool}\",backend=\"m\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::to_string)
    }

    #[test]
    fn a_backend_that_goes_leaves_the_series_a_live_namesake_owns() {
        let recorder = super::super::recorder().expect("the recorder installs");
        let old = BackendMetrics::new("handles_p", "m");
        let new = BackendMetrics::new("handles_p", "m");
        new.show_state(0, 1);
        drop(old);
        let text = recorder.render();
        assert_eq!(up_of(&text, "handles_p").as_deref(), Some("1"), "{text}");
        drop(new);
        let text = recorder.render();
        assert!(!text.contains("pool=\"handles_p\""), "{text}");
    }
}
