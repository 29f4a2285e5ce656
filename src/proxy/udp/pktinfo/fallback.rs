//! Elsewhere a wildcard bind replies from whatever address routing picks; bind a specific
//! address for multi-homed hosts.

use std::io;
use std::net::Ipv4Addr;

use socket2::{SockAddr, SockRef, Socket};
use tokio::net::UdpSocket;

pub const SUPPORTED: bool = false;

#[allow(dead_code)] // never received here
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    V4(Ipv4Addr),
}

pub fn enable(_: &Socket, _: bool) -> io::Result<()> {
    tracing::warn!(
        "replies on a wildcard udp bind leave from the address routing picks on this platform; bind a specific address on multi-homed hosts"
    );
    Ok(())
}

pub fn send_to(front: &UdpSocket, data: &[u8], to: &SockAddr, _: &Control) -> io::Result<usize> {
    SockRef::from(front).send_to(data, to)
}

#[derive(Clone, Copy, Default)]
pub struct Control;

impl Control {
    pub fn new(_: Local) -> Control {
        Control
    }

    /// Always: replies never carry a source address here.
    pub fn is_empty(&self) -> bool {
        true
    }
}
