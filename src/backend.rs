//! A backend: one address in a pool, with its live state.
//!
//! Health (written by the health checker and by passive connect failures) and admin state
//! (written by the operator through the admin socket) are two separate atomics, so a probe
//! can never overwrite an operator's `drain` or `disable`: the state users see is derived
//! from both at read time. A backend that survives a reload is the same `Arc<Backend>`, so
//! its counters, health and open connections carry over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::metrics::{BackendMetrics, names};
use crate::queue::WaitQueue;

/// `max_connections` of a backend without one.
pub const UNLIMITED: u64 = u64::MAX;

/// What the health checker (or passive checking) last concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Up = 0,
    Down = 1,
}

/// Passive checking: what failures from real traffic do to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Passive {
    /// This many failed connects (udp: ICMP errors) in a row mark the backend down.
    pub fall: u32,
    /// The pool has no health check, so nothing else would bring a backend marked down
    /// back: it is tried again by traffic after a backoff (1 s, doubling to 30 s), and is
    /// up again as soon as a connect to it succeeds.
    pub retry: bool,
}

/// The first wait before a backend marked down by traffic (without a health check) is
/// tried again, and the longest.
const RETRY_MIN_MS: u64 = 1_000;
const RETRY_MAX_MS: u64 = 30_000;

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Admin {
    Enabled = 0,
    /// No new connections; open ones continue; health checks go on.
    Drain = 1,
    /// Like drain, and health checks pause.
    Disabled = 2,
}

/// The state shown to users and in metrics, derived from health, admin and active count.
/// The order is that of `metrics::names::BACKEND_STATES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
    Draining,
    Drained,
    Disabled,
    /// Removed by a reload, finishing its last connections; it goes when they are done.
    Retiring,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Up,
        State::Down,
        State::Draining,
        State::Drained,
        State::Disabled,
        State::Retiring,
    ];

    /// Its name as shown and as the `state` label of `weir_backend_state`.
    pub fn as_str(self) -> &'static str {
        names::BACKEND_STATES[self as usize]
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub struct Backend {
    /// The pool's name, as in the config.
    pub pool: String,
    /// The backend's `name` (defaults to the address as written).
    pub name: String,
    /// The address as written in the config (may be a DNS name).
    pub address: String,
    /// The resolved address connections go to.
    pub addr: SocketAddr,
    weight: AtomicU32,
    health: AtomicU8,
    admin: AtomicU8,
    active: AtomicU64,
    total: AtomicU64,
    /// Consecutive failed connects from real traffic (passive health checking).
    connect_failures: AtomicU32,
    /// Marked down by traffic in a pool without a health check: from this time on
    /// (`monotonic_ms`) traffic may try it again; 0: not waiting for a retry.
    retry_at_ms: AtomicU64,
    /// How many times in a row traffic marked it down without a connect succeeding in
    /// between: the retry backoff doubles with each.
    passive_downs: AtomicU32,
    connect_errors: AtomicU64,
    /// Human-readable result of the last health check ("" before the first one).
    last_check: ArcSwap<String>,
    /// When `last_check` was written (`monotonic_ms`); 0 before the first check.
    last_check_ms: AtomicU64,
    /// When the admin state last left `Enabled` (drain, disable, or a reload's retirement),
    /// in ms on `monotonic_ms`'s clock; 0 while enabled.
    admin_since_ms: AtomicU64,
    /// The pool's `on_down: close` (written by the control task).
    close_on_down: AtomicBool,
    /// Removed by a reload, kept until its last connection closes (written by the control
    /// task). Its metrics series may be shared with a live backend of the same name.
    retiring: AtomicBool,
    /// Fired, and replaced by a fresh one, when the backend is marked down while
    /// `close_on_down` holds: every connection and session opened on it watches the one
    /// current when it started, and ends at once. Each is a child of `shutdown` (shutdown's
    /// hard token), so it fires at shutdown's end too: a TCP connection waits on this one
    /// token for both, and tells them apart with `shutdown.is_cancelled()`.
    down: ArcSwap<CancellationToken>,
    shutdown: CancellationToken,
    /// Set by `enable` after `disable` in a pool with a health check: the checker starts
    /// afresh (first probe decides); `probe_now` wakes it for that probe at once.
    recheck: AtomicBool,
    probe_now: tokio::sync::Notify,
    /// `max_connections` (`UNLIMITED` when unset), written by the control task.
    limit: AtomicU64,
    /// `backup: true`, written by the control task.
    backup: AtomicBool,
    /// The pool's `slow_start` in ms (0: off), written by the control task.
    slow_start_ms: AtomicU64,
    /// When its current slow-start ramp began (`monotonic_ms`); 0: not ramping. Set when
    /// it comes up or back into rotation, cleared by the first read after the ramp ends.
    ramp_since_ms: AtomicU64,
    /// Built from the config weir started with: its first health result is the startup
    /// round, where every backend comes up at once and a ramp would be pointless.
    startup_round: AtomicBool,
    /// A listed host name that has not resolved: `addr` is a placeholder, so it is never
    /// up (set once, before it is published; a successor replaces it once the name
    /// resolves).
    unresolved: AtomicBool,
    /// The pool's wait queue, which a released slot is handed to (set once: a backend
    /// never changes pools).
    queue: OnceLock<Arc<WaitQueue<ConnGuard>>>,
    pub metrics: BackendMetrics,
}

