//! Metric handles, registered once when their owner (a backend, a listener, the control
//! task) is built. The connection path only bumps them: no lookup by name, no label
//! allocation, no lock.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::names::*;

/// Per-backend handles, created once when the backend is built.
pub struct BackendMetrics {
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
    states: [Gauge; 5],
    weight: Gauge,
}

impl BackendMetrics {
    pub fn new(pool: &str, backend: &str) -> Self {
        let labels = [("pool", pool.to_string()), ("backend", backend.to_string())];
        let state = |s: &'static str| gauge!(BACKEND_STATE, "pool" => pool.to_string(), "backend" => backend.to_string(), "state" => s);
        let check = |result: &'static str| counter!(HEALTH_CHECKS, "pool" => pool.to_string(), "backend" => backend.to_string(), "result" => result);
        BackendMetrics {
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

/// A backend that is gone (removed by a reload, its last connection closed) is no longer
/// refreshed, and the exporter cannot delete series: without this its last `up 1` would
/// stay forever and hide a pool with no backend left. It reports no state instead.
impl Drop for BackendMetrics {
    fn drop(&mut self) {
        self.up.set(0.0);
        for state in &self.states {
            state.set(0.0);
        }
    }
}

/// Per-listener handles.
pub struct ListenerMetrics {
    pub connections_total: Counter,
    pub connections_active: Gauge,
    pub rejected_no_backend: Counter,
    pub rejected_max_connections: Counter,
    /// weir was out of descriptors or memory when connecting to a backend.
    pub rejected_resources: Counter,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> Self {
        let l = listener.to_string();
        ListenerMetrics {
            connections_total: counter!(LISTENER_CONNECTIONS, "listener" => l.clone()),
            connections_active: gauge!(LISTENER_CONNECTIONS_ACTIVE, "listener" => l.clone()),
            rejected_no_backend: counter!(LISTENER_REJECTED, "listener" => l.clone(), "reason" => "no_backend"),
            rejected_max_connections: counter!(LISTENER_REJECTED, "listener" => l.clone(), "reason" => "max_connections"),
            rejected_resources: counter!(LISTENER_REJECTED, "listener" => l, "reason" => "resources"),
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

/// `weir_listener_max_connections` of one listener. A lookup by name: called once a
/// second per listener by the refresh task, off the connection path, so it follows a
/// reload that changes the limit.
pub fn listener_max_connections(listener: &str) -> Gauge {
    gauge!(LISTENER_MAX_CONNECTIONS, "listener" => listener.to_string())
}
