//! TCP listeners: the accept loop and one task per client connection.

use std::future::Future;
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
///
/// One listening socket and one accept loop per listener: one SO_REUSEPORT socket and
/// accept loop per worker thread was measured no faster (docs/performance.md), since
/// tokio already spreads the connection tasks over the workers.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted connections inherit these on Linux: four fewer setsockopt calls per
    // connection (TCP_NODELAY, and three for keepalive). `handle` sets them elsewhere.
    #[cfg(target_os = "linux")]
    {
        socket.set_nodelay(true)?;
        connect::set_keepalive(&socket)?;
    }
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
                shutdown.tracker.spawn(handle(stream, peer, admitted, hard));
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

#[allow(clippy::manual_async_fn)] // deliberately not an `async fn`, see below
/// One client connection: connect to a backend, then splice until it ends.
///
/// A plain fn returning an `async move` block that uses its captures in place (an `async fn`
/// would keep a second copy of its arguments in the task for the connection's life).
fn handle(
    client: TcpStream,
    peer: SocketAddr,
    admitted: super::ListenerGuard,
    hard: tokio_util::sync::CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let listener = admitted.listener();
        // On Linux inherited from the listening socket (see `bind_with`).
        #[cfg(not(target_os = "linux"))]
        {
            let _ = client.set_nodelay(true);
            let _ = connect::set_keepalive(&client);
        }
        let snapshot = listener.pool.load().load_full();
        let (upstream, guard) = tokio::select! {
            // Boxed: the connect attempt's state lives only while it runs, instead of
            // enlarging every connection's task for its whole life.
            r = Box::pin(connect::connect(&snapshot, peer.ip())) => match r {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `handle` relies on to skip setting them per connection.
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        #[cfg(not(target_os = "linux"))]
        {
            let _ = accepted.set_nodelay(true);
            let _ = connect::set_keepalive(&accepted);
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
