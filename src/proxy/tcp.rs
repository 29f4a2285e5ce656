//! TCP listeners: the accept loop and one task per client connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connect::{self, ConnectError};
use super::splice::{self, Counters, SpliceOptions};
use super::{Listener, access};
use crate::backend::ConnGuard;
use crate::net;
use crate::pool::Pool;
use crate::queue::QUEUE_CAP;
use crate::shutdown::Shutdown;

/// How often the oldest queued connection looks for a slot that opened without a release
/// (a backend coming up, a raised limit); released slots are handed over at once.
const HEAD_RETRY: Duration = Duration::from_millis(100);

/// How long a client trusted by `accept_proxy` has to send its whole PROXY header (or
/// the listener's `idle_timeout`, when shorter): a load balancer in front sends it at once.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What `accept_proxy` found out about a connection, for its backend connection.
#[derive(Clone, Copy, Default)]
struct Origin {
    /// The original destination from the client's PROXY header.
    destination: Option<SocketAddr>,
    /// From a source not trusted with `accept_proxy` (on a listener with it): a PROXY
    /// header at its start is refused.
    untrusted: bool,
}

/// At most this many connections are taken from the backlog when a listener stops (it
/// holds 1,024; more would be clients still arriving).
const DRAIN_MAX: usize = 4096;

/// Accepts until `stop` fires (a child of shutdown's stop-accepting token), then takes
/// what the kernel already accepted into the backlog (a client whose connect succeeded is
/// served, not reset with the socket) and drops the socket so new connections are
/// refused. Never exits on a transient error (`net::accept_loop`).
pub async fn accept_loop(
    socket: TcpListener,
    listener: Arc<Listener>,
    shutdown: Shutdown,
    stop: tokio_util::sync::CancellationToken,
) {
    let what = format!("listener {:?}", listener.name);
    let take = |(stream, peer): (TcpStream, SocketAddr)| serve(&listener, &shutdown, stream, peer);
    net::accept_loop(&what, &stop, || socket.accept(), &take).await;
    let drained = match socket.into_std() {
        Ok(socket) => drain(&socket, |stream, peer| take((stream, peer))),
        Err(e) => {
            tracing::warn!(listener = %listener.name, "cannot take the backlog at stop: {e}");
            0
        }
    };
    tracing::info!(listener = %listener.name, bind = %listener.bind, "stopped accepting ({drained} taken from the backlog)");
}

/// Admits (or, over `max_connections`, closes at once) one accepted connection and
/// starts its task.
fn serve(listener: &Arc<Listener>, shutdown: &Shutdown, stream: TcpStream, peer: SocketAddr) {
    let Some(admitted) = listener.admit() else {
        // Over max_connections: closed at once, never left in the backlog.
        drop(stream);
        listener.rejected_over_max(peer);
        if listener.access_log() {
            let start = AccessStart::now();
            not_connected(listener, peer, Some(&start), "", 0, "max_connections");
        }
        return;
    };
    let hard = shutdown.hard.clone();
    shutdown.tracker.spawn(handle(stream, peer, admitted, hard));
}

/// Accepts, without waiting, what is already in `socket`'s backlog (at most `DRAIN_MAX`),
/// handing each to `serve`; returns how many.
fn drain(socket: &std::net::TcpListener, mut serve: impl FnMut(TcpStream, SocketAddr)) -> usize {
    let mut taken = 0;
    for _ in 0..DRAIN_MAX {
        let (stream, peer) = match socket.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // Out of descriptors or memory: what is left cannot be taken now.
            Err(e) if net::is_resource_exhaustion(&e) => break,
            Err(_) => continue, // that client gave up; the next may be there
        };
        // An accepted socket does not inherit O_NONBLOCK (TCP_NODELAY and keepalive it does).
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            serve(stream, peer);
            taken += 1;
        }
    }
    taken
}

