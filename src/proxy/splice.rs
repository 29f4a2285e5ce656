//! Moving bytes both ways between a client and a backend.
//!
//! Each direction is a pump that reads from one socket and writes to the other. The two
//! pumps run in one task and the connection ends only when BOTH are done: EOF on one side
//! becomes a write shutdown on the other while the other direction keeps flowing (the
//! half-close bug of an early `select!` over two copies is the one to never write).
//! Besides that the connection ends when:
//! - one side resets: the other side is reset at once (SO_LINGER 0, then close);
//! - no byte moved either way for `idle_timeout`;
//! - one direction finished and the other has not within `half_close_linger`;
//! - shutdown's grace period ran out (`hard` token).
//!
//! Both pumps use `&TcpStream` readiness (`readable` + `try_io`, `writable` + `try_io`),
//! so no stream is split and either can still be reset afterwards.
//!
//! On Linux the bytes never enter user space: a pump `splice(2)`s socket → pipe → socket.
//! A pump takes a pipe when bytes arrive and gives it back to a small per-thread pool as
//! soon as the pipe is empty and the pump goes back to waiting, so an idle connection holds
//! no pipe and no buffer. A pipe that still holds bytes (a connection cut mid-transfer) is
//! closed, never pooled. Where pipes can't be had (another OS, or out of file descriptors)
//! a pump copies through a small buffer instead, freed likewise when the pump waits.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use metrics::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant as TokioInstant, sleep_until};
use tokio_util::sync::CancellationToken;

/// Size of the copy path's buffer (no splice): taken when bytes arrive, freed when the
/// pump waits again.
const BUFFER_SIZE: usize = 16 * 1024;

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
            End::ClientReset(e) => format!("client: {}", super::connect::describe(e)),
            End::BackendReset(e) => format!("backend: {}", super::connect::describe(e)),
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

/// Milliseconds since `epoch` of the last byte moved, shared by both pumps.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

pub async fn splice(
    client: TcpStream,
    backend: TcpStream,
    options: &SpliceOptions,
    counters: Counters<'_>,
    hard: &CancellationToken,
) -> Outcome {
    let activity = Activity {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let sent_to_backend = AtomicU64::new(0);
    let sent_to_client = AtomicU64::new(0);

    let end = {
        let upstream = pump(
            &client,
            &backend,
            &activity,
            counters.to_backend,
            &sent_to_backend,
        );
        let downstream = pump(
            &backend,
            &client,
            &activity,
            counters.to_client,
            &sent_to_client,
        );
        tokio::pin!(upstream, downstream);
        let mut upstream_done = false;
        let mut downstream_done = false;
        // Registered in the timer wheel once; when it fires it is pushed back to the last
        // activity instead of being reset on every byte.
        let idle = sleep_until(TokioInstant::from_std(
            activity.last() + options.idle_timeout,
        ));
        tokio::pin!(idle);
        // Armed (and so registered) only once one direction is done.
        let linger = sleep_until(TokioInstant::now());
        tokio::pin!(linger);
        let cancelled = pin!(hard.cancelled());
        let mut hard = Watch::new(cancelled);

        loop {
            tokio::select! {
                result = &mut upstream, if !upstream_done => match result {
                    Ok(()) => {
                        upstream_done = true;
                        if downstream_done { break End::Done; }
                        linger.as_mut().reset(TokioInstant::now() + options.half_close_linger);
                    }
                    Err(PumpError::Read(e)) => break End::ClientReset(e),
                    Err(PumpError::Write(e)) => break End::BackendReset(e),
                },
                result = &mut downstream, if !downstream_done => match result {
                    Ok(()) => {
                        downstream_done = true;
                        if upstream_done { break End::Done; }
                        linger.as_mut().reset(TokioInstant::now() + options.half_close_linger);
                    }
                    Err(PumpError::Read(e)) => break End::BackendReset(e),
                    Err(PumpError::Write(e)) => break End::ClientReset(e),
                },
                () = &mut idle => {
                    let deadline = activity.last() + options.idle_timeout;
                    if Instant::now() >= deadline {
                        break End::IdleTimeout;
                    }
                    idle.as_mut().reset(TokioInstant::from_std(deadline));
                },
                () = &mut linger, if upstream_done || downstream_done => break End::HalfCloseLinger,
                () = &mut hard => break End::Shutdown,
            }
        }
    };

    // A reset is passed on as a reset: SO_LINGER 0 makes the close below send RST.
    // (Zero linger never blocks, unlike the non-zero linger tokio warns about.)
    match &end {
        End::ClientReset(_) => {
            let _ = SockRef::from(&backend).set_linger(Some(Duration::ZERO));
        }
        End::BackendReset(_) => {
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
        }
        _ => {}
    }
    Outcome {
        end,
        bytes_to_backend: sent_to_backend.into_inner(),
        bytes_to_client: sent_to_client.into_inner(),
    }
}

/// What one step of a pump did.
enum Step {
    /// `n` bytes went from one socket to the other.
    Moved(usize),
    /// Nothing to read after all (readiness was stale); wait again.
    Nothing,
    /// The reading side sent EOF, and everything before it was written.
    Eof,
}

/// Moves `from` → `to` until EOF, then shuts down writing on `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    counter: &Counter,
    total: &AtomicU64,
) -> Result<(), PumpError> {
    #[cfg(target_os = "linux")]
    let mut pipe = pipes::Slot::default();
    let mut buffer: Option<Box<[u8]>> = None;
    loop {
        from.readable().await.map_err(PumpError::Read)?;
        #[cfg(target_os = "linux")]
        let step = if pipe.fill() {
            splice_step(from, to, &mut pipe, activity).await?
        } else {
            copy_step(from, to, &mut buffer, activity).await?
        };
        #[cfg(not(target_os = "linux"))]
        let step = copy_step(from, to, &mut buffer, activity).await?;
        match step {
            Step::Moved(n) => {
                counter.increment(n as u64);
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            Step::Nothing => {}
            Step::Eof => {
                // Pass EOF on as a write shutdown; the other direction goes on.
                return match SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                    Err(e) => Err(PumpError::Write(e)),
                };
            }
        }
    }
}

