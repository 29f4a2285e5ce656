//! The session table of one receive loop: a client's datagram finds its session or opens
//! one (pick a backend, admit against `max_connections`, open the upstream socket and its
//! reply task), a session on a backend that went down moves on its next datagram, and the
//! sweep ends idle sessions. A plain `HashMap` only its receive loop touches: no lock.
//!
//! A session on a backend out of rotation (drained, disabled, removed by a reload) ends
//! once the backend has been out for `idle_timeout`, at the sweep or at its client's next
//! datagram, whichever comes first; that datagram then opens a new session on an eligible
//! backend. Without this a client that never pauses (syslog, statsd, SIP) would hold its
//! session forever and `drain --wait` would never return. It costs one atomic load per
//! datagram (`Backend::out_of_rotation_for` reads one `AtomicU64`, 0 while enabled).
//!
//! Under `on_down: close` a backend marked down fires the down signal each of its sessions
//! took when it opened: the reply task stops and asks the loop to sweep now, and the sweep
//! (or the client's next datagram, if it comes first) ends the session, counted in
//! `closed_on_down`. A session whose reply task has ended for any other reason is ended the
//! same way, so no session is left that forwards datagrams whose answers nobody reads.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::pktinfo;
use super::reply::{ReplyTask, ReplyTo, SessionBytes};
use super::stats::{Clock, DropReason, WARN_EVERY, stats};
use super::upstream::{Fault, backend_unreachable, send, upstream_socket};
use crate::backend::{Backend, ConnGuard, Health};
use crate::proxy::{Listener, ListenerGuard, access};
use crate::shutdown::Shutdown;

/// One session in the receive loop's table.
struct Session {
    upstream: Upstream,
    /// Last datagram either way, in `Clock` milliseconds (shared with the reply task).
    activity: Arc<AtomicU64>,
    /// The address the client sent to (wildcard binds on Linux), for a re-pick.
    local: Option<pktinfo::Local>,
    /// With `access_log`: when it opened.
    opened: Option<Instant>,
    _admitted: ListenerGuard,
}

/// A session's link to its backend. Dropping it cancels the reply task and releases the
/// backend's active count.
struct Upstream {
    socket: Arc<UdpSocket>,
    guard: ConnGuard,
    started: Instant,
    /// The backend's down signal as of the session's start.
    down: CancellationToken,
    /// Finished: no reply reaches the client any more, the session is dead.
    reply: JoinHandle<()>,
    /// With `access_log`: the session's byte counts (shared with the reply task, and kept
    /// by a re-pick).
    bytes: Option<Arc<SessionBytes>>,
    _reply_task: DropGuard,
}

/// Why the table ends a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// No datagram either way for `idle_timeout`.
    Idle,
    /// Its backend has been out of rotation for `idle_timeout`.
    OutOfRotation,
    /// Its backend was marked down under `on_down: close`.
    ClosedOnDown,
    /// Its reply task ended on its own (the upstream socket failed).
    ReplyEnded,
}

impl End {
    /// Its name in access logs (`end`).
    fn name(self) -> &'static str {
        match self {
            End::Idle => "idle_timeout",
            End::OutOfRotation => "out_of_rotation",
            End::ClosedOnDown => "backend_down",
            End::ReplyEnded => "backend_error",
        }
    }
}

impl Session {
    /// Whether the session must end before it carries another datagram: its backend was
    /// marked down under `on_down: close`, its reply task is gone, or its backend left
    /// rotation `idle` or longer ago. Three atomic loads while all is well; the down
    /// signal (a mutex) is read only when the backend is down or the reply task gone.
    fn must_end(&self, idle: Duration) -> Option<End> {
        let upstream = &self.upstream;
        let backend = upstream.guard.backend();
        let gone = upstream.reply.is_finished();
        if (gone || backend.health() == Health::Down) && upstream.down.is_cancelled() {
            return Some(End::ClosedOnDown);
        }
        if gone {
            return Some(End::ReplyEnded);
        }
        let out = backend.out_of_rotation_for();
        out.is_some_and(|out| out >= idle)
            .then_some(End::OutOfRotation)
    }

