//! Active health checking: one task per backend probes it every `interval` (±10% jitter,
//! so a fleet of backends isn't probed in lockstep) and flips the backend's health atomic
//! after `rise` consecutive passes or `fall` consecutive failures.
//!
//! The first round decides at once (up after a pass, down after a failure), and
//! `Server::start` waits for it before binding listeners, so a fresh weir never sends a
//! client to a dead backend. A probe only ever writes `health`, never the operator's
//! `admin` state; while a backend is `disabled` its probes pause (the task stays).
//!
//! The control task owns the checkers' lifecycle ([`Checker`]): one per backend, so a
//! reload that keeps a pool's check leaves each surviving backend's checker, and its
//! rise/fall progress, untouched.
//!
//! Passive checking (failed connects from traffic, in `proxy/connect.rs`) can also mark a
//! backend down; the checker notices that its health changed under it and starts counting
//! passes from zero, so the backend needs `rise` fresh passes to come back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{Admin, Backend, Health};
use crate::config::{HealthCheckConfig, Protocol};
use crate::net::describe;
use crate::shutdown::Shutdown;

/// A TCP reply is searched for `expect` within this many bytes at most: a probe never
/// buffers without bound.
pub const MAX_REPLY: usize = 64 * 1024;

/// A running checker task. The control task holds one per checked backend and stops it
/// with [`Checker::stop`], which returns only once the task has ended: after it, no probe
/// of this checker can write the backend's health any more (a plain cancel only asks the
/// task to stop at its next await, and a probe that just finished could still apply its
/// result).
pub struct Checker {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Checker {
    /// Asks the task to stop; [`Checker::stopped`] waits for it.
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Waits until the task has ended (cancel first).
    pub async fn stopped(self) {
        // A panicked or aborted checker has ended too.
        let _ = self.task.await;
    }

    pub async fn stop(self) {
        self.cancel();
        self.stopped().await;
    }
}

/// Starts the checker task of one backend on the shutdown tracker; its first probe comes
/// after `first_delay` (zero at startup, where the first round is waited for; a random
/// share of the interval for a backend a reload adds, so that its probes don't all land
/// at once). It stops when accepting stops or on [`Checker::stop`]. The receiver fires
/// once the first probe has finished.
pub fn spawn_checker(
    backend: Arc<Backend>,
    config: HealthCheckConfig,
    protocol: Protocol,
    shutdown: &Shutdown,
    first_delay: Duration,
) -> (Checker, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    let stop = shutdown.stop_accepting.child_token();
    let stopping = stop.clone();
    let task = shutdown.tracker.spawn(async move {
        tokio::select! {
            () = async {
                tokio::time::sleep(first_delay).await;
                check_loop(backend, config, protocol, tx).await;
            } => {}
            () = stopping.cancelled() => {}
        }
    });
    (Checker { stop, task }, rx)
}

/// A random delay in `[0, interval)`: when a reload starts checkers, their first probes
/// are spread over one interval instead of all firing at once.
pub fn spread(interval: Duration) -> Duration {
    let nanos = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rand::random_range(0..nanos))
}

/// Waits until every first probe has finished, or `bound` has passed (each probe is
/// already bounded by its timeout; the bound only guards against surprises).
pub async fn wait_first_round(receivers: Vec<oneshot::Receiver<()>>, bound: Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    for rx in receivers {
        if tokio::time::timeout_at(deadline, rx).await.is_err() {
            tracing::warn!(
                "health: the first round of checks did not finish within {}; starting anyway",
                humantime::format_duration(bound)
            );
            return;
        }
    }
}

