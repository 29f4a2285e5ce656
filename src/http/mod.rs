//! The HTTP endpoint on `metrics.bind`: `GET /metrics` (Prometheus text format),
//! `GET /ready`, the status page `GET /` and its data `GET /status.json` (`status.rs`), plus the refresh task that writes the gauges derived from state (backend
//! up/state/weight, listener limits) from the control task's published tables, once a
//! second and again right before each render.

mod status;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::control::ControlHandle;
use crate::metrics::names::LISTENER_MAX_CONNECTIONS;
use crate::metrics::{self, Recorder, handles::listener_max_connections, recorder};
use crate::net;
use crate::shutdown::Shutdown;
use crate::slots::{Slot, Slots};
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

// The endpoint, on hyper (one request a connection). Every bound is explicit: the request
// head's size (hyper's buffer; over it, 431), the time to send it (hyper's header-read
// timeout), the whole exchange's time, and the clients at once (`Slots`: when all are
// taken, the oldest that has not sent its request makes room, so idle connections can't
// lock out a scrape).

/// A request head larger than this is refused (431). hyper's smallest buffer.
const MAX_REQUEST: usize = 8 * 1024;
/// A client must send its request head within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// And have read the answer within this after.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients at once.
const MAX_CLIENTS: usize = 32;

type Body = http_body_util::Full<hyper::body::Bytes>;

async fn serve(
    socket: TcpListener,
    recorder: &'static Recorder,
    refresher: Arc<Refresher>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Slots::new(MAX_CLIENTS);
    net::accept_loop(
        "metrics endpoint",
        &stop,
        || socket.accept(),
        |(stream, _peer): (TcpStream, SocketAddr)| {
            let Some(slot) = slots.take() else {
                return;
            };
            let refresher = Arc::clone(&refresher);
            let stop = stop.clone();
            tracker.spawn(connection(stream, recorder, refresher, slot, stop));
        },
    )
    .await;
}

async fn connection(
    stream: TcpStream,
    recorder: &'static Recorder,
    refresher: Arc<Refresher>,
    slot: Slot,
    stop: CancellationToken,
) {
    let slot = Arc::new(slot);
    let evicted = slot.evicted.clone();
    let answering = Arc::clone(&slot);
    let service = hyper::service::service_fn(move |request| {
        slot.request_read();
        let refresher = Arc::clone(&refresher);
        async move { Ok::<_, std::convert::Infallible>(answer(request, recorder, refresher).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let served = tokio::time::timeout(READ_TIMEOUT + WRITE_TIMEOUT, served);
    tokio::pin!(served);
    let outcome = tokio::select! {
        // The connection first: a request already in the socket when a newcomer takes
        // this slot (a burst of connects) is read and parsed in this one poll, and then
        // it is answered rather than dropped; a slow client's head is never complete.
        biased;
        r = &mut served => Some(r),
        () = stop.cancelled() => return,
        () = evicted.cancelled() => None,
    };
    let outcome = match outcome {
        Some(r) => r,
        None if answering.is_request_read() => served.await,
        None => return,
    };
    match outcome {
        Err(_) => tracing::debug!("metrics: client too slow to read its answer"),
        Ok(Err(e)) => tracing::debug!("metrics: {e}"),
        Ok(Ok(())) => {}
    }
}

fn reply(
    status: u16,
    content_type: &str,
    body: impl Into<hyper::body::Bytes>,
) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(Body::new(body.into()));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn answer<B>(
    request: hyper::Request<B>,
    recorder: &'static Recorder,
    refresher: Arc<Refresher>,
) -> hyper::Response<Body> {
    let path = request.uri().path().to_string();
    let method = request.method();
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        let known = matches!(path.as_str(), "/" | "/metrics" | "/ready" | "/status.json");
        return if known {
            reply(405, TEXT, "use GET\n")
        } else {
            reply(404, TEXT, NOT_FOUND)
        };
    }
    match path.as_str() {
        // The endpoint starts only once every listener is bound, which is after the first
        // health-check round, and stops when shutdown begins: answering means ready.
        "/ready" => reply(200, TEXT, "ready\n"),
        "/metrics" => {
            let body = rendered(recorder, refresher).await;
            reply(200, "text/plain; version=0.0.4; charset=utf-8", body)
        }
        "/" | "/status.json" => {
            let control = refresher.control.clone();
            let body = rendered(recorder, refresher).await;
            let status = status::Status::of(&control, &body);
            if path == "/" {
                reply(200, "text/html; charset=utf-8", status.html())
            } else {
                reply(200, "application/json", status.json())
            }
        }
        _ => reply(404, TEXT, NOT_FOUND),
    }
}

const NOT_FOUND: &str =
    "not found: the status page is at /, metrics at /metrics, readiness at /ready\n";

/// Rendering walks every series and reads /proc: kept off the runtime's workers.
async fn rendered(recorder: &'static Recorder, refresher: Arc<Refresher>) -> String {
    tokio::task::spawn_blocking(move || render(recorder, &refresher))
        .await
        .unwrap_or_default()
}