/// Socket → pipe once, then pipe → socket until the pipe is empty again. The pipe is
/// always empty between steps, so EAGAIN when filling it can only mean "no bytes to read",
/// and EOF is only passed on after every byte before it was written.
#[cfg(target_os = "linux")]
async fn splice_step(
    from: &TcpStream,
    to: &TcpStream,
    slot: &mut pipes::Slot,
    activity: &Activity,
) -> Result<Step, PumpError> {
    let n = match from.try_io(Interest::READABLE, || slot.splice_in(from)) {
        Ok(0) => return Ok(Step::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            // Going back to waiting: an empty pipe goes back to the pool.
            slot.release();
            return Ok(Step::Nothing);
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Step::Nothing),
        Err(e) => return Err(PumpError::Read(e)),
    };
    activity.touch();
    while slot.pending() > 0 {
        to.writable().await.map_err(PumpError::Write)?;
        match to.try_io(Interest::WRITABLE, || slot.splice_out(to)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PumpError::Write(e)),
        }
    }
    activity.touch();
    Ok(Step::Moved(n))
}

/// Read once into a buffer, then write all of it. The buffer is taken when bytes arrive
/// and freed when there is nothing to read, so an idle pump holds none.
async fn copy_step(
    from: &TcpStream,
    to: &TcpStream,
    buffer: &mut Option<Box<[u8]>>,
    activity: &Activity,
) -> Result<Step, PumpError> {
    let buf = buffer.get_or_insert_with(|| vec![0; BUFFER_SIZE].into_boxed_slice());
    let n = match from.try_read(buf) {
        Ok(0) => return Ok(Step::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            *buffer = None;
            return Ok(Step::Nothing);
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Step::Nothing),
        Err(e) => return Err(PumpError::Read(e)),
    };
    activity.touch();
    let mut written = 0;
    while written < n {
        to.writable().await.map_err(PumpError::Write)?;
        match to.try_write(&buf[written..n]) {
            Ok(m) => written += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PumpError::Write(e)),
        }
    }
    activity.touch();
    Ok(Step::Moved(n))
}

/// Pipes for splicing, pooled per thread (no lock): a pump holds one only while bytes are
/// on their way.
#[cfg(target_os = "linux")]
mod pipes {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
    use tokio::net::TcpStream;

    /// Empty pipes kept per worker thread; more are closed. Each is two descriptors and a
    /// little kernel memory, and a burst of new connections reuses them.
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
        pending: usize,
    }

    impl Slot {
        /// Makes sure a pipe is at hand; false when none can be had (out of descriptors),
        /// and the pump copies this time instead.
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

        pub(super) fn pending(&self) -> usize {
            self.pending
        }

        /// socket → pipe. Ok(0) is EOF.
        pub(super) fn splice_in(&mut self, from: &TcpStream) -> io::Result<usize> {
            let pipe = self.pipe.as_ref().expect("fill() before splice_in");
            debug_assert_eq!(self.pending, 0, "the pipe is empty between steps");
            let n = splice(from, None, &pipe.write, None, MAX_CHUNK, FLAGS)?;
            self.pending = n;
            Ok(n)
        }

        /// pipe → socket, as much as the socket takes.
        pub(super) fn splice_out(&mut self, to: &TcpStream) -> io::Result<usize> {
            let pipe = self.pipe.as_ref().expect("splice_out with bytes in a pipe");
            let n = splice(&pipe.read, None, to, None, self.pending, FLAGS)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.pending -= n;
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
/// the token's mutexes each time: in a connection's `select!`, that would be a lock shared
/// by all connections on every wakeup. `Watch` polls the inner future with a waker of its
/// own that raises a flag before waking the task, so later polls only read the flag.
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
