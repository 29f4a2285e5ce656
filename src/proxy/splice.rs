//! Moving bytes both ways between a client and a backend.
//!
//! Each direction is a pump that reads from one socket and writes to the other. The two
//! pumps are polled by one future and the connection ends only when BOTH are done: EOF on
//! one side becomes a write shutdown on the other while the other direction keeps flowing
//! (the half-close bug of an early `select!` over two copies is the one to never write).
//! Besides that the connection ends when:
//! - one side resets: the other side is reset at once (SO_LINGER 0, then close);
//! - no byte moved either way for `idle_timeout`;
//! - one direction finished and the other has not within `half_close_linger`;
//! - shutdown's grace period ran out (`hard` token).
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
//! per-direction sub-futures, one timer for idle and linger — which keeps an idle
//! connection's task small.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::{Duration, Instant};

use metrics::Counter;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant as TokioInstant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;

pub struct SpliceOptions {
    pub idle_timeout: Duration,
    pub half_close_linger: Duration,
}

/// How a connection ended.
#[derive(Debug)]
pub enum End {
    /// Both sides finished sending.
    Done,
    IdleTimeout,
    HalfCloseLinger,
    ClientReset(io::Error),
    BackendReset(io::Error),
    Shutdown,
}

impl End {
    pub fn describe(&self) -> String {
        match self {
            End::Done => "closed".into(),
            End::IdleTimeout => "idle timeout".into(),
            End::HalfCloseLinger => "half-closed for too long".into(),
            End::ClientReset(e) => format!("client: {}", crate::net::describe(e)),
            End::BackendReset(e) => format!("backend: {}", crate::net::describe(e)),
            End::Shutdown => "shutdown grace period ended".into(),
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

/// Which socket failed inside a pump.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// Splices `client` ⇄ `backend` until the connection ends (see the module docs).
///
/// A plain fn returning an `async move` block that uses its captures in place: an
/// `async fn` would keep a second copy of its arguments in the task for its whole life.
pub fn splice<'a>(
    client: TcpStream,
    backend: TcpStream,
    options: &SpliceOptions,
    counters: Counters<'a>,
    hard: &'a CancellationToken,
) -> impl Future<Output = Outcome> + 'a {
    let mut conn = Conn {
        client,
        backend,
        upstream: Pump::new(counters.to_backend),
        downstream: Pump::new(counters.to_client),
        last_activity: Instant::now(),
        linger_until: None,
        idle_timeout: options.idle_timeout,
        half_close_linger: options.half_close_linger,
    };
    async move {
        // One timer for both the idle timeout and the half-close linger. It is registered
        // once and, when it fires, pushed back to the last activity instead of being reset
        // on every byte.
        let mut timer = pin!(sleep_until(TokioInstant::from_std(
            conn.last_activity + conn.idle_timeout
        )));
        let cancelled = pin!(hard.cancelled());
        let mut hard = Watch::new(cancelled);
        let end = poll_fn(|cx| conn.poll(cx, timer.as_mut(), &mut hard)).await;
        conn.finish(end)
    }
}

/// One connection's state, polled by `splice`'s future.
struct Conn<'a> {
    client: TcpStream,
    backend: TcpStream,
    upstream: Pump<'a>,
    downstream: Pump<'a>,
    last_activity: Instant,
    linger_until: Option<Instant>,
    idle_timeout: Duration,
    half_close_linger: Duration,
}

