//! A session's reply task: reads what its backend answers, several datagrams per call, and
//! sends it to the client through the listener's socket, from the address the client sent
//! to.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::batch::{self, BUDGET, Batch, with_batch};
use super::pktinfo;
use super::stats::{Clock, stats, warning_due};
use super::upstream::{Fault, backend_unreachable};
use crate::backend::Backend;
use crate::proxy::Listener;

/// Where a reply goes and which source address it carries.
pub struct ReplyTo {
    pub client: SockAddr,
    /// The same address, for `sendmmsg`.
    pub client_addr: SocketAddr,
    /// Encoded IP_PKTINFO/IPV6_PKTINFO naming the reply's source; empty: let routing pick.
    pub control: pktinfo::Control,
}

/// A session's bytes each way, kept only for its access line (`access_log`).
#[derive(Default)]
pub struct SessionBytes {
    pub to_backend: AtomicU64,
    pub to_client: AtomicU64,
}

/// Reads a session's replies from its backend and sends them to the client.
pub struct ReplyTask {
    pub listener: Arc<Listener>,
    pub front: Arc<UdpSocket>,
    pub upstream: Arc<UdpSocket>,
    pub backend: Arc<Backend>,
    pub to: ReplyTo,
    pub activity: Arc<AtomicU64>,
    pub clock: Clock,
    pub cancel: CancellationToken,
    /// The backend's down signal when the session opened (fired under `on_down: close`).
    pub down: CancellationToken,
    /// The receive loop's "sweep now": told when the task ends on `down`, so the session
    /// and its counts go at once, not at the next sweep.
    pub sweep_now: Arc<Notify>,
    /// With `access_log`: the session's byte counts.
    pub bytes: Option<Arc<SessionBytes>>,
}

impl ReplyTask {
    pub async fn run(self) {
        // ERROR too: the kernel reports an ICMP error on a connected UDP socket as
        // EPOLLERR; asking for it makes sure the task wakes for it, whatever readiness
        // comes with it.
        let interest = Interest::READABLE | Interest::ERROR;
        let mut cancelled = pin!(self.cancel.cancelled());
        let mut down = pin!(self.down.cancelled());
        let mut unchecked = 0;
        loop {
            tokio::select! {
                biased;
                ready = self.upstream.ready(interest) => {
                    if ready.is_err() {
                        return;
                    }
                }
                () = &mut cancelled => return,
                () = &mut down => {
                    // No reply passes any more; the table ends the session.
                    self.sweep_now.notify_one();
                    return;
                }
            }
            let mut handled = 0;
            while handled < BUDGET {
                // A raw recv under each readiness in turn (try_io takes one interest at a
                // time), not try_recv: that one skips the syscall unless read readiness is
                // set, so ERROR-only readiness would never be cleared.
                let received = with_batch(|batch| {
                    let mut receive = || batch.receive(&self.upstream, false);
                    let n = match self.upstream.try_io(Interest::READABLE, &mut receive) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.upstream.try_io(Interest::ERROR, receive)
                        }
                        result => result,
                    }?;
                    self.deliver(batch);
                    Ok::<_, io::Error>(n)
                });
                match received {
                    Ok(n) => handled += n.max(1),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if Fault::of(&e) == Fault::Backend => {
                        backend_unreachable(&self.listener, &self.backend, self.clock, &e);
                    }
                    Err(e) => {
                        // Out of memory or buffers (Fault::Weir) included: never the backend's.
                        tracing::debug!(listener = %self.listener.name, backend = %self.backend.name, "udp receive from backend: {e}");
                        break;
                    }
                }
            }
            // Counted across wakeups, as in the receive loop.
            unchecked += handled;
            if unchecked >= BUDGET {
                unchecked = 0;
                if self.cancel.is_cancelled() {
                    return;
                }
                if self.down.is_cancelled() {
                    self.sweep_now.notify_one();
                    return;
                }
            }
        }
    }

    /// Sends the batch just received from the backend to the client: one `sendmmsg` when
    /// the kernel picks the source address, one `sendmsg` each when a wildcard bind sets it.
    fn deliver(&self, batch: &Batch) {
        let count = batch.datagrams().count();
        if count == 0 {
            return;
        }
        let bytes: usize = batch.datagrams().map(|(data, _)| data.len()).sum();
        self.activity.store(self.clock.now(), Ordering::Relaxed);
        self.backend.record_connect_success();
        self.backend.metrics.bytes_received.increment(bytes as u64);
        if let Some(counted) = &self.bytes {
            counted.to_client.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        let stats = stats(&self.listener);
        let (sent, error) = if self.to.control.is_empty() {
            batch::send_all_to(
                &self.front,
                self.to.client_addr,
                batch.datagrams().map(|(data, _)| data),
            )
        } else {
            let mut sent = 0;
            let mut error = None;
            for (data, _) in batch.datagrams() {
                match pktinfo::send_to(&self.front, data, &self.to.client, &self.to.control) {
                    Ok(_) => sent += 1,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            (sent, error)
        };
        stats.count_to_client(sent as u64);
        if let Some(e) = error {
            // The datagram that failed and those after it in this batch are dropped.
            let dropped = (count - sent) as u64;
            let fault = Fault::of(&e);
            stats.count_drops(fault.when_sending(), dropped);
            match fault {
                Fault::BufferFull => {}
                Fault::Weir if warning_due(&stats.next_resources_warning, self.clock) => {
                    tracing::warn!(
                        listener = %self.listener.name, client = %self.to.client_addr,
                        "udp reply dropped (resources): sending to the client failed: {e}: weir is out of socket buffers or memory (further drops are counted in weir_udp_dropped_total, logged at debug)"
                    );
                }
                _ => tracing::debug!(listener = %self.listener.name, "udp send to client: {e}"),
            }
        }
    }
}
