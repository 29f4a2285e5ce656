//! weir: a Layer-4 TCP/UDP load balancer.
pub mod backend;
pub mod balance;
pub mod config;
pub mod metrics;
pub mod pool;
