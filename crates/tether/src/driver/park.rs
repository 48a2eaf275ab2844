//! The lot: idle server connections kept without a task of their own (issue 17).
//!
//! A connection whose wake-up ends with nothing in flight ([`Conn::is_quiescent`], nothing
//! queued, not paused, not closing; see `Driver::may_park`) does not return `Pending` to
//! tokio: its task ends (its cell and its `Sleep` are freed) and the driver's state moves
//! here. The lot is one tokio task per server, started by the first parked connection and
//! ending when the last one leaves:
//!
//! ```text
//!  driver task ──park(d)──▶ incoming ──▶ slab[idx] = {Driver, waker(idx, gen), queued_at}
//!                                            │  polled here with the entry's waker:
//!   socket readable ─┐                       │  the same `Driver::poll` as a task runs,
//!   handle send/close ├─ waker(idx) ─▶ ready ─┤  with the deadline kept in the lot's heap
//!   lot's one Sleep ──┘  (heap of deadlines) ─┘  instead of a Sleep of its own
//!                                            │
//!            still quiescent: stays ◀────────┤
//!            anything else (bytes to write, more to read, paused, closing, ended):
//!            spawned again as a task (`Lot::spawn`, the accept path's task function)
//! ```
//!
//! The driver is the one driver and the state machine the one engine: a parked connection
//! is polled with the very code its task would run (a client's heartbeat is read and
//! answered, a due deadline fired, a handle's message written) — only where it waits
//! differs. Its waker is the entry's: the transport registers it for readability (and for
//! writability, which unparks), `Shared` keeps it as the driver's waker (a handle's send,
//! close or command wakes the lot through it), and the budgets queue it like a task's.
//!
//! Deadlines: a binary heap of `(instant, slot, generation)`, lazily re-checked against
//! the entry's current deadline when popped (a deadline that moved later is pushed again,
//! once; one that moved earlier is pushed at once). Never early (an entry is polled only
//! once its deadline is due, and the state machine re-checks it), late only by the lot's
//! own scheduling: one tokio `Sleep` for the whole lot.
//!
//! The lot runs unconstrained by tokio's cooperative budget (a parked transport's poll
//! would otherwise answer `Pending` for a budget it does not own, and wake the entry in a
//! loop) and bounds itself instead: at most [`POLLS_PER_PASS`] entries per pass, then a
//! deferred yield.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio::time::Sleep;

use super::{now, Driver, Exit, Resume, Sink, Timer};
use crate::transport::Transport;

/// Entries polled per pass of the lot's task before it yields to other tasks. Large: the
/// lot stands for every idle connection of its worker, and under a saturating load it gets
/// a turn like one task among the busy ones; with 1,024 a pass, 19,000 clients' heartbeats
/// and deadlines queued behind 256 loaders for 1.3-1.6 s (`tether bench detect`,
/// BENCHMARKS.md 2026-11-30 "fourth pass"). A pass of this many is ~0.1-0.3 s of one core.
const POLLS_PER_PASS: usize = 16 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data (queues of indexes and drivers): usable after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Idle connections of one server (see the module docs).
pub(crate) struct Lot<T, S> {
    wake: Arc<LotWake>,
    incoming: Mutex<Incoming<T, S>>,
    /// Spawns an unparked connection's task (the same task function the accept path
    /// spawns, so the end of a connection runs in one place whichever way it ends).
    spawn: fn(Resume<T, S>),
    /// Connections parked now.
    parked: AtomicUsize,
}

struct Incoming<T, S> {
    drivers: Vec<Driver<T, S>>,
    /// The lot's task is running (it ends when the lot is empty).
    running: bool,
}

/// What an entry's waker reaches: the ready list and the lot's task. A leaf: nothing else
/// is locked while `ready` is (wakers are called with a connection's `Shared` locked).
struct LotWake {
    ready: Mutex<VecDeque<(u32, u32)>>,
    task: AtomicWaker,
}

/// One parked connection's waker.
struct EntryWake {
    lot: Arc<LotWake>,
    idx: u32,
    gen: u32,
    /// On the ready list already (cleared before the entry is polled).
    scheduled: AtomicBool,
}

impl Wake for EntryWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.scheduled.swap(true, AcqRel) {
            lock(&self.lot.ready).push_back((self.idx, self.gen));
            self.lot.task.wake();
        }
    }
}