async fn check_loop(
    backend: Arc<Backend>,
    config: HealthCheckConfig,
    protocol: Protocol,
    first_round: oneshot::Sender<()>,
) {
    let addr = probe_addr(backend.addr, &config);
    // This checker owns the backend's health from now on.
    backend.stop_passive_retries();
    // A backend checked before (its pool's checkers restarted by a reload) goes on by
    // rise/fall: only a backend never checked lets its first probe decide at once.
    let mut counters = if backend.last_check().is_empty() {
        Counters::new(backend.health())
    } else {
        Counters::resuming(backend.health())
    };
    let mut first_round = Some(first_round);
    loop {
        if backend.take_recheck() {
            // Back from maintenance (`enable` after `disable`): what was measured before
            // is not trusted; the backend is down and the next probe decides at once.
            counters = Counters::new(backend.health());
        }
        if backend.admin() != Admin::Disabled {
            check_once(&backend, addr, &config, protocol, &mut counters).await;
        }
        if let Some(tx) = first_round.take() {
            let _ = tx.send(());
        }
        tokio::select! {
            () = tokio::time::sleep(jittered(config.interval)) => {}
            () = backend.probe_requested() => {}
        }
    }
}

/// One probe, its metrics and its verdict. weir's own exhaustion is neither a pass nor a
/// failure: it is reported (`net::report_exhaustion`) and the backend keeps its health.
async fn check_once(
    backend: &Backend,
    addr: SocketAddr,
    config: &HealthCheckConfig,
    protocol: Protocol,
    counters: &mut Counters,
) {
    let handles = &backend.metrics;
    let started = Instant::now();
    let result = probe_classified(addr, config, protocol).await;
    let took = started.elapsed();
    let result = match result {
        Err(ProbeError::Weir(e)) => {
            crate::net::report_exhaustion("health check", &e);
            backend.set_last_check(format!("skipped: weir is out of resources: {e}"));
            return;
        }
        Err(ProbeError::Backend(reason)) => Err(reason),
        Ok(()) => Ok(()),
    };
    handles.health_check_duration.record(took.as_secs_f64());
    match &result {
        Ok(()) => {
            handles.health_checks_pass.increment(1);
            backend.set_last_check(format!("pass {:.1}ms", took.as_secs_f64() * 1e3));
        }
        Err(reason) => {
            handles.health_checks_fail.increment(1);
            backend.set_last_check(format!("fail: {reason}"));
        }
    }
    let current = backend.health();
    if let Some(change) = counters.record(result.is_ok(), current, config.rise, config.fall) {
        apply(backend, change, &result);
    }
}

/// Flips the backend's health for a rise/fall transition and logs it once, with the reason.
fn apply(backend: &Backend, change: Change, result: &Result<(), String>) {
    let (pool, name) = (&backend.pool, &backend.name);
    match change {
        Change::FirstPass => {
            backend.set_health(Health::Up);
            tracing::info!(pool = %pool, backend = %name, state = "up", reason = "first check passed", "{pool}/{name} up: first check passed");
        }
        Change::FirstFail => {
            backend.mark_down();
            let reason = result.as_ref().err().map_or("", String::as_str);
            tracing::warn!(pool = %pool, backend = %name, state = "down", reason = %reason, "{pool}/{name} down: first check failed: {reason}");
        }
        Change::Up { passes } => {
            // Logged once: only the writer that actually flipped it says so.
            if backend.set_health(Health::Up) == Health::Down {
                // A backend marked down by traffic starts afresh.
                backend.record_connect_success();
                tracing::info!(
                    pool = %pool, backend = %name, state = "up", passes,
                    reason = "health checks passed",
                    "{pool}/{name} up: {passes} consecutive {}",
                    plural(passes, "pass", "passes")
                );
            }
        }
        Change::Down { failures } => {
            if backend.mark_down() {
                let reason = result.as_ref().err().map_or("", String::as_str);
                tracing::warn!(
                    pool = %pool, backend = %name, state = "down", failures, reason = %reason,
                    "{pool}/{name} down: {failures} consecutive {}, last: {reason}",
                    plural(failures, "failure", "failures")
                );
            }
        }
    }
}

