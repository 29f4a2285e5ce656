//! Metrics: handles registered once per backend and listener, the Prometheus recorder,
//! and the `/metrics` endpoint.
//!
//! The connection path only bumps handles held by `Backend` and `Listener` (registered
//! once, when those are built): no lookup by name, no label allocation, no lock. Everything
//! derived from state rather than events — `weir_backend_up`, `weir_backend_state`, process
//! figures — is written by a refresh task once a second and again right before each render,
//! from the control task's published tables.
//!
//! The recorder is process-global (the `metrics` facade allows one). It is installed by the
//! first `Server::start`, before any backend is built, because handles created before it
//! exist are no-ops forever. It is installed whether or not `metrics.bind` is set: handles
//! live as long as their backend (across reloads), so a recorder installed later would
//! never see them. Only the HTTP endpoint depends on the config; the upkeep task keeps
//! histogram memory bounded when nobody scrapes. Several servers in one process (tests)
//! share the recorder: their series are told apart by their labels only.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::State;
use crate::control::{ControlHandle, Tables};
use crate::shutdown::Shutdown;

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

/// How often derived gauges are refreshed without a scrape.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How often histogram samples are folded into their buckets without a scrape, so memory
/// stays bounded when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Per-backend handles, created once when the backend is built.
pub struct BackendMetrics {
    pub connections_total: Counter,
    pub connections_active: Gauge,
    pub connect_errors: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub connect_duration: Histogram,
    pub connection_duration: Histogram,
    /// For the health checker: `weir_health_checks_total{result="pass"}` and `"fail"`,
    /// and how long each probe took.
    pub health_checks_pass: Counter,
    pub health_checks_fail: Counter,
    pub health_check_duration: Histogram,
    /// Written by the refresh task only (derived from `Backend::state()`).
    up: Gauge,
    /// One per `State::ALL`, in that order.
    states: [Gauge; 5],
    weight: Gauge,
}

impl BackendMetrics {
    pub fn new(pool: &str, backend: &str) -> Self {
        let labels = [("pool", pool.to_string()), ("backend", backend.to_string())];
        let state = |s: State| gauge!("weir_backend_state", "pool" => pool.to_string(), "backend" => backend.to_string(), "state" => s.as_str());
        BackendMetrics {
            connections_total: counter!("weir_backend_connections_total", &labels),
            connections_active: gauge!("weir_backend_connections_active", &labels),
            connect_errors: counter!("weir_backend_connect_errors_total", &labels),
            bytes_sent: counter!("weir_backend_bytes_sent_total", &labels),
            bytes_received: counter!("weir_backend_bytes_received_total", &labels),
            connect_duration: histogram!("weir_backend_connect_duration_seconds", &labels),
            connection_duration: histogram!("weir_connection_duration_seconds", &labels),
            health_checks_pass: counter!("weir_health_checks_total", "pool" => pool.to_string(), "backend" => backend.to_string(), "result" => "pass"),
            health_checks_fail: counter!("weir_health_checks_total", "pool" => pool.to_string(), "backend" => backend.to_string(), "result" => "fail"),
            health_check_duration: histogram!("weir_health_check_duration_seconds", &labels),
            up: gauge!("weir_backend_up", &labels),
            states: State::ALL.map(state),
            weight: gauge!("weir_backend_weight", &labels),
        }
    }
}