#[allow(clippy::manual_async_fn)] // deliberately not an `async fn`, see below
/// One client connection: connect to a backend, then splice until it ends.
///
/// A plain fn returning an `async move` block that uses its captures in place (an `async fn`
/// would keep a second copy of its arguments in the task for the connection's life).
fn handle(
    client: TcpStream,
    mut peer: SocketAddr,
    admitted: super::ListenerGuard,
    hard: tokio_util::sync::CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let listener = admitted.listener();
        // Only with access_log: a clock read and a small allocation per connection, so
        // the task of a connection without it stays as small as it was.
        let mut access = listener.access_log().then(|| Box::new(AccessStart::now()));
        // On Linux inherited from the listening socket (see `net::bind_tcp`).
        #[cfg(not(target_os = "linux"))]
        {
            let _ = client.set_nodelay(true);
            let _ = net::set_keepalive(&client);
        }
        let mut origin = Origin::default();
        if listener.accept_proxy_on() {
            // Boxed: a connection without accept_proxy pays one relaxed load, no bytes.
            let read = Box::pin(accept_proxy(listener, &client, peer, access.as_deref()));
            let Some((source, found)) = read.await else {
                return;
            };
            (peer, origin) = (source, found);
        }
        let Some(connect::Connected {
            stream: upstream,
            guard,
            down,
            connect_time,
            retries,
        }) = Box::pin(open_upstream(
            listener,
            &client,
            peer,
            origin,
            &hard,
            access.as_deref(),
        ))
        .await
        else {
            return;
        };
        if let Some(start) = access.as_mut() {
            start.connect = connect_time;
            start.retries = retries;
        }
        let backend = guard.backend();
        let started = std::time::Instant::now();
        let options = SpliceOptions {
            idle_timeout: listener.idle_timeout(),
            half_close_timeout: listener.half_close_timeout(),
        };
        let counters = Counters {
            to_backend: &backend.metrics.bytes_sent,
            to_client: &backend.metrics.bytes_received,
        };
        let outcome = splice::splice(&client, upstream, options, counters, &hard, &down).await;
        drop(client); // closed as the splice ends, as `splice` wants
        ended(listener, peer, backend, started, &outcome);
        if let Some(start) = access {
            access::Entry {
                listener: &listener.name,
                pool: &backend.pool,
                backend: &backend.name,
                client: peer,
                bytes_to_backend: outcome.bytes_to_backend,
                bytes_to_client: outcome.bytes_to_client,
                duration: start.accepted.elapsed(),
                connect: Some(start.connect),
                retries: start.retries,
                end: outcome.end.name(),
            }
            .log();
        }
    }
}

/// What the access line of a connection needs from before its splice (`access_log`).
struct AccessStart {
    accepted: std::time::Instant,
    connect: std::time::Duration,
    retries: u32,
}

impl AccessStart {
    fn now() -> Self {
        AccessStart {
            accepted: std::time::Instant::now(),
            connect: std::time::Duration::ZERO,
            retries: 0,
        }
    }
}

/// Records and logs how a connection ended.
fn ended(
    listener: &Listener,
    peer: SocketAddr,
    backend: &crate::backend::Backend,
    started: std::time::Instant,
    outcome: &splice::Outcome,
) {
    backend
        .metrics
        .connection_duration
        .record(started.elapsed().as_secs_f64());
    if matches!(outcome.end, splice::End::BackendDown) {
        backend.metrics.closed_on_down.increment(1);
    }
    match &outcome.end {
        splice::End::Done => {}
        end @ (splice::End::ClientReset(_)
        | splice::End::IdleTimeout
        | splice::End::HalfCloseTimeout) => {
            tracing::debug!(listener = %listener.name, client = %peer, backend = %backend.name, "connection ended: {}", end.describe())
        }
        end => tracing::info!(
            listener = %listener.name, client = %peer, pool = %backend.pool, backend = %backend.name,
            sent = outcome.bytes_to_backend, received = outcome.bytes_to_client,
            reason = end.name(),
            "connection ended: {}", end.describe()
        ),
    }
}

