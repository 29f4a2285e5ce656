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
//! The system calls are one implementation per platform, chosen here once (`imp`):
//! `batch/linux.rs` and `batch/fallback.rs`. No `unsafe` in either.
//! quinn-udp was considered instead and does not fit (it forbids fragmentation and has no
//! `sendmmsg`): docs/performance.md, "Why not quinn-udp".

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;

use super::pktinfo::Local;

#[cfg(target_os = "linux")]
#[path = "batch/linux.rs"]
mod imp;

#[cfg(not(target_os = "linux"))]
#[path = "batch/fallback.rs"]
mod imp;

pub use imp::send_all_to;

/// Receive buffer: larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6),
/// so a datagram is never truncated.
pub const BUFFER_SIZE: usize = 65_536;

/// Datagrams one call reads or sends at most.
pub const SLOTS: usize = 16;

/// Datagrams a loop (the listener's receive loop, a session's reply task) handles in a row,
/// over several calls, before it looks at its timer and stop tokens again.
pub const BUDGET: usize = 64;

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
    static THREAD_BATCH: RefCell<Option<Box<Batch>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's batch, made on first use. Not re-entrant: `f` must not
/// call `with_batch` again.
pub fn with_batch<R>(f: impl FnOnce(&mut Batch) -> R) -> R {
    THREAD_BATCH.with_borrow_mut(|batch| f(batch.get_or_insert_with(|| Box::new(Batch::new()))))
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
        imp::receive_into(self, socket, with_pktinfo)?;
        Ok(self.received.len())
    }
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