impl<T: Transport, S: Sink + Send + 'static> Lot<T, S> {
    /// An empty lot whose unparked connections are spawned with `spawn`.
    pub(crate) fn new(spawn: fn(Resume<T, S>)) -> Arc<Self> {
        Arc::new(Lot {
            wake: Arc::new(LotWake {
                ready: Mutex::default(),
                task: AtomicWaker::new(),
            }),
            incoming: Mutex::new(Incoming {
                drivers: Vec::new(),
                running: false,
            }),
            spawn,
            parked: AtomicUsize::new(0),
        })
    }

    /// Connections parked now.
    pub(crate) fn parked(&self) -> usize {
        self.parked.load(Relaxed)
    }

    /// Takes a connection whose task ended quiescent. The lot polls it once at once (with
    /// the entry's waker): what arrived since its task's last look is not lost.
    pub(super) fn park(self: &Arc<Self>, d: Driver<T, S>) {
        let mut i = lock(&self.incoming);
        i.drivers.push(d);
        if i.running {
            drop(i);
            self.wake.task.wake();
        } else {
            i.running = true;
            drop(i);
            tokio::spawn(tokio::task::unconstrained(run(self.clone())));
        }
    }
}

/// What one parked connection costs the lot besides its driver's parts (for the size test):
/// the boxed entry (the driver inline), its waker's `Arc` payload, one deadline in the heap.
#[cfg(test)]
pub(crate) fn parked_sizes<T, S>() -> (usize, usize, usize) {
    (
        std::mem::size_of::<Entry<T, S>>(),
        std::mem::size_of::<EntryWake>(),
        std::mem::size_of::<Reverse<(Instant, u32, u32)>>(),
    )
}

struct Entry<T, S> {
    d: Driver<T, S>,
    wake: Arc<EntryWake>,
    /// The earliest deadline of this entry in the heap (others for it there are stale).
    queued_at: Option<Instant>,
}

struct Slot<T, S> {
    gen: u32,
    /// Boxed: a slab of inline entries would carry its growth slack in entry-sized slots.
    entry: Option<Box<Entry<T, S>>>,
}

/// What the lot's task owns.
struct Yard<T, S> {
    slots: Vec<Slot<T, S>>,
    free: Vec<u32>,
    len: usize,
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
}

impl<T: Transport, S: Sink + Send + 'static> Yard<T, S> {
    fn insert(&mut self, lot: &Lot<T, S>, d: Driver<T, S>) -> u32 {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    entry: None,
                });
                // A lot of more than 4 billion connections is not a lot this process holds.
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[idx as usize];
        slot.gen = slot.gen.wrapping_add(1);
        slot.entry = Some(Box::new(Entry {
            d,
            wake: Arc::new(EntryWake {
                lot: lot.wake.clone(),
                idx,
                gen: slot.gen,
                scheduled: AtomicBool::new(false),
            }),
            queued_at: None,
        }));
        self.len += 1;
        lot.parked.fetch_add(1, Relaxed);
        idx
    }

    fn entry(&mut self, idx: u32, gen: u32) -> Option<&mut Entry<T, S>> {
        let slot = self.slots.get_mut(idx as usize)?;
        if slot.gen != gen {
            return None;
        }
        slot.entry.as_deref_mut()
    }

    /// Polls entry `idx` as its task would; spawns its task again when it is no longer
    /// idle (or ended).
    fn poll(&mut self, lot: &Lot<T, S>, idx: u32) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        let gen = slot.gen;
        let Some(e) = slot.entry.as_deref_mut() else {
            return;
        };
        e.wake.scheduled.store(false, Relaxed);
        let waker = Waker::from(e.wake.clone());
        let mut cx = Context::from_waker(&waker);
        match e.d.poll(&mut cx, Timer::Parked) {
            Poll::Pending => {
                if let Some(a) = e.d.armed.get() {
                    if e.queued_at.is_none_or(|q| requeue(q, a, now())) {
                        e.queued_at = Some(a);
                        self.deadlines.push(Reverse((a, idx, gen)));
                    }
                }
            }
            Poll::Ready(exit) => {
                let Some(e) = slot.entry.take() else {
                    return;
                };
                self.free.push(idx);
                self.len -= 1;
                lot.parked.fetch_sub(1, Relaxed);
                (lot.spawn)(Resume {
                    d: e.d,
                    finished: matches!(exit, Exit::Done),
                });
            }
        }
    }

    /// Drops the heap's stale places at its top (the entry left, or was queued again
    /// elsewhere), so the lot's sleep is armed for a deadline that is still wanted.
    fn clean(&mut self) {
        while let Some(&Reverse((t, idx, gen))) = self.deadlines.peek() {
            if self.entry(idx, gen).is_some_and(|e| e.queued_at == Some(t)) {
                return;
            }
            self.deadlines.pop();
        }
    }

    /// Pops the deadlines due at `now`: an entry whose deadline is due is polled (the
    /// state machine fires it); one whose deadline moved later is queued again at it.
    /// Returns the entries polled.
    fn due(&mut self, lot: &Lot<T, S>, now: Instant, mut room: usize) -> usize {
        let mut polled = 0;
        while room > 0 {
            match self.deadlines.peek() {
                Some(Reverse((t, _, _))) if *t <= now => {}
                _ => break,
            }
            let Some(Reverse((t, idx, gen))) = self.deadlines.pop() else {
                break;
            };
            let Some(e) = self.entry(idx, gen) else {
                continue;
            };
            if e.queued_at != Some(t) {
                continue;
            }
            e.queued_at = None;
            match e.d.armed.get() {
                Some(a) if a <= now => {
                    self.poll(lot, idx);
                    polled += 1;
                    room -= 1;
                }
                Some(a) => {
                    e.queued_at = Some(a);
                    self.deadlines.push(Reverse((a, idx, gen)));
                }
                None => {}
            }
        }
        polled
    }
}

