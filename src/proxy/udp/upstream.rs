//! A session's upstream socket, and what an ICMP error on it means for the backend.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;

use super::stats::{Clock, WARN_EVERY, stats};
use crate::backend::Backend;
use crate::net::describe;
use crate::proxy::Listener;

/// SO_RCVBUF/SO_SNDBUF for each session's upstream socket: a few maximum-size datagrams.
/// Up to 65,536 sessions each have one, so not more.
const UPSTREAM_SOCKET_BUFFER: usize = 256 << 10;

/// Best effort: the kernel may cap or refuse the size; the defaults still work.
pub fn set_buffers(socket: &Socket, size: usize) {
    if let Err(e) = socket.set_recv_buffer_size(size) {
        tracing::debug!("SO_RCVBUF {size}: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(size) {
        tracing::debug!("SO_SNDBUF {size}: {e}");
    }
}

/// A session's upstream socket: an ephemeral port of the backend's family, connected to it,
/// so only the backend's datagrams arrive and ICMP errors about it are reported.
pub fn upstream_socket(backend: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    set_buffers(&socket, UPSTREAM_SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    // connect() binds an ephemeral port itself: no bind call of our own.
    socket.connect(&backend.into())?;
    UdpSocket::from_std(socket.into())
}

/// The backend answered a datagram with an ICMP error: a failed connect, as for TCP. With a
/// health check, `fall` of them in a row mark it down at once (probes bring it back); a
/// reply from it resets the run.
pub fn backend_unreachable(listener: &Listener, backend: &Backend, clock: Clock, e: &io::Error) {
    let passive_fall = listener.pool.load().snapshot().passive_fall;
    let what = "ICMP errors from udp traffic";
    if backend.connect_failed(passive_fall, what, &describe(e)) {
        return;
    }
    let now = clock.now();
    let next = &stats(listener).next_unreachable_warning;
    if now >= next.load(Ordering::Relaxed) {
        next.store(now + WARN_EVERY.as_millis() as u64, Ordering::Relaxed);
        tracing::warn!(
            listener = %listener.name, pool = %backend.pool, backend = %backend.name, address = %backend.addr,
            "backend unreachable over udp: {}", describe(e)
        );
    } else {
        tracing::debug!(listener = %listener.name, backend = %backend.name, "backend unreachable: {e}");
    }
}
