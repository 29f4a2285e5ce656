//! `recvmmsg` and `sendmmsg`. nix wraps `recvmmsg` (rustix has no wrapper for it); rustix
//! wraps `sendmmsg` (nix's version needs control buffers set up just so, even for messages
//! without any).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny, sendmmsg};
use tokio::net::UdpSocket;

use super::{BUFFER_SIZE, Batch, Meta, SLOTS};
use crate::proxy::udp::pktinfo;

pub fn receive_into(batch: &mut Batch, socket: &UdpSocket, with_pktinfo: bool) -> io::Result<()> {
    // Fresh headers for every call: the kernel writes each message's address and
    // control lengths back into its header, and nix's `recvmmsg` doesn't reset them, so
    // reused headers would cut the next datagram's address or pktinfo short (seen: a
    // wildcard bind lost its reply source). Two or three small allocations per call,
    // against the one system call per datagram this saves.
    let control = with_pktinfo.then(|| vec![0u8; pktinfo::RECV_CONTROL_SIZE]);
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(SLOTS, control);
    let Batch { buffers, received } = batch;
    let mut slots = buffers.chunks_mut(BUFFER_SIZE);
    let mut iovs: [[IoSliceMut<'_>; 1]; SLOTS] =
        std::array::from_fn(|_| [IoSliceMut::new(slots.next().expect("SLOTS buffers"))]);
    let messages = recvmmsg(
        socket.as_raw_fd(),
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    for (slot, message) in messages.enumerate() {
        let Some(from) = message.address.as_ref().and_then(pktinfo::socket_addr) else {
            continue; // no source address: nowhere to reply, nothing to key a session on
        };
        let local = if with_pktinfo {
            pktinfo::local_of(&message)
        } else {
            None
        };
        received.push(Meta {
            slot,
            len: message.bytes,
            from,
            local,
        });
    }
    Ok(())
}

/// Sends `datagrams` to `to` on the unconnected `socket` without waiting, in as few calls
/// as it takes. Returns how many were sent before the first error, and that error (a full
/// send buffer is WouldBlock): what follows it is not sent.
pub fn send_all_to<'d>(
    socket: &UdpSocket,
    to: SocketAddr,
    datagrams: impl Iterator<Item = &'d [u8]>,
) -> (usize, Option<io::Error>) {
    let to = SocketAddrAny::from(to);
    let mut slices: [[IoSlice<'_>; 1]; SLOTS] = std::array::from_fn(|_| [IoSlice::new(&[])]);
    let mut count = 0;
    for (slot, data) in slices.iter_mut().zip(datagrams) {
        *slot = [IoSlice::new(data)];
        count += 1;
    }
    // No ancillary data: sendmmsg is only used when the kernel picks the source address.
    let mut controls: [SendAncillaryBuffer<'_, '_, '_>; SLOTS] = Default::default();
    let mut pairs = slices.iter().zip(controls.iter_mut());
    let mut messages: [MMsgHdr<'_>; SLOTS] = std::array::from_fn(|_| {
        let (iov, control) = pairs.next().expect("SLOTS pairs");
        MMsgHdr::new_with_addr(&to, iov, control)
    });
    let mut sent = 0;
    while sent < count {
        match sendmmsg(socket, &mut messages[sent..count], SendFlags::DONTWAIT) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) => return (sent, Some(e.into())),
        }
    }
    (sent, None)
}