impl Conn<'_> {
    fn poll<F: Future>(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
        hard: &mut Watch<'_, F>,
    ) -> Poll<End> {
        if hard.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Shutdown);
        }
        let mut finished_now = false;
        if !self.upstream.done {
            let polled = self.upstream.poll(
                cx,
                &mut self.client,
                &mut self.backend,
                &mut self.last_activity,
                self.downstream.done,
            );
            match polled {
                Poll::Ready(Ok(())) => finished_now = true,
                Poll::Ready(Err(PumpError::Read(e))) => return Poll::Ready(End::ClientReset(e)),
                Poll::Ready(Err(PumpError::Write(e))) => {
                    return Poll::Ready(End::BackendReset(e));
                }
                Poll::Pending => {}
            }
        }
        if !self.downstream.done {
            let polled = self.downstream.poll(
                cx,
                &mut self.backend,
                &mut self.client,
                &mut self.last_activity,
                self.upstream.done,
            );
            match polled {
                Poll::Ready(Ok(())) => finished_now = true,
                Poll::Ready(Err(PumpError::Read(e))) => {
                    return Poll::Ready(End::BackendReset(e));
                }
                Poll::Ready(Err(PumpError::Write(e))) => return Poll::Ready(End::ClientReset(e)),
                Poll::Pending => {}
            }
        }
        if self.upstream.done && self.downstream.done {
            return Poll::Ready(End::Done);
        }
        if finished_now && self.linger_until.is_none() {
            let until = Instant::now() + self.half_close_linger;
            self.linger_until = Some(until);
            if TokioInstant::from_std(until) < timer.deadline() {
                timer.as_mut().reset(TokioInstant::from_std(until));
            }
        }
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.linger_until.is_some_and(|until| now >= until) {
                return Poll::Ready(End::HalfCloseLinger);
            }
            let idle_deadline = self.last_activity + self.idle_timeout;
            if now >= idle_deadline {
                return Poll::Ready(End::IdleTimeout);
            }
            let next = self
                .linger_until
                .map_or(idle_deadline, |until| until.min(idle_deadline));
            timer.as_mut().reset(TokioInstant::from_std(next));
        }
        Poll::Pending
    }

    fn finish(self, end: End) -> Outcome {
        // A reset is passed on as a reset: SO_LINGER 0 makes the close (when the streams
        // drop) send RST. (Zero linger never blocks, unlike the non-zero linger tokio
        // warns about.)
        match &end {
            End::ClientReset(_) => {
                let _ = SockRef::from(&self.backend).set_linger(Some(Duration::ZERO));
            }
            End::BackendReset(_) => {
                let _ = SockRef::from(&self.client).set_linger(Some(Duration::ZERO));
            }
            _ => {}
        }
        Outcome {
            end,
            bytes_to_backend: self.upstream.total,
            bytes_to_client: self.downstream.total,
        }
    }
}

/// Size of a copy buffer. A read that fills it switches the pump to splicing (on Linux).
const BUFFER_SIZE: usize = 16 * 1024;

type Buffer = Box<[u8; BUFFER_SIZE]>;

/// One direction: its bytes in flight (in a buffer or a pipe) and its byte count.
struct Pump<'a> {
    counter: &'a Counter,
    total: u64,
    /// Copy path: `buffer[start..end]` is still to be written.
    buffer: Option<Buffer>,
    start: u32,
    end: u32,
    #[cfg(target_os = "linux")]
    pipe: pipes::Slot,
    /// Splicing: a bulk transfer is under way (a read filled the buffer, and the last
    /// splice still moved at least a buffer's worth).
    #[cfg(target_os = "linux")]
    splicing: bool,
    /// Bytes of the chunk being written, counted once all of it is out.
    chunk: u32,
    done: bool,
}

impl<'a> Pump<'a> {
    fn new(counter: &'a Counter) -> Self {
        Pump {
            counter,
            total: 0,
            buffer: None,
            start: 0,
            end: 0,
            #[cfg(target_os = "linux")]
            pipe: pipes::Slot::default(),
            #[cfg(target_os = "linux")]
            splicing: false,
            chunk: 0,
            done: false,
        }
    }