/// A backend that is gone (removed by a reload, its last connection closed) is no longer
/// refreshed, and the exporter cannot delete series: without this its last `up 1` would
/// stay forever and hide a pool with no backend left. It reports no state instead.
impl Drop for BackendMetrics {
    fn drop(&mut self) {
        self.up.set(0.0);
        for state in &self.states {
            state.set(0.0);
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

/// The installed recorder and the process-wide handles that belong to no backend.
struct Recorder {
    handle: PrometheusHandle,
    process: ProcessMetrics,
}

static RECORDER: OnceLock<Option<Recorder>> = OnceLock::new();

/// Installs the Prometheus recorder once per process; later calls return the same one.
/// None when another recorder was installed first (then weir's handles report elsewhere).
fn recorder() -> Option<&'static Recorder> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("weir_backend_connect_duration_seconds".into()),
                    CONNECT_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("weir_connection_duration_seconds".into()),
                        CONNECTION_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("weir_health_check_duration_seconds".into()),
                        HEALTH_CHECK_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty");
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    gauge!("weir_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
                    Some(Recorder {
                        handle,
                        process: ProcessMetrics::new(),
                    })
                }
                Err(e) => {
                    tracing::warn!("metrics: cannot install the Prometheus recorder: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// The HELP lines. Metrics the health checker registers are described here too, so the
/// text is complete whichever module creates a series first.
fn describe() {
    describe_counter!(
        "weir_config_reloads_total",
        "Config reloads (SIGHUP or admin reload) by result: success or failure."
    );
    describe_gauge!(
        "weir_config_last_reload_success_timestamp_seconds",
        "When the config was last reloaded successfully, Unix time."
    );
    describe_gauge!(
        "weir_backend_up",
        "1 when the backend is up (healthy and enabled), 0 otherwise."
    );
    describe_gauge!(
        "weir_backend_state",
        "1 for the backend's current state (up, down, draining, drained, disabled), 0 for the others."
    );
    describe_gauge!("weir_backend_weight", "The backend's current weight.");
    describe_gauge!(
        "weir_backend_connections_active",
        "Open connections (udp: sessions) to the backend, including ones still connecting."
    );
    describe_counter!(
        "weir_backend_connections_total",
        "Connections (udp: sessions) sent to the backend, counting failed connects too."
    );
    describe_counter!(
        "weir_backend_connect_errors_total",
        "Connects to the backend that failed (refused, reset or timed out)."
    );
    describe_counter!(
        "weir_backend_bytes_sent_total",
        "Bytes written to the backend."
    );
    describe_counter!(
        "weir_backend_bytes_received_total",
        "Bytes read from the backend."
    );
    describe_histogram!(
        "weir_backend_connect_duration_seconds",
        "Time to establish a connection to the backend (successful connects)."
    );
    describe_histogram!(
        "weir_connection_duration_seconds",
        "Lifetime of proxied connections, from backend connect to close."
    );
    describe_counter!(
        "weir_health_checks_total",
        "Health check probes by result (pass or fail)."
    );
    describe_histogram!(
        "weir_health_check_duration_seconds",
        "Time a health check probe took."
    );
    describe_counter!(
        "weir_listener_connections_total",
        "Client connections (udp: sessions) admitted by the listener."
    );
    describe_gauge!(
        "weir_listener_connections_active",
        "Client connections (udp: sessions) open on the listener."
    );
    describe_counter!(
        "weir_listener_rejected_total",
        "Client connections closed without being proxied, by reason."
    );
    describe_counter!(
        "weir_udp_datagrams_total",
        "UDP datagrams forwarded, by direction: to_backend (from clients) or to_client (replies)."
    );
    describe_counter!(
        "weir_udp_dropped_total",
        "UDP datagrams dropped, by reason: max_connections, no_backend, upstream_socket, buffer_full, send_error."
    );
    describe_gauge!(
        "weir_listener_max_connections",
        "The listener's max_connections (absent when unlimited)."
    );
    describe_gauge!(
        "weir_build_info",
        "Always 1; the version label says which weir is running."
    );
    describe_gauge!("process_open_fds", "Open file descriptors.");
    describe_gauge!(
        "process_max_fds",
        "The soft limit on open file descriptors."
    );
    describe_gauge!("process_resident_memory_bytes", "Resident memory size.");
    describe_gauge!("process_virtual_memory_bytes", "Virtual memory size.");
    describe_gauge!(
        "process_start_time_seconds",
        "When the process started, in seconds since the Unix epoch."
    );
}

/// Writes the gauges derived from state: backend up/state/weight, listener limits.
fn refresh_tables(tables: &Tables) {
    for pool in tables.pools.values() {
        for backend in &pool.snapshot().backends {
            let state = backend.state();
            let m = &backend.metrics;
            m.up.set(if state == State::Up { 1.0 } else { 0.0 });
            for (gauge, s) in m.states.iter().zip(State::ALL) {
                gauge.set(if s == state { 1.0 } else { 0.0 });
            }
            m.weight.set(f64::from(backend.weight()));
        }
    }
    for listener in tables.listeners.values() {
        if let Some(max) = listener.max_connections() {
            // A lookup by name, once a second per listener: off the connection path, and it
            // follows a reload that changes the limit.
            gauge!("weir_listener_max_connections", "listener" => listener.name.clone())
                .set(max as f64);
        }
    }
}

/// Everything a scrape needs, brought up to date, then rendered. Blocking (reads /proc).
fn render(recorder: &Recorder, control: &ControlHandle) -> String {
    refresh_tables(&control.tables());
    recorder.process.refresh();
    recorder.handle.render()
}

/// The metrics side of a server: the recorder, and the endpoint's socket when configured.
pub struct Exporter {
    recorder: Option<&'static Recorder>,
    socket: Option<TcpListener>,
}

impl Exporter {
    /// Installs the recorder (once per process) and binds `bind` when set. Call first in
    /// `Server::start`: a bind failure is a startup error, before any listener runs.
    pub fn new(bind: Option<SocketAddr>) -> anyhow::Result<Exporter> {
        let recorder = recorder();
        let socket = match bind {
            None => None,
            Some(addr) => {
                if recorder.is_none() {
                    anyhow::bail!(
                        "metrics.bind {addr}: another metrics recorder is installed in this process"
                    );
                }
                let socket = crate::proxy::tcp::bind(addr)
                    .map_err(|e| anyhow::anyhow!("metrics.bind {addr}: cannot bind: {e}"))?;
                Some(socket)
            }
        };
        Ok(Exporter { recorder, socket })
    }

    /// Starts the refresh/upkeep task and, when bound, the `/metrics` endpoint; both stop
    /// on `stop_accepting` (a task left in the tracker would hold shutdown for the whole
    /// grace period). Returns the endpoint's address.
    pub fn start(self, control: ControlHandle, shutdown: &Shutdown) -> Option<SocketAddr> {
        let recorder = self.recorder?;
        shutdown.tracker.spawn(refresh_loop(
            recorder,
            control.clone(),
            shutdown.stop_accepting.clone(),
        ));
        let socket = self.socket?;
        let addr = socket.local_addr().ok()?;
        tracing::info!("serving metrics on http://{addr}/metrics");
        shutdown.tracker.spawn(serve(
            socket,
            recorder,
            control,
            shutdown.stop_accepting.clone(),
            shutdown.tracker.clone(),
        ));
        Some(addr)
    }
}

async fn refresh_loop(
    recorder: &'static Recorder,
    control: ControlHandle,
    stop: CancellationToken,
) {
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = refresh.tick() => refresh_tables(&control.tables()),
            _ = upkeep.tick() => recorder.handle.run_upkeep(),
        }
    }
}

// The endpoint: a deliberately tiny HTTP/1.0-style server (read one request head, answer,
// close). One path and one method don't justify hyper and its dependency tree; Prometheus
// and curl speak this just fine, and every bound below is explicit.

/// A request head larger than this is refused.
const MAX_REQUEST: usize = 8 * 1024;
/// A client must send its request head within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// And read the answer within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once; more are closed at once.
const MAX_CLIENTS: usize = 32;

async fn serve(
    socket: TcpListener,
    recorder: &'static Recorder,
    control: ControlHandle,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = socket.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of descriptors, or the client gave up: pause briefly rather than spin.
                tracing::debug!("metrics: accept: {e}");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&clients).try_acquire_owned() else {
            continue;
        };
        let control = control.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = stop.cancelled() => {}
                r = answer(stream, recorder, control) => if let Err(e) = r {
                    tracing::debug!("metrics: {e}");
                },
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    recorder: &'static Recorder,
    control: ControlHandle,
) -> io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", b"").await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()), // silent client: just close
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if path == "/ready" && (method == "GET" || method == "HEAD") {
        // The endpoint starts only once every listener is bound, which is after the first
        // health-check round, and stops when shutdown begins: answering means ready.
        return respond(
            &mut stream,
            "200 OK",
            "text/plain; charset=utf-8",
            b"ready\n",
        )
        .await;
    }
    if path != "/metrics" {
        return respond(
            &mut stream,
            "404 Not Found",
            "text/plain; charset=utf-8",
            b"not found: metrics are at /metrics\n",
        )
        .await;
    }
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            b"use GET\n",
        )
        .await;
    }
    // Rendering walks every series and reads /proc: keep it off the runtime's workers.
    let body = tokio::task::spawn_blocking(move || render(recorder, &control))
        .await
        .map_err(io::Error::other)?;
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    if method == "HEAD" {
        // The same head as GET (Content-Length included), no body.
        return respond_head(&mut stream, "200 OK", content_type, body.len(), b"").await;
    }
    respond(&mut stream, "200 OK", content_type, body.as_bytes()).await
}

