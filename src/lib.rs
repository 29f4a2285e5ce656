//! weir: a Layer-4 TCP/UDP load balancer.
//!
//! # Layout
//!
//! - `main.rs` (binary): clap → tracing → the command; exit codes live there only.
//! - [`cli`]: the commands of the contract (`run`, `check`, `ctl`, `demo`).
//! - [`config`]: YAML → serde types (unknown keys rejected, positions kept) → validation
//!   reporting every problem as `FILE:LINE:COLUMN` → the runtime [`config::Config`].
//! - [`run`]: `weir run`: start, signals (SIGTERM/SIGINT stop, SIGHUP reloads), systemd notify.
//! - [`control`]: the one writer of the routing tables: builds pools, backends and listeners,
//!   applies `set weight` and reload (a typed diff), persists admin state ([`state_file`]).
//! - [`backend`]: a backend's live state; health and admin state are separate atomics, so a
//!   probe can never undo an operator's drain. [`backend::ConnGuard`] counts connections.
//! - [`pool`]: a pool's backends and balancer, published as one immutable snapshot (`ArcSwap`).
//! - [`balance`]: the four strategies, one file each, dispatched by a plain enum.
//! - [`proxy`]: the data path: [`proxy::tcp`] accept loops, [`proxy::connect`] (timeouts,
//!   retries, passive checks), [`proxy::splice`] (both directions, half-close, resets, idle),
//!   [`proxy::udp`] (sessions per client address).
//! - [`health`]: active probes (tcp connect, send/expect over tcp or udp), rise/fall, jitter.
//! - [`admin`] and [`ctl`]: the Unix-socket admin protocol, server and client side.
//! - [`metrics`]: the Prometheus exporter, `/metrics` and `/ready`, handles registered once.
//! - [`shutdown`]: one `TaskTracker` and two tokens: stop accepting, then close what's left.
//! - [`demo`]: `weir demo`, kept apart from the core.
//!
//! # Flows
//!
//! TCP: accept (backs off on EMFILE, never exits on a transient error) → `max_connections`
//! check → the pool's snapshot picks an eligible backend (up and enabled) → connect with the
//! pool's timeout, retrying other backends → splice both ways until both sides are done, an
//! idle timeout, a half-close linger or shutdown's hard token → bytes and durations to metrics.
//!
//! UDP: one receive loop per listener owns the session table; a new client address picks a
//! backend and gets a connected upstream socket with its own reply task; a sweep expires idle
//! sessions.
//!
//! The per-connection and per-datagram path takes no lock: it loads a snapshot, reads and
//! bumps atomics, and uses metric handles registered once.

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