fn plural<'a>(n: u32, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// The address probed: the backend's, or its host with the check's `port`.
pub fn probe_addr(backend: SocketAddr, config: &HealthCheckConfig) -> SocketAddr {
    match config.port {
        Some(port) => SocketAddr::new(backend.ip(), port),
        None => backend,
    }
}

/// `interval` ±10%.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range(0.9..=1.1))
}

/// A health transition the checker decided on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    FirstPass,
    FirstFail,
    Up { passes: u32 },
    Down { failures: u32 },
}

/// rise/fall bookkeeping, kept apart from I/O so it can be tested on its own.
#[derive(Debug)]
struct Counters {
    first: bool,
    passes: u32,
    failures: u32,
    /// The health this checker last saw or set; a different value at the next result
    /// means someone else (passive checking) changed it.
    believed: Health,
}

impl Counters {
    fn new(current: Health) -> Self {
        Counters {
            first: true,
            passes: 0,
            failures: 0,
            believed: current,
        }
    }

    /// For a backend that was checked before: no first-probe shortcut.
    fn resuming(current: Health) -> Self {
        Counters {
            first: false,
            ..Counters::new(current)
        }
    }

    fn record(&mut self, passed: bool, current: Health, rise: u32, fall: u32) -> Option<Change> {
        if current != self.believed {
            // Marked down (or up) by someone else: count from zero.
            self.passes = 0;
            self.failures = 0;
            self.believed = current;
        }
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        if std::mem::take(&mut self.first) {
            self.believed = if passed { Health::Up } else { Health::Down };
            return Some(if passed {
                Change::FirstPass
            } else {
                Change::FirstFail
            });
        }
        match current {
            Health::Down if passed && self.passes >= rise => {
                self.believed = Health::Up;
                Some(Change::Up {
                    passes: self.passes,
                })
            }
            Health::Up if !passed && self.failures >= fall => {
                self.believed = Health::Down;
                Some(Change::Down {
                    failures: self.failures,
                })
            }
            _ => None,
        }
    }
}

/// One probe of `addr`, bounded by `config.timeout`. `Err` carries an operator-facing
/// reason: "connection refused", "timed out after 1s", `reply did not contain "role:master"`.
pub async fn probe(
    addr: SocketAddr,
    config: &HealthCheckConfig,
    protocol: Protocol,
) -> Result<(), String> {
    probe_classified(addr, config, protocol)
        .await
        .map_err(|e| match e {
            ProbeError::Backend(reason) => reason,
            ProbeError::Weir(e) => format!("weir is out of resources: {e}"),
        })
}

/// Why a probe did not pass: the backend's answer (or silence), or weir's own exhaustion,
/// which says nothing about the backend and must not count as a failed check.
#[derive(Debug)]
pub enum ProbeError {
    Backend(String),
    Weir(std::io::Error),
}

impl From<String> for ProbeError {
    fn from(reason: String) -> Self {
        ProbeError::Backend(reason)
    }
}

/// A socket-level error: weir's own when it is exhaustion, else the backend's.
fn classify(e: std::io::Error) -> ProbeError {
    if crate::net::is_resource_exhaustion(&e) {
        ProbeError::Weir(e)
    } else {
        ProbeError::Backend(describe(&e))
    }
}

async fn probe_classified(
    addr: SocketAddr,
    config: &HealthCheckConfig,
    protocol: Protocol,
) -> Result<(), ProbeError> {
    let deadline = tokio::time::Instant::now() + config.timeout;
    match protocol {
        Protocol::Tcp => probe_tcp(addr, config, deadline).await,
        Protocol::Udp => probe_udp(addr, config, deadline).await,
    }
}

fn timed_out(config: &HealthCheckConfig) -> String {
    format!(
        "timed out after {}",
        humantime::format_duration(config.timeout)
    )
}

