//! Client slots for a small control endpoint (the admin socket): at most `max` clients at
//! once, and when all are taken, the oldest client that has not yet sent its request makes
//! room for the newcomer.
//!
//! A plain cap lets a few hundred slow clients (slowloris: a byte every few seconds, never
//! a full line) hold every slot until their read timeout, again and again, so that the
//! operator's own `weir ctl` is refused when it matters. Evicting the oldest idle client
//! instead means a real request, which sends its line at once, is served: to lose its slot
//! it would have to wait while `max` newer connections arrived. A client whose request is
//! being answered is never evicted; when every slot holds one, the newcomer is refused.
//!
//! Not on the data path: one mutex, taken twice per admin connection.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

pub struct Slots {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    taken: usize,
    next_id: u64,
    /// Clients still sending their request, oldest first, with the token that tells
    /// each to go.
    waiting: VecDeque<(u64, CancellationToken)>,
    /// Evicted clients whose slot went to a newcomer: their `Slot` must not give it back.
    handed_over: HashSet<u64>,
}

/// One client's slot, given back on drop.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    /// Fires when a newcomer takes this slot (only while the request is still unread).
    pub evicted: CancellationToken,
    read: std::sync::atomic::AtomicBool,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new client: a free one, or that of the oldest client still sending
    /// its request (told to go through its `evicted` token). None when every slot's
    /// client is being answered.
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let mut inner = self.lock();
        if inner.taken >= self.max {
            let (oldest, go) = inner.waiting.pop_front()?;
            go.cancel();
            inner.handed_over.insert(oldest);
        } else {
            inner.taken += 1;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let evicted = CancellationToken::new();
        inner.waiting.push_back((id, evicted.clone()));
        Some(Slot {
            slots: Arc::clone(self),
            id,
            evicted,
            read: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Slots taken now (for tests and logs).
    pub fn taken(&self) -> usize {
        self.lock().taken
    }
}

impl Slot {
    /// The client's request is read: from now on it keeps its slot until it is answered.
    pub fn request_read(&self) {
        (self.read).store(true, std::sync::atomic::Ordering::Relaxed);
        let mut inner = self.slots.lock();
        inner.waiting.retain(|(id, _)| *id != self.id);
    }
}

impl Slot {
    /// Whether `request_read` was called: a client evicted after that, in the same poll
    /// that read its request, is still answered.
    pub fn is_request_read(&self) -> bool {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        inner.waiting.retain(|(id, _)| *id != self.id);
        if !inner.handed_over.remove(&self.id) {
            inner.taken -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_client_makes_room_and_busy_ones_never_do() {
        let slots = Slots::new(2);
        let a = slots.take().unwrap();
        let b = slots.take().unwrap();
        assert_eq!(slots.taken(), 2);
        let c = slots.take().expect("room made");
        assert!(a.evicted.is_cancelled(), "the oldest idle one goes");
        assert!(!b.evicted.is_cancelled());
        drop(a);
        assert_eq!(slots.taken(), 2, "its slot went to c, not back to the pool");
        b.request_read();
        c.request_read();
        assert!(slots.take().is_none(), "both are being answered: refused");
        drop(b);
        assert_eq!(slots.taken(), 1);
        let d = slots.take().unwrap();
        assert_eq!(slots.taken(), 2);
        drop((c, d));
        assert_eq!(slots.taken(), 0);
    }
}
