//! Every metric name weir exports, written once.
//!
//! # Adding a metric
//!
//! 1. Add its name here, next to its kin (`weir_` + what it counts + a unit suffix:
//!    `_total` for counters, `_seconds`, `_bytes`).
//! 2. Describe it in `recorder::describe` (the HELP line), and give a histogram its buckets
//!    in `recorder::install`.
//! 3. Register its handle once, where its owner is built (`handles.rs`: per backend, per
//!    listener, per process), never per connection; the data path only bumps handles.
//! 4. Add it to the README's metrics table and docs/monitoring.md.

pub const CONFIG_RELOADS: &str = "weir_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESS: &str = "weir_config_last_reload_success_timestamp_seconds";

pub const BACKEND_UP: &str = "weir_backend_up";
pub const BACKEND_STATE: &str = "weir_backend_state";
pub const BACKEND_WEIGHT: &str = "weir_backend_weight";
pub const BACKEND_CONNECTIONS_ACTIVE: &str = "weir_backend_connections_active";
pub const BACKEND_CONNECTIONS: &str = "weir_backend_connections_total";
pub const BACKEND_CONNECT_ERRORS: &str = "weir_backend_connect_errors_total";
pub const BACKEND_BYTES_SENT: &str = "weir_backend_bytes_sent_total";
pub const BACKEND_BYTES_RECEIVED: &str = "weir_backend_bytes_received_total";
pub const BACKEND_CONNECT_DURATION: &str = "weir_backend_connect_duration_seconds";
pub const CONNECTION_DURATION: &str = "weir_connection_duration_seconds";
pub const BACKEND_CLOSED_ON_DOWN: &str = "weir_backend_closed_on_down_total";
pub const HEALTH_CHECKS: &str = "weir_health_checks_total";
pub const HEALTH_CHECK_DURATION: &str = "weir_health_check_duration_seconds";

pub const LISTENER_CONNECTIONS: &str = "weir_listener_connections_total";
pub const LISTENER_CONNECTIONS_ACTIVE: &str = "weir_listener_connections_active";
pub const LISTENER_REJECTED: &str = "weir_listener_rejected_total";
pub const LISTENER_MAX_CONNECTIONS: &str = "weir_listener_max_connections";
pub const POOL_QUEUE_LENGTH: &str = "weir_pool_queue_length";
pub const UDP_DATAGRAMS: &str = "weir_udp_datagrams_total";
pub const UDP_DROPPED: &str = "weir_udp_dropped_total";

pub const STATE_FILE_ERRORS: &str = "weir_state_file_errors_total";
pub const DISCOVERY_ERRORS: &str = "weir_discovery_errors_total";
pub const RESOURCE_EXHAUSTION: &str = "weir_resource_exhaustion_total";
pub const BUILD_INFO: &str = "weir_build_info";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";

/// The values of `weir_backend_state`'s `state` label, in `backend::State`'s order.
pub const BACKEND_STATES: [&str; 6] = ["up", "down", "draining", "drained", "disabled", "retiring"];