    /// Moves `from` → `to` until EOF, then shuts down writing on `to`. Only ever reads
    /// when nothing is left to write, so EOF is passed on after every byte before it.
    /// When the other direction is already done (`last`), the connection ends with this
    /// EOF and closing the sockets sends the FIN: no `shutdown` call is needed.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        last_activity: &mut Instant,
        last: bool,
    ) -> Poll<Result<(), PumpError>> {
        loop {
            if self.chunk > 0 {
                ready!(self.poll_write_out(cx, to))?;
                self.counter.increment(self.chunk as u64);
                self.total += self.chunk as u64;
                self.chunk = 0;
                *last_activity = Instant::now();
            }
            match from.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Read(e))),
                // Waiting for bytes needs neither a buffer nor a pipe (both are empty now).
                Poll::Pending => {
                    self.give_back();
                    return Poll::Pending;
                }
            }
            let read = self.read(cx, from);
            match read {
                Poll::Ready(Ok(0)) => {
                    self.done = true;
                    self.give_back();
                    if last {
                        return Poll::Ready(Ok(()));
                    }
                    // EOF: pass it on as a write shutdown; the other direction goes on.
                    return Poll::Ready(
                        match SockRef::from(&*to).shutdown(std::net::Shutdown::Write) {
                            Ok(()) => Ok(()),
                            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                            Err(e) => Err(PumpError::Write(e)),
                        },
                    );
                }
                Poll::Ready(Ok(n)) => {
                    // At most a buffer or a pipe's worth.
                    self.chunk = n as u32;
                    *last_activity = Instant::now();
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Read(e))),
                // Nothing to read after all (splicing stays on: see `read`).
                Poll::Pending => {}
            }
        }
    }

    /// One `read` into the buffer. A short read clears the socket's readiness (tokio does
    /// that in `poll_read`); a full one switches to splicing.
    fn copy_in(&mut self, cx: &mut Context<'_>, from: &mut TcpStream) -> Poll<io::Result<usize>> {
        let buffer = self.buffer.get_or_insert_with(pool::take_buffer);
        let mut read = ReadBuf::new(&mut buffer[..]);
        ready!(Pin::new(from).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.start = 0;
        self.end = n as u32;
        #[cfg(target_os = "linux")]
        if n == BUFFER_SIZE {
            self.splicing = true;
        }
        Poll::Ready(Ok(n))
    }

    /// Reads one chunk: spliced into the pipe while a bulk transfer is under way,
    /// copied into the buffer otherwise. Pending: nothing to read (readiness cleared).
    fn read(&mut self, cx: &mut Context<'_>, from: &mut TcpStream) -> Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        if self.splicing {
            if self.pipe.fill() {
                let result =
                    from.try_io(tokio::io::Interest::READABLE, || self.pipe.splice_in(from));
                return match result {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                    result => {
                        // The socket waiting in between a bulk transfer's chunks doesn't end
                        // it; a small chunk does: the next burst starts with a copy again.
                        if result.as_ref().is_ok_and(|&n| n < BUFFER_SIZE) {
                            self.splicing = false;
                        }
                        Poll::Ready(result)
                    }
                };
            }
            // No pipe to be had (out of descriptors): keep copying.
            self.splicing = false;
        }
        self.copy_in(cx, from)
    }

    /// Writes the current chunk out, from the buffer or the pipe.
    fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut TcpStream,
    ) -> Poll<Result<(), PumpError>> {
        #[cfg(target_os = "linux")]
        while self.pipe.pending() > 0 {
            if let Err(e) = ready!(to.poll_write_ready(cx)) {
                return Poll::Ready(Err(PumpError::Write(e)));
            }
            match to.try_io(tokio::io::Interest::WRITABLE, || self.pipe.splice_out(to)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(PumpError::Write(e))),
            }
        }
        while self.start < self.end {
            let buffer = self
                .buffer
                .as_ref()
                .expect("a buffer holds the bytes to write");
            let unwritten = &buffer[self.start as usize..self.end as usize];
            match ready!(Pin::new(&mut *to).poll_write(cx, unwritten)) {
                Ok(0) => {
                    return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())));
                }
                Ok(n) => self.start += n as u32,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(PumpError::Write(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Returns the (empty) buffer and pipe to this thread's pools.
    fn give_back(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            pool::give_buffer(buffer);
        }
        #[cfg(target_os = "linux")]
        self.pipe.release();
    }
}

