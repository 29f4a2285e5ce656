//! TCP listeners: the accept loop and one task per client connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::Listener;
use super::connect::{self, ConnectError};
use super::splice::{self, Counters, SpliceOptions};
use crate::shutdown::Shutdown;

/// A half-closed connection (one direction finished) may wait this long for the other.
/// Long enough for a server to answer a request whose sender already shut down writing;
/// short enough that abandoned half-open connections don't pile up.
pub const HALF_CLOSE_LINGER: Duration = Duration::from_secs(60);

/// Backoff bounds when accept fails because file descriptors or memory ran out.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Binds a TCP listener with SO_REUSEADDR (a restart doesn't wait for TIME_WAIT).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts until `stop` fires (or shutdown begins), then drops the socket so new
/// connections are refused. Never exits on a transient error.
pub async fn accept_loop(
    socket: TcpListener,
    listener: Arc<Listener>,
    shutdown: Shutdown,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut in_burst = false;
    loop {
        let accepted = tokio::select! {
            () = shutdown.stop_accepting.cancelled() => break,
            () = stop.cancelled() => break,
            r = socket.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                if in_burst {
                    tracing::info!(listener = %listener.name, "accepting again");
                    in_burst = false;
                }
                backoff = BACKOFF_MIN;
                let Some(admitted) = listener.admit() else {
                    // Over max_connections: closed at once, never left in the backlog.
                    tracing::debug!(listener = %listener.name, client = %peer, "rejected: max_connections reached");
                    drop(stream);
                    continue;
                };
                let hard = shutdown.hard.clone();
                shutdown.tracker.spawn(async move {
                    handle(stream, peer, admitted, hard).await;
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                if !in_burst {
                    tracing::error!(
                        listener = %listener.name,
                        "accept failed: {e}; backing off (raise the open-file limit or lower max_connections)"
                    );
                    in_burst = true;
                }
                tokio::select! {
                    () = shutdown.stop_accepting.cancelled() => break,
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                // ECONNABORTED and friends: the client gave up before we accepted.
                tracing::debug!(listener = %listener.name, "accept: {e}");
            }
        }
    }
    tracing::info!(listener = %listener.name, bind = %listener.bind, "stopped accepting");
}

/// accept(2) failures that mean "out of file descriptors or memory": back off, they pass.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        use rustix::io::Errno;
        let errno = Errno::from_io_error(e);
        matches!(
            errno,
            Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
        )
    }
    #[cfg(not(unix))]
    {
        e.kind() == io::ErrorKind::OutOfMemory
    }
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    admitted: super::ListenerGuard,
    hard: tokio_util::sync::CancellationToken,
) {
    let listener = admitted.listener();
    let _ = client.set_nodelay(true);
    let _ = connect::set_keepalive(&client);
    let snapshot = listener.pool.load().load_full();
    let (upstream, guard) = tokio::select! {
        r = connect::connect(&snapshot, peer.ip()) => match r {
            Ok(connected) => connected,
            Err(e) => {
                listener.metrics.rejected_no_backend.increment(1);
                match e {
                    ConnectError::NoBackend => tracing::warn!(
                        listener = %listener.name, client = %peer, pool = %listener.pool.load().name,
                        "connection closed: no backend available"
                    ),
                    ConnectError::AllFailed { .. } => tracing::warn!(
                        listener = %listener.name, client = %peer, pool = %listener.pool.load().name,
                        "connection closed: {e}"
                    ),
                }
                return;
            }
        },
        () = hard.cancelled() => return,
    };
    drop(snapshot);
    let backend = guard.backend();
    let started = std::time::Instant::now();
    let options = SpliceOptions {
        idle_timeout: listener.idle_timeout(),
        half_close_linger: HALF_CLOSE_LINGER,
    };
    let counters = Counters {
        to_backend: &backend.metrics.bytes_sent,
        to_client: &backend.metrics.bytes_received,
    };
    let outcome = splice::splice(client, upstream, &options, counters, &hard).await;
    backend
        .metrics
        .connection_duration
        .record(started.elapsed().as_secs_f64());
    match &outcome.end {
        splice::End::Done => {}
        end @ (splice::End::ClientReset(_)
        | splice::End::IdleTimeout
        | splice::End::HalfCloseLinger) => {
            tracing::debug!(listener = %listener.name, client = %peer, backend = %backend.name, "connection ended: {}", end.describe())
        }
        end => tracing::info!(
            listener = %listener.name, client = %peer, pool = %backend.pool, backend = %backend.name,
            sent = outcome.bytes_to_backend, received = outcome.bytes_to_client,
            "connection ended: {}", end.describe()
        ),
    }
}