/// `expect` as the operator wrote it, quoted, with binary bytes as `\xNN`.
fn quoted(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

async fn probe_tcp(
    addr: SocketAddr,
    config: &HealthCheckConfig,
    deadline: tokio::time::Instant,
) -> Result<(), ProbeError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    let socket = socket.map_err(classify)?;
    let mut stream = tokio::time::timeout_at(deadline, socket.connect(addr))
        .await
        .map_err(|_| timed_out(config))?
        .map_err(classify)?;
    if let Some(send) = &config.send {
        tokio::time::timeout_at(deadline, stream.write_all(send))
            .await
            .map_err(|_| format!("{} sending the probe", timed_out(config)))?
            .map_err(|e| format!("sending the probe: {}", describe(&e)))?;
    }
    let Some(expect) = &config.expect else {
        return Ok(());
    };
    let mut reply = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) if reply.is_empty() => {
                return Err(format!(
                    "{} waiting for a reply containing {}",
                    timed_out(config),
                    quoted(expect)
                )
                .into());
            }
            // Many servers (Redis among them) keep the connection open after answering.
            Err(_) => {
                return Err(format!(
                    "reply did not contain {} within {}",
                    quoted(expect),
                    humantime::format_duration(config.timeout)
                )
                .into());
            }
            Ok(Err(e)) => return Err(format!("reading the reply: {}", describe(&e)).into()),
            Ok(Ok(0)) if reply.is_empty() => {
                return Err(format!(
                    "connection closed without a reply (expected {})",
                    quoted(expect)
                )
                .into());
            }
            Ok(Ok(0)) => return Err(format!("reply did not contain {}", quoted(expect)).into()),
            Ok(Ok(n)) => n,
        };
        // Only the new bytes and the tail that could complete a match are searched again.
        let from = reply.len().saturating_sub(expect.len().saturating_sub(1));
        reply.extend_from_slice(&chunk[..n]);
        if contains(&reply[from..], expect) {
            return Ok(());
        }
        if reply.len() >= MAX_REPLY {
            return Err(format!(
                "reply did not contain {} in its first {} bytes",
                quoted(expect),
                MAX_REPLY
            )
            .into());
        }
    }
}

