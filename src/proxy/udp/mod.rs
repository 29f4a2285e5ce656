//! UDP listeners: sessions keyed by client address.
//!
//! A listener receives on one socket per worker thread, all bound to its address with
//! SO_REUSEPORT (`bind`); the kernel sends each client's datagrams to always the same one.
//! Each socket has its own receive loop, which owns that socket's session table: a plain
//! `HashMap` no other task touches, so the datagram path takes no lock. A datagram from an
//! unknown client is admitted against `max_connections` (`Listener::admit`), picks a
//! backend with the pool's strategy, and opens a session: a `ConnGuard` (so least-
//! connections counts sessions), and an upstream UDP socket bound to an ephemeral port and
//! connected to the backend, with its own reply task. Later datagrams of the session go out
//! on that socket; the reply task sends what comes back to the client through the
//! listener's socket, so the client sees replies from the address it sent to. A sweep on
//! the loop's timer ends sessions that saw no datagram either way for `idle_timeout`;
//! ending a session drops its guards and cancels its reply task.
//!
//! Re-pick rule: a session whose backend's health is *down* (health check or passive
//! checking) moves to a newly picked backend on its next client datagram; under
//! `on_down: close` its sessions end as it is marked down instead. A backend that
//! is only draining or disabled by an operator (or removed by a reload) keeps its sessions
//! until they go idle, but for at most `idle_timeout` after it left rotation: then they end
//! at the sweep or their next datagram, which opens a new session elsewhere. A
//! backend that answers with ICMP port unreachable shows up as `ConnectionRefused` on the
//! connected upstream socket: it counts as a failed connect (`Backend::connect_failed`,
//! which feeds passive checking), nothing more. weir's own shortage of descriptors,
//! buffers or memory (`upstream::Fault::Weir`) is never counted against a backend: those
//! datagrams are dropped as `reason="resources"`, with a warning at most every 10 s.
//!
//! Several datagrams per system call (`batch`): the receive loop reads what is queued on
//! the listener's socket with one `recvmmsg`, a reply task reads its backend's answers the
//! same way and sends them to the client with one `sendmmsg`. The buffers are one set per
//! worker thread, not per session. Sends never wait (a full socket buffer drops the
//! datagram and counts it rather than stalling every session behind one), and metric
//! handles were registered with the listener. The loop polls its stop tokens (which take a
//! mutex) only when it is about to sleep, never once per datagram.
//!
//! On a wildcard bind (`0.0.0.0` or `[::]`) on Linux the loop reads each datagram's destination
//! address (IP_PKTINFO / IPV6_RECVPKTINFO) and replies carry it as their source
//! (`pktinfo`), so a multi-homed host answers from the address the client used.
//!
//! The files, each using only those below it (none uses this one):
//!
//! ```text
//! mod.rs       bind, the receive loop (this file): the public API
//! sessions.rs  the session table: lookup, open (pick, admit), re-pick, sweep
//! reply.rs     a session's reply task: backend → client
//! upstream.rs  a session's upstream socket; whose fault an error is (ICMP: the backend's)
//! stats.rs     UdpStats, DropReason, the activity clock
//! batch.rs     recvmmsg/sendmmsg (batch/linux.rs, batch/fallback.rs)
//! pktinfo.rs   IP_PKTINFO control messages (pktinfo/linux.rs, pktinfo/fallback.rs)
//! ```

mod batch;
mod pktinfo;
mod reply;
mod sessions;
mod stats;
mod upstream;

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub use batch::BUFFER_SIZE;
pub use stats::{DropReason, UdpStats};

use super::Listener;
use crate::shutdown::Shutdown;
use batch::{BUDGET, with_batch};
use sessions::Table;
use stats::WARN_EVERY;
use upstream::set_buffers;

/// SO_RCVBUF/SO_SNDBUF asked for on a listener's socket. The kernel caps it at
/// `net.core.rmem_max`/`wmem_max`; raise those for high packet rates.
const LISTENER_SOCKET_BUFFER: usize = 4 << 20;

/// Once a listener stops receiving (shutdown or removal), its sessions can carry no more
/// requests; they live on until their backend has been quiet this long (or `idle_timeout`
/// if shorter), so answers in flight still reach their clients, then end.
const STOPPED_LINGER: Duration = Duration::from_secs(2);