/// A backend connection for `peer`, waiting in the pool's queue while every eligible
/// backend is full and `queue_timeout` allows; None (counted and logged) when there is
/// none, or the client left or shutdown came first.
async fn open_upstream(
    listener: &Arc<Listener>,
    client: &TcpStream,
    peer: SocketAddr,
    origin: Origin,
    hard: &CancellationToken,
    access: Option<&AccessStart>,
) -> Option<connect::Connected> {
    let mut given = None;
    let mut deadline = None;
    loop {
        let snapshot = listener.pool.load().load_full();
        // Not boxed here: the caller boxes this whole future (connect attempts and queue
        // waits), so its state lives only until a backend is connected, instead of
        // enlarging every connection's task for its whole life; one allocation either way.
        let result = tokio::select! {
            r = connect::connect(&snapshot, peer.ip(), given.take()) => r,
            () = hard.cancelled() => return not_connected(listener, peer, access, "", 0, "shutdown"),
        };
        let error = match result {
            Ok(connected) => {
                return proxy_out(listener, client, peer, origin, connected, access).await;
            }
            Err(ConnectError::Full) if !snapshot.queue_timeout.is_zero() => ConnectError::Full,
            Err(e) => return reject(listener, peer, &e, access),
        };
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + snapshot.queue_timeout);
        drop(snapshot);
        let pool = listener.pool.load_full();
        match wait_for_slot(&pool, client, peer, deadline, hard).await {
            Wait::Slot(slot) => given = slot,
            Wait::QueueFull => return reject(listener, peer, &error, access),
            Wait::TimedOut => {
                listener.metrics.rejected_queue_timeout.increment(1);
                tracing::warn!(
                    listener = %listener.name, client = %peer, pool = %pool.name,
                    "connection closed: no backend slot within queue_timeout"
                );
                return not_connected(listener, peer, access, "", 0, "queue_timeout");
            }
            Wait::Left => {
                tracing::debug!(listener = %listener.name, client = %peer, "client left the queue");
                return not_connected(listener, peer, access, "", 0, "client_left");
            }
        }
    }
}

/// The client's PROXY header (`accept_proxy`), from a trusted source: its source address
/// is the client's from here on. None (counted, logged) when it is missing, malformed or
/// late. From other sources nothing is read here (see `proxy_out`).
async fn accept_proxy(
    listener: &Listener,
    client: &TcpStream,
    peer: SocketAddr,
    access: Option<&AccessStart>,
) -> Option<(SocketAddr, Origin)> {
    if !listener.trusts_proxy(peer.ip()) {
        let origin = Origin {
            destination: None,
            untrusted: true,
        };
        return Some((peer, origin));
    }
    let limit = PROXY_HEADER_TIMEOUT.min(listener.idle_timeout());
    let why = match tokio::time::timeout(limit, read_proxy_header(client)).await {
        Ok(Ok(Some((source, destination)))) => {
            let origin = Origin {
                destination: Some(destination),
                untrusted: false,
            };
            return Some((source, origin));
        }
        // v1 UNKNOWN, v2 LOCAL: the connection's own peer stays the client.
        Ok(Ok(None)) => return Some((peer, Origin::default())),
        Ok(Err(why)) => why,
        Err(_) => format!(
            "no complete PROXY header within {}",
            humantime::format_duration(limit)
        ),
    };
    refuse_proxy(listener, peer, access, &why)
}

/// Counts, logs (and access-logs) a connection closed for its PROXY header; None.
fn refuse_proxy<T>(
    listener: &Listener,
    peer: SocketAddr,
    access: Option<&AccessStart>,
    why: &str,
) -> Option<T> {
    listener.metrics.rejected_proxy_header.increment(1);
    if listener.proxy_warning_due() {
        tracing::warn!(
            listener = %listener.name, client = %peer, reason = "proxy_header",
            "connection closed: {why} (further ones within 10s are logged at debug, all counted in weir_listener_rejected_total)"
        );
    } else {
        tracing::debug!(listener = %listener.name, client = %peer, reason = "proxy_header", "connection closed: {why}");
    }
    not_connected(listener, peer, access, "", 0, "proxy_header");
    None
}

