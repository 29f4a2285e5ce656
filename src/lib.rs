//! weir: a Layer-4 TCP/UDP load balancer.
//!
//! # Layers (bottom up; a module uses only those below it, `../shared/tools/shape` checks
//! that there is no circle)
//!
//! 1. Leaf types: [`config`] (YAML → serde types → validation → the runtime `Config`),
//!    [`backend`] (live state; health and admin state as separate atomics, so a probe can
//!    never undo an operator's drain), [`metrics`] (every name once, handles registered
//!    once, the recorder), [`queue`] (a pool's first-come-first-served wait for a backend
//!    slot), [`net`] (bind, keepalive, accept with backoff, socket-error
//!    classes), [`shutdown`], [`slots`] (admin clients at once; the oldest idle one makes
//!    room), [`proxy_protocol`] (PROXY v1/v2 headers, parsed and written).
//! 2. Picking: [`balance`] (one file per strategy; `Strategy` owns its names), [`pool`]
//!    (backends and balancer as one immutable snapshot).
//! 3. Data path: [`proxy`] (tcp accept, connect + retries, splice, udp sessions), [`health`]
//!    (probes, rise/fall), [`discover`] (DNS lookups for `discover`, reported to control).
//! 4. The one writer: [`control`] (the task and its handle; reload as a plan computed by a
//!    pure function, then applied), [`tables`] (the read side everyone else looks at).
//! 5. Edges: [`server`] (startup wiring), [`info`] (`show info`), [`admin`] (the Unix-socket protocol), [`http`]
//!    (`/metrics`, `/ready`, the status page), [`state_file`].
//! 6. Commands: [`run`], [`check`], [`ctl`], [`demo`], [`cli`]; `main.rs` holds the exit codes.
//!
//! # Flows
//!
//! TCP: `net::accept_loop` (backs off on EMFILE, never exits on a transient error) →
//! `Listener::admit` checks `max_connections` and takes the **listener guard** (listener
//! active/total) → the pool's snapshot picks an eligible backend (up and enabled) →
//! `Backend::connect_guard` takes the **`ConnGuard`** (backend active/total) →
//! `proxy::connect` connects with the pool's timeout, retrying other backends, and records
//! the **connect duration** (or a connect error, which feeds passive checking) →
//! `proxy::splice` moves bytes both ways, bumping the **splice byte counters**
//! (`weir_backend_bytes_sent_total`/`_received_total`) as they pass, until both sides are
//! done, an idle timeout, a half-close timeout, a reset, the backend's down signal
//! (`on_down: close`) or shutdown's hard token → `proxy::tcp`
//! records the **connection duration**; dropping the guards releases the active counts.
//!
//! UDP: one receive loop per socket (one per worker thread) owns its session table; a new
//! client address is admitted (listener guard), picks a backend (`ConnGuard`) and gets a
//! connected upstream socket with its own reply task; datagram counters are bumped per
//! datagram; a sweep expires idle sessions.
//!
//! Control: the admin socket, reload (SIGHUP or admin) and the health checker either flip
//! one atomic of a backend or send the control task a message; only the control task
//! publishes new tables and pool snapshots.
//!
//! The per-connection and per-datagram path takes no lock: it loads a snapshot, reads and
//! bumps atomics, and uses metric handles registered once.

pub mod admin;
pub mod backend;
pub mod balance;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod discover;
pub mod health;
pub mod http;
pub mod info;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod queue;
pub mod run;
pub mod server;
pub mod shutdown;
pub mod slots;
pub mod state_file;
pub mod tables;