/// Binds a UDP listener: one socket per runtime worker thread, all on `addr`
/// (SO_REUSEPORT), each to be read by its own receive loop with its own session table.
/// The kernel sends all of a client's datagrams to the same socket (it picks by a hash of
/// the client's address and port), so a session lives in exactly one table, and the
/// client→backend direction of a busy listener spreads over every core instead of one.
/// On a wildcard address each socket also asks for every datagram's destination address,
/// so replies can leave from it.
pub fn bind(addr: SocketAddr) -> io::Result<Vec<UdpSocket>> {
    let workers = tokio::runtime::Handle::try_current().map_or(1, |rt| rt.metrics().num_workers());
    bind_sockets(addr, workers)
}

/// Binds `count` sockets on `addr` (one without SO_REUSEPORT where the platform lacks it).
pub fn bind_sockets(addr: SocketAddr, count: usize) -> io::Result<Vec<UdpSocket>> {
    // A plain bind first. It fails when anything holds the address, another weir included:
    // SO_REUSEPORT alone would let a second instance join and silently take part of the
    // traffic. It also turns port 0 into the port every socket then binds.
    let first = new_listener_socket(addr)?;
    first.bind(&addr.into())?;
    let count = if cfg!(unix) { count.max(1) } else { 1 };
    if count == 1 {
        return Ok(vec![UdpSocket::from_std(first.into())?]);
    }
    let addr = first
        .local_addr()?
        .as_socket()
        .expect("a UDP socket has an IP address");
    drop(first);
    (0..count)
        .map(|_| {
            let socket = new_listener_socket(addr)?;
            #[cfg(unix)]
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            UdpSocket::from_std(socket.into())
        })
        .collect()
}

