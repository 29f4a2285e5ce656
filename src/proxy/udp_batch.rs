//! UDP datagrams several per system call: `recvmmsg` to read what is queued on a socket,
//! `sendmmsg` to send a session's replies, on Linux. Elsewhere one datagram per call.
//!
//! Why: a UDP proxy's own work is mostly system calls, two in and two out per query; the
//! fixed cost of each call (entry, file lookup, the libc and tokio wrappers) is what
//! batching saves. The kernel's work per datagram stays (docs/performance.md, udp_qps).
//!
//! One `Batch` per worker thread (`with_batch`), shared by the listener receive loops and
//! the session reply tasks that run on it, and borrowed only between two awaits: a batch
//! per session would cost `SLOTS` × 64 KiB × sessions. Slots are only touched as far as
//! datagrams fill them, so small datagrams keep the resident part small.
//!
//! nix wraps `recvmmsg` (rustix has no wrapper for it); rustix wraps `sendmmsg` (nix's
//! version needs control buffers set up just so, even for messages without any). No
//! `unsafe` here.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;

use super::udp::BUFFER_SIZE;
use super::udp::pktinfo::Local;

/// Datagrams one call reads or sends at most.
pub const SLOTS: usize = 16;

/// What one received datagram was: its slot and length, its sender, and (wildcard binds
/// on Linux) the address it was sent to.
#[derive(Clone, Copy)]
pub struct Meta {
    /// Which of the `SLOTS` buffers holds it (a message without a sender is skipped, so
    /// this is not always its position among the datagrams).
    slot: usize,
    pub len: usize,
    pub from: SocketAddr,
    pub local: Option<Local>,
}

pub struct Batch {
    /// `SLOTS` receive buffers of `BUFFER_SIZE` bytes, one after the other.
    buffers: Box<[u8]>,
    received: Vec<Meta>,
}

thread_local! {
    static BATCH: RefCell<Option<Box<Batch>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's batch, made on first use. Not re-entrant: `f` must not
/// call `with_batch` again.
pub fn with_batch<R>(f: impl FnOnce(&mut Batch) -> R) -> R {
    BATCH.with_borrow_mut(|batch| f(batch.get_or_insert_with(|| Box::new(Batch::new()))))
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buffers: vec![0u8; SLOTS * BUFFER_SIZE].into_boxed_slice(),
            received: Vec::with_capacity(SLOTS),
        }
    }

    /// The datagrams of the last `receive`, in the order they arrived.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], Meta)> {
        self.received.iter().map(|meta| {
            let start = meta.slot * BUFFER_SIZE;
            (&self.buffers[start..start + meta.len], *meta)
        })
    }

    /// Reads what is queued on `socket`, up to `SLOTS` datagrams, without waiting:
    /// WouldBlock when nothing is. `with_pktinfo`: read each datagram's destination address
    /// too (IP_PKTINFO must be enabled on the socket). Returns how many were read.
    pub fn receive(&mut self, socket: &UdpSocket, with_pktinfo: bool) -> io::Result<usize> {
        self.received.clear();
        self.receive_into(socket, with_pktinfo)?;
        Ok(self.received.len())
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn receive_into(&mut self, socket: &UdpSocket, with_pktinfo: bool) -> io::Result<()> {
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};

        // Fresh headers for every call: the kernel writes each message's address and
        // control lengths back into its header, and nix's `recvmmsg` doesn't reset them, so
        // reused headers would cut the next datagram's address or pktinfo short (seen: a
        // wildcard bind lost its reply source). Two or three small allocations per call,
        // against the one system call per datagram this saves.
        let control = with_pktinfo.then(|| vec![0u8; super::udp::pktinfo::RECV_CONTROL_SIZE]);
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(SLOTS, control);
        let Batch { buffers, received } = self;
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
            let Some(from) = message
                .address
                .as_ref()
                .and_then(super::udp::pktinfo::socket_addr)
            else {
                continue; // no source address: nowhere to reply, nothing to key a session on
            };
            let local = if with_pktinfo {
                super::udp::pktinfo::local_of(&message)
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

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn receive_into(&mut self, socket: &UdpSocket, _with_pktinfo: bool) -> io::Result<()> {
        let (len, from) = socket.try_recv_from(&mut self.buffers[..BUFFER_SIZE])?;
        self.received.push(Meta {
            slot: 0,
            len,
            from,
            local: None,
        });
        Ok(())
    }
}

/// Sends `datagrams` to `to` on the unconnected `socket` without waiting, in as few calls
/// as it takes. Returns how many were sent before the first error, and that error (a full
/// send buffer is WouldBlock): what follows it is not sent.
pub fn send_all_to<'d>(
    socket: &UdpSocket,
    to: SocketAddr,
    datagrams: impl Iterator<Item = &'d [u8]>,
) -> (usize, Option<io::Error>) {
    send_all_to_impl(socket, to, datagrams)
}

