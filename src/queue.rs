//! A pool's wait queue: connections waiting, first come first served, for a backend slot
//! (`pools.NAME.queue_timeout`, docs/traffic-control.md).
//!
//! Generic over what is handed out (the backend's `ConnGuard`) so that this leaf module
//! knows nothing of backends. A freed slot is *handed* to the oldest waiter (one wake-up
//! per freed slot, no thundering herd, and no newcomer can take the slot between the wake
//! and the waiter's pick). Waiting holds no socket to any backend: only a oneshot receiver.
//! A waiter that is dropped (its client left, its timeout fired) leaves the queue at once.
//!
//! The lock is taken only by connections that wait and by the release of a slot of a
//! backend with a limit while someone waits (`is_empty` is one atomic load); the pick path
//! never touches it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use metrics::Gauge;
use tokio::sync::oneshot;

/// The most connections one pool's queue holds, whatever the listeners' `max_connections`
/// (a connection beyond it is closed as `reason="backend_full"`).
pub const QUEUE_CAP: usize = 10_000;

pub struct WaitQueue<T> {
    waiters: Mutex<Inner<T>>,
    len: AtomicUsize,
    gauge: Gauge,
}

struct Inner<T> {
    next_id: u64,
    waiters: VecDeque<(u64, oneshot::Sender<T>)>,
}

/// One place in the queue; dropping it leaves the queue.
pub struct Waiter<T> {
    queue: Arc<WaitQueue<T>>,
    id: u64,
    rx: oneshot::Receiver<T>,
}

impl<T> WaitQueue<T> {
    /// An empty queue whose length `gauge` shows (`weir_pool_queue_length`).
    pub fn new(gauge: Gauge) -> Arc<Self> {
        gauge.set(0.0);
        Arc::new(WaitQueue {
            waiters: Mutex::new(Inner {
                next_id: 0,
                waiters: VecDeque::new(),
            }),
            len: AtomicUsize::new(0),
            gauge,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        // A panic while holding it leaves a consistent queue (every operation is one step).
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_len(&self, len: usize) {
        self.len.store(len, Ordering::Release);
        self.gauge.set(len as f64);
    }

    /// Connections waiting now.
    #[inline]
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A place at the back of the queue; None when `cap` are already waiting.
    pub fn join(self: &Arc<Self>, cap: usize) -> Option<Waiter<T>> {
        let mut inner = self.lock();
        if inner.waiters.len() >= cap {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.waiters.push_back((id, tx));
        self.set_len(inner.waiters.len());
        Some(Waiter {
            queue: Arc::clone(self),
            id,
            rx,
        })
    }

    /// Gives `value` to the oldest waiter still there; `Err(value)` when nobody waits.
    pub fn hand_off(&self, mut value: T) -> Result<(), T> {
        loop {
            let next = {
                let mut inner = self.lock();
                let next = inner.waiters.pop_front();
                self.set_len(inner.waiters.len());
                next
            };
            let Some((_, tx)) = next else {
                return Err(value);
            };
            // Sent outside the lock: a value coming back (its waiter just went) may be a
            // guard whose own drop hands off again.
            match tx.send(value) {
                Ok(()) => return Ok(()),
                Err(back) => value = back,
            }
        }
    }

    fn leave(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(pos) = inner.waiters.iter().position(|(i, _)| *i == id) {
            inner.waiters.remove(pos);
            self.set_len(inner.waiters.len());
        }
    }

    fn is_head(&self, id: u64) -> bool {
        self.lock().waiters.front().is_some_and(|(i, _)| *i == id)
    }
}

impl<T> Waiter<T> {
    /// Resolves with the value handed to this waiter; `None` when the queue went away
    /// (its pool was removed by a reload).
    pub async fn handed(&mut self) -> Option<T> {
        (&mut self.rx).await.ok()
    }

    /// Whether this waiter is the oldest one (only it may take a slot that opened without
    /// a release, say a backend coming up).
    pub fn is_head(&self) -> bool {
        self.queue.is_head(self.id)
    }
}

impl<T> Drop for Waiter<T> {
    fn drop(&mut self) {
        self.queue.leave(self.id);
        // A value handed to it but never taken is dropped with `rx` (a guard: released,
        // and so handed to the next waiter).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Arc<WaitQueue<u32>> {
        WaitQueue::new(metrics::Gauge::noop())
    }

    #[tokio::test]
    async fn values_go_to_the_oldest_waiter_first() {
        let q = queue();
        let mut a = q.join(10).unwrap();
        let mut b = q.join(10).unwrap();
        assert!(a.is_head() && !b.is_head());
        assert_eq!(q.len(), 2);
        q.hand_off(1).unwrap();
        q.hand_off(2).unwrap();
        assert_eq!(q.hand_off(3), Err(3));
        assert_eq!(a.handed().await, Some(1));
        assert_eq!(b.handed().await, Some(2));
        assert!(q.is_empty());
    }

    #[test]
    fn a_dropped_waiter_leaves_at_once_and_the_cap_holds() {
        let q = queue();
        let a = q.join(2).unwrap();
        let b = q.join(2).unwrap();
        assert!(q.join(2).is_none());
        drop(a);
        assert_eq!(q.len(), 1);
        assert!(b.is_head());
        drop(b);
        assert!(q.is_empty());
        assert_eq!(q.hand_off(7), Err(7));
    }
}
