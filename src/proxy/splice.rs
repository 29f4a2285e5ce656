//! Moving bytes both ways between a client and a backend.
//!
//! Each direction is a pump that reads from one socket and writes to the other. The two
//! pumps are polled by one future and the connection ends only when BOTH are done: EOF on
//! one side becomes a write shutdown on the other while the other direction keeps flowing
//! (the half-close bug of an early `select!` over two copies is the one to never write).
//! Besides that the connection ends when:
//! - one side resets: the other side is reset at once (SO_LINGER 0, then close), whatever
//!   the pumps are doing: a socket that neither pump watches just then (its reader is
//!   blocked writing, or done) gets a watch on its error readiness (`Conn::poll_reset`);
//! - no byte moved either way for `idle_timeout`;
//! - one direction finished and the other moved no byte for `half_close_timeout` (an
//!   inactivity timeout of the direction still open, counted from the EOF and from each
//!   byte after it: a reply that keeps trickling is never cut);
//! - shutdown's grace period ran out (`hard` token);
//! - the backend was marked down under `on_down: close` (its `down` token): both sides
//!   are reset.
//!
//! The backend's `down` token is a child of `hard` (`Backend::new_under`): the connection
//! waits on that one token for both, and tells them apart by whether `hard` fired.
//!
//! A connection that ends for any reason but a reset closes with a FIN towards each side
//! that got every byte read for it; a side whose peer stopped reading, so that bytes for
//! it are still held, is reset instead: a stream cut short never looks complete.
//!
//! How bytes move (like HAProxy's `splice-auto`): a burst starts with a `read` into a
//! small buffer and a `write` out of it. A read that comes back short proves the socket
//! drained, so tokio clears its readiness without another `read` that would only say
//! EAGAIN: a request/response exchange costs one `read` and one `write` per direction. A
//! read that fills the buffer means a bulk transfer: on Linux the pump then `splice(2)`s
//! socket → pipe → socket, so the bytes never enter user space, until the socket has
//! nothing more to give. Where pipes can't be had (another OS, or out of descriptors) the
//! pump keeps copying.
//!
//! Buffers and pipes come from small per-thread pools (no lock) when bytes arrive and go
//! back as soon as they are empty and the pump waits again, so an idle connection holds
//! neither. A pipe that still holds bytes (a connection cut mid-transfer) is closed, never
//! pooled. The whole connection is one hand-written future over owned streams — no
//! per-direction sub-futures, one timer for both timeouts — which keeps an idle
//! connection's task small.
//!
//! Files: `pump.rs` (one direction), `pool.rs` (the buffer pool), `pipes.rs` (the pipe
//! pool and splice calls, Linux only), `watch.rs` (polling shared futures cheaply).

#[cfg(target_os = "linux")]
mod pipes;
mod pool;
mod pump;
mod watch;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use metrics::Counter;
use socket2::SockRef;
use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;
use tokio::time::{Instant as TokioInstant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use pump::{Pump, PumpError};
use watch::Watch;

pub struct SpliceOptions {
    pub idle_timeout: Duration,
    pub half_close_timeout: Duration,
}

/// How a connection ended.
#[derive(Debug)]
pub enum End {
    /// Both sides finished sending.
    Done,
    IdleTimeout,
    /// One side finished sending and the other sent nothing for `half_close_timeout`.
    HalfCloseTimeout,
    ClientReset(io::Error),
    BackendReset(io::Error),
    Shutdown,
    /// The backend was marked down under `on_down: close`.
    BackendDown,
}

impl End {
    pub fn describe(&self) -> String {
        match self {
            End::Done => "closed".into(),
            End::IdleTimeout => "idle timeout".into(),
            End::HalfCloseTimeout => "half-closed and quiet for half_close_timeout".into(),
            End::ClientReset(e) => format!("client: {}", crate::net::describe(e)),
            End::BackendReset(e) => format!("backend: {}", crate::net::describe(e)),
            End::Shutdown => "shutdown grace period ended".into(),
            End::BackendDown => "backend marked down (on_down: close)".into(),
        }
    }

    /// Its name in access logs (`end`).
    pub fn name(&self) -> &'static str {
        match self {
            End::Done => "closed",
            End::IdleTimeout => "idle_timeout",
            End::HalfCloseTimeout => "half_close_timeout",
            End::ClientReset(_) => "client_reset",
            End::BackendReset(_) => "backend_reset",
            End::Shutdown => "shutdown",
            End::BackendDown => "backend_down",
        }
    }
}

