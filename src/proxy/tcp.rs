//! TCP listeners: the accept loop and one task per client connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::connect::{self, ConnectError};
use super::splice::{self, Counters, SpliceOptions};
use super::{Listener, access};
use crate::backend::Backend;
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
                drop(stream);
                listener.rejected_over_max(peer);
                if listener.access_log() {
                    not_connected(&listener, peer, Instant::now(), "", 0, "max_connections");
                }
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
        // Only with access_log: the one clock read it adds per connection.
        let accepted = listener.access_log().then(Instant::now);
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
            connect_time,
            retries,
        } = tokio::select! {
            // Boxed: the connect attempt's state lives only while it runs, instead of
            // enlarging every connection's task for its whole life.
            r = Box::pin(connect::connect(&snapshot, peer.ip())) => match r {
                Ok(connected) => connected,
                Err(e) => return refused(listener, peer, &e, accepted),
            },
            () = hard.cancelled() => {
                if let Some(accepted) = accepted {
                    not_connected(listener, peer, accepted, "", 0, "shutdown");
                }
                return;
            }
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
        let outcome = splice::splice(client, upstream, &options, counters, &hard, &down).await;
        backend
            .metrics
            .connection_duration
            .record(started.elapsed().as_secs_f64());
        if matches!(outcome.end, splice::End::BackendDown) {
            backend.metrics.closed_on_down.increment(1);
        }
        ended(listener, peer, backend, &outcome);
        if let Some(accepted) = accepted {
            access::Entry {
                listener: &listener.name,
                pool: &backend.pool,
                backend: &backend.name,
                client: peer,
                bytes_to_backend: outcome.bytes_to_backend,
                bytes_to_client: outcome.bytes_to_client,
                duration: accepted.elapsed(),
                connect: Some(connect_time),
                retries,
                end: outcome.end.name(),
            }
            .log();
        }
    }
}

/// Logs how a spliced connection ended (the ordinary ends at debug).
fn ended(listener: &Listener, peer: SocketAddr, backend: &Backend, outcome: &splice::Outcome) {
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

/// A connection closed because no backend could be connected: counted, logged, and
/// (`access_log`) an access line.
fn refused(listener: &Listener, peer: SocketAddr, e: &ConnectError, accepted: Option<Instant>) {
    let pool = listener.pool.load();
    let (backend, tried, end) = match e {
        ConnectError::Exhausted(_) => {
            // Logged and counted by `net::report_exhaustion`.
            listener.metrics.rejected_resources.increment(1);
            ("", 0, "resources")
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
    if let Some(accepted) = accepted {
        not_connected(listener, peer, accepted, backend, tried, end);
    }
}

/// The access line of a connection that never reached a backend.
fn not_connected(
    listener: &Listener,
    peer: SocketAddr,
    accepted: Instant,
    backend: &str,
    retries: u32,
    end: &str,
) {
    access::Entry {
        listener: &listener.name,
        pool: &listener.pool.load().name,
        backend,
        client: peer,
        bytes_to_backend: 0,
        bytes_to_client: 0,
        duration: accepted.elapsed(),
        connect: None,
        retries,
        end,
    }
    .log();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
