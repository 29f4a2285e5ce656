//! Sockets, shared by every layer that opens one: binding TCP listeners, keepalive, one
//! accept loop with backoff (used by the proxy listeners, the admin socket and the HTTP
//! endpoint), and naming socket errors for operators.
//!
//! The error classes matter beyond log lines: weir running out of its own descriptors or
//! memory is weir's problem and must never be counted against a backend.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a connection may sit idle before the kernel starts keepalive probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Backoff bounds when accept fails because file descriptors or memory ran out.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Binds a TCP listener with SO_REUSEADDR (a restart doesn't wait for TIME_WAIT).
///
/// One listening socket and one accept loop per listener: one SO_REUSEPORT socket and
/// accept loop per worker thread was measured no faster (docs/performance.md), since
/// tokio already spreads the connection tasks over the workers.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted connections inherit these on Linux: four fewer setsockopt calls per
    // connection (TCP_NODELAY, and three for keepalive). Elsewhere `proxy::tcp` sets them
    // on each accepted connection.
    #[cfg(target_os = "linux")]
    {
        socket.set_nodelay(true)?;
        set_keepalive(&socket)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// TCP keepalive, so a peer that vanished without a FIN is noticed eventually. (Also set
/// on listening sockets, whose accepted connections inherit it on Linux.)
pub fn set_keepalive<'s>(socket: impl Into<SockRef<'s>>) -> io::Result<()> {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    socket.into().set_tcp_keepalive(&keepalive)
}

/// A short, operator-facing reason: "connection refused", "timed out", …
pub fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// Failures that mean "this process (or host) is out of file descriptors or memory":
/// they pass, and they say nothing about the peer.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
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

/// weir itself ran out of descriptors or memory during `operation` ("connect", "health
/// check", "accept", …): never a backend's fault. Counted in
/// `weir_resource_exhaustion_total{operation}` every time, logged at error once per burst
/// (at most every 10 s, whatever the operation), naming the fix.
pub fn report_exhaustion(operation: &'static str, e: &io::Error) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT_LOG_MS: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    metrics::counter!(crate::metrics::names::RESOURCE_EXHAUSTION, "operation" => operation)
        .increment(1);
    let now = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64;
    let next = NEXT_LOG_MS.load(Ordering::Relaxed);
    if now >= next
        && NEXT_LOG_MS
            .compare_exchange(next, now + 10_000, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::error!(
            operation,
            "weir is out of resources: {operation}: {e}; no backend is blamed (raise the open-file limit, LimitNOFILE=, or lower max_connections)"
        );
    }
}

/// ICMP errors a connected UDP socket reports for its peer: the backend is not there.
pub fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// Accepts until `stop` fires, handing each accepted item to `serve`. Never exits on a
/// transient error: when descriptors or memory run out it logs once per burst and backs
/// off (5 ms doubling to 1 s), so the loop neither spins nor gives up; other errors (the
/// client gave up before we accepted) are logged at debug and skipped.
///
/// `what` names the socket in log lines ("listener \"pg\"", "admin socket …").
pub async fn accept_loop<T, F, Fut>(
    what: &str,
    stop: &CancellationToken,
    mut accept: F,
    mut serve: impl FnMut(T),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut backoff = BACKOFF_MIN;
    let mut in_burst = false;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            r = accept() => r,
        };
        match accepted {
            Ok(item) => {
                if in_burst {
                    tracing::info!("{what}: accepting again");
                    in_burst = false;
                }
                backoff = BACKOFF_MIN;
                serve(item);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                metrics::counter!(crate::metrics::names::RESOURCE_EXHAUSTION, "operation" => "accept")
                    .increment(1);
                if !in_burst {
                    tracing::error!(
                        "{what}: accept failed: {e}; backing off (raise the open-file limit or lower max_connections)"
                    );
                    in_burst = true;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => tracing::debug!("{what}: accept: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_is_told_apart_from_peer_errors() {
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let enomem = io::Error::from_raw_os_error(rustix::io::Errno::NOMEM.raw_os_error());
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(is_resource_exhaustion(&emfile));
        assert!(is_resource_exhaustion(&enomem));
        assert!(!is_resource_exhaustion(&refused));
        assert_eq!(describe(&refused), "connection refused");
    }

    #[tokio::test]
    async fn the_accept_loop_backs_off_on_exhaustion_and_stops_on_its_token() {
        let stop = CancellationToken::new();
        let mut results = vec![
            Ok(1),
            Err(io::Error::from_raw_os_error(
                rustix::io::Errno::MFILE.raw_os_error(),
            )),
            Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
            Ok(2),
        ]
        .into_iter();
        let mut served = Vec::new();
        let stopper = stop.clone();
        accept_loop(
            "test",
            &stop,
            || {
                let next = results.next();
                let stop = stopper.clone();
                async move {
                    match next {
                        Some(r) => r,
                        None => {
                            stop.cancel();
                            std::future::pending().await
                        }
                    }
                }
            },
            |n| served.push(n),
        )
        .await;
        assert_eq!(served, vec![1, 2]);
    }
}