    /// Whether the sweep ends the session: `must_end`, or idle for `idle` (`idle_ms` in
    /// `Clock` milliseconds) at `now`.
    fn ends_at_sweep(&self, now: u64, idle: Duration, idle_ms: u64) -> Option<End> {
        self.must_end(idle).or_else(|| {
            let quiet = now.saturating_sub(self.activity.load(Ordering::Relaxed));
            (quiet >= idle_ms).then_some(End::Idle)
        })
    }
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
    /// Told by a reply task that ended on its backend's down signal.
    sweep_now: Arc<Notify>,
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
        if self.warning_due(reason) {
            tracing::warn!(
                listener = %self.listener.name, client = %client, pool = %self.listener.pool.load().name,
                "udp datagram dropped ({}): {detail} (further drops for this reason are counted in weir_udp_dropped_total, logged at debug)",
                reason.as_str()
            );
        } else {
            tracing::debug!(listener = %self.listener.name, client = %client, "udp datagram dropped ({}): {detail}", reason.as_str());
        }
    }

    /// Whether a warning about `reason` may be logged now (at most every `WARN_EVERY`).
    fn warning_due(&mut self, reason: DropReason) -> bool {
        let now = Instant::now();
        let next = &mut self.next_warning[reason as usize];
        if now < *next {
            return false;
        }
        *next = now + WARN_EVERY;
        true
    }

    /// Notes the end of a session (the caller drops it, which releases its counts).
    fn ended(&self, session: &Session, client: SocketAddr, end: End) {
        self.access(session, client, end.name());
        let backend = session.upstream.guard.backend();
        let why = match end {
            End::Idle => return,
            End::OutOfRotation => "out of rotation for idle_timeout",
            End::ClosedOnDown => {
                backend.metrics.closed_on_down.increment(1);
                "marked down (on_down: close)"
            }
            End::ReplyEnded => "its upstream socket failed",
        };
        tracing::debug!(
            listener = %self.listener.name, client = %client, pool = %backend.pool,
            "udp session on {} ended: {why}", backend.name
        );
    }

    /// The access line of an ended session (with `access_log`).
    fn access(&self, session: &Session, client: SocketAddr, end: &str) {
        let (Some(opened), Some(bytes)) = (session.opened, &session.upstream.bytes) else {
            return;
        };
        let backend = session.upstream.guard.backend();
        access::Entry {
            listener: &self.listener.name,
            pool: &backend.pool,
            backend: &backend.name,
            client,
            bytes_to_backend: bytes.to_backend.load(Ordering::Relaxed),
            bytes_to_client: bytes.to_client.load(Ordering::Relaxed),
            duration: opened.elapsed(),
            connect: None,
            retries: 0,
            end,
        }
        .log();
    }

    /// The access line of a datagram that opened no session (with `access_log`).
    fn refused(&self, client: SocketAddr, end: &str) {
        if !self.listener.access_log() {
            return;
        }
        access::Entry {
            listener: &self.listener.name,
            pool: &self.listener.pool.load().name,
            backend: "",
            client,
            bytes_to_backend: 0,
            bytes_to_client: 0,
            duration: Duration::ZERO,
            connect: None,
            retries: 0,
            end,
        }
        .log();
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
        bytes: Option<&Arc<SessionBytes>>,
    ) -> io::Result<Upstream> {
        let socket = Arc::new(upstream_socket(backend.addr)?);
        let guard = backend.connect_guard();
        let down = backend.down_signal();
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
            down: down.clone(),
            sweep_now: Arc::clone(&self.sweep_now),
            bytes: bytes.cloned(),
        };
        let reply = self.tracker.spawn(reply.run());
        Ok(Upstream {
            socket,
            guard,
            started: Instant::now(),
            down,
            reply,
            bytes: bytes.cloned(),
            _reply_task: cancel.drop_guard(),
        })
    }
}

/// The receive loop's state: the session table and what opens sessions.
pub struct Table {
    sessions: HashMap<SocketAddr, Session>,
    opener: Opener,
    /// The listener's `idle_timeout` as of the last sweep.
    idle: Duration,
}