#[cfg(target_os = "linux")]
fn send_all_to_impl<'d>(
    socket: &UdpSocket,
    to: SocketAddr,
    datagrams: impl Iterator<Item = &'d [u8]>,
) -> (usize, Option<io::Error>) {
    use std::io::IoSlice;

    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny, sendmmsg};

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

#[cfg(not(target_os = "linux"))]
fn send_all_to_impl<'d>(
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn socket() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// Receives batches from `socket` and hands each to `take`, which returns how many
    /// datagrams it holds so far, until that is `count` (10 s at most).
    async fn read_until(socket: &UdpSocket, count: usize, mut take: impl FnMut(&Batch) -> usize) {
        let reading = async {
            let mut held = 0;
            while held < count {
                socket.readable().await.unwrap();
                let received = with_batch(|batch| {
                    socket
                        .try_io(tokio::io::Interest::READABLE, || {
                            batch.receive(socket, false)
                        })
                        .map(|_| take(batch))
                });
                match received {
                    Ok(now) => held = now,
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}"),
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .expect("every datagram within 10 s");
    }

    #[tokio::test]
    async fn receives_what_is_queued_in_order_with_senders_and_whole_sizes() {
        let receiver = socket().await;
        let to = receiver.local_addr().unwrap();
        let (a, b) = (socket().await, socket().await);
        let sizes = [1usize, 512, 65_507, 3, 1400];
        for (i, size) in sizes.iter().enumerate() {
            let from = if i % 2 == 0 { &a } else { &b };
            from.send_to(&vec![i as u8; *size], to).await.unwrap();
        }
        let mut got: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
        read_until(&receiver, sizes.len(), |batch| {
            got.extend(
                batch
                    .datagrams()
                    .map(|(data, meta)| (data.to_vec(), meta.from)),
            );
            got.len()
        })
        .await;
        for (i, (data, from)) in got.iter().enumerate() {
            assert_eq!(data.len(), sizes[i], "datagram {i} whole");
            assert!(
                data.iter().all(|&byte| byte == i as u8),
                "datagram {i} in order"
            );
            let sender = if i % 2 == 0 { &a } else { &b };
            assert_eq!(*from, sender.local_addr().unwrap());
        }
        let nothing = with_batch(|batch| batch.receive(&receiver, false));
        assert_eq!(
            nothing.unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "an empty queue is WouldBlock, never a wait"
        );
    }

    #[tokio::test]
    async fn more_than_a_batch_is_read_over_several_calls() {
        let receiver = socket().await;
        let to = receiver.local_addr().unwrap();
        let sender = socket().await;
        let total = SLOTS * 2 + 3;
        for i in 0..total {
            sender.send_to(&(i as u32).to_be_bytes(), to).await.unwrap();
        }
        let mut seen = Vec::new();
        read_until(&receiver, total, |batch| {
            assert!(batch.datagrams().count() <= SLOTS);
            seen.extend(
                batch
                    .datagrams()
                    .map(|(data, _)| u32::from_be_bytes(data.try_into().unwrap())),
            );
            seen.len()
        })
        .await;
        assert_eq!(seen, (0..total as u32).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn send_all_to_delivers_every_datagram_in_order() {
        let receiver = socket().await;
        let to = receiver.local_addr().unwrap();
        let sender = socket().await;
        let datagrams: Vec<Vec<u8>> = (0..SLOTS).map(|i| vec![i as u8; 10 + i * 100]).collect();
        let (sent, error) = send_all_to(&sender, to, datagrams.iter().map(Vec::as_slice));
        assert!(error.is_none(), "{error:?}");
        assert_eq!(sent, SLOTS);
        let mut buf = vec![0u8; BUFFER_SIZE];
        for expected in &datagrams {
            let (n, from) = receiver.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], expected.as_slice());
            assert_eq!(from, sender.local_addr().unwrap());
        }
    }
}