/// Reads up to the blank line ending the request head. None: too large.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // EOF before a blank line: answer what we have (`printf 'GET /metrics' | nc`).
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    respond_head(stream, status, content_type, body.len(), body).await
}

/// Writes a head announcing `length` bytes, then `body`, then closes our side.
async fn respond_head(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    length: usize,
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client too slow to read"))?
}

/// Process figures read from /proc (Linux); elsewhere these series are simply absent.
struct ProcessMetrics {
    #[cfg(target_os = "linux")]
    open_fds: Gauge,
    #[cfg(target_os = "linux")]
    max_fds: Gauge,
    #[cfg(target_os = "linux")]
    resident: Gauge,
    #[cfg(target_os = "linux")]
    virtual_memory: Gauge,
}

#[cfg(target_os = "linux")]
impl ProcessMetrics {
    fn new() -> Self {
        let p = ProcessMetrics {
            open_fds: gauge!("process_open_fds"),
            max_fds: gauge!("process_max_fds"),
            resident: gauge!("process_resident_memory_bytes"),
            virtual_memory: gauge!("process_virtual_memory_bytes"),
        };
        if let Some(start) = proc_stat().and_then(|s| s.start_time_seconds()) {
            gauge!("process_start_time_seconds").set(start);
        }
        p.refresh();
        p
    }