impl Table {
    pub fn new(listener: &Arc<Listener>, front: &Arc<UdpSocket>, shutdown: &Shutdown) -> Table {
        let started = Instant::now();
        Table {
            sessions: HashMap::new(),
            opener: Opener {
                listener: Arc::clone(listener),
                front: Arc::clone(front),
                clock: Clock(started),
                hard: shutdown.hard.clone(),
                tracker: shutdown.tracker.clone(),
                sweep_now: Arc::new(Notify::new()),
                next_warning: [started; DropReason::ALL.len()],
            },
            idle: listener.idle_timeout(),
        }
    }

    /// Notified when sessions wait to be ended (their backend was marked down under
    /// `on_down: close`): the receive loop sweeps then, not only on its timer.
    pub fn sweep_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.opener.sweep_now)
    }

    pub fn listener_name(&self) -> &str {
        &self.opener.listener.name
    }

    /// Sessions open.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Sends a client's datagram to its session's backend, opening the session first if
    /// it has none (or the one it had must end): `local` is the address it was sent to
    /// (wildcard binds on Linux).
    pub fn on_datagram(&mut self, data: &[u8], client: SocketAddr, local: Option<pktinfo::Local>) {
        let now = self.opener.clock.now();
        if let Some(session) = self.sessions.get_mut(&client) {
            match session.must_end(self.idle) {
                None => {
                    if session.upstream.guard.backend().health() == Health::Down {
                        Self::repick(&mut self.opener, session, client);
                    }
                    session.activity.store(now, Ordering::Relaxed);
                    forward(
                        &mut self.opener,
                        &session.upstream,
                        client,
                        session.local,
                        data,
                    );
                    return;
                }
                Some(end) => {
                    // Ended (guards released) before the new one is admitted and picked.
                    let session = self.sessions.remove(&client).expect("found above");
                    self.opener.ended(&session, client, end);
                }
            }
        }
        let Some(session) = self.open_session(client, local, now) else {
            return;
        };
        let session = self.sessions.entry(client).insert_entry(session).into_mut();
        forward(
            &mut self.opener,
            &session.upstream,
            client,
            session.local,
            data,
        );
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
            self.opener.refused(client, "no_backend");
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
            self.opener.refused(client, "max_connections");
            return None;
        };
        let activity = Arc::new(AtomicU64::new(now));
        let access_log = self.opener.listener.access_log();
        let bytes = access_log.then(|| Arc::new(SessionBytes::default()));
        match self
            .opener
            .open(&backend, client, local, &activity, bytes.as_ref())
        {
            Ok(upstream) => {
                tracing::debug!(listener = %self.opener.listener.name, client = %client, backend = %backend.name, "udp session opened");
                Some(Session {
                    upstream,
                    activity,
                    local,
                    opened: access_log.then(Instant::now),
                    _admitted: admitted,
                })
            }
            Err(e) => {
                let fault = Fault::of(&e);
                let reason = fault.when_opening();
                if fault == Fault::Weir {
                    let detail = format_args!(
                        "cannot open a socket to {}: {e}: weir is out of file descriptors or memory, not the backend's fault (raise the open-file limit or lower max_connections)",
                        backend.addr
                    );
                    self.opener.drop_datagram(reason, client, &detail);
                } else {
                    if fault == Fault::Backend {
                        let o = &self.opener;
                        backend_unreachable(&o.listener, &backend, o.clock, &e);
                    }
                    let detail = format_args!("cannot open a socket to {}: {e}", backend.addr);
                    self.opener.drop_datagram(reason, client, &detail);
                }
                None
            }
        }
    }

    /// The session's backend is down: move the session to a backend picked now. With none
    /// eligible, or if the new socket can't be opened, it stays where it is.
    fn repick(opener: &mut Opener, session: &mut Session, client: SocketAddr) {
        let Some(backend) = opener.pick(client) else {
            return;
        };
        let old = session.upstream.guard.backend();
        if Arc::ptr_eq(&backend, old) {
            return;
        }
        let bytes = session.upstream.bytes.clone();
        match opener.open(
            &backend,
            client,
            session.local,
            &session.activity,
            bytes.as_ref(),
        ) {
            Ok(upstream) => {
                tracing::info!(
                    listener = %opener.listener.name, client = %client, pool = %backend.pool,
                    "udp session moved from {} (down) to {}", old.name, backend.name
                );
                session.upstream = upstream;
            }
            Err(e) if Fault::of(&e) == Fault::Weir && opener.warning_due(DropReason::Resources) => {
                tracing::warn!(listener = %opener.listener.name, client = %client, "udp session stays on {} (down): cannot open a socket to {}: {e}: weir is out of file descriptors or memory", old.name, backend.name);
            }
            Err(e) => {
                tracing::debug!(listener = %opener.listener.name, client = %client, "udp session stays on {}: {e}", old.name);
            }
        }
    }

    /// Ends sessions with no datagram either way for `idle`, and those whose backend has
    /// been out of rotation that long; `idle` holds for the next datagrams too.
    pub fn expire(&mut self, idle: Duration) {
        self.idle = idle;
        let now = self.opener.clock.now();
        let idle_ms = idle.as_millis() as u64;
        let before = self.sessions.len();
        let opener = &self.opener;
        let (mut out_of_rotation, mut closed_on_down) = (0, 0);
        self.sessions
            .retain(|client, s| match s.ends_at_sweep(now, idle, idle_ms) {
                None => true,
                Some(end) => {
                    out_of_rotation += usize::from(end == End::OutOfRotation);
                    closed_on_down += usize::from(end == End::ClosedOnDown);
                    opener.ended(s, *client, end);
                    false
                }
            });
        let expired = before - self.sessions.len();
        let name = &self.opener.listener.name;
        if out_of_rotation > 0 {
            tracing::info!(listener = %name, sessions = out_of_rotation, "udp sessions ended: their backend was out of rotation (drained, disabled or removed) for idle_timeout");
        }
        if closed_on_down > 0 {
            tracing::info!(listener = %name, sessions = closed_on_down, "udp sessions closed: their backend was marked down (on_down: close)");
        }
        if expired > 0 {
            tracing::debug!(listener = %self.opener.listener.name, expired, out_of_rotation, open = self.sessions.len(), "udp sessions ended");
            // Give back the memory of a burst, without shrinking on every sweep.
            let capacity = self.sessions.capacity();
            if capacity > 1024 && self.sessions.len() * 4 < capacity {
                self.sessions.shrink_to(self.sessions.len() * 2);
            }
        }
    }
}

