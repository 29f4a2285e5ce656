//! Pipes for splicing (Linux), pooled per worker thread like the buffers: a pump holds one
//! only while bytes are on their way. A pipe that still holds bytes (a connection cut
//! mid-transfer) is closed, never pooled, so its bytes can't leak into another connection.

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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::tests::pair;
    use super::*;

    #[tokio::test]
    async fn empty_pipes_are_pooled_and_pipes_with_bytes_are_closed() {
        let (mut writer, from) = pair().await;
        let (mut reader, to) = pair().await;
        let pooled_before = pooled();

        async fn splice_in(slot: &mut Slot, from: &TcpStream) -> usize {
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
        let mut slot = Slot::default();
        assert!(slot.fill());
        assert_eq!(splice_in(&mut slot, &from).await, 5);
        // Bytes in the pipe: release keeps it.
        slot.release();
        assert_eq!(pooled(), pooled_before);
        to.writable().await.unwrap();
        slot.splice_out(&to).unwrap();
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Empty: back to the pool, and taken from it next time.
        slot.release();
        assert_eq!(pooled(), pooled_before + 1);
        assert!(slot.fill());
        assert_eq!(pooled(), pooled_before);

        // A slot dropped with bytes in its pipe closes the pipe.
        writer.write_all(b"cut").await.unwrap();
        splice_in(&mut slot, &from).await;
        drop(slot);
        assert_eq!(pooled(), pooled_before);
    }
}