/// Whether an entry queued at `q` whose deadline is now `a` is queued again at `a` (the
/// rule of the driver's `arm_timer`): when `a` is earlier, or later and the old place would
/// soon be reached for nothing (within `REARM_SLACK`, or in less than half the new wait).
/// An idle server answers its client's heartbeat in a wake-up and its deadline moves from
/// about now + h/8 to now + 9h/8: queued again, and the old place is dropped unvisited
/// (`Yard::clean`). Traffic, which moves the deadline a little later every wake-up, queues
/// it again about twice per interval, not once per message.
fn requeue(q: Instant, a: Instant, now: Instant) -> bool {
    if a < q {
        return true;
    }
    let early = q.saturating_duration_since(now);
    a > q && (early <= super::REARM_SLACK || early < a.saturating_duration_since(now) / 2)
}

/// The lot's task: takes parked connections, polls the woken and the due, sleeps until the
/// earliest deadline; ends when the lot is empty.
async fn run<T: Transport, S: Sink + Send + 'static>(lot: Arc<Lot<T, S>>) {
    let mut yard = Yard {
        slots: Vec::new(),
        free: Vec::new(),
        len: 0,
        deadlines: BinaryHeap::new(),
    };
    let sleep =
        tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
    tokio::pin!(sleep);
    poll_fn(|cx| pass(&lot, &mut yard, cx, sleep.as_mut())).await;
}

fn pass<T: Transport, S: Sink + Send + 'static>(
    lot: &Lot<T, S>,
    yard: &mut Yard<T, S>,
    cx: &mut Context<'_>,
    mut sleep: Pin<&mut Sleep>,
) -> Poll<()> {
    lot.wake.task.register(cx.waker());
    let mut room = POLLS_PER_PASS;
    loop {
        let before = room;
        // Deadlines first: dead-after must not wait behind heartbeats to answer.
        room -= yard.due(lot, now(), room);
        let incoming = {
            let mut i = lock(&lot.incoming);
            if i.drivers.is_empty() && yard.len == 0 {
                i.running = false;
                return Poll::Ready(());
            }
            std::mem::take(&mut i.drivers)
        };
        for d in incoming {
            let idx = yard.insert(lot, d);
            yard.poll(lot, idx);
            room = room.saturating_sub(1);
        }
        while room > 0 {
            let Some((idx, gen)) = lock(&lot.wake.ready).pop_front() else {
                break;
            };
            if yard.entry(idx, gen).is_some() {
                yard.poll(lot, idx);
                room -= 1;
            }
        }
        yard.clean();
        if room == 0 {
            // More may be waiting: run again after the worker polled I/O and timers.
            super::steps::yield_deferred(cx);
            return Poll::Pending;
        }
        if let Some(Reverse((t, _, _))) = yard.deadlines.peek() {
            let t = tokio::time::Instant::from_std(*t);
            if sleep.deadline() != t {
                sleep.as_mut().reset(t);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                continue;
            }
        }
        if room == before {
            return Poll::Pending;
        }
    }
}
