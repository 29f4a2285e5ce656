//! The Prometheus recorder: installed once per process, with weir's histogram buckets and
//! HELP lines, over weir's own registry (`registry.rs`, which says why), so that the series
//! of a backend that is gone can be deleted ([`forget`]).
//!
//! The recorder is process-global (the `metrics` facade allows one). It is installed by the
//! first server start, before any backend is built, because handles created before it
//! exist are no-ops forever. It is installed whether or not `metrics.bind` is set: handles
//! live as long as their backend (across reloads), so a recorder installed later would
//! never see them. Several servers in one process (tests) share the recorder: their series
//! are told apart by their labels only.

use std::sync::{Arc, OnceLock};

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit, describe_counter,
    describe_gauge, describe_histogram, gauge,
};

use super::names::*;
use super::process::ProcessMetrics;
use super::registry::Registry;

/// Connect times: 100 µs (same host) to 10 s (well past any sane connect_timeout).
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Connection lifetimes: 1 ms (one request) to 4 h (pooled database connections).
pub const CONNECTION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
    7200.0, 14400.0,
];

/// Health check probes: same span as connects (a probe is a connect plus a short exchange).
pub const HEALTH_CHECK_BUCKETS: &[f64] = CONNECT_BUCKETS;

/// The installed recorder and the process-wide handles that belong to no backend.
pub struct Recorder {
    registry: Arc<Registry>,
    process: ProcessMetrics,
}

impl Recorder {
    /// The text exposition of every series, process figures brought up to date first.
    /// Blocking (reads /proc): call it off the runtime's workers.
    pub fn render(&self) -> String {
        self.process.refresh();
        self.registry.render()
    }
}

/// Deletes every series named `name` (any name when None) whose labels include all of
/// `labels`, from the installed recorder (nothing when none is installed). For series
/// nobody writes again: a backend gone for good, a limit removed.
pub fn forget(name: Option<&str>, labels: &[(&str, &str)]) {
    if let Some(Some(recorder)) = RECORDER.get() {
        recorder.registry.forget(name, labels);
    }
}

static RECORDER: OnceLock<Option<Recorder>> = OnceLock::new();

/// Installs the Prometheus recorder once per process; later calls return the same one.
/// None when another recorder was installed first (then weir's handles report elsewhere).
pub fn recorder() -> Option<&'static Recorder> {
    RECORDER.get_or_init(install).as_ref()
}

/// What the facade holds: the registry `Recorder` renders.
struct Shared(Arc<Registry>);

impl metrics::Recorder for Shared {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(key, metadata)
    }
}

