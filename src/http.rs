//! The HTTP endpoint on `metrics.bind`: `GET /metrics` (Prometheus text format) and
//! `GET /ready`, plus the refresh task that writes the gauges derived from state (backend
//! up/state/weight, listener limits) from the control task's published tables, once a
//! second and again right before each render.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::control::ControlHandle;
use crate::metrics::names::LISTENER_MAX_CONNECTIONS;
use crate::metrics::{self, Recorder, handles::listener_max_connections, recorder};
use crate::net;
use crate::shutdown::Shutdown;
use crate::tables::Tables;

/// How often derived gauges are refreshed without a scrape.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// What writes the gauges derived from state, for one server: its tables, and the
/// listeners whose `max_connections` it last published.
struct Refresher {
    control: ControlHandle,
    /// Listener names with a `weir_listener_max_connections` series from this server: one
    /// whose limit a reload removed, or that a reload removed, loses its series.
    limited: Mutex<BTreeSet<String>>,
}

impl Refresher {
    fn refresh(&self) {
        let tables = self.control.tables();
        refresh_backends(&tables);
        let mut limited = self.limited.lock().unwrap_or_else(PoisonError::into_inner);
        let now = refresh_listeners(&tables);
        for gone in limited.difference(&now) {
            metrics::forget(Some(LISTENER_MAX_CONNECTIONS), &[("listener", gone)]);
        }
        *limited = now;
    }
}

/// Writes each listener's `max_connections`; returns the names of those that have one.
fn refresh_listeners(tables: &Tables) -> BTreeSet<String> {
    let mut limited = BTreeSet::new();
    for listener in tables.listeners.values() {
        if let Some(max) = listener.max_connections() {
            listener_max_connections(&listener.name).set(max as f64);
            limited.insert(listener.name.clone());
        }
    }
    limited
}

/// Writes the gauges derived from backend state: up/state/weight.
///
/// A backend's series are named by pool and backend name, so a backend that a reload moved
/// to another address shares them with its retiring predecessor until that one's last
/// connection closes: the series show the live backend only (a retiring one writes them
/// only while no live backend of its pool has its name).
fn refresh_backends(tables: &Tables) {
    for pool in tables.pools.values() {
        let snapshot = pool.snapshot();
        let succeeded = |retiring: &Backend| {
            snapshot
                .backends
                .iter()
                .any(|b| !b.is_retiring() && b.name == retiring.name)
        };
        for backend in &snapshot.backends {
            if backend.is_retiring() && succeeded(backend) {
                continue;
            }
            backend
                .metrics
                .show_state(backend.state() as usize, backend.weight());
        }
    }
}

/// Everything a scrape needs, brought up to date, then rendered. Blocking (reads /proc).
fn render(recorder: &Recorder, refresher: &Refresher) -> String {
    refresher.refresh();
    recorder.render()
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
                let socket = net::bind_tcp(addr)
                    .map_err(|e| anyhow::anyhow!("metrics.bind {addr}: cannot bind: {e}"))?;
                Some(socket)
            }
        };
        Ok(Exporter { recorder, socket })
    }

    /// The address `/metrics` is bound on (None without `metrics.bind`).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.socket.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Starts the refresh task and, when bound, the `/metrics` endpoint; both stop
    /// on `stop_accepting` (a task left in the tracker would hold shutdown for the whole
    /// grace period). Returns the endpoint's address.
    pub fn start(self, control: ControlHandle, shutdown: &Shutdown) -> Option<SocketAddr> {
        let recorder = self.recorder?;
        let refresher = Arc::new(Refresher {
            control,
            limited: Mutex::new(BTreeSet::new()),
        });
        shutdown.tracker.spawn(refresh_loop(
            Arc::clone(&refresher),
            shutdown.stop_accepting.clone(),
        ));
        let socket = self.socket?;
        let addr = socket.local_addr().ok()?;
        tracing::info!("serving metrics on http://{addr}/metrics");
        shutdown.tracker.spawn(serve(
            socket,
            recorder,
            refresher,
            shutdown.stop_accepting.clone(),
            shutdown.tracker.clone(),
        ));
        Some(addr)
    }
}

async fn refresh_loop(refresher: Arc<Refresher>, stop: CancellationToken) {
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = refresh.tick() => refresher.refresh(),
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
    refresher: Arc<Refresher>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    net::accept_loop(
        "metrics endpoint",
        &stop,
        || socket.accept(),
        |(stream, _peer): (TcpStream, SocketAddr)| {
            let Ok(permit) = Arc::clone(&clients).try_acquire_owned() else {
                return;
            };
            let refresher = Arc::clone(&refresher);
            let stop = stop.clone();
            tracker.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    () = stop.cancelled() => {}
                    r = answer(stream, recorder, refresher) => if let Err(e) = r {
                        tracing::debug!("metrics: {e}");
                    },
                }
            });
        },
    )
    .await;
}

async fn answer(
    mut stream: TcpStream,
    recorder: &'static Recorder,
    refresher: Arc<Refresher>,
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
    let body = tokio::task::spawn_blocking(move || render(recorder, &refresher))
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