    fn refresh(&self) {
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Minus one: the descriptor read_dir itself holds open.
            self.open_fds.set(dir.count().saturating_sub(1) as f64);
        }
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        if let Some(max) = limit.current {
            self.max_fds.set(max as f64);
        }
        if let Some(stat) = proc_stat() {
            self.resident
                .set((stat.rss_pages * rustix::param::page_size() as u64) as f64);
            self.virtual_memory.set(stat.vsize_bytes as f64);
        }
    }
}

#[cfg(not(target_os = "linux"))]
impl ProcessMetrics {
    fn new() -> Self {
        ProcessMetrics {}
    }

    fn refresh(&self) {}
}

/// The few fields of /proc/self/stat weir exports.
#[cfg(target_os = "linux")]
struct ProcStat {
    /// Clock ticks after boot.
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

#[cfg(target_os = "linux")]
fn proc_stat() -> Option<ProcStat> {
    parse_proc_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

#[cfg(target_os = "linux")]
fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may hold spaces or ')': fields
    // are counted from after its last ')'. The first one after it is field 3 (state).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        start_ticks: field(22)?,
        vsize_bytes: field(23)?,
        rss_pages: field(24)?,
    })
}

#[cfg(target_os = "linux")]
impl ProcStat {
    fn start_time_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let boot: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let ticks = rustix::param::clock_ticks_per_second();
        Some(boot as f64 + self.start_ticks as f64 / ticks as f64)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let text = "4242 (we ir) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 4 0 \
                    123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let stat = parse_proc_stat(text).unwrap();
        assert_eq!(stat.start_ticks, 123456);
        assert_eq!(stat.vsize_bytes, 987654321);
        assert_eq!(stat.rss_pages, 2048);
    }

    #[test]
    fn this_process_has_sane_figures() {
        let stat = proc_stat().unwrap();
        assert!(stat.rss_pages > 0);
        let start = stat.start_time_seconds().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(start <= now + 1.0 && start > now - 86400.0 * 365.0);
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
