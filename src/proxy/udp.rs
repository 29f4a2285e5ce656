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
//! checking) moves to a newly picked backend on its next client datagram. A backend that
//! is only draining or disabled by an operator keeps its sessions until they go idle. A
//! backend that answers with ICMP port unreachable shows up as `ConnectionRefused` on the
//! connected upstream socket: it counts as a failed connect (`record_connect_failure`,
//! which feeds passive checking), nothing more.
//!
//! Several datagrams per system call (`udp_batch`): the receive loop reads what is queued on
//! the listener's socket with one `recvmmsg`, a reply task reads its backend's answers the
//! same way and sends them to the client with one `sendmmsg`. The buffers are one set per
//! worker thread, not per session. Sends never wait (a full socket buffer drops the
//! datagram and counts it rather than stalling every session behind one), and metric
//! handles were registered with the listener. The loop polls its stop tokens (which take a
//! mutex) only when it is about to sleep, never once per datagram.
//!
//! On a wildcard bind (`0.0.0.0` or `[::]`) on Linux the loop reads each datagram's destination
//! address (IP_PKTINFO / IPV6_RECVPKTINFO) and replies carry it as their source
//! (`pktinfo` below), so a multi-homed host answers from the address the client used.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::udp_batch::{self, Batch, with_batch};
use super::{Listener, ListenerGuard};
use crate::backend::{Backend, ConnGuard, Health};
use crate::metrics::UdpListenerMetrics;
use crate::shutdown::Shutdown;

/// Receive buffer: larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6),
/// so a datagram is never truncated.
pub const BUFFER_SIZE: usize = 65_536;

/// SO_RCVBUF/SO_SNDBUF asked for on a listener's socket. The kernel caps it at
/// `net.core.rmem_max`/`wmem_max`; raise those for high packet rates.
const LISTENER_SOCKET_BUFFER: usize = 4 << 20;

/// SO_RCVBUF/SO_SNDBUF for each session's upstream socket: a few maximum-size datagrams.
/// Up to 65,536 sessions each have one, so not more.
const UPSTREAM_SOCKET_BUFFER: usize = 256 << 10;

/// Datagrams handled in a row before the loop looks at its timer and stop tokens again.
const BATCH: usize = 64;

/// Once a listener stops receiving (shutdown or removal), its sessions can carry no more
/// requests; they live on until their backend has been quiet this long (or `idle_timeout`
/// if shorter), so answers in flight still reach their clients, then end.
const STOPPED_LINGER: Duration = Duration::from_secs(2);

/// At most one warning of a kind per listener this often; the rest are counted and logged
/// at debug level.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why a datagram was dropped: the `reason` label of `weir_udp_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A new session would exceed `max_connections`.
    MaxConnections,
    /// No eligible backend for a new session.
    NoBackend,
    /// The upstream socket for a new session could not be opened (out of file descriptors?).
    UpstreamSocket,
    /// A socket's send buffer was full.
    BufferFull,
    /// The kernel refused the send for another reason.
    SendError,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::MaxConnections,
        DropReason::NoBackend,
        DropReason::UpstreamSocket,
        DropReason::BufferFull,
        DropReason::SendError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MaxConnections => "max_connections",
            DropReason::NoBackend => "no_backend",
            DropReason::UpstreamSocket => "upstream_socket",
            DropReason::BufferFull => "buffer_full",
            DropReason::SendError => "send_error",
        }
    }
}

/// A UDP listener's counters: readable in-process (admin, tests) and exported as metrics.
pub struct UdpStats {
    to_backend: AtomicU64,
    to_client: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    metrics: UdpListenerMetrics,
    /// When the next "backend unreachable" warning may be logged (ms on `CLOCK`).
    next_unreachable_warning: AtomicU64,
    /// Sockets the listener receives on (one per worker thread).
    sockets: AtomicUsize,
}

impl UdpStats {
    pub fn new(listener: &str) -> Self {
        UdpStats {
            to_backend: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            dropped: Default::default(),
            metrics: UdpListenerMetrics::new(listener, &DropReason::ALL.map(DropReason::as_str)),
            next_unreachable_warning: AtomicU64::new(0),
            sockets: AtomicUsize::new(0),
        }
    }