async fn probe_udp(
    addr: SocketAddr,
    config: &HealthCheckConfig,
    deadline: tokio::time::Instant,
) -> Result<(), ProbeError> {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(classify)?;
    // Connected, so only the backend's replies arrive and an ICMP "port unreachable"
    // comes back as "connection refused".
    socket.connect(addr).await.map_err(classify)?;
    let datagram = config.send.as_deref().unwrap_or(&[]);
    tokio::time::timeout_at(deadline, socket.send(datagram))
        .await
        .map_err(|_| timed_out(config))?
        .map_err(classify)?;
    let mut buf = vec![0u8; 65536];
    let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
        Err(_) => {
            return Err(match &config.expect {
                Some(expect) => format!(
                    "{} waiting for a reply containing {}",
                    timed_out(config),
                    quoted(expect)
                ),
                None => format!("{} waiting for a reply", timed_out(config)),
            }
            .into());
        }
        Ok(Err(e)) => return Err(classify(e)),
        Ok(Ok(n)) => n,
    };
    match &config.expect {
        Some(expect) if !contains(&buf[..n], expect) => {
            Err(format!("reply did not contain {}", quoted(expect)).into())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_at_once() {
        let mut c = Counters::new(Health::Down);
        assert_eq!(c.record(true, Health::Down, 3, 3), Some(Change::FirstPass));
        let mut c = Counters::new(Health::Down);
        assert_eq!(c.record(false, Health::Down, 3, 3), Some(Change::FirstFail));
    }

    #[test]
    fn a_resumed_checker_goes_by_rise_and_fall() {
        // After a reload restarted the pool's checkers: one failed probe does not take an
        // up backend down, one pass does not bring a down one up.
        let mut c = Counters::resuming(Health::Up);
        assert_eq!(c.record(false, Health::Up, 2, 3), None);
        assert_eq!(c.record(false, Health::Up, 2, 3), None);
        assert_eq!(
            c.record(false, Health::Up, 2, 3),
            Some(Change::Down { failures: 3 })
        );
        let mut c = Counters::resuming(Health::Down);
        assert_eq!(c.record(true, Health::Down, 2, 3), None);
        assert_eq!(
            c.record(true, Health::Down, 2, 3),
            Some(Change::Up { passes: 2 })
        );
    }

    #[test]
    fn rise_and_fall_count_consecutive_results() {
        let mut c = Counters::new(Health::Down);
        c.record(true, Health::Down, 2, 3);
        // Up now. Two failures are not enough, a pass resets the count.
        assert_eq!(c.record(false, Health::Up, 2, 3), None);
        assert_eq!(c.record(false, Health::Up, 2, 3), None);
        assert_eq!(c.record(true, Health::Up, 2, 3), None);
        assert_eq!(c.record(false, Health::Up, 2, 3), None);
        assert_eq!(c.record(false, Health::Up, 2, 3), None);
        assert_eq!(
            c.record(false, Health::Up, 2, 3),
            Some(Change::Down { failures: 3 })
        );
        assert_eq!(c.record(true, Health::Down, 2, 3), None);
        assert_eq!(
            c.record(true, Health::Down, 2, 3),
            Some(Change::Up { passes: 2 })
        );
    }

    #[test]
    fn marked_down_by_traffic_needs_rise_fresh_passes() {
        let mut c = Counters::new(Health::Down);
        c.record(true, Health::Down, 3, 3);
        for _ in 0..10 {
            assert_eq!(c.record(true, Health::Up, 3, 3), None);
        }
        // Passive checking marked it down between two probes: the 11 passes so far
        // don't count.
        assert_eq!(c.record(true, Health::Down, 3, 3), None);
        assert_eq!(c.record(true, Health::Down, 3, 3), None);
        assert_eq!(
            c.record(true, Health::Down, 3, 3),
            Some(Change::Up { passes: 3 })
        );
    }

    /// A server that writes `reply` in the pieces `cuts` gives (each flushed on its own,
    /// without Nagle), then closes; the probe's verdict on `expect`.
    async fn probe_split_reply(reply: Vec<u8>, cuts: Vec<usize>, expect: Vec<u8>) -> bool {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut at = 0;
            for cut in cuts.into_iter().chain([reply.len()]) {
                let cut = cut.clamp(at, reply.len());
                if stream.write_all(&reply[at..cut]).await.is_err() {
                    return;
                }
                at = cut;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let config = HealthCheckConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            rise: 1,
            fall: 1,
            port: None,
            send: None,
            expect: Some(expect),
        };
        let deadline = tokio::time::Instant::now() + config.timeout;
        let verdict = probe_tcp(addr, &config, deadline).await.is_ok();
        server.await.unwrap();
        verdict
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// The reply is searched across reads: a needle split over any number of
        /// segments is found, and one that isn't there never is.
        #[test]
        fn expect_matches_a_reply_however_it_is_split(
            reply in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..6),
            needle in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..6),
            planted in proptest::prelude::any::<Option<proptest::sample::Index>>(),
        ) {
            let mut reply = reply;
            if let Some(at) = planted {
                let at = at.index(reply.len() + 1);
                reply.splice(at..at, needle.iter().copied());
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let wanted = contains(&reply, &needle);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let got = runtime.block_on(probe_split_reply(reply.clone(), cuts, needle.clone()));
            proptest::prop_assert_eq!(got, wanted, "reply {:?} needle {:?}", reply, needle);
        }
    }

    #[test]
    fn contains_finds_needles_anywhere() {
        assert!(contains(
            b"# Replication\r\nrole:master\r\n",
            b"role:master"
        ));
        assert!(!contains(b"role:slave", b"role:master"));
        assert!(contains(b"anything", b""));
    }

    #[test]
    fn spread_stays_within_one_interval() {
        for _ in 0..1000 {
            assert!(spread(Duration::from_millis(1000)) < Duration::from_millis(1000));
        }
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(900) && d <= Duration::from_millis(1100));
        }
    }
}
