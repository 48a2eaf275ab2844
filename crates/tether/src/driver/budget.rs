//! Byte budgets shared by all of a server's connections: received messages the application
//! has not taken yet (the backlog), partially received frames, and bytes queued for clients
//! and not yet written. A connection that cannot get what it needs pauses (reading) or is
//! refused (sending) instead of allocating past the budget.
//!
//! ```text
//!   take(n) / try_take(n) ──▶ used ──▶ give(n)
//!                              │ used ≥ limit: readers that need room register a waker
//!                              └ used ≤ resume_at after give: the oldest WAKE_BATCH waiters
//!                                are woken (all that are left once nothing is in use)
//! ```
//!
//! Waiters are woken a bounded number at a time, oldest first: a drained backlog used to
//! wake every paused connection at once (9,775 tasks in one `give` at 19,000 clients under
//! load, BENCHMARKS.md 2026-11-30 third pass), and a herd that size overflows the runtime's
//! local run queues into its global queue, where tasks wait behind everything else. Each
//! `give` at or below the resume mark wakes the next batch, so the waiters follow the
//! application's pace; a woken reader that finds the budget full again queues at the back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::task::Waker;

use tokio::sync::Notify;

/// Waiters woken per `give` at or below the resume mark.
pub(crate) const WAKE_BATCH: usize = 32;

/// A byte budget with a wake-up for whoever waits for room. See the module docs.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
    /// Paused readers are woken once usage falls to this (hysteresis: not on every byte).
    resume_at: usize,
    waiting: AtomicBool,
    waiters: Mutex<Waiters>,
    /// For async waiters (a `send` waiting for room).
    room: Notify,
}

/// Registered wakers, oldest first, with the tickets that let a reader register once.
#[derive(Debug)]
struct Waiters {
    queue: VecDeque<Waker>,
    /// Tickets handed out so far (the next registration gets this number).
    issued: u64,
    /// Tickets woken so far: the queue holds tickets `woken..issued`.
    woken: u64,
}

/// A reader's place in a budget's queue of waiters ([`Budget::wait_once`]); 0: none.
pub(crate) type Ticket = u64;