/// Reads exactly one PROXY header and not a byte more: the bytes are peeked, and only
/// those that belong to the header are read (what follows is the client's, for the
/// backend). While the header is incomplete every byte seen is the header's, so they are
/// consumed and the next peek waits for new ones. Bounded: each turn takes at least one
/// byte, and at most `MAX_HEADER` are taken.
async fn read_proxy_header(client: &TcpStream) -> Result<Option<(SocketAddr, SocketAddr)>, String> {
    use crate::proxy_protocol::{MAX_HEADER, parse};
    let mut buf = [0u8; MAX_HEADER];
    let mut have = 0;
    while have < MAX_HEADER {
        let n = client
            .peek(&mut buf[have..])
            .await
            .map_err(|e| net::describe(&e))?;
        if n == 0 {
            return Err("the client closed before sending a PROXY header".into());
        }
        let total = have + n;
        let (take, complete) = match parse(&buf[..total]) {
            Ok(Some(header)) => (header.len, Some(header.addresses)),
            Ok(None) => (total, None),
            Err(e) => return Err(format!("bad PROXY header: {e}")),
        };
        consume(client, &mut buf[have..take])?;
        if let Some(addresses) = complete {
            return Ok(addresses);
        }
        have = take;
    }
    Err("PROXY header too long".into())
}

/// Reads exactly `buf.len()` bytes that a peek has just shown are there.
fn consume(client: &TcpStream, buf: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    // Bounded: each turn reads at least one byte (the bytes were peeked).
    while done < buf.len() {
        match client.try_read(&mut buf[done..]) {
            Ok(0) => return Err("the client closed during its PROXY header".into()),
            Ok(n) => done += n,
            Err(e) => return Err(net::describe(&e)),
        }
    }
    Ok(())
}

/// Whether the first bytes already received from `client` start like a PROXY header (a
/// look without waiting: the backend connect took a round trip, so a client that sends
/// first has usually sent by now; a header sent later reaches the backend as data, after
/// weir's own header when the pool sends one, so it is never taken for the real one).
fn starts_with_proxy_header(client: &TcpStream) -> bool {
    use rustix::net::{RecvFlags, recv};
    let mut first = [0u8; 12];
    match recv(
        client,
        &mut first[..],
        RecvFlags::PEEK | RecvFlags::DONTWAIT,
    ) {
        Ok((n, _)) if n > 0 => crate::proxy_protocol::looks_like_header(&first[..n]),
        _ => false,
    }
}

/// After the backend connect: refuses a PROXY header from an untrusted source, and
/// writes the pool's own (`proxy_protocol`) before any client byte.
async fn proxy_out(
    listener: &Listener,
    client: &TcpStream,
    peer: SocketAddr,
    origin: Origin,
    mut connected: connect::Connected,
    access: Option<&AccessStart>,
) -> Option<connect::Connected> {
    if origin.untrusted && starts_with_proxy_header(client) {
        return refuse_proxy(
            listener,
            peer,
            access,
            "a PROXY header from a source not in accept_proxy",
        );
    }
    let Some(version) = listener.send_proxy() else {
        return Some(connected);
    };
    let destination = match origin.destination {
        Some(d) => d,
        None => client.local_addr().unwrap_or(listener.bind),
    };
    let header = crate::proxy_protocol::write(
        version,
        crate::proxy_protocol::Transport::Stream,
        peer,
        destination,
    );
    // A new connection's send buffer is empty: this does not wait on the backend.
    use tokio::io::AsyncWriteExt;
    if let Err(e) = connected.stream.write_all(header.as_bytes()).await {
        let backend = connected.guard.backend();
        tracing::warn!(
            listener = %listener.name, client = %peer, backend = %backend.name,
            "connection closed: cannot send the PROXY header: {}", net::describe(&e)
        );
        let name = backend.name.clone();
        drop(connected);
        return not_connected(listener, peer, access, &name, 0, "connect_failed");
    }
    Some(connected)
}

