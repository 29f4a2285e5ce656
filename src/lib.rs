//! weir: a Layer-4 TCP/UDP load balancer.
pub mod admin;
pub mod backend;
pub mod balance;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod run;
pub mod shutdown;
pub mod state_file;
