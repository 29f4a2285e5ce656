//! Metrics, the leaf part: every name written once ([`names`], with the recipe for adding
//! one), the handles registered once per backend, listener and process ([`handles`]), and
//! the process-wide Prometheus recorder ([`recorder`]).
//!
//! Everything derived from state rather than events (`weir_backend_up`,
//! `weir_backend_state`, process figures) is written by the HTTP endpoint's refresh task
//! (`crate::http`), which reads the control task's published tables; this module knows
//! nothing of them.

pub mod handles;
pub mod names;
mod process;
pub mod recorder;
mod registry;

pub use handles::{
    BackendMetrics, ListenerMetrics, PoolMetrics, ReloadMetrics, UdpListenerMetrics,
};
pub use recorder::{Recorder, forget, recorder};