/// Counts and logs a connection closed for want of a backend.
fn reject(
    listener: &Listener,
    peer: SocketAddr,
    e: &ConnectError,
    access: Option<&AccessStart>,
) -> Option<connect::Connected> {
    let pool = listener.pool.load();
    let (backend, retries, end) = match e {
        ConnectError::Exhausted(_) => {
            // Logged and counted by `net::report_exhaustion`.
            listener.metrics.rejected_resources.increment(1);
            ("", 0, "resources")
        }
        ConnectError::Full => {
            listener.metrics.rejected_backend_full.increment(1);
            tracing::warn!(
                listener = %listener.name, client = %peer, pool = %pool.name, reason = "backend_full",
                "connection closed: every eligible backend is at its max_connections"
            );
            ("", 0, "backend_full")
        }
        ConnectError::NoBackend => {
            listener.metrics.rejected_no_backend.increment(1);
            tracing::warn!(
                listener = %listener.name, client = %peer, pool = %pool.name, reason = "no_backend",
                "connection closed: no backend available"
            );
            ("", 0, "no_backend")
        }
        ConnectError::AllFailed { backend, tried, .. } => {
            listener.metrics.rejected_no_backend.increment(1);
            tracing::warn!(
                listener = %listener.name, client = %peer, pool = %pool.name, backend = %backend,
                reason = "connect_failed", "connection closed: {e}"
            );
            (backend.as_str(), tried.saturating_sub(1), "connect_failed")
        }
    };
    not_connected(listener, peer, access, backend, retries, end)
}

/// The access line (`access_log`) of a connection that never reached a backend; None.
fn not_connected(
    listener: &Listener,
    peer: SocketAddr,
    access: Option<&AccessStart>,
    backend: &str,
    retries: u32,
    end: &str,
) -> Option<connect::Connected> {
    let start = access?;
    access::Entry {
        listener: &listener.name,
        pool: &listener.pool.load().name,
        backend,
        client: peer,
        bytes_to_backend: 0,
        bytes_to_client: 0,
        duration: start.accepted.elapsed(),
        connect: None,
        retries,
        end,
    }
    .log();
    None
}

/// How a wait in the pool's queue ended.
enum Wait {
    /// A slot handed over by a release (or taken at the head of the queue); None: the
    /// queue went away with its pool (reload), pick again.
    Slot(Option<ConnGuard>),
    /// `QUEUE_CAP` connections wait already.
    QueueFull,
    TimedOut,
    /// The client closed or reset, or shutdown's hard deadline came.
    Left,
}

/// Waits, first come first served, for a backend slot of `pool` until `deadline`. Holds
/// no backend socket; leaving (any return, or this future dropped) leaves the queue.
async fn wait_for_slot(
    pool: &Pool,
    client: &TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    hard: &CancellationToken,
) -> Wait {
    let Some(mut waiter) = pool.queue.join(QUEUE_CAP) else {
        return Wait::QueueFull;
    };
    let mut watch_client = true;
    let mut head_retry = tokio::time::interval(HEAD_RETRY);
    head_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            slot = waiter.handed() => return Wait::Slot(slot),
            () = tokio::time::sleep_until(deadline) => return Wait::TimedOut,
            () = hard.cancelled() => return Wait::Left,
            gone = client_gone(client), if watch_client => {
                if gone {
                    return Wait::Left;
                }
                // It sent bytes (kept for the backend): an EOF behind them cannot be seen
                // without reading them, so from here the timeout ends a departed client.
                watch_client = false;
            }
            _ = head_retry.tick() => {
                if waiter.is_head()
                    && let Ok(slot) = pool.load_full().claim(peer.ip(), &[])
                {
                    return Wait::Slot(Some(slot));
                }
            }
        }
    }
}

/// Resolves when the client's socket turns readable: true when that is its EOF or an
/// error (it left), false when it is bytes (which stay unread).
async fn client_gone(client: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(client.peek(&mut byte).await, Ok(0) | Err(_))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn returned_size<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle connection's memory is mostly its task: tokio's header and trailer, the
    /// tracker's token and this future, rounded up to 128 bytes. At 656 bytes (debug
    /// build) the task is 768 bytes, one of jemalloc's size classes (1,366 B/conn in
    /// `benches/compare.sh`'s idle_memory); a little more and it is the next class, 896.
    #[test]
    fn a_connection_task_fits_in_768_bytes() {
        let size = returned_size(handle);
        assert!(size <= 664, "the connection future grew to {size} bytes");
    }

    /// What `handle` relies on to skip setting them per connection.
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let listener = net::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        #[cfg(not(target_os = "linux"))]
        {
            let _ = accepted.set_nodelay(true);
            let _ = net::set_keepalive(&accepted);
        }
        let sock = socket2::SockRef::from(&accepted);
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY");
        assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE");
        #[cfg(target_os = "linux")]
        {
            assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
            assert_eq!(
                sock.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(10)
            );
        }
    }
}