    /// How many sockets (and receive loops) the listener receives on.
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    pub(crate) fn set_sockets(&self, count: usize) {
        self.sockets.store(count, Ordering::Relaxed);
    }

    /// Client datagrams sent to backends.
    pub fn datagrams_to_backend(&self) -> u64 {
        self.to_backend.load(Ordering::Relaxed)
    }

    /// Backend datagrams sent to clients.
    pub fn datagrams_to_client(&self) -> u64 {
        self.to_client.load(Ordering::Relaxed)
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    fn count_drop(&self, reason: DropReason) {
        self.count_drops(reason, 1);
    }

    fn count_drops(&self, reason: DropReason, count: u64) {
        self.dropped[reason as usize].fetch_add(count, Ordering::Relaxed);
        self.metrics.dropped[reason as usize].increment(count);
    }

    fn count_to_backend(&self) {
        self.to_backend.fetch_add(1, Ordering::Relaxed);
        self.metrics.datagrams_to_backend.increment(1);
    }

    fn count_to_client(&self, count: u64) {
        if count > 0 {
            self.to_client.fetch_add(count, Ordering::Relaxed);
            self.metrics.datagrams_to_client.increment(count);
        }
    }
}

fn stats(listener: &Listener) -> &UdpStats {
    listener.udp.as_ref().expect("a udp listener has udp stats")
}

/// Milliseconds since a fixed start: session activity is one `AtomicU64` of these, written
/// by the receive loop and the reply task without a lock.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

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

/// Best effort: the kernel may cap or refuse the size; the defaults still work.
fn set_buffers(socket: &Socket, size: usize) {
    if let Err(e) = socket.set_recv_buffer_size(size) {
        tracing::debug!("SO_RCVBUF {size}: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(size) {
        tracing::debug!("SO_SNDBUF {size}: {e}");
    }
}

/// A session's upstream socket: an ephemeral port of the backend's family, connected to it,
/// so only the backend's datagrams arrive and ICMP errors about it are reported.
fn upstream_socket(backend: SocketAddr) -> io::Result<UdpSocket> {
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

/// ICMP errors a connected UDP socket reports for its peer: the backend is not there.
fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// The backend answered a datagram with an ICMP error: a failed connect, as for TCP. With a
/// health check, `fall` of them in a row mark it down at once (probes bring it back); a
/// reply from it resets the run.
fn backend_unreachable(listener: &Listener, backend: &Backend, clock: Clock, e: &io::Error) {
    let failures = backend.record_connect_failure();
    let passive_fall = listener.pool.load().snapshot().passive_fall;
    if let Some(fall) = passive_fall
        && failures >= fall
        && backend.set_health(Health::Down) == Health::Up
    {
        tracing::warn!(
            "{}/{} down: {failures} consecutive ICMP errors from udp traffic, last: {}",
            backend.pool,
            backend.name,
            super::connect::describe(e)
        );
        return;
    }
    let now = clock.now();
    let next = &stats(listener).next_unreachable_warning;
    if now >= next.load(Ordering::Relaxed) {
        next.store(now + WARN_EVERY.as_millis() as u64, Ordering::Relaxed);
        tracing::warn!(
            listener = %listener.name, pool = %backend.pool, backend = %backend.name, address = %backend.addr,
            "backend unreachable over udp: {}", super::connect::describe(e)
        );
    } else {
        tracing::debug!(listener = %listener.name, backend = %backend.name, "backend unreachable: {e}");
    }
}

/// Where a reply goes and which source address it carries.
struct ReplyTo {
    client: SockAddr,
    /// The same address, for `sendmmsg`.
    client_addr: SocketAddr,
    /// Encoded IP_PKTINFO/IPV6_PKTINFO naming the reply's source; empty: let routing pick.
    control: pktinfo::Control,
}

/// One session in the receive loop's table.
struct Session {
    upstream: Upstream,
    /// Last datagram either way, in `Clock` milliseconds (shared with the reply task).
    activity: Arc<AtomicU64>,
    /// The address the client sent to (wildcard binds on Linux), for a re-pick.
    local: Option<pktinfo::Local>,
    _admitted: ListenerGuard,
}

/// A session's link to its backend. Dropping it cancels the reply task and releases the
/// backend's active count.
struct Upstream {
    socket: Arc<UdpSocket>,
    guard: ConnGuard,
    started: Instant,
    _reply_task: DropGuard,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.guard
            .backend()
            .metrics
            .connection_duration
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// What the loop needs to open sessions, apart from the table itself (so both can be
/// borrowed at once).
struct Opener {
    listener: Arc<Listener>,
    front: Arc<UdpSocket>,
    clock: Clock,
    hard: CancellationToken,
    tracker: TaskTracker,
    next_warning: [Instant; DropReason::ALL.len()],
}

impl Opener {
    /// Counts a drop; warns about it at most every `WARN_EVERY` per reason.
    fn drop_datagram(
        &mut self,
        reason: DropReason,
        client: SocketAddr,
        detail: &dyn std::fmt::Display,
    ) {
        stats(&self.listener).count_drop(reason);
        let now = Instant::now();
        let next = &mut self.next_warning[reason as usize];
        if now >= *next {
            *next = now + WARN_EVERY;
            tracing::warn!(
                listener = %self.listener.name, client = %client, pool = %self.listener.pool.load().name,
                "udp datagram dropped ({}): {detail} (further drops for this reason are counted in weir_udp_dropped_total, logged at debug)",
                reason.as_str()
            );
        } else {
            tracing::debug!(listener = %self.listener.name, client = %client, "udp datagram dropped ({}): {detail}", reason.as_str());
        }
    }

    /// Picks an eligible backend for `client`; None when there is none.
    fn pick(&self, client: SocketAddr) -> Option<Arc<Backend>> {
        let pool = self.listener.pool.load();
        let snapshot = pool.snapshot();
        let index = snapshot.pick(client.ip(), &[])?;
        Some(Arc::clone(&snapshot.backends[index]))
    }

    /// Opens the upstream socket to `backend` and starts its reply task.
    fn open(
        &self,
        backend: &Arc<Backend>,
        client: SocketAddr,
        local: Option<pktinfo::Local>,
        activity: &Arc<AtomicU64>,
    ) -> io::Result<Upstream> {
        let socket = Arc::new(upstream_socket(backend.addr)?);
        let guard = backend.connect_guard();
        // A child of `hard`: shutdown's end reaches every reply task, and each task polls
        // only its own token (no mutex shared across sessions).
        let cancel = self.hard.child_token();
        let reply = ReplyTask {
            listener: Arc::clone(&self.listener),
            front: Arc::clone(&self.front),
            upstream: Arc::clone(&socket),
            backend: Arc::clone(backend),
            to: ReplyTo {
                client: client.into(),
                client_addr: client,
                control: local.map(pktinfo::Control::new).unwrap_or_default(),
            },
            activity: Arc::clone(activity),
            clock: self.clock,
            cancel: cancel.clone(),
        };
        self.tracker.spawn(reply.run());
        Ok(Upstream {
            socket,
            guard,
            started: Instant::now(),
            _reply_task: cancel.drop_guard(),
        })
    }
}

/// The receive loop's state: the session table and what opens sessions.
struct Table {
    sessions: HashMap<SocketAddr, Session>,
    opener: Opener,
}

impl Table {
    fn on_datagram(&mut self, data: &[u8], client: SocketAddr, local: Option<pktinfo::Local>) {
        let now = self.opener.clock.now();
        let session = match self.sessions.get_mut(&client) {
            Some(session) => {
                if session.upstream.guard.backend().health() == Health::Down {
                    Self::repick(&self.opener, session, client);
                }
                session
            }
            None => match self.open_session(client, local, now) {
                Some(session) => self.sessions.entry(client).insert_entry(session).into_mut(),
                None => return,
            },
        };
        session.activity.store(now, Ordering::Relaxed);
        forward(&self.opener, &session.upstream, data);
    }

    fn open_session(
        &mut self,
        client: SocketAddr,
        local: Option<pktinfo::Local>,
        now: u64,
    ) -> Option<Session> {
        // Picked before admitted: a datagram dropped for want of a backend is not a session
        // (weir_listener_connections_total).
        let Some(backend) = self.opener.pick(client) else {
            self.opener
                .listener
                .metrics
                .rejected_no_backend
                .increment(1);
            self.opener
                .drop_datagram(DropReason::NoBackend, client, &"no backend available");
            return None;
        };
        let Some(admitted) = self.opener.listener.admit() else {
            // admit() counted it in weir_listener_rejected_total{reason="max_connections"}.
            let max = self.opener.listener.max_connections().unwrap_or(0);
            self.opener.drop_datagram(
                DropReason::MaxConnections,
                client,
                &format_args!("{max} sessions open (max_connections)"),
            );
            return None;
        };
        let activity = Arc::new(AtomicU64::new(now));
        match self.opener.open(&backend, client, local, &activity) {
            Ok(upstream) => {
                tracing::debug!(listener = %self.opener.listener.name, client = %client, backend = %backend.name, "udp session opened");
                Some(Session {
                    upstream,
                    activity,
                    local,
                    _admitted: admitted,
                })
            }
            Err(e) => {
                self.opener.drop_datagram(
                    DropReason::UpstreamSocket,
                    client,
                    &format_args!("cannot open a socket to {}: {e} (raise the open-file limit or lower max_connections)", backend.addr),
                );
                None
            }
        }
    }

    /// The session's backend is down: move the session to a backend picked now. With none
    /// eligible, or if the new socket can't be opened, it stays where it is.
    fn repick(opener: &Opener, session: &mut Session, client: SocketAddr) {
        let Some(backend) = opener.pick(client) else {
            return;
        };
        let old = session.upstream.guard.backend();
        if Arc::ptr_eq(&backend, old) {
            return;
        }
        match opener.open(&backend, client, session.local, &session.activity) {
            Ok(upstream) => {
                tracing::info!(
                    listener = %opener.listener.name, client = %client, pool = %backend.pool,
                    "udp session moved from {} (down) to {}", old.name, backend.name
                );
                session.upstream = upstream;
            }
            Err(e) => {
                tracing::debug!(listener = %opener.listener.name, client = %client, "udp session stays on {}: {e}", old.name);
            }
        }
    }

    /// Ends sessions with no datagram either way for `idle`.
    fn expire(&mut self, idle: Duration) {
        let now = self.opener.clock.now();
        let idle = idle.as_millis() as u64;
        let before = self.sessions.len();
        self.sessions
            .retain(|_, s| now.saturating_sub(s.activity.load(Ordering::Relaxed)) < idle);
        let expired = before - self.sessions.len();
        if expired > 0 {
            tracing::debug!(listener = %self.opener.listener.name, expired, open = self.sessions.len(), "udp sessions expired");
            // Give back the memory of a burst, without shrinking on every sweep.
            let capacity = self.sessions.capacity();
            if capacity > 1024 && self.sessions.len() * 4 < capacity {
                self.sessions.shrink_to(self.sessions.len() * 2);
            }
        }
    }
}

/// Sends a client's datagram to its session's backend. A pending ICMP error from an
/// earlier datagram surfaces here instead of in the reply task: count it, then send again
/// (the error was reported instead of sending).
fn forward(opener: &Opener, upstream: &Upstream, data: &[u8]) {
    let backend = upstream.guard.backend();
    let stats = stats(&opener.listener);
    let mut result = SockRef::from(&*upstream.socket).send(data);
    if let Err(e) = &result
        && is_unreachable(e)
    {
        backend_unreachable(&opener.listener, backend, opener.clock, e);
        result = SockRef::from(&*upstream.socket).send(data);
    }
    match result {
        Ok(_) => {
            stats.count_to_backend();
            backend.metrics.bytes_sent.increment(data.len() as u64);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => stats.count_drop(DropReason::BufferFull),
        Err(e) => {
            stats.count_drop(DropReason::SendError);
            tracing::debug!(listener = %opener.listener.name, backend = %backend.name, "udp send to backend: {e}");
        }
    }
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
    let started = Instant::now();
    let mut table = Table {
        sessions: HashMap::new(),
        opener: Opener {
            listener: Arc::clone(&listener),
            front: Arc::clone(&front),
            clock: Clock(started),
            hard: shutdown.hard.clone(),
            tracker: shutdown.tracker.clone(),
            next_warning: [started; DropReason::ALL.len()],
        },
    };
    let mut next_sweep = tokio::time::Instant::now() + sweep_every;
    let mut sweep = pin!(tokio::time::sleep_until(next_sweep));
    let mut stopped = pin!(async {
        tokio::select! {
            () = shutdown.stop_accepting.cancelled() => {}
            () = stop.cancelled() => {}
        }
    });
    let mut next_receive_error = started;

    let mut unchecked = 0;
    'receiving: loop {
        // Biased: while datagrams are queued, readiness is ready at once and neither the
        // timer nor the stop tokens (a mutex each) are polled; they are checked by hand
        // below after every batch.
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
        }
        let mut handled = 0;
        while handled < BATCH {
            let received = with_batch(|batch| {
                let n = front.try_io(Interest::READABLE, || batch.receive(&front, with_pktinfo))?;
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
                    if now >= next_receive_error {
                        next_receive_error = now + WARN_EVERY;
                        tracing::warn!(listener = %listener.name, "udp receive: {e}");
                    }
                    break;
                }
            }
        }
        let now = tokio::time::Instant::now();
        if now >= next_sweep {
            idle = listener.idle_timeout();
            sweep_every = sweep_interval(idle);
            table.expire(idle);
            next_sweep = now + sweep_every;
            sweep.as_mut().reset(next_sweep);
        }
        // Counted across wakeups: under steady traffic a wakeup may find fewer than BATCH
        // datagrams while the socket never stops being readable, so the stop branch of the
        // biased select above is never reached.
        unchecked += handled;
        if unchecked >= BATCH {
            unchecked = 0;
            if shutdown.stop_accepting.is_cancelled() || stop.is_cancelled() {
                break 'receiving;
            }
        }
    }
    tracing::info!(listener = %listener.name, bind = %listener.bind, sessions = table.sessions.len(), "stopped receiving");

    let linger = idle.min(STOPPED_LINGER);
    let mut hard = pin!(shutdown.hard.cancelled());
    while !table.sessions.is_empty() {
        tokio::select! {
            () = &mut hard => break,
            () = tokio::time::sleep(sweep_every.min(linger)) => table.expire(linger),
        }
    }
    // Dropping the table ends what is left: guards released, reply tasks cancelled.
}

/// Reads a session's replies from its backend and sends them to the client.
struct ReplyTask {
    listener: Arc<Listener>,
    front: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    backend: Arc<Backend>,
    to: ReplyTo,
    activity: Arc<AtomicU64>,
    clock: Clock,
    cancel: CancellationToken,
}

impl ReplyTask {
    async fn run(self) {
        // ERROR too: the kernel reports an ICMP error on a connected UDP socket as
        // EPOLLERR; asking for it makes sure the task wakes for it, whatever readiness
        // comes with it.
        let interest = Interest::READABLE | Interest::ERROR;
        let mut cancelled = pin!(self.cancel.cancelled());
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
            }
            let mut handled = 0;
            while handled < BATCH {
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
                    Err(e) if is_unreachable(&e) => {
                        backend_unreachable(&self.listener, &self.backend, self.clock, &e);
                    }
                    Err(e) => {
                        tracing::debug!(listener = %self.listener.name, backend = %self.backend.name, "udp receive from backend: {e}");
                        break;
                    }
                }
            }
            // Counted across wakeups, as in the receive loop.
            unchecked += handled;
            if unchecked >= BATCH {
                unchecked = 0;
                if self.cancel.is_cancelled() {
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
        let stats = stats(&self.listener);
        let (sent, error) = if self.to.control.is_empty() {
            udp_batch::send_all_to(
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
            if e.kind() == io::ErrorKind::WouldBlock {
                stats.count_drops(DropReason::BufferFull, dropped);
            } else {
                stats.count_drops(DropReason::SendError, dropped);
                tracing::debug!(listener = %self.listener.name, "udp send to client: {e}");
            }
        }
    }
}

/// Destination addresses of received datagrams, and reply source addresses, on Linux.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(super) mod pktinfo {
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
}

/// Elsewhere a wildcard bind replies from whatever address routing picks; bind a specific
/// address for multi-homed hosts.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) mod pktinfo {
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

    pub fn send_to(
        front: &UdpSocket,
        data: &[u8],
        to: &SockAddr,
        _: &Control,
    ) -> io::Result<usize> {
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
}

#[cfg(test)]
mod tests {
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
