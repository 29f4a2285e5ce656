//! Connecting to a backend: pick, connect with the pool's timeout, and on refusal or
//! timeout try up to `retries` other eligible backends.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

use crate::backend::{ConnGuard, Health};
use crate::pool::PoolSnapshot;

/// How long a connection may sit idle before the kernel starts keepalive probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no backend available")]
    NoBackend,
    #[error("every backend tried failed, last {backend}: {reason}")]
    AllFailed { backend: String, reason: String },
}

/// Connects to an eligible backend for `client`. On success the guard holds the
/// backend's active count for the connection's lifetime.
pub async fn connect(
    snapshot: &PoolSnapshot,
    client: IpAddr,
) -> Result<(TcpStream, ConnGuard), ConnectError> {
    // Indexes already tried; a small fixed array would do, but retries are configurable
    // and this only allocates when a connect fails.
    let mut tried: Vec<usize> = Vec::new();
    let mut last_failure: Option<(String, String)> = None;
    for _attempt in 0..=snapshot.retries {
        let Some(index) = snapshot.pick(client, &tried) else {
            break;
        };
        let backend = &snapshot.backends[index];
        let guard = backend.connect_guard();
        let started = Instant::now();
        let result = tokio::time::timeout(snapshot.connect_timeout, connect_to(backend.addr)).await;
        let reason = match result {
            Ok(Ok(stream)) => {
                backend.record_connect_success();
                backend
                    .metrics
                    .connect_duration
                    .record(started.elapsed().as_secs_f64());
                return Ok((stream, guard));
            }
            Ok(Err(e)) => describe(&e),
            Err(_) => format!(
                "timed out after {}",
                humantime::format_duration(snapshot.connect_timeout)
            ),
        };
        drop(guard);
        let failures = backend.record_connect_failure();
        tracing::warn!(
            pool = %backend.pool,
            backend = %backend.name,
            address = %backend.addr,
            "connect failed: {reason}"
        );
        if let Some(fall) = snapshot.passive_fall
            && failures >= fall
            && backend.set_health(Health::Down) == Health::Up
        {
            tracing::warn!(
                "{}/{} down: {failures} consecutive failed connects from traffic, last: {reason}",
                backend.pool,
                backend.name
            );
        }
        last_failure = Some((backend.name.clone(), reason));
        tried.push(index);
    }
    Err(match last_failure {
        None => ConnectError::NoBackend,
        Some((backend, reason)) => ConnectError::AllFailed { backend, reason },
    })
}

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
