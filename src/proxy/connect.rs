//! Connecting to a backend: pick, connect with the pool's timeout, and on refusal or
//! timeout try up to `retries` other eligible backends.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

#[cfg(not(target_os = "linux"))]
use tokio::net::TcpSocket;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::backend::ConnGuard;
use crate::net::{self, describe, set_keepalive};
use crate::pool::{NoSlot, PoolSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no backend available")]
    NoBackend,
    /// Every eligible backend is at its `max_connections` (nothing was tried).
    #[error("every eligible backend is at its max_connections")]
    Full,
    #[error("every backend tried failed, last {backend}: {reason}")]
    AllFailed {
        backend: String,
        reason: String,
        /// How many were tried.
        tried: u32,
    },
    /// weir is out of descriptors or memory: no backend is blamed, none is tried.
    #[error("weir is out of resources: {0}")]
    Exhausted(String),
}

/// A connection to a backend.
pub struct Connected {
    pub stream: TcpStream,
    /// Holds the backend's active count for the connection's lifetime.
    pub guard: ConnGuard,
    /// Fired when the backend is marked down under `on_down: close` (`Backend::down_signal`).
    /// Taken when the backend was picked, before connecting: being marked down while the
    /// connect is under way ends the connection too.
    pub down: CancellationToken,
    /// How long the successful connect took.
    pub connect_time: std::time::Duration,
    /// Backends that failed before this one.
    pub retries: u32,
}

/// Connects to an eligible backend for `client`. `given` is a slot handed over by the
/// pool's queue: tried first (unless its backend left rotation in the meantime), then
/// the usual retries.
pub async fn connect(
    snapshot: &PoolSnapshot,
    client: IpAddr,
    mut given: Option<ConnGuard>,
) -> Result<Connected, ConnectError> {
    // Indexes already tried; a small fixed array would do, but retries are configurable
    // and this only allocates when a connect fails.
    let mut tried: Vec<usize> = Vec::new();
    let mut last_failure: Option<(String, String)> = None;
    let mut full = false;
    for _attempt in 0..=snapshot.retries {
        let guard = match given.take().filter(|g| g.backend().is_eligible()) {
            Some(guard) => guard,
            None => match snapshot.claim(client, &tried) {
                Ok(guard) => guard,
                Err(why) => {
                    full = why == NoSlot::Full;
                    break;
                }
            },
        };
        let backend = std::sync::Arc::clone(guard.backend());
        let down = backend.down_signal();
        let started = Instant::now();
        let result = tokio::time::timeout(snapshot.connect_timeout, connect_to(backend.addr)).await;
        let reason = match result {
            Ok(Ok(stream)) => {
                backend.record_connect_success();
                let connect_time = started.elapsed();
                backend
                    .metrics
                    .connect_duration
                    .record(connect_time.as_secs_f64());
                return Ok(Connected {
                    stream,
                    guard,
                    down,
                    connect_time,
                    retries: tried.len() as u32,
                });
            }
            Ok(Err(e)) if net::is_resource_exhaustion(&e) => {
                net::report_exhaustion("connect", &e);
                return Err(ConnectError::Exhausted(describe(&e)));
            }
            Ok(Err(e)) => describe(&e),
            Err(_) => format!(
                "timed out after {}",
                humantime::format_duration(snapshot.connect_timeout)
            ),
        };
        drop((guard, down));
        failed(snapshot, &backend, &reason);
        last_failure = Some((backend.name.clone(), reason));
        tried.extend(snapshot.index_of(&backend));
    }
    Err(match last_failure {
        None if full => ConnectError::Full,
        None => ConnectError::NoBackend,
        Some((backend, reason)) => ConnectError::AllFailed {
            backend,
            reason,
            tried: tried.len() as u32,
        },
    })
}

/// A failed connect to `backend`: logged, and counted by passive checking.
fn failed(snapshot: &PoolSnapshot, backend: &crate::backend::Backend, reason: &str) {
    tracing::warn!(
        pool = %backend.pool,
        backend = %backend.name,
        address = %backend.addr,
        reason = %reason,
        "connect failed: {reason}"
    );
    backend.connect_failed(
        snapshot.passive_fall,
        "failed connects from traffic",
        reason,
    );
}

/// Connects a socket to `addr` and sets it up for proxying (TCP_NODELAY, keepalive).
///
/// On Linux this does not go through tokio's `TcpSocket::connect`, which reads SO_ERROR
/// after every connect: a failed connect already shows in the readiness epoll reports
/// (EPOLLERR/EPOLLHUP, seen as write-closed), so SO_ERROR is read only then, to name the
/// failure. One system call fewer per connection (docs/performance.md).
#[cfg(target_os = "linux")]
async fn connect_to(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    use tokio::io::Interest;

    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    set_keepalive(&socket)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if ready.is_write_closed() || ready.is_error() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::ConnectionAborted, "closed while connecting")
        }));
    }
    Ok(stream)
}

#[cfg(not(target_os = "linux"))]
async fn connect_to(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    let stream = socket.connect(addr).await?;
    set_keepalive(&stream)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback port with nothing listening: bind one, note it, close it.
    fn closed_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn a_refused_connect_is_reported_as_refused() {
        let error = connect_to(closed_port())
            .await
            .expect_err("nothing listens");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
        assert_eq!(describe(&error), "connection refused");
    }

    #[tokio::test]
    async fn a_connected_stream_carries_bytes_with_nodelay_and_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream, accepted) = tokio::join!(connect_to(addr), listener.accept());
        let mut stream = stream.expect("connects");
        let (mut server, _) = accepted.unwrap();
        assert!(stream.nodelay().unwrap());
        assert!(SockRef::from(&stream).keepalive().unwrap());
        stream.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn connecting_to_both_families() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
                eprintln!("skipped {bind}: cannot bind (no IPv6 here?)");
                continue;
            };
            let addr = listener.local_addr().unwrap();
            let (stream, accepted) = tokio::join!(connect_to(addr), listener.accept());
            assert_eq!(stream.unwrap().peer_addr().unwrap(), addr);
            accepted.unwrap();
        }
    }
}