pub struct Outcome {
    pub end: End,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
}

/// Bytes counted as they move, for metrics (handles registered once per backend).
pub struct Counters<'a> {
    pub to_backend: &'a Counter,
    pub to_client: &'a Counter,
}

/// Splices `client` ⇄ `backend` until the connection ends (see the module docs). The
/// caller drops `client` right after, which closes it (and `backend` is closed as the
/// future ends).
///
/// A plain fn returning an `async move` block that uses its captures in place: an
/// `async fn` would keep a second copy of its arguments in the task for its whole life.
/// `client` is borrowed: the caller's task holds it already (an `async` block's captures
/// stay in its future for its whole life, even once moved out), so moving it here would
/// hold it twice; `options` is taken by value, so the caller keeps no copy.
pub fn splice<'a>(
    client: &'a TcpStream,
    backend: TcpStream,
    options: SpliceOptions,
    counters: Counters<'a>,
    hard: &'a CancellationToken,
    down: &'a CancellationToken,
) -> impl Future<Output = Outcome> + 'a {
    // Built out here and moved in whole: the task holds one copy of each.
    let sockets = Sockets { client, backend };
    let mut conn = Conn {
        upstream: Pump::new(counters.to_backend),
        downstream: Pump::new(counters.to_client),
        last_activity: Instant::now(),
        idle_timeout: options.idle_timeout,
        half_close_timeout: options.half_close_timeout,
        watching: None,
    };
    async move {
        // One timer for both the idle and the half-close timeout. It is registered once
        // and, when it fires, pushed back to the last activity instead of being reset on
        // every byte.
        let mut timer = pin!(sleep_until(TokioInstant::from_std(
            conn.last_activity + conn.idle_timeout
        )));
        // `down` fires for shutdown's hard stop too (it is a child of `hard`).
        let mut stops = pin!(down.cancelled());
        let mut stops = Watch::new(stops.as_mut());
        // Armed only when a socket needs it (see `Conn::poll_reset`), and boxed then: the
        // task of a connection that never arms it doesn't carry tokio's readiness future.
        let mut reset = None;
        let end = poll_fn(|cx| {
            conn.poll(
                cx,
                &sockets,
                timer.as_mut(),
                &mut stops,
                &mut reset,
                reset_of,
            )
        })
        .await
        .unwrap_or_else(|| {
            if hard.is_cancelled() {
                End::Shutdown
            } else {
                End::BackendDown
            }
        });
        conn.finish(end, &sockets)
    }
}

/// The connection's two sockets, shared by the pumps and the reset watch.
struct Sockets<'a> {
    client: &'a TcpStream,
    backend: TcpStream,
}

impl Sockets<'_> {
    fn get(&self, side: Side) -> &TcpStream {
        match side {
            Side::Client => self.client,
            Side::Backend => &self.backend,
        }
    }
}

/// A socket's error readiness: what a reset (or another fatal error) raises.
fn reset_of(socket: &TcpStream) -> impl Future<Output = io::Result<Ready>> + '_ {
    socket.ready(Interest::ERROR)
}

/// One side of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// One connection's state, polled by `splice`'s future.
struct Conn<'a> {
    upstream: Pump<'a>,
    downstream: Pump<'a>,
    /// When a byte last moved (and when the first direction finished).
    last_activity: Instant,
    idle_timeout: Duration,
    half_close_timeout: Duration,
    /// The socket the reset watch is armed for.
    watching: Option<Side>,
}