impl Budget {
    /// A budget of `limit` bytes whose waiters are woken when usage falls to `resume_at`.
    pub(crate) fn new(limit: usize, resume_at: usize) -> Self {
        let limit = limit.max(1);
        Budget {
            used: AtomicUsize::new(0),
            limit,
            resume_at: resume_at.min(limit - 1),
            waiting: AtomicBool::new(false),
            // Tickets start at 1 (0 is "none").
            waiters: Mutex::new(Waiters {
                queue: VecDeque::new(),
                issued: 1,
                woken: 1,
            }),
            room: Notify::new(),
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes in use.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// True while usage is at or above the limit (nothing is registered).
    pub(crate) fn at_limit(&self) -> bool {
        self.used() >= self.limit
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

    /// Gives `n` bytes back; at or below `resume_at`, wakes the next [`WAKE_BATCH`] waiters
    /// (every waiter once nothing is in use: no `give` would come for the rest).
    pub(crate) fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| Some(u.saturating_sub(n)))
            .unwrap_or(0);
        let left = before.saturating_sub(n);
        if left <= self.resume_at && self.waiting.load(Relaxed) {
            let batch = if left == 0 { usize::MAX } else { WAKE_BATCH };
            self.wake(batch);
            self.room.notify_waiters();
        }
    }

    /// Wakes the `n` oldest waiters.
    fn wake(&self, n: usize) {
        let mut w = self.waiters();
        let k = n.min(w.queue.len());
        let woken: Vec<Waker> = w.queue.drain(..k).collect();
        w.woken += k as u64;
        if w.queue.is_empty() {
            self.waiting.store(false, Relaxed);
            if w.queue.capacity() > 64 {
                w.queue = VecDeque::new();
            }
        }
        drop(w);
        for waker in woken {
            waker.wake();
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

    /// True while usage is at or above the limit; `waker` is then woken (in its turn) when
    /// usage has fallen to `resume_at`. `ticket` remembers the registration: a reader polled
    /// again before its turn keeps its place instead of queuing twice.
    pub(crate) fn is_full(&self, waker: &Waker, ticket: &mut Ticket) -> bool {
        if !self.at_limit() {
            return false;
        }
        self.wait_once(waker, ticket);
        // Re-check: a `give` between the first check and the registration woke nobody.
        self.at_limit()
    }

    /// Registers `waker` unless `ticket` says it is still queued.
    pub(crate) fn wait_once(&self, waker: &Waker, ticket: &mut Ticket) {
        let mut w = self.waiters();
        if *ticket >= w.woken && *ticket < w.issued {
            self.waiting.store(true, Relaxed);
            return;
        }
        *ticket = w.issued;
        w.issued += 1;
        w.queue.push_back(waker.clone());
        self.waiting.store(true, Relaxed);
    }

    /// Registers `waker` for the next time usage falls to `resume_at` (a reader that keeps
    /// no ticket: the queue is searched for it).
    pub(crate) fn wait(&self, waker: &Waker) {
        let mut w = self.waiters();
        if !w.queue.iter().any(|q| q.will_wake(waker)) {
            w.issued += 1;
            w.queue.push_back(waker.clone());
        }
        self.waiting.store(true, Relaxed);
    }

    /// Waiters registered and not woken yet.
    #[cfg(test)]
    pub(crate) fn waiters_len(&self) -> usize {
        self.waiters().queue.len()
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
        let mut ticket = 0;
        assert!(b.is_full(&waker, &mut ticket));
        b.give(30); // 70 in use: above the resume mark
        assert_eq!(count.0.load(Relaxed), 0);
        b.give(20); // 50: wake
        assert_eq!(count.0.load(Relaxed), 1);
        assert!(!b.is_full(&waker, &mut ticket));
        b.adjust(50, 0);
        assert_eq!(b.used(), 0);
        // One item larger than the whole budget passes alone.
        assert!(b.try_take(1000));
        assert!(!b.try_take(1));
    }

    #[test]
    fn a_give_wakes_a_batch_of_waiters_oldest_first_and_a_waiter_queues_once() {
        let b = Budget::new(100, 50);
        b.take(100);
        let counts: Vec<Arc<Count>> = (0..3 * WAKE_BATCH)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let mut tickets = vec![0; counts.len()];
        for (c, t) in counts.iter().zip(tickets.iter_mut()) {
            let waker = Waker::from(c.clone());
            assert!(b.is_full(&waker, t));
            // Polled again before its turn: it keeps its place, no second entry.
            assert!(b.is_full(&waker, t));
        }
        assert_eq!(b.waiters_len(), 3 * WAKE_BATCH);
        let woken = || counts.iter().map(|c| c.0.load(Relaxed)).collect::<Vec<_>>();
        b.give(10); // 90: above the resume mark
        assert_eq!(woken().iter().sum::<usize>(), 0);
        b.give(40); // 50: the oldest batch
        let w = woken();
        assert!(w[..WAKE_BATCH].iter().all(|&n| n == 1));
        assert!(w[WAKE_BATCH..].iter().all(|&n| n == 0));
        b.give(10); // 40: the next batch
        assert_eq!(woken().iter().sum::<usize>(), 2 * WAKE_BATCH);
        // A woken waiter that registers again goes to the back.
        let first = Waker::from(counts[0].clone());
        b.take(60);
        assert!(b.is_full(&first, &mut tickets[0]));
        assert_eq!(b.waiters_len(), WAKE_BATCH + 1);
        b.give(100); // nothing in use: everyone left
        assert_eq!(counts[0].0.load(Relaxed), 2);
        assert!(woken().iter().all(|&n| n >= 1));
        assert_eq!(b.waiters_len(), 0);
    }
}
