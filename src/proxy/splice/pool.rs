//! Copy buffers, pooled per worker thread (a `RefCell<Vec<_>>` in a thread-local: no
//! lock), so that a burst of connections reuses them instead of allocating. A pump takes
//! one when bytes arrive and gives it back as soon as it is empty and the pump waits again.

use std::cell::RefCell;

/// Size of a copy buffer. A read that fills it switches the pump to splicing (on Linux).
pub(super) const BUFFER_SIZE: usize = 16 * 1024;

pub(super) type Buffer = Box<[u8; BUFFER_SIZE]>;

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