/// Milliseconds since the first call, on a monotonic clock (never 0 after the first ms).
fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    (start.elapsed().as_millis() as u64).saturating_add(1)
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.pool, self.name, self.addr)
    }
}

impl Backend {
    /// A new backend. `healthy` is its starting health: up when it has no health check,
    /// down until its first pass when it has one. Its down signal never fires for a
    /// shutdown (see `new_under`).
    pub fn new(
        pool: &str,
        name: &str,
        address: &str,
        addr: SocketAddr,
        weight: u32,
        healthy: bool,
    ) -> Arc<Self> {
        Self::new_under(
            &CancellationToken::new(),
            pool,
            name,
            address,
            addr,
            weight,
            healthy,
        )
    }

    /// `new`, with down signals that are children of `shutdown` (shutdown's hard token):
    /// they fire when it does.
    pub fn new_under(
        shutdown: &CancellationToken,
        pool: &str,
        name: &str,
        address: &str,
        addr: SocketAddr,
        weight: u32,
        healthy: bool,
    ) -> Arc<Self> {
        Arc::new(Backend {
            pool: pool.to_string(),
            name: name.to_string(),
            address: address.to_string(),
            addr,
            weight: AtomicU32::new(weight),
            health: AtomicU8::new(if healthy { Health::Up } else { Health::Down } as u8),
            admin: AtomicU8::new(Admin::Enabled as u8),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            retry_at_ms: AtomicU64::new(0),
            passive_downs: AtomicU32::new(0),
            connect_errors: AtomicU64::new(0),
            last_check: ArcSwap::from_pointee(String::new()),
            last_check_ms: AtomicU64::new(0),
            admin_since_ms: AtomicU64::new(0),
            close_on_down: AtomicBool::new(false),
            retiring: AtomicBool::new(false),
            down: ArcSwap::from_pointee(shutdown.child_token()),
            shutdown: shutdown.clone(),
            recheck: AtomicBool::new(false),
            probe_now: tokio::sync::Notify::new(),
            limit: AtomicU64::new(UNLIMITED),
            backup: AtomicBool::new(false),
            slow_start_ms: AtomicU64::new(0),
            ramp_since_ms: AtomicU64::new(0),
            startup_round: AtomicBool::new(false),
            unresolved: AtomicBool::new(false),
            queue: OnceLock::new(),
            metrics: BackendMetrics::new(pool, name),
        })
    }

    /// Up (or, marked down by traffic without a health check, due for a retry) and
    /// enabled: strategies pick only eligible backends.
    #[inline]
    pub fn is_eligible(&self) -> bool {
        self.admin.load(Ordering::Relaxed) == Admin::Enabled as u8
            && (self.health.load(Ordering::Relaxed) == Health::Up as u8 || self.retry_due())
    }