impl Drop for Pump<'_> {
    fn drop(&mut self) {
        // Bytes left in a buffer are just memory: pool it. A pipe with bytes in it is
        // closed by its own Drop.
        if let Some(buffer) = self.buffer.take() {
            pool::give_buffer(buffer);
        }
    }
}

/// Per-thread pools of empty buffers (and on Linux, pipes): no lock, and a burst of
/// connections reuses them instead of allocating.
mod pool {
    use std::cell::RefCell;

    use super::{BUFFER_SIZE, Buffer};

    /// Empty buffers kept per worker thread; more are freed.
    const BUFFERS_MAX: usize = 32;

    thread_local! {
        static BUFFERS: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take_buffer() -> Buffer {
        BUFFERS
            .try_with(|pool| pool.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Box::new([0; BUFFER_SIZE]))
    }

    pub(super) fn give_buffer(buffer: Buffer) {
        let _ = BUFFERS.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < BUFFERS_MAX {
                pool.push(buffer);
            }
        });
    }
}

/// Pipes for splicing, pooled per thread: a pump holds one only while bytes are on their
/// way.
#[cfg(target_os = "linux")]
mod pipes {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
    use tokio::net::TcpStream;

    /// Empty pipes kept per worker thread; more are closed. Each is two descriptors and a
    /// little kernel memory.
    const POOL_MAX: usize = 32;

    /// Asked of one splice into the pipe; the kernel stops at the pipe's capacity
    /// (64 KiB by default).
    const MAX_CHUNK: usize = 1 << 20;

    const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    thread_local! {
        static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    /// A pump's pipe, when it has one, and how many bytes are in it.
    #[derive(Default)]
    pub(super) struct Slot {
        pipe: Option<Pipe>,
        pending: u32,
    }

    impl Slot {
        /// Makes sure a pipe is at hand; false when none can be had (out of descriptors).
        pub(super) fn fill(&mut self) -> bool {
            if self.pipe.is_none() {
                let pooled = POOL.try_with(|pool| pool.borrow_mut().pop()).ok().flatten();
                self.pipe = match pooled {
                    Some(pipe) => Some(pipe),
                    None => match pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
                        Ok((read, write)) => Some(Pipe { read, write }),
                        Err(e) => {
                            tracing::debug!("no pipe for splicing ({e}); copying instead");
                            None
                        }
                    },
                };
            }
            self.pipe.is_some()
        }

        #[cfg(test)]
        pub(super) fn holds_pipe(&self) -> bool {
            self.pipe.is_some()
        }

        pub(super) fn pending(&self) -> u32 {
            self.pending
        }

        /// socket → pipe. Ok(0) is EOF.
        pub(super) fn splice_in(&mut self, from: &TcpStream) -> io::Result<usize> {
            let pipe = self.pipe.as_ref().expect("fill() before splice_in");
            debug_assert_eq!(self.pending, 0, "the pipe is empty between chunks");
            let n = splice(from, None, &pipe.write, None, MAX_CHUNK, FLAGS)?;
            self.pending = n as u32; // at most MAX_CHUNK
            Ok(n)
        }

        /// pipe → socket, as much as the socket takes.
        pub(super) fn splice_out(&mut self, to: &TcpStream) -> io::Result<usize> {
            let pipe = self.pipe.as_ref().expect("splice_out with bytes in a pipe");
            let n = splice(&pipe.read, None, to, None, self.pending as usize, FLAGS)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.pending -= n as u32;
            Ok(n)
        }

        /// Gives an empty pipe back to this thread's pool.
        pub(super) fn release(&mut self) {
            if self.pending != 0 {
                return;
            }
            if let Some(pipe) = self.pipe.take() {
                let _ = POOL.try_with(|pool| {
                    let mut pool = pool.borrow_mut();
                    if pool.len() < POOL_MAX {
                        pool.push(pipe);
                    }
                });
            }
        }
    }

