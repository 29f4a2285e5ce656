//! One datagram per call, where there is no `recvmmsg`/`sendmmsg` (or no wrapper for it).

use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;

use super::{BUFFER_SIZE, Batch, Meta};

pub fn receive_into(batch: &mut Batch, socket: &UdpSocket, _with_pktinfo: bool) -> io::Result<()> {
    let (len, from) = socket.try_recv_from(&mut batch.buffers[..BUFFER_SIZE])?;
    batch.received.push(Meta {
        slot: 0,
        len,
        from,
        local: None,
    });
    Ok(())
}

/// Sends `datagrams` to `to` on the unconnected `socket` without waiting, one call each.
/// Returns how many were sent before the first error, and that error (a full send buffer
/// is WouldBlock): what follows it is not sent.
pub fn send_all_to<'d>(
    socket: &UdpSocket,
    to: SocketAddr,
    datagrams: impl Iterator<Item = &'d [u8]>,
) -> (usize, Option<io::Error>) {
    let mut sent = 0;
    for data in datagrams {
        match socket.try_send_to(data, to) {
            Ok(_) => sent += 1,
            Err(e) => return (sent, Some(e)),
        }
    }
    (sent, None)
}
