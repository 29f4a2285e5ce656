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
//! Both pumps use `&TcpStream` readiness (`readable`/`try_read`, `writable`/`try_write`),
//! so no stream is split and either can still be reset afterwards.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::Counter;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::{Instant as TokioInstant, sleep_until};
use tokio_util::sync::CancellationToken;

/// Size of a pump's buffer, allocated on the first byte it moves (an idle connection
/// that never sent anything holds none).
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
        let idle = sleep_until(TokioInstant::from_std(
            activity.last() + options.idle_timeout,
        ));
        tokio::pin!(idle);
        let linger = sleep_until(TokioInstant::now() + Duration::from_secs(86_400 * 365));
        tokio::pin!(linger);

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
                () = &mut linger => break End::HalfCloseLinger,
                () = hard.cancelled() => break End::Shutdown,
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

/// Copies `from` → `to` until EOF, then shuts down writing on `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    counter: &Counter,
    total: &AtomicU64,
) -> Result<(), PumpError> {
    let mut buffer: Option<Box<[u8]>> = None;
    loop {
        from.readable().await.map_err(PumpError::Read)?;
        let buf = buffer.get_or_insert_with(|| vec![0; BUFFER_SIZE].into_boxed_slice());
        let n = match from.try_read(buf) {
            Ok(0) => {
                // EOF: pass it on as a write shutdown; the other direction goes on.
                return match SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                    Err(e) => Err(PumpError::Write(e)),
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
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
        counter.increment(n as u64);
        total.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}