    /// Pipes in this thread's pool.
    #[cfg(test)]
    pub(super) fn pooled() -> usize {
        POOL.with(|pool| pool.borrow().len())
    }

    impl Drop for Slot {
        /// A pipe with bytes in it belongs to a connection cut mid-transfer: it is closed
        /// (dropped), never pooled, so its bytes can't leak into another connection.
        fn drop(&mut self) {
            self.release();
        }
    }
}

/// Polls a future (here shutdown's `hard.cancelled()`) without touching it again until it
/// has woken us.
///
/// Every connection waits on the same `CancellationToken`, and polling its future locks
/// the token's mutexes each time: polled on every wakeup of every connection, that would
/// be a lock shared by all connections on the data path. `Watch` polls the inner future
/// with a waker of its own that raises a flag before waking the task, so later polls
/// only read the flag.
struct Watch<'a, F> {
    inner: Pin<&'a mut F>,
    flag: Option<Arc<Flag>>,
}

struct Flag {
    raised: AtomicBool,
    task: Waker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raised.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<'a, F: Future> Watch<'a, F> {
    fn new(inner: Pin<&'a mut F>) -> Self {
        Watch { inner, flag: None }
    }

    fn as_mut(&mut self) -> Pin<&mut Self> {
        Pin::new(self)
    }
}

impl<F: Future> Future for Watch<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if let Some(flag) = &self.flag
            && !flag.raised.load(Ordering::Acquire)
            && flag.task.will_wake(cx.waker())
        {
            return Poll::Pending;
        }
        let flag = Arc::new(Flag {
            raised: AtomicBool::new(false),
            task: cx.waker().clone(),
        });
        let waker = Waker::from(Arc::clone(&flag));
        let result = self.inner.as_mut().poll(&mut Context::from_waker(&waker));
        self.flag = Some(flag);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: (the end a peer uses, the end weir holds).
    async fn pair() -> (TcpStream, TcpStream) {
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
            half_close_linger: Duration::from_secs(60),
        }
    }

    /// Runs `splice` between two fresh pairs; returns the client's and backend's ends.
    async fn spliced(
        options: SpliceOptions,
        hard: CancellationToken,
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
            splice(client_side, backend_side, &options, counters, &hard).await
        });
        (client, backend, running)
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
    async fn half_closed_connection_ends_after_the_linger() {
        let options = SpliceOptions {
            idle_timeout: Duration::from_secs(60),
            half_close_linger: Duration::from_millis(200),
        };
        let (mut client, _backend, running) = spliced(options, CancellationToken::new()).await;
        client.shutdown().await.unwrap();
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the linger ends it")
            .unwrap();
        assert!(
            matches!(outcome.end, End::HalfCloseLinger),
            "{:?}",
            outcome.end
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn traffic_pushes_the_idle_timeout_back() {
        let options = SpliceOptions {
            idle_timeout: Duration::from_millis(300),
            half_close_linger: Duration::from_secs(60),
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

    /// Polls `pump` (from → to) until `reader` got `len` bytes; returns them.
    async fn pump_until_read(
        pump: &mut Pump<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        reader: &mut TcpStream,
        len: usize,
    ) -> Vec<u8> {
        let mut last = Instant::now();
        let mut got = vec![0u8; len];
        tokio::select! {
            _ = poll_fn(|cx| pump.poll(cx, from, to, &mut last, false)) => panic!("the pump ended"),
            r = reader.read_exact(&mut got) => { r.unwrap(); }
        }
        got
    }

    #[tokio::test]
    async fn a_pump_waiting_for_bytes_holds_no_buffer_and_no_pipe() {
        let (mut writer, mut from) = pair().await;
        let (mut reader, mut to) = pair().await;
        let counter = Counter::noop();
        let mut pump = Pump::new(&counter);

        writer.write_all(b"PING").await.unwrap();
        let got = pump_until_read(&mut pump, &mut from, &mut to, &mut reader, 4).await;
        assert_eq!(got, b"PING");
        assert!(
            pump.buffer.is_none(),
            "buffer given back after a small exchange"
        );

        let bulk = vec![5u8; 2 * 1024 * 1024];
        let sending = tokio::spawn(async move {
            writer.write_all(&bulk).await.unwrap();
            writer
        });
        let got =
            pump_until_read(&mut pump, &mut from, &mut to, &mut reader, 2 * 1024 * 1024).await;
        assert!(got.iter().all(|&b| b == 5));
        let _writer = sending.await.unwrap();
        // The pump may still be between a read and the wait: let it reach the wait.
        let mut last = Instant::now();
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            poll_fn(|cx| pump.poll(cx, &mut from, &mut to, &mut last, false)),
        )
        .await;
        assert!(
            pump.buffer.is_none(),
            "buffer given back after a bulk transfer"
        );
        #[cfg(target_os = "linux")]
        assert_eq!(pump.pipe.pending(), 0);
        #[cfg(target_os = "linux")]
        assert!(
            !pump.pipe.holds_pipe(),
            "pipe given back after a bulk transfer"
        );
        assert_eq!(pump.total, 4 + 2 * 1024 * 1024);
    }

    #[test]
    fn watch_polls_the_inner_future_once_until_woken() {
        use std::sync::atomic::AtomicUsize;
        struct Counting<'a>(&'a AtomicUsize);
        impl Future for Counting<'_> {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
                self.0.fetch_add(1, Ordering::Relaxed);
                Poll::Pending
            }
        }
        let polls = AtomicUsize::new(0);
        let inner = pin!(Counting(&polls));
        let mut watch = Watch::new(inner);
        struct Task;
        impl Wake for Task {
            fn wake(self: Arc<Self>) {}
        }
        let task = Waker::from(Arc::new(Task));
        let mut cx = Context::from_waker(&task);
        for _ in 0..5 {
            assert!(watch.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "later polls only read the flag"
        );
        // The inner future's waker raises the flag: the next poll asks it again.
        Waker::from(Arc::clone(watch.flag.as_ref().unwrap())).wake();
        assert!(watch.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn empty_pipes_are_pooled_and_pipes_with_bytes_are_closed() {
        let (mut writer, from) = pair().await;
        let (mut reader, to) = pair().await;
        let pooled_before = pipes::pooled();

        async fn splice_in(slot: &mut pipes::Slot, from: &TcpStream) -> usize {
            loop {
                from.readable().await.unwrap();
                match from.try_io(tokio::io::Interest::READABLE, || slot.splice_in(from)) {
                    Ok(n) => return n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }

        writer.write_all(b"hello").await.unwrap();
        let mut slot = pipes::Slot::default();
        assert!(slot.fill());
        assert_eq!(splice_in(&mut slot, &from).await, 5);
        // Bytes in the pipe: release keeps it.
        slot.release();
        assert_eq!(pipes::pooled(), pooled_before);
        to.writable().await.unwrap();
        slot.splice_out(&to).unwrap();
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Empty: back to the pool, and taken from it next time.
        slot.release();
        assert_eq!(pipes::pooled(), pooled_before + 1);
        assert!(slot.fill());
        assert_eq!(pipes::pooled(), pooled_before);

        // A slot dropped with bytes in its pipe closes the pipe.
        writer.write_all(b"cut").await.unwrap();
        splice_in(&mut slot, &from).await;
        drop(slot);
        assert_eq!(pipes::pooled(), pooled_before);
    }
}