fn new_listener_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    set_buffers(&socket, LISTENER_SOCKET_BUFFER);
    if addr.ip().is_unspecified() {
        pktinfo::enable(&socket, addr.is_ipv6())?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A session expires between idle_timeout and 1.25 × idle_timeout after its last datagram.
fn sweep_interval(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Receives until `stop` fires or shutdown begins, owning the session table; then lets
/// the sessions linger briefly for answers in flight (see `STOPPED_LINGER`) and ends them.
pub async fn receive_loop(
    socket: UdpSocket,
    listener: Arc<Listener>,
    shutdown: Shutdown,
    stop: CancellationToken,
) {
    let front = Arc::new(socket);
    let with_pktinfo = pktinfo::SUPPORTED && listener.bind.ip().is_unspecified();
    // Read again at every sweep: a reload may change idle_timeout.
    let mut idle = listener.idle_timeout();
    let mut sweep_every = sweep_interval(idle);
    let mut table = Table::new(&listener, &front, &shutdown);
    let mut next_sweep = tokio::time::Instant::now() + sweep_every;
    let mut sweep = pin!(tokio::time::sleep_until(next_sweep));
    let mut stopped = pin!(async {
        tokio::select! {
            () = shutdown.stop_accepting.cancelled() => {}
            () = stop.cancelled() => {}
        }
    });
    let mut next_receive_error = Instant::now();
    // Reply tasks of sessions closed on down ask for a sweep now.
    let sweep_signal = table.sweep_signal();
    let mut sweep_asked = pin!(sweep_signal.notified());

    let mut unchecked = 0;
    'receiving: loop {
        // Biased: while datagrams are queued, readiness is ready at once and neither the
        // timers nor the stop tokens (a mutex each) are polled; the stop tokens are
        // checked by hand below after every batch, the sweep's time too.
        let mut sweep_now = false;
        tokio::select! {
            biased;
            ready = front.readable() => {
                if let Err(e) = ready {
                    tracing::error!(listener = %listener.name, "udp socket failed: {e}");
                    break 'receiving;
                }
            }
            () = &mut stopped => break 'receiving,
            () = &mut sweep => {}
            () = &mut sweep_asked => sweep_now = true,
        }
        if sweep_now {
            sweep_asked.set(sweep_signal.notified());
        }
        let handled = receive_queued(&front, &mut table, with_pktinfo, &mut next_receive_error);
        let now = tokio::time::Instant::now();
        if sweep_now || now >= next_sweep {
            idle = listener.idle_timeout();
            sweep_every = sweep_interval(idle);
            table.expire(idle);
            next_sweep = now + sweep_every;
            sweep.as_mut().reset(next_sweep);
        }
        // Counted across wakeups: under steady traffic a wakeup may find fewer than BUDGET
        // datagrams while the socket never stops being readable, so the stop branch of the
        // biased select above is never reached.
        unchecked += handled;
        if unchecked >= BUDGET {
            unchecked = 0;
            if shutdown.stop_accepting.is_cancelled() || stop.is_cancelled() {
                break 'receiving;
            }
        }
    }
    tracing::info!(listener = %listener.name, bind = %listener.bind, sessions = table.len(), "stopped receiving");
    linger(table, idle.min(STOPPED_LINGER), sweep_every, &shutdown).await;
}

/// Hands what is queued on the listener's socket to the table, up to `BUDGET` datagrams;
/// returns how many receive results it handled (an empty call counts one).
fn receive_queued(
    front: &UdpSocket,
    table: &mut Table,
    with_pktinfo: bool,
    next_receive_error: &mut Instant,
) -> usize {
    let mut handled = 0;
    while handled < BUDGET {
        let received = with_batch(|batch| {
            let n = front.try_io(Interest::READABLE, || batch.receive(front, with_pktinfo))?;
            for (data, datagram) in batch.datagrams() {
                table.on_datagram(data, datagram.from, datagram.local);
            }
            Ok::<_, io::Error>(n)
        });
        match received {
            Ok(n) => handled += n.max(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                // Transient (ENOMEM, a signal): note it and go on; never exit on it.
                let now = Instant::now();
                if now >= *next_receive_error {
                    *next_receive_error = now + WARN_EVERY;
                    tracing::warn!(listener = %table.listener_name(), "udp receive: {e}");
                }
                break;
            }
        }
    }
    handled
}

/// After the listener stopped receiving: sessions end once their backend has been quiet
/// for `linger`, or all at once when shutdown's hard token fires.
async fn linger(mut table: Table, linger: Duration, sweep_every: Duration, shutdown: &Shutdown) {
    let mut hard = pin!(shutdown.hard.cancelled());
    while !table.is_empty() {
        tokio::select! {
            () = &mut hard => break,
            () = tokio::time::sleep(sweep_every.min(linger)) => table.expire(linger),
        }
    }
    // Dropping the table ends what is left: guards released, reply tasks cancelled.
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[tokio::test]
    async fn sockets_share_one_address_and_the_kernel_keeps_each_client_on_one() {
        // Plain non-blocking std sockets, so a read is a read (tokio would answer
        // WouldBlock until its reactor has seen the socket become readable).
        let sockets: Vec<std::net::UdpSocket> = bind_sockets("127.0.0.1:0".parse().unwrap(), 3)
            .unwrap()
            .into_iter()
            .map(|s| s.into_std().unwrap())
            .collect();
        assert_eq!(sockets.len(), 3);
        let addr = sockets[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert!(sockets.iter().all(|s| s.local_addr().unwrap() == addr));

        // Two rounds from 64 client sockets: every datagram arrives once, and each client
        // arrives at the same socket both times.
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        }
        let mut first_round = HashMap::new();
        for round in 0..2 {
            for client in &clients {
                client.send_to(&[round], addr).unwrap();
            }
            // Loopback usually delivers inside send_to, but a busy machine may leave it to
            // ksoftirqd: read until all have arrived, within a deadline.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut got = 0;
            let mut buf = [0u8; 16];
            while got < clients.len() {
                assert!(
                    Instant::now() < deadline,
                    "{got} of {} arrived",
                    clients.len()
                );
                for (index, socket) in sockets.iter().enumerate() {
                    while let Ok((_, from)) = socket.recv_from(&mut buf) {
                        got += 1;
                        assert_eq!(buf[0], round);
                        let at = *first_round.entry(from).or_insert(index);
                        assert_eq!(at, index, "{from} moved between sockets");
                    }
                }
                std::thread::yield_now();
            }
            assert_eq!(got, clients.len());
        }
        assert!(
            (0..3)
                .filter(|i| first_round.values().any(|v| v == i))
                .count()
                > 1,
            "64 clients all hashed to one socket: {first_round:?}"
        );
    }

    #[tokio::test]
    async fn a_taken_address_is_refused_even_to_reuseport_sockets() {
        let sockets = bind_sockets("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = sockets[0].local_addr().unwrap();
        // A second weir on the same address: refused, not let in to share the traffic.
        let error = bind_sockets(addr, 2).expect_err("the address is taken");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        let error = std::net::UdpSocket::bind(addr).expect_err("the address is taken");
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        drop(sockets);
        assert_eq!(
            bind_sockets(addr, 2).unwrap().len(),
            2,
            "free again once closed"
        );
    }
}