    /// Below its `max_connections`: one more connection fits (two relaxed loads; the
    /// slot itself is taken by `try_connect_guard`).
    #[inline]
    pub fn has_room(&self) -> bool {
        self.active.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed)
    }

    /// `max_connections`; None when unlimited.
    pub fn max_connections(&self) -> Option<u64> {
        match self.limit.load(Ordering::Relaxed) {
            UNLIMITED => None,
            n => Some(n),
        }
    }

    /// Control task only (from the config, at every snapshot build).
    pub fn set_max_connections(&self, limit: Option<u64>) {
        self.limit
            .store(limit.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    #[inline]
    pub fn is_backup(&self) -> bool {
        self.backup.load(Ordering::Relaxed)
    }

    /// Control task only (from the config, at every snapshot build).
    pub fn set_backup(&self, backup: bool) {
        self.backup.store(backup, Ordering::Relaxed);
    }

    /// The pool's wait queue; the first call wins (a backend belongs to one pool).
    pub fn attach_queue(&self, queue: &Arc<WaitQueue<ConnGuard>>) {
        let _ = self.queue.set(Arc::clone(queue));
    }

    /// Marked down by traffic in a pool without a health check, and its backoff has
    /// passed: traffic may try it (a clock read only for such a backend).
    #[cold]
    fn retry_due(&self) -> bool {
        let at = self.retry_at_ms.load(Ordering::Relaxed);
        at != 0 && monotonic_ms() >= at
    }

    /// A health checker now owns this backend's health: no retries by traffic.
    pub fn stop_passive_retries(&self) {
        self.retry_at_ms.store(0, Ordering::Relaxed);
        self.passive_downs.store(0, Ordering::Relaxed);
    }

    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Only the control task calls this, then rebuilds the pool's snapshot.
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    #[inline]
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn health(&self) -> Health {
        if self.health.load(Ordering::Relaxed) == Health::Up as u8 {
            Health::Up
        } else {
            Health::Down
        }
    }

    /// Sets health; returns the previous value. Coming up starts a slow-start ramp
    /// (unless it is the backend's first result in weir's startup round). A backend whose
    /// host name has not resolved stays down, whoever asks.
    pub fn set_health(&self, health: Health) -> Health {
        if health == Health::Up && self.is_unresolved() {
            return self.health();
        }
        let prev = self.health.swap(health as u8, Ordering::AcqRel);
        let startup = self.startup_round.swap(false, Ordering::Relaxed);
        if prev == Health::Up as u8 {
            Health::Up
        } else {
            if health == Health::Up && !startup {
                self.start_ramp();
            }
            Health::Down
        }
    }

    /// Before it is published: its host name (`address`) did not resolve, so it stays
    /// down, unchecked, until a backend at the resolved address replaces it.
    pub fn mark_unresolved(&self, why: &str) {
        self.unresolved.store(true, Ordering::Relaxed);
        self.health.store(Health::Down as u8, Ordering::Relaxed);
        self.set_last_check(format!("unresolved: {why}"));
    }

    pub fn is_unresolved(&self) -> bool {
        self.unresolved.load(Ordering::Relaxed)
    }

    /// The address for people: as written, and for a host name where it resolves now
    /// (`db.internal:5432 (10.0.0.7)`) or that it has not.
    pub fn shown_address(&self) -> String {
        if self.is_unresolved() {
            format!("{} (unresolved)", self.address)
        } else if self.address.parse::<SocketAddr>().is_ok() {
            self.address.clone()
        } else {
            format!("{} ({})", self.address, self.addr.ip())
        }
    }

    /// Where connections go; None while its host name has not resolved.
    pub fn resolved_addr(&self) -> Option<SocketAddr> {
        (!self.is_unresolved()).then_some(self.addr)
    }

    /// Server startup only: this backend's first health result (its first probe) is
    /// part of the round where all come up together, and starts no ramp.
    pub fn in_startup_round(&self) {
        self.startup_round.store(true, Ordering::Relaxed);
    }

    /// Control task only (from the pool's config, at every snapshot build).
    pub fn set_slow_start(&self, ramp: Duration) {
        let ms = u64::try_from(ramp.as_millis()).unwrap_or(u64::MAX);
        self.slow_start_ms.store(ms, Ordering::Relaxed);
        if ms == 0 {
            self.ramp_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// The backend came up or back into rotation: with `slow_start`, its share of new
    /// connections ramps from small to full from now on.
    pub fn start_ramp(&self) {
        if self.slow_start_ms.load(Ordering::Relaxed) != 0 {
            self.ramp_since_ms.store(monotonic_ms(), Ordering::Relaxed);
        }
    }

    /// In a slow-start ramp: a pick of it must pass `ramp_admits` (one relaxed load).
    #[inline]
    pub fn is_ramping(&self) -> bool {
        self.ramp_since_ms.load(Ordering::Relaxed) != 0
    }

    /// How far into its ramp it is, as (elapsed ms, ramp ms); None when not ramping (a
    /// ramp that has ended is cleared here).
    fn ramp_progress(&self) -> Option<(u64, u64)> {
        let since = self.ramp_since_ms.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let ramp = self.slow_start_ms.load(Ordering::Relaxed);
        let elapsed = monotonic_ms().saturating_sub(since);
        if ramp == 0 || elapsed >= ramp {
            // Only this ramp's own end clears it: a newer ramp keeps its start.
            let _ = (self.ramp_since_ms).compare_exchange(
                since,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return None;
        }
        Some((elapsed, ramp))
    }

    /// The weight its share follows now: its weight, or during a slow-start ramp that
    /// weight scaled linearly by the time elapsed (at least 1), as HAProxy's `slowstart`.
    pub fn effective_weight(&self) -> u32 {
        let weight = self.weight();
        match self.ramp_progress() {
            None => weight,
            Some((elapsed, ramp)) => {
                let scaled = (u64::from(weight) * elapsed).div_ceil(ramp);
                u32::try_from(scaled)
                    .unwrap_or(weight)
                    .clamp(1, weight.max(1))
            }
        }
    }

    /// A pick of this backend during its ramp is kept with the probability of how far
    /// into the ramp it is, so that its share of new connections grows linearly from small
    /// to full whatever the strategy; otherwise the pool picks another.
    ///
    /// The probability is elapsed / slow_start itself, not the rounded effective weight,
    /// so that a backend of weight 1 ramps too.
    #[cold]
    pub fn ramp_admits(&self) -> bool {
        match self.ramp_progress() {
            None => true,
            Some((elapsed, ramp)) => rand::random_range(0..ramp) < elapsed,
        }
    }

    /// How far into its slow-start ramp it is, in percent; None when not ramping.
    pub fn ramp_percent(&self) -> Option<u8> {
        let (elapsed, ramp) = self.ramp_progress()?;
        Some(u8::try_from(elapsed * 100 / ramp).unwrap_or(100))
    }

    pub fn admin(&self) -> Admin {
        match self.admin.load(Ordering::Relaxed) {
            0 => Admin::Enabled,
            1 => Admin::Drain,
            _ => Admin::Disabled,
        }
    }

    /// Back into rotation (enable after drain or disable) while up starts a slow-start
    /// ramp; after `disable` with a health check, the probe that brings it up does.
    pub fn set_admin(&self, admin: Admin) {
        let was = self.admin.swap(admin as u8, Ordering::AcqRel);
        if admin == Admin::Enabled {
            if was != Admin::Enabled as u8 && self.health() == Health::Up {
                self.start_ramp();
            }
            self.admin_since_ms.store(0, Ordering::Relaxed);
        } else if was == Admin::Enabled as u8 {
            self.admin_since_ms.store(monotonic_ms(), Ordering::Relaxed);
        }
    }

    /// `enable` of a backend whose pool has a health check: back in rotation only once a
    /// probe passes, since health measured before a `disable` (probes paused) is not
    /// trusted. It shows `down` now and its checker probes at once. Returns the admin
    /// state it had.
    pub fn enable_rechecked(&self) -> Admin {
        let was = self.admin();
        if was == Admin::Disabled {
            self.set_health(Health::Down);
            self.recheck.store(true, Ordering::Release);
        }
        self.set_admin(Admin::Enabled);
        if was == Admin::Disabled {
            self.probe_now.notify_one();
        }
        was
    }

    /// For the checker: whether it must start afresh (see `enable_rechecked`).
    pub fn take_recheck(&self) -> bool {
        self.recheck.swap(false, Ordering::AcqRel)
    }

    /// For the checker: resolves when someone asks for a probe now.
    pub async fn probe_requested(&self) {
        self.probe_now.notified().await;
    }

    /// How long ago the backend left rotation by an operator's drain or disable (or a
    /// reload's retirement); None while enabled.
    pub fn out_of_rotation_for(&self) -> Option<Duration> {
        match self.admin_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(monotonic_ms().saturating_sub(since))),
        }
    }

    /// The pool's `on_down` setting: with `true`, being marked down ends every open
    /// connection and session at once.
    pub fn set_close_on_down(&self, close: bool) {
        self.close_on_down.store(close, Ordering::Relaxed);
    }

    /// Control task only: removed by a reload (and kept until its last connection closes),
    /// or back in the config.
    pub fn set_retiring(&self, retiring: bool) {
        self.retiring.store(retiring, Ordering::Relaxed);
    }

    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::Relaxed)
    }

    /// What a connection or session opened now watches: fired when this backend is
    /// marked down under `on_down: close`, and when shutdown's hard token fires (for a
    /// backend made by `new_under`). One `ArcSwap` load per connection.
    pub fn down_signal(&self) -> CancellationToken {
        CancellationToken::clone(&self.down.load())
    }

    /// Marks the backend down (health checker or passive checking); returns true when it
    /// was up. Under `on_down: close` its open connections and sessions end now.
    pub fn mark_down(&self) -> bool {
        let was_up = self.set_health(Health::Down) == Health::Up;
        if was_up && self.close_on_down.load(Ordering::Relaxed) {
            let fired = self.down.swap(Arc::new(self.shutdown.child_token()));
            fired.cancel();
        }
        was_up
    }

    pub fn state(&self) -> State {
        if self.is_retiring() {
            return State::Retiring;
        }
        match self.admin() {
            Admin::Disabled => State::Disabled,
            Admin::Drain if self.active() > 0 => State::Draining,
            Admin::Drain => State::Drained,
            Admin::Enabled if self.health() == Health::Up => State::Up,
            Admin::Enabled => State::Down,
        }
    }

    pub fn last_check(&self) -> Arc<String> {
        self.last_check.load_full()
    }

    /// How long ago the last health check ended; None before the first.
    pub fn last_check_age(&self) -> Option<Duration> {
        match self.last_check_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(monotonic_ms().saturating_sub(at))),
        }
    }

    pub fn set_last_check(&self, result: String) {
        self.last_check_ms.store(monotonic_ms(), Ordering::Relaxed);
        self.last_check.store(Arc::new(result));
    }

    /// Failed connects to this backend so far (what `weir_backend_connect_errors_total` shows).
    pub fn metrics_connect_errors(&self) -> u64 {
        self.connect_errors.load(Ordering::Relaxed)
    }

    /// A connect from real traffic failed: counted; returns the consecutive failures so far.
    fn record_connect_failure(&self) -> u32 {
        self.metrics.connect_errors.increment(1);
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
        self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Passive checking, the one rule for TCP connects and UDP sends: a failure from real
    /// traffic is counted, and `passive.fall` of them in a row mark the backend down at
    /// once. With a health check the probes bring it back; without one, traffic tries it
    /// again after a backoff (`Passive::retry`). `what` names the failures in the log line
    /// ("failed connects from traffic"). Returns true when this call marked it down.
    ///
    /// Never call this for weir's own exhaustion (`net::is_resource_exhaustion`): that
    /// says nothing about the backend.
    pub fn connect_failed(&self, passive: Passive, what: &str, reason: &str) -> bool {
        let failures = self.record_connect_failure();
        if failures < passive.fall {
            return false;
        }
        let retry = passive.retry.then(|| {
            let downs = self.passive_downs.fetch_add(1, Ordering::Relaxed).min(5);
            let backoff = (RETRY_MIN_MS << downs).min(RETRY_MAX_MS);
            self.retry_at_ms
                .store(monotonic_ms() + backoff, Ordering::Relaxed);
            Duration::from_millis(backoff)
        });
        let marked_down = self.mark_down();
        if marked_down {
            let again = retry.map_or(String::new(), |b| {
                format!("; tried again in {}", humantime::format_duration(b))
            });
            tracing::warn!(
                pool = %self.pool,
                backend = %self.name,
                state = "down",
                failures,
                reason = %reason,
                "{}/{} down: {failures} consecutive {what}, last: {reason}{again}",
                self.pool,
                self.name
            );
        }
        marked_down
    }

    /// A connect from real traffic (udp: a reply) succeeded. A backend that traffic
    /// marked down without a health check is up again.
    pub fn record_connect_success(&self) {
        if self.connect_failures.load(Ordering::Relaxed) != 0 {
            self.connect_failures.store(0, Ordering::Relaxed);
        }
        if self.retry_at_ms.load(Ordering::Relaxed) != 0 {
            self.stop_passive_retries();
            if self.set_health(Health::Up) == Health::Down {
                tracing::info!(
                    pool = %self.pool,
                    backend = %self.name,
                    state = "up",
                    reason = "a connect from traffic succeeded",
                    "{}/{} up: a connect from traffic succeeded",
                    self.pool,
                    self.name
                );
            }
        }
    }

    /// Counts a new connection (or UDP session) against this backend until the guard drops,
    /// whatever its `max_connections` (udp sessions; see `try_connect_guard`).
    pub fn connect_guard(self: &Arc<Self>) -> ConnGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.counted_new()
    }

    /// Takes one of its `max_connections` slots, or None when they are all taken (a race
    /// with another pick since `has_room`). Lock-free: a compare-and-swap on `active`.
    pub fn try_connect_guard(self: &Arc<Self>) -> Option<ConnGuard> {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == UNLIMITED {
            return Some(self.connect_guard());
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(self.counted_new())
    }

    fn counted_new(self: &Arc<Self>) -> ConnGuard {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.metrics.connections_total.increment(1);
        self.metrics.connections_active.increment(1.0);
        ConnGuard {
            backend: Arc::clone(self),
            armed: true,
        }
    }

    /// A slot being released may go to a queued connection instead: the backend still
    /// takes new connections (never one drained, down, retiring or over a lowered limit).
    /// Not a backup's: whether it may take one depends on the primaries, so its freed
    /// slot is left to the oldest waiter's own pick (`proxy::tcp`'s head retry).
    fn may_pass_slot_on(&self) -> bool {
        !self.is_backup()
            && self.is_eligible()
            && !self.is_retiring()
            && self.active.load(Ordering::Relaxed) <= self.limit.load(Ordering::Relaxed)
    }
}

