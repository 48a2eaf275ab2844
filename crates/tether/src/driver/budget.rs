//! Byte budgets shared by all of a server's connections: received messages the application
//! has not taken yet (the backlog), partially received frames, and bytes queued for clients
//! and not yet written. A connection that cannot get what it needs pauses (reading) or is
//! refused (sending) instead of allocating past the budget.
//!
//! ```text
//!   take(n) / try_take(n) ──▶ used ──▶ give(n)
//!                              │ used ≥ limit: readers pause (register a waker)
//!                              └ used ≤ resume_at after give: every paused reader is woken
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::task::Waker;

use tokio::sync::Notify;

/// A byte budget with a wake-up for whoever waits for room. See the module docs.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
    /// Paused readers are woken once usage falls to this (hysteresis: not on every byte).
    resume_at: usize,
    waiting: AtomicBool,
    waiters: Mutex<Vec<Waker>>,
    /// For async waiters (a `send` waiting for room).
    room: Notify,
}

impl Budget {
    /// A budget of `limit` bytes whose waiters are woken when usage falls to `resume_at`.
    pub(crate) fn new(limit: usize, resume_at: usize) -> Self {
        let limit = limit.max(1);
        Budget {
            used: AtomicUsize::new(0),
            limit,
            resume_at: resume_at.min(limit - 1),
            waiting: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
            room: Notify::new(),
        }
    }

    /// Bytes in use.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Takes `n` bytes if they fit. When nothing is in use, any `n` fits (one item larger
    /// than the whole budget is let through alone rather than never).
    pub(crate) fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Relaxed, Relaxed, |u| {
                (u == 0 || u.saturating_add(n) <= self.limit).then(|| u.saturating_add(n))
            })
            .is_ok()
    }

    /// Takes `n` bytes whether they fit or not (accounting for what already exists).
    pub(crate) fn take(&self, n: usize) {
        if n > 0 {
            self.used.fetch_add(n, Relaxed);
        }
    }

    /// Gives `n` bytes back; wakes every waiter once usage is down to `resume_at`.
    pub(crate) fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| Some(u.saturating_sub(n)))
            .unwrap_or(0);
        let left = before.saturating_sub(n);
        if left <= self.resume_at && self.waiting.swap(false, Relaxed) {
            let waiters =
                std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
            for w in waiters {
                w.wake();
            }
            self.room.notify_waiters();
        }
    }

    /// Moves this holder's share from `old` to `new` bytes.
    pub(crate) fn adjust(&self, old: usize, new: usize) {
        if new > old {
            self.take(new - old);
        } else {
            self.give(old - new);
        }
    }

    /// True while usage is at or above the limit; `waker` is then woken when it has fallen
    /// to `resume_at`.
    pub(crate) fn is_full(&self, waker: &Waker) -> bool {
        if self.used() < self.limit {
            return false;
        }
        self.wait(waker);
        // Re-check: a `give` between the first check and the registration woke nobody.
        self.used() >= self.limit
    }

    /// Registers `waker` for the next time usage falls to `resume_at`.
    pub(crate) fn wait(&self, waker: &Waker) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
        self.waiting.store(true, Relaxed);
    }

    /// Waits until `n` bytes fit and takes them.
    pub(crate) async fn take_when_room(&self, n: usize) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Relaxed);
            if self.try_take(n) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    #[test]
    fn takes_only_what_fits_and_wakes_waiters_at_the_resume_mark() {
        let b = Budget::new(100, 50);
        assert!(b.try_take(60));
        assert!(!b.try_take(41));
        assert!(b.try_take(40));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        assert!(b.is_full(&waker));
        b.give(30); // 70 in use: above the resume mark
        assert_eq!(count.0.load(Relaxed), 0);
        b.give(20); // 50: wake
        assert_eq!(count.0.load(Relaxed), 1);
        assert!(!b.is_full(&waker));
        b.adjust(50, 0);
        assert_eq!(b.used(), 0);
        // One item larger than the whole budget passes alone.
        assert!(b.try_take(1000));
        assert!(!b.try_take(1));
    }
}