impl Conn<'_> {
    /// `stops` is the backend's down signal (shared by many connections, so polled
    /// through a `Watch`), which fires for shutdown's hard stop too: `None` when it fired.
    /// `reset` is the reset watch of one socket, when armed (`watching` says which), and
    /// `arm` makes one (`reset_of`).
    fn poll<'s, S: Future<Output = ()>, R: Future<Output = io::Result<Ready>>>(
        &mut self,
        cx: &mut Context<'_>,
        sockets: &'s Sockets<'_>,
        mut timer: Pin<&mut Sleep>,
        stops: &mut Watch<'_, S>,
        reset: &mut Option<Pin<Box<R>>>,
        arm: fn(&'s TcpStream) -> R,
    ) -> Poll<Option<End>> {
        if stops.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let finished_now = match self.poll_pumps(cx, sockets) {
            Ok(finished_now) => finished_now,
            Err(end) => return Poll::Ready(Some(end)),
        };
        if self.upstream.done && self.downstream.done {
            return Poll::Ready(Some(End::Done));
        }
        if let Poll::Ready(end) = self.poll_reset(cx, sockets, reset, arm) {
            return Poll::Ready(Some(end));
        }
        if finished_now {
            // Half-closed from now: the quiet time of the direction still open counts from
            // this EOF, and may be shorter than the idle timeout.
            self.last_activity = Instant::now();
            let deadline = TokioInstant::from_std(self.deadline());
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
        }
        self.poll_timer(cx, timer).map(Some)
    }

    /// Polls the pumps that are not done: Ok(whether one finished now), or how the
    /// connection ended.
    fn poll_pumps(&mut self, cx: &mut Context<'_>, sockets: &Sockets<'_>) -> Result<bool, End> {
        let (client, backend) = (sockets.client, &sockets.backend);
        let mut finished_now = false;
        if !self.upstream.done {
            let last = self.downstream.done;
            match self
                .upstream
                .poll(cx, client, backend, &mut self.last_activity, last)
            {
                Poll::Ready(Ok(())) => finished_now = true,
                Poll::Ready(Err(PumpError::Read(e))) => return Err(End::ClientReset(e)),
                Poll::Ready(Err(PumpError::Write(e))) => return Err(End::BackendReset(e)),
                Poll::Pending => {}
            }
        }
        if !self.downstream.done {
            let last = self.upstream.done;
            match self
                .downstream
                .poll(cx, backend, client, &mut self.last_activity, last)
            {
                Poll::Ready(Ok(())) => finished_now = true,
                Poll::Ready(Err(PumpError::Read(e))) => return Err(End::BackendReset(e)),
                Poll::Ready(Err(PumpError::Write(e))) => return Err(End::ClientReset(e)),
                Poll::Pending => {}
            }
        }
        Ok(finished_now)
    }

    /// The socket, if any, that no pump would notice a reset on now. A pump waiting for
    /// bytes notices a reset of the socket it reads, one waiting to write notices a reset
    /// of the socket it writes to; a pump that is done, or blocked writing, doesn't watch
    /// the socket it reads. (At most one socket is left unwatched: the client is when
    /// neither the upstream pump reads it nor the downstream pump is blocked writing to
    /// it, and then the downstream pump watches the backend.)
    fn unwatched(&self) -> Option<Side> {
        if !self.upstream.waits_to_read() && !self.downstream.waits_to_write() {
            Some(Side::Client)
        } else if !self.downstream.waits_to_read() && !self.upstream.waits_to_write() {
            Some(Side::Backend)
        } else {
            None
        }
    }

    /// Passes on a reset of the socket no pump watches (`unwatched`): a client that
    /// resets while weir waits to write to a backend that doesn't read, or after it sent
    /// its EOF, is passed on at once, not when the backend reads again or a timeout
    /// fires. The watch waits on the socket's error readiness: no system call until it
    /// fires, and it is armed (or moved to the other socket) only when needed, then left
    /// armed, so a request/response connection never arms one. It is boxed when first
    /// armed (one allocation for the connection's life: moving it reuses the box), so an
    /// idle connection's task doesn't hold it.
    fn poll_reset<'s, R: Future<Output = io::Result<Ready>>>(
        &mut self,
        cx: &mut Context<'_>,
        sockets: &'s Sockets<'_>,
        reset: &mut Option<Pin<Box<R>>>,
        arm: fn(&'s TcpStream) -> R,
    ) -> Poll<End> {
        let Some(side) = self.unwatched() else {
            return Poll::Pending;
        };
        let socket = sockets.get(side);
        if self.watching != Some(side) {
            match reset {
                Some(watch) => watch.set(arm(socket)),
                None => *reset = Some(Box::pin(arm(socket))),
            }
            self.watching = Some(side);
        }
        let Some(watch) = reset else {
            return Poll::Pending;
        };
        if ready!(watch.as_mut().poll(cx)).is_err() {
            // The runtime is shutting down.
            return Poll::Ready(End::Shutdown);
        }
        let error = match socket.take_error() {
            Ok(Some(e)) | Err(e) => e,
            Ok(None) => io::ErrorKind::ConnectionReset.into(),
        };
        Poll::Ready(match side {
            Side::Client => End::ClientReset(error),
            Side::Backend => End::BackendReset(error),
        })
    }

    /// How long the connection may stay quiet now: `idle_timeout`, or once half-closed
    /// the shorter of it and `half_close_timeout`.
    fn quiet_limit(&self) -> (Duration, End) {
        let half_closed = self.upstream.done || self.downstream.done;
        if half_closed && self.half_close_timeout < self.idle_timeout {
            (self.half_close_timeout, End::HalfCloseTimeout)
        } else {
            (self.idle_timeout, End::IdleTimeout)
        }
    }

    fn deadline(&self) -> Instant {
        self.last_activity + self.quiet_limit().0
    }

    /// Ends the connection when it has been quiet for too long; otherwise pushes the
    /// timer back to the deadline that the bytes moved since it was set make.
    fn poll_timer(&self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<End> {
        while timer.as_mut().poll(cx).is_ready() {
            let (limit, end) = self.quiet_limit();
            let deadline = self.last_activity + limit;
            if Instant::now() >= deadline {
                return Poll::Ready(end);
            }
            timer.as_mut().reset(TokioInstant::from_std(deadline));
        }
        Poll::Pending
    }

    /// Closes the connection (the streams drop after this) the way `end` calls for.
    ///
    /// A reset is passed on as a reset: SO_LINGER 0 makes the close send RST. (Zero linger
    /// never blocks, unlike the non-zero linger tokio warns about.) Any other end closes
    /// with a FIN, except towards a side whose pump still holds bytes it read but could
    /// not write (its peer stopped reading): those bytes can't be delivered any more, and
    /// a FIN after a stream cut short would look like a complete one, so that side is
    /// reset instead (and loses what its send buffer still held, which the reset makes
    /// plain too).
    fn finish(self, end: End, sockets: &Sockets<'_>) -> Outcome {
        let (reset_client, reset_backend) = match &end {
            End::ClientReset(_) => (false, true),
            End::BackendReset(_) => (true, false),
            End::BackendDown => (true, true),
            _ => (self.downstream.holds_bytes(), self.upstream.holds_bytes()),
        };
        if reset_client {
            let _ = SockRef::from(sockets.client).set_linger(Some(Duration::ZERO));
        }
        if reset_backend {
            let _ = SockRef::from(&sockets.backend).set_linger(Some(Duration::ZERO));
        }
        Outcome {
            end,
            bytes_to_backend: self.upstream.total,
            bytes_to_client: self.downstream.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: (the end a peer uses, the end weir holds).
    pub(super) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (peer, ours)
    }

    fn options() -> SpliceOptions {
        SpliceOptions {
            idle_timeout: Duration::from_secs(60),
            half_close_timeout: Duration::from_secs(60),
        }
    }

    /// Runs `splice` between two fresh pairs; returns the client's and backend's ends.
    async fn spliced(
        options: SpliceOptions,
        hard: CancellationToken,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Outcome>) {
        let down = hard.child_token();
        spliced_watching(options, hard, down).await
    }

    /// `spliced` with the backend's down signal (a child of `hard`, as
    /// `Backend::new_under` makes it).
    async fn spliced_watching(
        options: SpliceOptions,
        hard: CancellationToken,
        down: CancellationToken,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Outcome>) {
        let (client, client_side) = pair().await;
        let (backend, backend_side) = pair().await;
        let running = tokio::spawn(async move {
            let to_backend = Counter::noop();
            let to_client = Counter::noop();
            let counters = Counters {
                to_backend: &to_backend,
                to_client: &to_client,
            };
            let outcome = splice(&client_side, backend_side, options, counters, &hard, &down).await;
            drop(client_side);
            outcome
        });
        (client, backend, running)
    }

    /// The size of the future `f` returns, without calling it.
    fn returned_size<A, B, C, D, E, G, F>(_: fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The splice future is most of an idle connection's task (see `proxy::tcp`'s test of
    /// the whole): it must not grow silently. 504 bytes now; the reset watch is boxed, the
    /// client borrowed and one cancellation future serves shutdown and the down signal.
    #[test]
    fn the_splice_future_stays_small() {
        let size = returned_size(splice);
        assert!(size <= 512, "the splice future grew to {size} bytes");
    }

    #[tokio::test]
    async fn small_and_bulk_chunks_arrive_in_order_and_are_counted() {
        let hard = CancellationToken::new();
        let (mut client, mut backend, running) = spliced(options(), hard.clone()).await;
        // Small messages (the copy path), then a bulk transfer (splicing), then small again.
        let mut sent = Vec::new();
        for round in 0..3u8 {
            let chunk: Vec<u8> = (0..(1 + round as usize * 700_000))
                .map(|i| (i as u8) ^ round)
                .collect();
            client.write_all(&chunk).await.unwrap();
            let mut got = vec![0u8; chunk.len()];
            backend.read_exact(&mut got).await.unwrap();
            assert!(got == chunk, "round {round}: bytes differ");
            sent.extend_from_slice(&chunk);
        }
        backend.write_all(b"answer").await.unwrap();
        let mut answer = [0u8; 6];
        client.read_exact(&mut answer).await.unwrap();

        hard.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(2), running)
            .await
            .expect("the hard stop ends the connection at once")
            .unwrap();
        assert!(matches!(outcome.end, End::Shutdown), "{:?}", outcome.end);
        assert_eq!(outcome.bytes_to_backend, sent.len() as u64);
        assert_eq!(outcome.bytes_to_client, 6);
    }

    #[tokio::test]
    async fn half_closed_connection_ends_after_half_close_timeout() {
        let options = SpliceOptions {
            idle_timeout: Duration::from_secs(60),
            half_close_timeout: Duration::from_millis(200),
        };
        let (mut client, _backend, running) = spliced(options, CancellationToken::new()).await;
        client.shutdown().await.unwrap();
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("half_close_timeout ends it")
            .unwrap();
        assert!(
            matches!(outcome.end, End::HalfCloseTimeout),
            "{:?}",
            outcome.end
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn the_down_signal_resets_both_sides() {
        let hard = CancellationToken::new();
        let down = hard.child_token();
        let (mut client, mut backend, running) =
            spliced_watching(options(), hard, down.clone()).await;
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        backend.read_exact(&mut got).await.unwrap();
        down.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(2), running)
            .await
            .expect("the down signal ends the connection at once")
            .unwrap();
        assert!(matches!(outcome.end, End::BackendDown), "{:?}", outcome.end);
        assert_eq!(outcome.end.name(), "backend_down");
        for peer in [&mut client, &mut backend] {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(2), peer.read(&mut byte))
                .await
                .expect("the peer sees the end");
            assert_eq!(
                read.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionReset)
            );
        }
    }

    #[tokio::test]
    async fn a_shorter_idle_timeout_still_ends_a_half_closed_connection() {
        let options = SpliceOptions {
            idle_timeout: Duration::from_millis(200),
            half_close_timeout: Duration::from_secs(60),
        };
        let (mut client, _backend, running) = spliced(options, CancellationToken::new()).await;
        client.shutdown().await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the idle timeout ends it")
            .unwrap();
        assert!(matches!(outcome.end, End::IdleTimeout), "{:?}", outcome.end);
    }

    #[tokio::test]
    async fn traffic_pushes_the_idle_timeout_back() {
        let options = SpliceOptions {
            idle_timeout: Duration::from_millis(300),
            half_close_timeout: Duration::from_secs(60),
        };
        let (mut client, mut backend, running) = spliced(options, CancellationToken::new()).await;
        let started = Instant::now();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            backend.read_exact(&mut byte).await.unwrap();
        }
        let outcome = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the idle timeout ends it")
            .unwrap();
        assert!(matches!(outcome.end, End::IdleTimeout), "{:?}", outcome.end);
        assert!(started.elapsed() >= Duration::from_millis(850));
    }
}