/// Holds one `active` count on a backend; released on every path by `Drop`, or, for a
/// backend with `max_connections` while connections wait in its pool's queue, handed on
/// to the oldest of them.
pub struct ConnGuard {
    backend: Arc<Backend>,
    /// False once its count has been passed on (or never held).
    armed: bool,
}

impl ConnGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Hands this slot to the pool's oldest waiter; true when one took it.
    #[cold]
    fn pass_on(&self, queue: &WaitQueue<ConnGuard>) -> bool {
        let slot = ConnGuard {
            backend: Arc::clone(&self.backend),
            armed: true,
        };
        match queue.hand_off(slot) {
            Ok(()) => {
                self.backend.total.fetch_add(1, Ordering::Relaxed);
                self.backend.metrics.connections_total.increment(1);
                true
            }
            Err(mut slot) => {
                slot.armed = false;
                false
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let b = &self.backend;
        if b.limit.load(Ordering::Relaxed) != UNLIMITED
            && let Some(queue) = b.queue.get()
            && !queue.is_empty()
            && b.may_pass_slot_on()
            && self.pass_on(queue)
        {
            return;
        }
        b.active.fetch_sub(1, Ordering::Relaxed);
        b.metrics.connections_active.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_name_themselves_by_the_metrics_state_label_in_order() {
        assert_eq!(State::ALL.len(), names::BACKEND_STATES.len());
        for (i, state) in State::ALL.into_iter().enumerate() {
            assert_eq!(state as usize, i);
            assert_eq!(state.as_str(), names::BACKEND_STATES[i]);
        }
    }

    #[test]
    fn a_retiring_backend_is_retiring_whatever_its_admin_state() {
        let b = Backend::new(
            "p",
            "b",
            "127.0.0.1:1",
            "127.0.0.1:1".parse().unwrap(),
            1,
            true,
        );
        let _open = b.connect_guard();
        b.set_admin(Admin::Drain);
        assert_eq!(b.state(), State::Draining);
        b.set_retiring(true);
        assert_eq!(b.state(), State::Retiring);
        b.set_admin(Admin::Disabled);
        assert_eq!(b.state(), State::Retiring);
        b.set_retiring(false);
        assert_eq!(b.state(), State::Disabled);
    }
}
