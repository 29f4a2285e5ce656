//! TCP listeners: the accept loop and one task per client connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::Listener;
use super::connect::{self, ConnectError};
use super::splice::{self, Counters, SpliceOptions};
use crate::net;
use crate::shutdown::Shutdown;

/// Accepts until `stop` fires (a child of shutdown's stop-accepting token), then drops
/// the socket so new connections are refused. Never exits on a transient error
/// (`net::accept_loop`).
pub async fn accept_loop(
    socket: TcpListener,
    listener: Arc<Listener>,
    shutdown: Shutdown,
    stop: tokio_util::sync::CancellationToken,
) {
    let what = format!("listener {:?}", listener.name);
    net::accept_loop(
        &what,
        &stop,
        || socket.accept(),
        |(stream, peer): (TcpStream, SocketAddr)| {
            let Some(admitted) = listener.admit() else {
                // Over max_connections: closed at once, never left in the backlog.
                tracing::debug!(listener = %listener.name, client = %peer, "rejected: max_connections reached");
                drop(stream);
                return;
            };
            let hard = shutdown.hard.clone();
            shutdown.tracker.spawn(handle(stream, peer, admitted, hard));
        },
    )
    .await;
    tracing::info!(listener = %listener.name, bind = %listener.bind, "stopped accepting");
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
        // On Linux inherited from the listening socket (see `net::bind_tcp`).
        #[cfg(not(target_os = "linux"))]
        {
            let _ = client.set_nodelay(true);
            let _ = net::set_keepalive(&client);
        }
        let snapshot = listener.pool.load().load_full();
        let connect::Connected {
            stream: upstream,
            guard,
            down,
        } = tokio::select! {
            // Boxed: the connect attempt's state lives only while it runs, instead of
            // enlarging every connection's task for its whole life.
            r = Box::pin(connect::connect(&snapshot, peer.ip())) => match r {
                Ok(connected) => connected,
                Err(ConnectError::Exhausted(_)) => {
                    // Logged and counted by `net::report_exhaustion`.
                    listener.metrics.rejected_resources.increment(1);
                    return;
                }
                Err(e) => {
                    listener.metrics.rejected_no_backend.increment(1);
                    match e {
                        ConnectError::NoBackend => tracing::warn!(
                            listener = %listener.name, client = %peer, pool = %listener.pool.load().name,
                            "connection closed: no backend available"
                        ),
                        ConnectError::AllFailed { .. } | ConnectError::Exhausted(_) => tracing::warn!(
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
            half_close_timeout: listener.half_close_timeout(),
        };
        let counters = Counters {
            to_backend: &backend.metrics.bytes_sent,
            to_client: &backend.metrics.bytes_received,
        };
        let outcome = splice::splice(&client, upstream, options, counters, &hard, &down).await;
        drop(client); // closed as the splice ends, as `splice` wants
        ended(listener, peer, backend, started, &outcome);
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
            "connection ended: {}", end.describe()
        ),
    }
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
