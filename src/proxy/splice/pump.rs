//! One direction of a connection: reads from one socket and writes to the other, copying
//! small bursts through a pooled buffer and splicing bulk transfers through a pooled pipe
//! (see `splice`'s module docs).
//!
//! Both sockets are used through shared references (`try_io` and readiness polls, as
//! tokio's own `poll_read`/`poll_write` do inside), so that `splice` can also wait on a
//! socket's error readiness while a pump has it.

use std::io;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use metrics::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use super::pipes;
use super::pool::{self, BUFFER_SIZE, Buffer};

/// Which socket failed inside a pump.
pub(super) enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// One direction: its bytes in flight (in a buffer or a pipe) and its byte count.
pub(super) struct Pump<'a> {
    counter: &'a Counter,
    pub(super) total: u64,
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
    pub(super) done: bool,
}

impl<'a> Pump<'a> {
    pub(super) fn new(counter: &'a Counter) -> Self {
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
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        last_activity: &mut Instant,
        last: bool,
    ) -> Poll<Result<(), PumpError>> {
        loop {
            if self.chunk > 0 {
                ready!(self.poll_write_out(cx, to, last_activity))?;
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
            match self.read(from) {
                Ok(0) => {
                    self.done = true;
                    self.give_back();
                    if last {
                        return Poll::Ready(Ok(()));
                    }
                    // EOF: pass it on as a write shutdown; the other direction goes on.
                    return Poll::Ready(
                        match SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                            Ok(()) => Ok(()),
                            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                            Err(e) => Err(PumpError::Write(e)),
                        },
                    );
                }
                Ok(n) => {
                    // At most a buffer or a pipe's worth.
                    self.chunk = n as u32;
                    *last_activity = Instant::now();
                }
                // Nothing to read after all (the readiness is cleared; splicing stays on:
                // see `read`).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(PumpError::Read(e))),
            }
        }
    }

    /// One `read` into the buffer (see `once` for its readiness); a full one switches to
    /// splicing.
    fn copy_in(&mut self, from: &TcpStream) -> io::Result<usize> {
        let buffer = self.buffer.get_or_insert_with(pool::take_buffer);
        let n = once(from, Interest::READABLE, BUFFER_SIZE, || {
            from.try_read(&mut buffer[..])
        })?;
        self.start = 0;
        self.end = n as u32;
        #[cfg(target_os = "linux")]
        if n == BUFFER_SIZE {
            self.splicing = true;
        }
        Ok(n)
    }

    /// Reads one chunk: spliced into the pipe while a bulk transfer is under way,
    /// copied into the buffer otherwise. WouldBlock: nothing to read (readiness cleared).
    fn read(&mut self, from: &TcpStream) -> io::Result<usize> {
        #[cfg(target_os = "linux")]
        if self.splicing {
            if self.pipe.fill() {
                let result = from.try_io(Interest::READABLE, || self.pipe.splice_in(from));
                // The socket waiting in between a bulk transfer's chunks doesn't end it; a
                // small chunk does: the next burst starts with a copy again.
                if result.as_ref().is_ok_and(|&n| n < BUFFER_SIZE) {
                    self.splicing = false;
                }
                return result;
            }
            // No pipe to be had (out of descriptors): keep copying.
            self.splicing = false;
        }
        self.copy_in(from)
    }

    /// Writes the current chunk out, from the buffer or the pipe. A part of it written
    /// counts as activity: a slow reader that keeps taking bytes is not idle.
    fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        to: &TcpStream,
        last_activity: &mut Instant,
    ) -> Poll<Result<(), PumpError>> {
        #[cfg(target_os = "linux")]
        while self.pipe.pending() > 0 {
            if let Err(e) = ready!(to.poll_write_ready(cx)) {
                return Poll::Ready(Err(PumpError::Write(e)));
            }
            match to.try_io(Interest::WRITABLE, || self.pipe.splice_out(to)) {
                Ok(_) if self.pipe.pending() > 0 => *last_activity = Instant::now(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(PumpError::Write(e))),
            }
        }
        while self.start < self.end {
            if let Err(e) = ready!(to.poll_write_ready(cx)) {
                return Poll::Ready(Err(PumpError::Write(e)));
            }
            let buffer = self
                .buffer
                .as_ref()
                .expect("a buffer holds the bytes to write");
            let unwritten = &buffer[self.start as usize..self.end as usize];
            match once(to, Interest::WRITABLE, unwritten.len(), || {
                to.try_write(unwritten)
            }) {
                Ok(0) => {
                    return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())));
                }
                Ok(n) => {
                    self.start += n as u32;
                    if self.start < self.end {
                        *last_activity = Instant::now();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(PumpError::Write(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Not done, and waiting for bytes to read (its source is watched).
    pub(super) fn waits_to_read(&self) -> bool {
        !self.done && self.chunk == 0
    }

    /// Not done, and waiting to write what it read (its destination is watched).
    pub(super) fn waits_to_write(&self) -> bool {
        !self.done && self.chunk > 0
    }

    /// Whether bytes read are still waiting to be written (in the buffer or the pipe).
    pub(super) fn holds_bytes(&self) -> bool {
        self.chunk > 0
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

/// One read or write of up to `len` bytes (`op`), through tokio's readiness like its
/// `poll_read`/`poll_write`: WouldBlock clears the readiness, and so does a short result,
/// which proves the socket drained (or its buffer full) without another system call that
/// would only say EAGAIN. The readiness cleared is the one from before the call, so an
/// event that came in meanwhile is kept.
fn once(
    socket: &TcpStream,
    interest: Interest,
    len: usize,
    mut op: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut short = None;
    let result = socket.try_io(interest, || {
        let n = op()?;
        if n > 0 && n < len {
            // Reported as WouldBlock only so that try_io clears the readiness.
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => result,
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

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::tests::pair;
    use super::*;

    /// Polls `pump` (from → to) until `reader` got `len` bytes; returns them.
    async fn pump_until_read(
        pump: &mut Pump<'_>,
        from: &TcpStream,
        to: &TcpStream,
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
        let (mut writer, from) = pair().await;
        let (mut reader, to) = pair().await;
        let counter = Counter::noop();
        let mut pump = Pump::new(&counter);

        writer.write_all(b"PING").await.unwrap();
        let got = pump_until_read(&mut pump, &from, &to, &mut reader, 4).await;
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
        let got = pump_until_read(&mut pump, &from, &to, &mut reader, 2 * 1024 * 1024).await;
        assert!(got.iter().all(|&b| b == 5));
        let _writer = sending.await.unwrap();
        // The pump may still be between a read and the wait: let it reach the wait.
        let mut last = Instant::now();
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            poll_fn(|cx| pump.poll(cx, &from, &to, &mut last, false)),
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
}