/// Sessions still open when the table goes (shutdown's end) get their access line.
impl Drop for Table {
    fn drop(&mut self) {
        for (client, session) in &self.sessions {
            self.opener.access(session, *client, "shutdown");
        }
    }
}

/// Sends a client's datagram to its session's backend. A pending ICMP error from an
/// earlier datagram surfaces here instead of in the reply task: count it, then send again
/// (the error was reported instead of sending).
fn forward(
    opener: &mut Opener,
    upstream: &Upstream,
    client: SocketAddr,
    local: Option<pktinfo::Local>,
    data: &[u8],
) {
    let backend = upstream.guard.backend();
    let mut result = send(&upstream.socket, &opener.listener, client, local, data);
    if let Err(e) = &result
        && Fault::of(e) == Fault::Backend
    {
        backend_unreachable(&opener.listener, backend, opener.clock, e);
        result = send(&upstream.socket, &opener.listener, client, local, data);
    }
    let e = match result {
        Ok(_) => {
            stats(&opener.listener).count_to_backend();
            backend.metrics.bytes_sent.increment(data.len() as u64);
            if let Some(bytes) = &upstream.bytes {
                (bytes.to_backend).fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            return;
        }
        Err(e) => e,
    };
    let fault = Fault::of(&e);
    match fault {
        Fault::Weir => {
            let detail = format_args!(
                "sending to {} failed: {e}: weir is out of socket buffers or memory, not the backend's fault",
                backend.name
            );
            opener.drop_datagram(fault.when_sending(), client, &detail);
        }
        Fault::BufferFull => stats(&opener.listener).count_drop(fault.when_sending()),
        Fault::Backend | Fault::Other => {
            stats(&opener.listener).count_drop(fault.when_sending());
            tracing::debug!(listener = %opener.listener.name, backend = %backend.name, "udp send to backend: {e}");
        }
    }
}