fn install() -> Option<Recorder> {
    let registry = Arc::new(Registry::new(&[
        (BACKEND_CONNECT_DURATION, CONNECT_BUCKETS),
        (CONNECTION_DURATION, CONNECTION_BUCKETS),
        (HEALTH_CHECK_DURATION, HEALTH_CHECK_BUCKETS),
    ]));
    match metrics::set_global_recorder(Shared(Arc::clone(&registry))) {
        Ok(()) => {
            describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(Recorder {
                registry,
                process: ProcessMetrics::new(),
            })
        }
        Err(e) => {
            tracing::warn!("metrics: cannot install the Prometheus recorder: {e}");
            None
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric's HELP line. Metrics the health checker registers are described here
/// too, so the text is complete whichever module creates a series first.
const HELP: &[(Kind, &str, &str)] = &[
    (
        Kind::Counter,
        CONFIG_RELOADS,
        "Config reloads (SIGHUP or admin reload) by result: success or failure.",
    ),
    (
        Kind::Gauge,
        CONFIG_LAST_RELOAD_SUCCESS,
        "When the config was last reloaded successfully, Unix time.",
    ),
    (
        Kind::Gauge,
        BACKEND_UP,
        "1 when the backend is up (healthy and enabled), 0 otherwise.",
    ),
    (
        Kind::Gauge,
        BACKEND_STATE,
        "1 for the backend's current state (up, down, draining, drained, disabled, retiring), 0 for the others.",
    ),
    (Kind::Gauge, BACKEND_WEIGHT, "The backend's current weight."),
    (
        Kind::Gauge,
        BACKEND_CONNECTIONS_ACTIVE,
        "Open connections (udp: sessions) to the backend, including ones still connecting.",
    ),
    (
        Kind::Counter,
        BACKEND_CONNECTIONS,
        "Connections (udp: sessions) sent to the backend, counting failed connects too.",
    ),
    (
        Kind::Counter,
        BACKEND_CONNECT_ERRORS,
        "Connects to the backend that failed (refused, reset or timed out).",
    ),
    (
        Kind::Counter,
        BACKEND_BYTES_SENT,
        "Bytes written to the backend.",
    ),
    (
        Kind::Counter,
        BACKEND_BYTES_RECEIVED,
        "Bytes read from the backend.",
    ),
    (
        Kind::Histogram,
        BACKEND_CONNECT_DURATION,
        "Time to establish a connection to the backend (successful connects).",
    ),
    (
        Kind::Histogram,
        CONNECTION_DURATION,
        "Lifetime of proxied connections, from backend connect to close.",
    ),
    (
        Kind::Counter,
        BACKEND_CLOSED_ON_DOWN,
        "Connections (udp: sessions) closed because the backend was marked down under on_down: close.",
    ),
    (
        Kind::Counter,
        HEALTH_CHECKS,
        "Health check probes by result (pass or fail).",
    ),
    (
        Kind::Histogram,
        HEALTH_CHECK_DURATION,
        "Time a health check probe took.",
    ),
    (
        Kind::Counter,
        LISTENER_CONNECTIONS,
        "Client connections (udp: sessions) admitted by the listener.",
    ),
    (
        Kind::Gauge,
        LISTENER_CONNECTIONS_ACTIVE,
        "Client connections (udp: sessions) open on the listener.",
    ),
    (
        Kind::Counter,
        LISTENER_REJECTED,
        "Client connections closed without being proxied, by reason.",
    ),
    (
        Kind::Gauge,
        POOL_QUEUE_LENGTH,
        "Connections waiting in the pool's queue for a backend slot (backends[].max_connections, queue_timeout).",
    ),
    (
        Kind::Counter,
        UDP_DATAGRAMS,
        "UDP datagrams forwarded, by direction: to_backend (from clients) or to_client (replies).",
    ),
    (
        Kind::Counter,
        UDP_DROPPED,
        "UDP datagrams dropped, by reason: max_connections, no_backend, upstream_socket, resources, buffer_full, send_error.",
    ),
    (
        Kind::Gauge,
        LISTENER_MAX_CONNECTIONS,
        "The listener's max_connections (absent when unlimited).",
    ),
    (
        Kind::Counter,
        STATE_FILE_ERRORS,
        "Admin state file reads (at start: unreadable, empty, malformed or a symlink) and writes that failed, by op.",
    ),
    (
        Kind::Counter,
        DISCOVERY_ERRORS,
        "DNS lookups for a pool's discover that failed or found no records (the last good set is kept), by pool.",
    ),
    (
        Kind::Counter,
        RESOURCE_EXHAUSTION,
        "Operations that failed because weir ran out of file descriptors or memory (accept, connect, health check, udp socket); never counted against a backend.",
    ),
    (
        Kind::Gauge,
        BUILD_INFO,
        "Always 1; the version label says which weir is running.",
    ),
    (Kind::Gauge, PROCESS_OPEN_FDS, "Open file descriptors."),
    (
        Kind::Gauge,
        PROCESS_MAX_FDS,
        "The soft limit on open file descriptors.",
    ),
    (
        Kind::Gauge,
        PROCESS_RESIDENT_MEMORY,
        "Resident memory size.",
    ),
    (Kind::Gauge, PROCESS_VIRTUAL_MEMORY, "Virtual memory size."),
    (
        Kind::Gauge,
        PROCESS_START_TIME,
        "When the process started, in seconds since the Unix epoch.",
    ),
];

fn describe() {
    for &(kind, name, help) in HELP {
        match kind {
            Kind::Counter => describe_counter!(name, help),
            Kind::Gauge => describe_gauge!(name, help),
            Kind::Histogram => describe_histogram!(name, help),
        }
    }
}
