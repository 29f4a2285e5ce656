//! Metrics: handles registered once per backend and listener, so the connection path
//! never looks a metric up by name or allocates labels.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Per-backend handles, created once when the backend is built.
pub struct BackendMetrics {
    pub connections_total: Counter,
    pub connections_active: Gauge,
    pub connect_errors: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub connect_duration: Histogram,
    pub connection_duration: Histogram,
}

impl BackendMetrics {
    pub fn new(pool: &str, backend: &str) -> Self {
        let labels = [("pool", pool.to_string()), ("backend", backend.to_string())];
        BackendMetrics {
            connections_total: counter!("weir_backend_connections_total", &labels),
            connections_active: gauge!("weir_backend_connections_active", &labels),
            connect_errors: counter!("weir_backend_connect_errors_total", &labels),
            bytes_sent: counter!("weir_backend_bytes_sent_total", &labels),
            bytes_received: counter!("weir_backend_bytes_received_total", &labels),
            connect_duration: histogram!("weir_backend_connect_duration_seconds", &labels),
            connection_duration: histogram!("weir_connection_duration_seconds", &labels),
        }
    }
}

/// Per-listener handles.
pub struct ListenerMetrics {
    pub connections_total: Counter,
    pub connections_active: Gauge,
    pub rejected_no_backend: Counter,
    pub rejected_max_connections: Counter,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> Self {
        let l = listener.to_string();
        ListenerMetrics {
            connections_total: counter!("weir_listener_connections_total", "listener" => l.clone()),
            connections_active: gauge!("weir_listener_connections_active", "listener" => l.clone()),
            rejected_no_backend: counter!("weir_listener_rejected_total", "listener" => l.clone(), "reason" => "no_backend"),
            rejected_max_connections: counter!("weir_listener_rejected_total", "listener" => l, "reason" => "max_connections"),
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
            datagrams_to_backend: counter!("weir_udp_datagrams_total", "listener" => l.clone(), "direction" => "to_backend"),
            datagrams_to_client: counter!("weir_udp_datagrams_total", "listener" => l.clone(), "direction" => "to_client"),
            dropped: drop_reasons
                .iter()
                .map(|reason| counter!("weir_udp_dropped_total", "listener" => l.clone(), "reason" => *reason))
                .collect(),
        }
    }
}
