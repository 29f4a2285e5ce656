//! A session's upstream socket, what an ICMP error on it means for the backend, and whose
//! fault a failed send or socket is (`Fault`): weir's own lack of descriptors or memory
//! must never count against a backend.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;

use super::pktinfo::Local;
use super::stats::{Clock, DropReason, stats, warning_due};
use crate::backend::Backend;
use crate::net::{describe, is_resource_exhaustion, is_unreachable};
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

/// Sends a client's datagram on its session's upstream socket; with the pool's
/// `proxy_protocol`, a v2 DGRAM header (client, and the address it sent to) goes first in
/// the same datagram, written from the stack with no copy of the payload. A datagram that
/// no longer fits in 65,507 bytes with its header (28 bytes for IPv4, 52 for IPv6) is
/// refused by the kernel (EMSGSIZE): dropped and counted as `reason="send_error"`.
pub fn send(
    socket: &UdpSocket,
    listener: &Listener,
    client: SocketAddr,
    local: Option<Local>,
    data: &[u8],
) -> io::Result<usize> {
    use crate::proxy_protocol::{Transport, Version, write};
    let socket = socket2::SockRef::from(socket);
    if listener.send_proxy().is_none() {
        return socket.send(data);
    }
    let mut destination = listener.bind;
    if destination.ip().is_unspecified() {
        match local {
            Some(Local::V4(ip)) => destination.set_ip(ip.into()),
            #[cfg(target_os = "linux")]
            Some(Local::V6(ip, _)) => destination.set_ip(ip.into()),
            None => {}
        }
    }
    let header = write(Version::V2, Transport::Datagram, client, destination);
    let parts = [io::IoSlice::new(header.as_bytes()), io::IoSlice::new(data)];
    let sent = socket.send_vectored(&parts)?;
    Ok(sent.saturating_sub(header.as_bytes().len()))
}

/// The backend answered a datagram with an ICMP error (or there is no route to it): a
/// failed connect, as for TCP. The pool's `passive_fall` of them in a row mark it down at
/// once; a reply from it resets the run.
pub fn backend_unreachable(listener: &Listener, backend: &Backend, clock: Clock, e: &io::Error) {
    let passive_fall = listener.pool.load().snapshot().passive_fall;
    let what = "ICMP errors from udp traffic";
    if backend.connect_failed(passive_fall, what, &describe(e)) {
        return;
    }
    if warning_due(&stats(listener).next_unreachable_warning, clock) {
        tracing::warn!(
            listener = %listener.name, pool = %backend.pool, backend = %backend.name, address = %backend.addr,
            "backend unreachable over udp: {}", describe(e)
        );
    } else {
        tracing::debug!(listener = %listener.name, backend = %backend.name, "backend unreachable: {e}");
    }
}

/// Whose problem a socket error on a session's path is, which decides where it is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// weir itself is out of file descriptors, socket buffers or memory (EMFILE, ENFILE,
    /// ENOBUFS, ENOMEM): dropped as `reason="resources"` and never held against the
    /// backend, which did nothing wrong.
    Weir,
    /// The backend is not there (ICMP port or host unreachable, or no route to it): a
    /// failed connect to it, which feeds passive checking.
    Backend,
    /// A full socket buffer (EAGAIN): `reason="buffer_full"`.
    BufferFull,
    /// Anything else: counted, nobody's health changes.
    Other,
}

impl Fault {
    pub fn of(e: &io::Error) -> Fault {
        // First: ENOBUFS and ENOMEM must never pass for anything else.
        if is_resource_exhaustion(e) {
            Fault::Weir
        } else if e.kind() == io::ErrorKind::WouldBlock {
            Fault::BufferFull
        } else if is_unreachable(e) {
            Fault::Backend
        } else {
            Fault::Other
        }
    }

    /// Why a datagram is dropped when opening its session's upstream socket failed so.
    pub fn when_opening(self) -> DropReason {
        match self {
            Fault::Weir => DropReason::Resources,
            _ => DropReason::UpstreamSocket,
        }
    }

    /// Why a datagram is dropped when sending it (either way) failed so.
    pub fn when_sending(self) -> DropReason {
        match self {
            Fault::Weir => DropReason::Resources,
            Fault::BufferFull => DropReason::BufferFull,
            Fault::Backend | Fault::Other => DropReason::SendError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os_error(errno: rustix::io::Errno) -> io::Error {
        io::Error::from_raw_os_error(errno.raw_os_error())
    }

    #[test]
    fn weir_running_out_of_descriptors_or_memory_is_never_the_backends_fault() {
        use rustix::io::Errno;
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM] {
            let fault = Fault::of(&os_error(errno));
            assert_eq!(fault, Fault::Weir, "{errno:?}");
            assert_eq!(fault.when_opening(), DropReason::Resources, "{errno:?}");
            assert_eq!(fault.when_sending(), DropReason::Resources, "{errno:?}");
        }
        for errno in [Errno::CONNREFUSED, Errno::HOSTUNREACH, Errno::NETUNREACH] {
            let fault = Fault::of(&os_error(errno));
            assert_eq!(fault, Fault::Backend, "{errno:?}");
            assert_eq!(fault.when_opening(), DropReason::UpstreamSocket);
            assert_eq!(fault.when_sending(), DropReason::SendError);
        }
        let full = Fault::of(&os_error(Errno::AGAIN));
        assert_eq!(full, Fault::BufferFull);
        assert_eq!(full.when_sending(), DropReason::BufferFull);
        let other = Fault::of(&os_error(Errno::PERM));
        assert_eq!(other, Fault::Other);
        assert_eq!(other.when_opening(), DropReason::UpstreamSocket);
        assert_eq!(other.when_sending(), DropReason::SendError);
    }
}
