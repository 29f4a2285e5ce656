//! `Watch`: polls a future shared by many connections without taking its lock on every
//! wakeup.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

/// Polls a future (here shutdown's `hard.cancelled()` and the backend's down signal)
/// without touching it again until it has woken us.
///
/// Every connection waits on the same `CancellationToken`, and polling its future locks
/// the token's mutexes each time: polled on every wakeup of every connection, that would
/// be a lock shared by all connections on the data path. `Watch` polls the inner future
/// with a waker of its own that raises a flag before waking the task, so later polls
/// only read the flag.
pub(super) struct Watch<'a, F> {
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
    pub(super) fn new(inner: Pin<&'a mut F>) -> Self {
        Watch { inner, flag: None }
    }

    pub(super) fn as_mut(&mut self) -> Pin<&mut Self> {
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
    use std::pin::pin;

    use super::*;

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
}
