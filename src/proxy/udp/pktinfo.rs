//! The address each datagram was sent to, and replies sent from it: on a wildcard bind
//! (`0.0.0.0` or `[::]`) a multi-homed host must answer from the address the client used.
//!
//! One implementation per platform, chosen here once: IP_PKTINFO / IPV6_RECVPKTINFO control
//! messages on Linux; elsewhere a plain send, and replies leave from whatever address
//! routing picks.

#[cfg(target_os = "linux")]
#[path = "pktinfo/linux.rs"]
mod imp;

#[cfg(not(target_os = "linux"))]
#[path = "pktinfo/fallback.rs"]
mod imp;

pub use imp::*;
