//! IP_PKTINFO / IPV6_PKTINFO on Linux: the destination address of each received datagram,
//! and the same address set as the source of the replies.

use nix::libc;
use nix::sys::socket::{self, ControlMessageOwned, RecvMsg, SockaddrStorage, sockopt};
use socket2::{MsgHdr, SockAddr, SockRef, Socket};
use std::io::{self, IoSlice};
use std::mem::{offset_of, size_of};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use tokio::net::UdpSocket;

pub const SUPPORTED: bool = true;

/// Room for one IP_PKTINFO and one IPV6_PKTINFO message.
pub const RECV_CONTROL_SIZE: usize = 128;

/// The address a datagram was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    V4(Ipv4Addr),
    /// With the interface index, needed for a link-local address (0 otherwise).
    V6(Ipv6Addr, u32),
}

pub fn enable(socket: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        socket::setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true)?;
        // IPv4 clients of a dual-stack socket report their destination only through
        // IP_PKTINFO; with IPV6_V6ONLY there are none and this is harmless.
        socket::setsockopt(socket, sockopt::Ipv4PacketInfo, &true)?;
    } else {
        socket::setsockopt(socket, sockopt::Ipv4PacketInfo, &true)?;
    }
    Ok(())
}

/// The address a received datagram was sent to, from its IP_PKTINFO/IPV6_PKTINFO.
pub fn local_of(message: &RecvMsg<'_, '_, SockaddrStorage>) -> Option<Local> {
    let mut local = None;
    for control in message.cmsgs().ok()? {
        match control {
            ControlMessageOwned::Ipv4PacketInfo(info) => {
                let addr = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                // Broadcast and multicast can't be a source: use the interface's address.
                local = Some(Local::V4(if addr.is_broadcast() || addr.is_multicast() {
                    Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr))
                } else {
                    addr
                }));
            }
            ControlMessageOwned::Ipv6PacketInfo(info) => {
                let addr = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                if !addr.is_multicast() {
                    let ifindex = if addr.is_unicast_link_local() {
                        info.ipi6_ifindex
                    } else {
                        0
                    };
                    local = Some(Local::V6(addr, ifindex));
                }
            }
            _ => {}
        }
    }
    local
}

/// Sends without waiting (a full buffer is WouldBlock), from the address in `control`
/// when there is one.
pub fn send_to(
    front: &UdpSocket,
    data: &[u8],
    to: &SockAddr,
    control: &Control,
) -> io::Result<usize> {
    let front = SockRef::from(front);
    if control.is_empty() {
        return front.send_to(data, to);
    }
    let buffers = [IoSlice::new(data)];
    let message = MsgHdr::new()
        .with_addr(to)
        .with_buffers(&buffers)
        .with_control(control.as_bytes());
    front.sendmsg(&message, 0)
}

pub fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return Some(SocketAddr::V6(SocketAddrV6::from(*v6)));
    }
    None
}

/// `CMSG_ALIGN`: control messages are aligned to the size of `size_t` on Linux.
const fn align(len: usize) -> usize {
    (len + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}

const HEADER: usize = align(size_of::<libc::cmsghdr>());
const LEN_AT: usize = offset_of!(libc::cmsghdr, cmsg_len);
/// Bytes from `cmsg_len` to `cmsg_level`: the length's width with any padding (glibc:
/// size_t; musl: socklen_t plus padding placed so the two read as one size_t).
const LEN_WIDTH: usize = offset_of!(libc::cmsghdr, cmsg_level) - LEN_AT;
const LEVEL_AT: usize = offset_of!(libc::cmsghdr, cmsg_level);
const TYPE_AT: usize = offset_of!(libc::cmsghdr, cmsg_type);
const SPACE: usize = HEADER + align(size_of::<libc::in6_pktinfo>());

/// One encoded IP_PKTINFO or IPV6_PKTINFO message for sendmsg, built once per session
/// so replies need no allocation. Empty: no source address to set.
#[derive(Clone, Copy)]
pub struct Control {
    bytes: [u8; SPACE],
    len: usize,
}

impl Control {
    pub fn new(local: Local) -> Control {
        let mut control = Control::default();
        match local {
            Local::V4(addr) => {
                // struct in_pktinfo: for sendmsg, ipi_spec_dst is the source address;
                // ipi_ifindex 0 lets routing pick the interface.
                let mut data = [0u8; size_of::<libc::in_pktinfo>()];
                let at = offset_of!(libc::in_pktinfo, ipi_spec_dst);
                data[at..at + 4].copy_from_slice(&addr.octets());
                control.put(libc::IPPROTO_IP, libc::IP_PKTINFO, &data);
            }
            Local::V6(addr, ifindex) => {
                let mut data = [0u8; size_of::<libc::in6_pktinfo>()];
                let at = offset_of!(libc::in6_pktinfo, ipi6_addr);
                data[at..at + 16].copy_from_slice(&addr.octets());
                let at = offset_of!(libc::in6_pktinfo, ipi6_ifindex);
                data[at..at + 4].copy_from_slice(&ifindex.to_ne_bytes());
                control.put(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &data);
            }
        }
        control
    }

    /// Writes a cmsghdr and its data, as CMSG_FIRSTHDR/CMSG_DATA would lay them out.
    fn put(&mut self, level: libc::c_int, kind: libc::c_int, data: &[u8]) {
        let len = HEADER + data.len();
        let b = &mut self.bytes;
        if LEN_WIDTH == 8 {
            b[LEN_AT..LEN_AT + 8].copy_from_slice(&(len as u64).to_ne_bytes());
        } else {
            b[LEN_AT..LEN_AT + 4].copy_from_slice(&(len as u32).to_ne_bytes());
        }
        b[LEVEL_AT..LEVEL_AT + 4].copy_from_slice(&level.to_ne_bytes());
        b[TYPE_AT..TYPE_AT + 4].copy_from_slice(&kind.to_ne_bytes());
        b[HEADER..HEADER + data.len()].copy_from_slice(data);
        self.len = HEADER + align(data.len());
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Default for Control {
    fn default() -> Control {
        Control {
            bytes: [0; SPACE],
            len: 0,
        }
    }
}
