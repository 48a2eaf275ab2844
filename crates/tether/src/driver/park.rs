//! The lot: idle server connections kept without a task of their own (issue 17).
//!
//! A connection whose wake-up ends with nothing in flight ([`Conn::is_quiescent`], nothing
//! queued, not paused, not closing; see `Driver::may_park`) does not return `Pending` to
//! tokio: its task ends (its cell and its `Sleep` are freed) and the driver's state moves
//! here. A lot is started by the first parked connection and ends when the last one leaves.
//! It runs one of two ways around the same slab, heap and poll ([`Yard`]):
//!
//! - **On a thread of its own** ([`Lot::threaded`], the server's plain-TCP lots): the
//!   socket leaves tokio's reactor ([`Transport::detach`]: tokio's per-socket registration
//!   is freed) for the lot's own epoll (`mio`, edge-triggered, readable, token = slot and
//!   generation); the thread sleeps in `epoll_wait` until the earliest deadline, a socket's
//!   bytes or a waker (an eventfd). It runs outside tokio's run queue, so a deadline does
//!   not wait behind busy tasks (under 256 loaders the lot task was 113-215 ms late).
//!   Unparked, the socket leaves the epoll and goes back into the reactor
//!   ([`Transport::attach`], with the runtime's context entered) before its task is
//!   spawned; a connection that finished here is reported from here (`accept::unpark`).
//!   The thread may have helpers ([`helper`], `ServerConfig::park_threads`): they share
//!   its yard (behind a lock) and take handles' wakes off the ready list when more than one
//!   waits; a full wake-up is polled without the lock, its driver lent out of its entry
//!   ([`run_lent`]). The thread alone waits on the epoll and the deadlines: one wake-up
//!   per burst of idle heartbeats, and sends written by several threads.
//! - **As a tokio task** ([`Lot::new`]): for a transport that cannot leave the reactor; the
//!   transport registers the entry's waker. The paused-time tests park `DuplexStream`s here,
//!   so the lot's timing rules stay tested to the instant.
//!
//! ```text
//!  driver task ──park(d)──▶ incoming ──▶ slab[idx] = {Parked driver (Conn frozen), waker(idx, gen), queued_at}
//!                                            │  thawed and polled here with the entry's waker:
//!   socket readable ──┐ (epoll event, or     │  the same `Driver::poll` as a task runs,
//!   handle send/close ├─ waker(idx) ─▶ ready ┤  with the deadline kept in the lot's heap
//!   the lot's timeout ┘ (heap of deadlines) ─┘  instead of a Sleep of its own
//!                                            │
//!            still quiescent: stays ◀────────┤
//!            anything else (bytes to write, more to read, paused, closing, ended):
//!            spawned again as a task (`Lot::spawn`, the accept path's task function)
//! ```
//!
//! Quick wake-ups: an entry woken by its socket (a lot thread's epoll event, a lot task's
//! socket waker) or by its deadline alone, with no handle's wake queued, first asks the core
//! (`Driver::poll_quick`, `Conn::parked_input` / `parked_timeout`): a client's heartbeat is
//! answered, the fallback heartbeat sent and the deadline moved without the full wake-up
//! (no `Shared` lock, sink or publish; each read takes its partial-frame reservation first,
//! as every read of a server connection does). Whatever else it finds — a message, a
//! partial frame, CLOSE, AUTH, the end of the stream, an event for the application,
//! dead-after — runs the full wake-up below, handed what was read already (`Carried`).
//! On a lot thread a heartbeat so costs one `recv`, one `send` and a share of an
//! `epoll_wait` (8-19 sockets a return in a burst at 5,000 idle clients; 3-4 when each
//! of two workers had a lot of its own), and no allocation: the answer is encoded
//! into a transmit buffer the lot lends the state machine for the wake-up (`Yard::spare`,
//! back with the write; `idle_alloc` counts 0 per heartbeat). A lot thread does not nap before
//! `epoll_wait` to gather more of a burst: measured (BENCHMARKS.md, 2026-12-01), the nap's
//! own sleep cost what the fewer `epoll_wait` returns saved, and it delayed answers by up
//! to its length.
//!
//! Frozen between wake-ups: an entry keeps its driver in its compact form (`Driver::freeze`,
//! a `Parked`: the transport in its parked form (`ParkIo`: a lot thread's socket is its
//! descriptor and a flag, in one word), the sink, the shared state, two stamps and the state machine
//! frozen by `Conn::freeze`, 120 B instead of a 360 B `Conn`), since a parked connection's
//! `Conn` holds mostly empty buffers and queues and most of its driver's fields have the
//! values parking implies (no end, no close under way, established, no partial frame, this
//! lot; the state machine's counters are the ones published in `Shared::stats`). A wake-up
//! thaws it onto the stack (`Driver::thaw`, no allocation on a lot thread), runs the one
//! engine's quick or full path as a task would, and freezes it back while it stays idle; it
//! leaves the lot thawed. `Driver::may_park` is `Driver::can_freeze`, so every parked
//! connection freezes.
//!
//! On a lot thread the commonest wake-up does not thaw at all ([`frozen_wake`]): the
//! socket is read in place (`ParkIo::parked_read`) and a read of whole heartbeats is taken
//! on the frozen form by the core (`FrozenConn::parked_heartbeats`: its liveness engine
//! thawed on the stack, the same `on_receive` and `on_heartbeat_received`), the answer
//! written in place (`ParkIo::parked_write`), the counters published and the deadline
//! re-read from the frozen form (`FrozenConn::poll_timeout`). Anything it does not take
//! thaws the connection for the quick or full wake-up with what was read. Measured side by
//! side with the thawed path: 3 % less CPU per idle heartbeat (BENCHMARKS.md, seventeenth
//! pass; the kernel's work for the heartbeat, the same in both, is most of what is left).
//!
//! The driver is the one driver and the state machine the one engine: a parked connection
//! is polled with the very code its task would run (a client's heartbeat is read and
//! answered, a due deadline fired, a handle's message written) — only where it waits
//! differs. Its waker is the entry's: `Shared` keeps it as the driver's waker (a handle's
//! send, close or command wakes the lot through it), and the budgets queue it like a
//! task's; a lot task's transport registers it for readability too.
//!
//! Deadlines: an eight-ary heap ([`Deadlines`]) of `(instant, slot)` ([`Place`], 12 B),
//! lazily re-checked against the entry's current deadline when popped (a deadline that moved
//! later is pushed again, once; one that moved earlier is pushed at once). Never early (an
//! entry is polled only once its deadline is due, and the state machine re-checks it;
//! `epoll_wait`'s timeout is rounded up to the millisecond), late only by the lot's own
//! scheduling. The slab and the heap grow by an eighth, not by doubling, and the heap gives
//! its room back when less than three quarters used ([`more_room`], [`less_room`]): every
//! place costs an idle connection its bytes (8 B a slab slot, 12 B a heap place).
//!
//! A lot task runs unconstrained by tokio's cooperative budget (a parked transport's poll
//! would otherwise answer `Pending` for a budget it does not own, and wake the entry in a
//! loop) and bounds itself instead: at most [`POLLS_PER_PASS`] entries per pass, then a
//! deferred yield. A lot thread needs no bound: it is nobody else's turn.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::task::AtomicWaker;
use tokio::time::Sleep;

use super::{
    now, Carried, Driver, Exit, Parked, Resume, Sink, Stamp, Timer, PAUSED_READ, READS_PER_WAKE,
};
use crate::transport::{ParkIo, Transport};

/// Entries polled per pass of the lot's task before it yields to other tasks. Large: the
/// lot stands for every idle connection of its worker, and under a saturating load it gets
/// a turn like one task among the busy ones; with 1,024 a pass, 19,000 clients' heartbeats
/// and deadlines queued behind 256 loaders for 1.3-1.6 s (`tether bench detect`,
/// BENCHMARKS.md 2026-11-30 "fourth pass"). A pass of this many is ~0.1-0.3 s of one core.
const POLLS_PER_PASS: usize = 16 * 1024;

/// How long a lot thread waits, empty, for the next connection to park before it ends.
const THREAD_LINGER: Duration = Duration::from_secs(5);

/// The most a lot keeps of the transmit buffer it lends its quick wake-ups (`Yard::spare`):
/// what they encode is a heartbeat (4 B), a PONG or an ACK (13 B each); a larger one is
/// released rather than kept.
const SPARE_KEPT: usize = 256;

/// A lot thread looks at its deadlines again after this many polls within a pass (a poll
/// is ~10-40 µs: a deadline waits at most a few ms behind the heartbeats of one pass).
const POLLS_BETWEEN_DEADLINES: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data (queues of indexes and drivers): usable after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Idle connections of one server (see the module docs).
pub(crate) struct Lot<T, S> {
    /// Its wake state and its id in [`LOTS`] (the entries' wakers name it by id).
    wake: &'static LotWake,
    id: u32,
    incoming: Mutex<Incoming<T, S>>,
    /// Spawns an unparked connection's task (the same task function the accept path
    /// spawns, so the end of a connection runs in one place whichever way it ends).
    spawn: fn(Resume<T, S>),
    /// Connections parked now.
    parked: AtomicUsize,
    /// Runs on its own thread (`None`: as a tokio task).
    threaded: Option<Threaded<T, S>>,
    /// Connections that left the lot for a task (tests: nothing else tells).
    #[cfg(test)]
    unparks: AtomicUsize,
    /// Lot threads started so far (tests).
    #[cfg(test)]
    threads: AtomicUsize,
    /// Quick wake-ups that left the connection parked (tests).
    #[cfg(test)]
    quick: AtomicUsize,
    /// Reads a lot thread took on the frozen form (tests).
    #[cfg(test)]
    frozen: AtomicUsize,
    /// Full wake-ups run by a helper (tests).
    #[cfg(test)]
    helped: AtomicUsize,
    /// Lent entries woken meanwhile, by their socket or a handle (tests).
    #[cfg(test)]
    woken_lent: AtomicUsize,
}

struct Incoming<T, S> {
    drivers: Vec<Driver<T, S>>,
    /// The lot's task is running (it ends when the lot is empty).
    running: bool,
}

/// What an entry's waker reaches: the ready list, the entries' scheduled flags and the lot's
/// task (or thread). A leaf: nothing else is locked while `ready` is (wakers are called with
/// a connection's `Shared` locked). Never freed: one lot's, then the next one's (see
/// [`LOTS`]).
struct LotWake {
    /// Woken entries: slot, generation, and whether by its socket alone (a lot task's
    /// socket waker: a quick wake-up).
    ready: Mutex<VecDeque<(u32, u32, bool)>>,
    /// Per slot: the generation of its entry (the last one, once it left) and whether that
    /// entry is on the ready list already, for its full wake-up ([`FULL`]) and for its
    /// socket's quick one ([`SOCKET`]): one place on the list per burst of wakes. Set by a
    /// waker that finds its generation there, cleared before the entry is polled; a new
    /// entry starts unscheduled. 4 B a slot, kept when the lot's thread ends and for the
    /// next lot, so generations keep counting up and a stale waker finds another one.
    states: Segmented<AtomicU32, 23>,
    task: AtomicWaker,
    /// A lot thread's wake-up (an eventfd in its epoll); `None` for a lot task (and while
    /// no lot has this).
    thread: Mutex<Option<mio::Waker>>,
    /// `thread` is `Some` (read without its lock).
    threaded: AtomicBool,
    /// A lot thread's helpers wait here, with `ready`'s lock, for handles' wakes
    /// ([`helper`]); `sleeping` of them do (read without the lock).
    helpers: Condvar,
    sleeping: AtomicUsize,
}

impl LotWake {
    /// The wake state of a new lot and its id, `None` when [`MAX_LOTS`] are alive. The
    /// state of a dropped lot is taken first; its slots keep their generations.
    fn take(thread: Option<mio::Waker>) -> Option<(&'static LotWake, u32)> {
        let mut free = lock(&FREE_LOTS);
        let (w, id) = match free.0.pop() {
            Some(id) => (LOTS.get(id).and_then(OnceLock::get).copied()?, id),
            None => {
                let id = free.1;
                if id >= MAX_LOTS {
                    return None;
                }
                let w: &'static LotWake = Box::leak(Box::new(LotWake {
                    ready: Mutex::default(),
                    states: Segmented::new(),
                    task: AtomicWaker::new(),
                    thread: Mutex::new(None),
                    threaded: AtomicBool::new(false),
                    helpers: Condvar::new(),
                    sleeping: AtomicUsize::new(0),
                }));
                LOTS.get_or_grow(id)?.set(w).ok()?;
                free.1 += 1;
                (w, id)
            }
        };
        drop(free);
        // What stale wakers queued since the last lot gave it back: their generations are
        // older than any this lot arms, so it would pass over them; dropped here unread.
        lock(&w.ready).clear();
        w.threaded.store(thread.is_some(), Relaxed);
        *lock(&w.thread) = thread;
        Some((w, id))
    }

    /// Lot `id`, whose wake state this is, was dropped: the next lot takes both.
    fn give_back(&'static self, id: u32) {
        // Stale wakers may still queue here until the next lot takes it (which clears the
        // list) and after: each slot at most once while its flag stays set, and only with
        // the slot's last generation, older than any the next lot arms (`Yard::insert`
        // counts on from `last_gen`): what they queue is passed over, never polled.
        let mut r = lock(&self.ready);
        r.clear();
        r.shrink_to_fit();
        drop(r);
        self.threaded.store(false, Relaxed);
        // The eventfd closes with its lot.
        *lock(&self.thread) = None;
        drop(self.task.take());
        lock(&FREE_LOTS).0.push(id);
    }
}

/// A slot's state ([`LotWake::states`]): its entry is queued for the full wake-up.
const FULL: u32 = 1;
/// ... for a quick wake-up by its socket (a lot task's socket waker).
const SOCKET: u32 = 2;
/// Generations count in the state's upper 30 bits (and wrap there).
const GEN_SHIFT: u32 = 2;
const GEN_MASK: u32 = u32::MAX >> GEN_SHIFT;

/// An entry's waker is a number, not an allocation: its lot's id, its slot, the low bits of
/// its generation and whether it is the socket's, packed into the data word of a
/// `RawWaker` whose clone and drop do nothing and whose wake finds the lot in [`LOTS`]
/// (48 B a parked connection with an `Arc` per entry). The word, high to low:
///
/// ```text
///  63        44 43      29   28   27              0
/// ┌────────────┬──────────┬──────┬─────────────────┐
/// │ lot id (20)│ gen (15) │socket│   slot (28)     │
/// └────────────┴──────────┴──────┴─────────────────┘
/// ```
///
/// A stale waker is harmless: its lot's [`LotWake`] is never freed (a dropped lot's goes to
/// the next lot, whose slots' generations count on from the old ones), and a waker whose
/// generation is not its slot's does nothing. Only a waker kept through 32,768 generations
/// of its slot, exactly, wakes the slot's entry of the day: a spurious wake-up, which a
/// parked connection answers by finding nothing to do.
const WORD_SLOT_BITS: u32 = 28;
const WORD_GEN_BITS: u32 = 15;
const WORD_LOT_BITS: u32 = 20;
const _: () = assert!(WORD_SLOT_BITS + 1 + WORD_GEN_BITS + WORD_LOT_BITS == usize::BITS);
/// Slots a lot has at most (an entry beyond gets its task back).
const MAX_SLOTS: usize = 1 << WORD_SLOT_BITS;
/// Lots alive at once at most ([`Lot::new`] answers `None` beyond).
const MAX_LOTS: u32 = 1 << WORD_LOT_BITS;

/// An entry's waker (see [`WORD_SLOT_BITS`]).
fn entry_waker(lot: u32, idx: u32, gen: u32, socket: bool) -> Waker {
    let word = ((lot as usize) << (WORD_SLOT_BITS + 1 + WORD_GEN_BITS))
        | (((gen & ((1 << WORD_GEN_BITS) - 1)) as usize) << (WORD_SLOT_BITS + 1))
        | ((socket as usize) << WORD_SLOT_BITS)
        | idx as usize;
    // SAFETY: the vtable's functions never dereference the data pointer (a number made
    // into a pointer without provenance, read back with `addr`), keep nothing alive and
    // may run on any thread (they reach the lot through a static).
    unsafe {
        Waker::from_raw(RawWaker::new(
            std::ptr::without_provenance(word),
            &ENTRY_WAKER,
        ))
    }
}

static ENTRY_WAKER: RawWakerVTable =
    RawWakerVTable::new(clone_entry_waker, wake_entry, wake_entry, drop_entry_waker);

fn clone_entry_waker(word: *const ()) -> RawWaker {
    RawWaker::new(word, &ENTRY_WAKER)
}

fn drop_entry_waker(_: *const ()) {}

fn wake_entry(word: *const ()) {
    let w = word.addr();
    let idx = (w & (MAX_SLOTS - 1)) as u32;
    let socket = (w >> WORD_SLOT_BITS) & 1 == 1;
    let gen = ((w >> (WORD_SLOT_BITS + 1)) & ((1 << WORD_GEN_BITS) - 1)) as u32;
    let lot = (w >> (WORD_SLOT_BITS + 1 + WORD_GEN_BITS)) as u32;
    if let Some(l) = LOTS.get(lot).and_then(OnceLock::get) {
        l.wake(idx, gen, socket);
    }
}

/// Every lot's [`LotWake`] by id, for the entries' wakers. A dropped lot's id and wake
/// state go to the next lot ([`FREE_LOTS`]): they are never freed (a few hundred bytes
/// and 4 B a slot per lot alive at once, at most), so a stale waker reaches live memory.
static LOTS: Segmented<OnceLock<&'static LotWake>, 15> = Segmented::new();
/// Ids of dropped lots, and the next id never given.
static FREE_LOTS: Mutex<(Vec<u32>, u32)> = Mutex::new((Vec::new(), 0));

/// An array that grows while others read it, without a lock: segment `k` holds `64 << k`
/// places and is allocated by the first that needs it; places never move.
struct Segmented<T, const N: usize> {
    segs: [OnceLock<Box<[T]>>; N],
}

impl<T: Default, const N: usize> Segmented<T, N> {
    const fn new() -> Self {
        Segmented {
            segs: [const { OnceLock::new() }; N],
        }
    }

    fn place(i: u32) -> (usize, usize) {
        let n = (i as u64 >> 6) + 1;
        let k = 63 - n.leading_zeros();
        (k as usize, (i as u64 - (((1u64 << k) - 1) << 6)) as usize)
    }

    /// Place `i`, if its segment exists.
    fn get(&self, i: u32) -> Option<&T> {
        let (k, o) = Self::place(i);
        self.segs.get(k)?.get()?.get(o)
    }

    /// Place `i`, its segment allocated if need be (`None` beyond the last segment).
    fn get_or_grow(&self, i: u32) -> Option<&T> {
        let (k, o) = Self::place(i);
        self.segs
            .get(k)?
            .get_or_init(|| (0..64usize << k).map(|_| T::default()).collect())
            .get(o)
    }
}

/// A lot that runs on a thread of its own (see the module docs): its epoll, kept here while
/// no thread runs, and the runtime its unparked connections go back to.
struct Threaded<T, S> {
    poll: Mutex<Option<mio::Poll>>,
    runtime: tokio::runtime::Handle,
    /// Unparked connections on their way to a task: spawned by a relay task on a worker.
    relay: Arc<Mutex<Relay<T, S>>>,
    /// Threads that help the lot's thread with its entries' full wake-ups ([`helper`]).
    helpers: usize,
}

/// See [`Threaded::relay`]. A task spawned from outside the runtime waits in its global
/// queue, which a busy worker looks at once in 61 of its own tasks: under 256 loaders,
/// thousands of connections unparked by a lot thread waited there for seconds while their
/// clients' heartbeats went unanswered (12,000-16,000 false Offlines per `tether bench
/// detect` run). The relay waits there once per batch; the tasks it spawns from a worker go
/// to that worker's own queue, as a lot task's did.
struct Relay<T, S> {
    queued: Vec<Resume<T, S>>,
    running: bool,
}

/// The token of a lot thread's waker (an entry's token is its slot and generation).
const WAKE_TOKEN: mio::Token = mio::Token(usize::MAX);

fn token(idx: u32, gen: u32) -> mio::Token {
    mio::Token(((gen as usize) << 32) | idx as usize)
}

/// An entry's slot and generation from its [`token`]; `None` for the [`WAKE_TOKEN`].
fn entry_of(t: mio::Token) -> Option<(u32, u32)> {
    (t != WAKE_TOKEN).then_some((t.0 as u32, (t.0 >> 32) as u32))
}

impl LotWake {
    /// An entry's waker was woken (`gen`: the low bits of its generation; `socket`: the
    /// socket's waker of an entry in a lot task, whose transport registers the waker of the
    /// read that found nothing: a quick wake-up). Puts the entry on the ready list unless
    /// it is there already or the waker is stale.
    fn wake(&self, idx: u32, gen: u32, socket: bool) {
        let Some(state) = self.states.get(idx) else {
            return;
        };
        let bit = if socket { SOCKET } else { FULL };
        let mut s = state.load(Acquire);
        loop {
            let mine = (s >> GEN_SHIFT) & ((1 << WORD_GEN_BITS) - 1) == gen;
            if !mine || s & bit != 0 {
                return;
            }
            match state.compare_exchange_weak(s, s | bit, AcqRel, Acquire) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        let mut ready = lock(&self.ready);
        let first = ready.is_empty();
        ready.push_back((idx, s >> GEN_SHIFT, socket));
        let queued = ready.len();
        drop(ready);
        // A thread empties the list before it sleeps: one wake-up per batch. A second
        // wake queued before it took the first gets a helper going too (a helper counts
        // itself sleeping with the list's lock held and found it empty: none is missed).
        if first || !self.threaded.load(Relaxed) {
            self.notify();
        } else if queued >= 2 && self.sleeping.load(Relaxed) > 0 {
            self.helpers.notify_one();
        }
    }

    /// Wakes the lot's thread or task.
    fn notify(&self) {
        match &*lock(&self.thread) {
            Some(w) => {
                if let Err(e) = w.wake() {
                    tracing::warn!(error = %e, "cannot wake a lot thread");
                }
            }
            None => self.task.wake(),
        }
    }

    /// Slot `idx` holds a new entry of generation `gen` (unscheduled). False when the slot
    /// is beyond what a waker can name.
    fn arm(&self, idx: u32, gen: u32) -> bool {
        match self.states.get_or_grow(idx) {
            Some(s) if (idx as usize) < MAX_SLOTS => {
                s.store(gen << GEN_SHIFT, Release);
                true
            }
            _ => false,
        }
    }

    /// The generation slot `idx` had last (0: never used).
    fn last_gen(&self, idx: u32) -> u32 {
        self.states
            .get(idx)
            .map_or(0, |s| s.load(Acquire) >> GEN_SHIFT)
    }

    /// Entry `idx` is about to be polled: wakes from now on queue it again.
    fn unschedule(&self, idx: u32, bit: u32) {
        if let Some(s) = self.states.get(idx) {
            s.fetch_and(!bit, AcqRel);
        }
    }

    /// Whether entry `idx` is on the ready list for a full wake-up.
    fn scheduled(&self, idx: u32) -> bool {
        self.states
            .get(idx)
            .is_some_and(|s| s.load(Acquire) & FULL != 0)
    }
}

impl<T, S> Drop for Lot<T, S> {
    fn drop(&mut self) {
        self.wake.give_back(self.id);
    }
}

impl<T: ParkIo, S: Sink + Send + 'static> Lot<T, S> {
    /// An empty lot run as a tokio task, whose unparked connections are spawned with `spawn`.
    /// Any transport that registers the waker it is given can park here (the paused-time
    /// tests park `DuplexStream`s). `None` when [`MAX_LOTS`] lots are alive (its
    /// connections keep their tasks).
    pub(crate) fn new(spawn: fn(Resume<T, S>)) -> Option<Arc<Self>> {
        Self::with(spawn, None, None)
    }

    /// An empty lot run on a thread of its own with its own epoll, for transports that can
    /// leave the reactor ([`Transport::detach`]); unparked connections go back into the
    /// current runtime and are spawned there with `spawn`. A lot task when no epoll can be
    /// had (out of file descriptors); `None` as [`Lot::new`].
    /// `threads`: the lot's thread and `threads - 1` helpers ([`helper`]).
    pub(crate) fn threaded(spawn: fn(Resume<T, S>), threads: usize) -> Option<Arc<Self>> {
        let poll = mio::Poll::new().and_then(|p| {
            let w = mio::Waker::new(p.registry(), WAKE_TOKEN)?;
            Ok((p, w))
        });
        match poll {
            Ok((p, w)) => Self::with(
                spawn,
                Some(w),
                Some(Threaded {
                    poll: Mutex::new(Some(p)),
                    runtime: tokio::runtime::Handle::current(),
                    relay: Arc::new(Mutex::new(Relay {
                        queued: Vec::new(),
                        running: false,
                    })),
                    helpers: threads.saturating_sub(1),
                }),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "no epoll for a lot thread: idle connections park in a task");
                Self::new(spawn)
            }
        }
    }

    fn with(
        spawn: fn(Resume<T, S>),
        waker: Option<mio::Waker>,
        threaded: Option<Threaded<T, S>>,
    ) -> Option<Arc<Self>> {
        let Some((wake, id)) = LotWake::take(waker) else {
            tracing::warn!("too many lots alive: idle connections keep their tasks");
            return None;
        };
        Some(Arc::new(Lot {
            wake,
            id,
            incoming: Mutex::new(Incoming {
                drivers: Vec::new(),
                running: false,
            }),
            spawn,
            parked: AtomicUsize::new(0),
            threaded,
            #[cfg(test)]
            unparks: AtomicUsize::new(0),
            #[cfg(test)]
            threads: AtomicUsize::new(0),
            #[cfg(test)]
            quick: AtomicUsize::new(0),
            #[cfg(test)]
            frozen: AtomicUsize::new(0),
            #[cfg(test)]
            helped: AtomicUsize::new(0),
            #[cfg(test)]
            woken_lent: AtomicUsize::new(0),
        }))
    }

    /// Connections parked now.
    pub(crate) fn parked(&self) -> usize {
        self.parked.load(Relaxed)
    }

    /// The threads that run this lot while it has entries (its own and its helpers; 0 for
    /// a lot task).
    pub(crate) fn threads(&self) -> usize {
        self.threaded.as_ref().map_or(0, |t| 1 + t.helpers)
    }

    /// Whether the lot runs on a thread of its own (with its own epoll).
    #[cfg(test)]
    pub(crate) fn is_threaded(&self) -> bool {
        self.threaded.is_some()
    }

    /// Connections that left the lot for a task so far.
    #[cfg(test)]
    pub(crate) fn unparks(&self) -> usize {
        self.unparks.load(Relaxed)
    }

    /// Lot threads started so far.
    #[cfg(test)]
    pub(crate) fn threads_started(&self) -> usize {
        self.threads.load(Relaxed)
    }

    /// Entries on the ready list now.
    #[cfg(test)]
    pub(crate) fn ready_len(&self) -> usize {
        lock(&self.wake.ready).len()
    }

    /// Quick wake-ups (a heartbeat or a deadline answered without the full wake-up) so far.
    #[cfg(test)]
    pub(crate) fn quick_wakes(&self) -> usize {
        self.quick.load(Relaxed)
    }

    /// Reads of heartbeats a lot thread took on the frozen form so far (`frozen_wake`).
    #[cfg(test)]
    pub(crate) fn frozen_reads(&self) -> usize {
        self.frozen.load(Relaxed)
    }

    /// Full wake-ups a helper ran so far.
    #[cfg(test)]
    pub(crate) fn helped(&self) -> usize {
        self.helped.load(Relaxed)
    }

    /// Lent entries that were woken while lent, so far.
    #[cfg(test)]
    pub(crate) fn woken_lent(&self) -> usize {
        self.woken_lent.load(Relaxed)
    }

    /// Takes a connection whose task ended quiescent. The lot polls it once at once (with
    /// the entry's waker): what arrived since its task's last look is not lost.
    pub(super) fn park(self: &Arc<Self>, d: Driver<T, S>) {
        let mut i = lock(&self.incoming);
        i.drivers.push(d);
        if i.running {
            drop(i);
            self.wake.notify();
        } else {
            i.running = true;
            drop(i);
            if self.threaded.is_none() {
                tokio::spawn(tokio::task::unconstrained(run(self.clone())));
                return;
            }
            #[cfg(test)]
            self.threads.fetch_add(1, Relaxed);
            let lot = self.clone();
            let started = std::thread::Builder::new()
                .name("tether-lot".into())
                .spawn(move || run_thread(lot));
            if let Err(e) = started {
                // No thread: every connection that came gets its task back.
                tracing::warn!(error = %e, "cannot start a lot thread");
                let mut i = lock(&self.incoming);
                i.running = false;
                for d in std::mem::take(&mut i.drivers) {
                    (self.spawn)(Resume { d, finished: false });
                }
            }
        }
    }
}

/// What one parked connection costs the lot besides its driver's parts (for the size test):
/// the boxed entry (the driver inline), its slot's wake state (its waker is a number, see
/// [`entry_waker`]), one deadline in the heap.
#[cfg(test)]
pub(crate) fn parked_sizes<T: ParkIo, S>() -> (usize, usize, usize, usize) {
    (
        std::mem::size_of::<Entry<T, S>>(),
        std::mem::size_of::<AtomicU32>(),
        std::mem::size_of::<Reverse<Place>>(),
        std::mem::size_of::<Slot<T, S>>(),
    )
}

struct Entry<T: ParkIo, S> {
    /// The driver in its compact form (`Driver::freeze`: the state machine frozen, 120 B
    /// instead of a 360 B `Conn`, and only the driver's fields a parked connection needs).
    /// `None` only while a wake-up holds it, thawed on the stack (no allocation).
    d: Option<Parked<T::Parked, S>>,
    /// The earliest deadline of this entry in the heap (others for it there are stale;
    /// none: not queued). A stamp (8 bytes, exact both ways), not an `Option<Instant>`.
    queued_at: Stamp,
}

/// A place of the slab: 8 B. Its entry's generation is not kept here but in the slot's
/// wake state ([`LotWake::states`], which the lot's wakers read; only the lot writes it, in
/// [`LotWake::arm`]): 16 B a slot with a copy of it.
struct Slot<T: ParkIo, S> {
    /// Boxed: a slab of inline entries would carry its growth slack in entry-sized slots.
    entry: Option<Box<Entry<T, S>>>,
}

/// A place in the lot's deadline heap: a deadline and the slot of the entry queued at it,
/// ordered by deadline, then slot. 12 B (packed to 4-byte alignment; 16 B with the
/// generation it had, or aligned). No generation: a place is the entry's own when the
/// entry's `queued_at` is its stamp. One left by an earlier entry of the slot is stale as
/// one its own entry left behind is (its stamp is not the new entry's `queued_at`); and
/// should the new entry be queued at that very stamp, the old place is as good as the new.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(4))]
struct Place {
    at: Stamp,
    idx: u32,
}

impl Place {
    /// The fields, copied out (a packed struct's fields are not referenced in place).
    fn get(self) -> (Stamp, u32) {
        (self.at, self.idx)
    }
}

impl Ord for Place {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.get().cmp(&other.get())
    }
}

impl PartialOrd for Place {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The lot's deadlines: an eight-ary heap (`dary_heap`), not the standard library's binary
/// one. Every answered heartbeat costs the heap a push (its new deadline) and a pop (the
/// place it left, dropped by `Yard::clean` when it reaches the top); a pop walks the heap
/// from top to bottom, and between two of them the kernel's work for a heartbeat has evicted
/// most of it from the caches. Eight children a level (96 B) walk 5 levels at 19,000 places
/// instead of 14: 299 ns a push and a pop against 498 ns binary and 369 ns four-ary, with
/// 256 KiB written between operations (`cargo bench -p tether --bench deadlines -- --bench`,
/// BENCHMARKS.md 2026-12-02); in a 19k hold `pop` fell from 1.3-1.8 % of the lot's CPU to
/// 0.4-0.6 %.
type Deadlines = Heap<Reverse<Place>>;

/// The lot's heaps (the deadlines; the tests' heaps of other places).
type Heap<T> = dary_heap::OctonaryHeap<T>;

/// What the lot's task owns.
struct Yard<T: ParkIo, S> {
    slots: Vec<Slot<T, S>>,
    free: Vec<u32>,
    len: usize,
    /// Stamps, as the entries keep them (12 B a place, compared without conversion).
    deadlines: Deadlines,
    /// A lot thread's epoll: entries' sockets are registered here while parked.
    registry: Option<mio::Registry>,
    /// The lot's wake state: the slots' generations.
    wake: &'static LotWake,
    /// The transmit buffer lent to each quick wake-up's state machine (see
    /// `Driver::poll_quick`): an answered heartbeat is encoded into it and it comes back
    /// with the write, so an idle heartbeat allocates nothing (it allocated its answer's
    /// buffer and released it once written). One per lot, a few bytes (at most
    /// [`SPARE_KEPT`]).
    spare: BytesMut,
    /// A lot thread's full wake-ups, thawed and lent out of their entries to be polled
    /// without the yard's lock ([`run_lent`]): taken by whoever holds the lock before it
    /// lets it go.
    lending: Vec<Lent<T, S>>,
    /// Lent entries whose socket the epoll reported meanwhile: the edge will not be
    /// reported again, so each gets a wake-up when it is back ([`returned`](Self::returned)).
    early: Vec<(u32, u32)>,
}

/// A lot thread's full wake-up of entry `idx` (generation `gen`), its driver thawed and
/// out of the entry (which keeps its slot, its socket in the epoll and its place in the
/// heap) until it is polled and given back ([`run_lent`], [`Yard::returned`]).
struct Lent<T, S> {
    idx: u32,
    gen: u32,
    d: Driver<T, S>,
    /// The wake-up's first read, done by a quick wake-up already.
    carried: Carried,
}

impl<T: ParkIo, S: Sink + Send + 'static> Yard<T, S> {
    fn new(wake: &'static LotWake, registry: Option<mio::Registry>) -> Self {
        Yard {
            wake,
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            deadlines: Deadlines::new(),
            registry,
            spare: BytesMut::new(),
            lending: Vec::new(),
            early: Vec::new(),
        }
    }

    /// Takes a connection and polls it once; on a lot thread its socket leaves the reactor
    /// for the lot's epoll first (one that cannot gets its task back at once).
    fn take(&mut self, lot: &Arc<Lot<T, S>>, mut d: Driver<T, S>) {
        let Some((idx, gen)) = self.insert(lot) else {
            // On a lot thread its socket is still in the reactor: its task takes it.
            (lot.spawn)(Resume { d, finished: false });
            return;
        };
        if let Some(r) = &self.registry {
            let registered = d.io.detach().map(|fd| {
                r.register(
                    &mut mio::unix::SourceFd(&fd),
                    token(idx, gen),
                    mio::Interest::READABLE,
                )
            });
            if !matches!(registered, Some(Ok(()))) {
                if let Some(Err(e)) = registered {
                    tracing::debug!(error = %e, "cannot register a parked socket");
                }
                self.release(lot, idx, d, Exit::Unpark);
                return;
            }
        }
        // Polled here, not lent: what a parking connection's look finds is rarely a send,
        // and lending each of a burst of parks put a ~1 KiB block between every two of
        // their entries on the heap (+10-60 B per idle connection at 19,000).
        self.poll_now(lot, idx, gen, d, Carried::None);
    }

    /// A new entry, its driver not in it yet (the caller's first wake-up puts it there):
    /// its slot and generation; `None` when the lot has no slot its waker can name
    /// ([`MAX_SLOTS`]).
    fn insert(&mut self, lot: &Arc<Lot<T, S>>) -> Option<(u32, u32)> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None if self.slots.len() < MAX_SLOTS => {
                let idx = self.slots.len() as u32;
                if let Some(more) = more_room(self.slots.len(), self.slots.capacity()) {
                    self.slots.reserve_exact(more);
                }
                self.slots.push(Slot { entry: None });
                idx
            }
            None => return None,
        };
        // Generations count on from the slot's last entry, of this lot, its earlier thread
        // or an earlier lot (see `LotWake::states`); 0 is a slot never used.
        let gen = (self.wake.last_gen(idx).wrapping_add(1) & GEN_MASK).max(1);
        if !lot.wake.arm(idx, gen) {
            self.free.push(idx);
            return None;
        }
        let slot = &mut self.slots[idx as usize];
        slot.entry = Some(Box::new(Entry {
            d: None,
            queued_at: Stamp::NONE,
        }));
        self.len += 1;
        lot.parked.fetch_add(1, Relaxed);
        Some((idx, gen))
    }

    /// The entry in slot `idx` now, whichever its generation (for a place of the heap).
    fn entry_at(&mut self, idx: u32) -> Option<&mut Entry<T, S>> {
        self.slots.get_mut(idx as usize)?.entry.as_deref_mut()
    }

    fn entry(&mut self, idx: u32, gen: u32) -> Option<&mut Entry<T, S>> {
        if self.wake.last_gen(idx) != gen {
            return None;
        }
        self.slots.get_mut(idx as usize)?.entry.as_deref_mut()
    }

    /// Polls entry `idx` as its task would (the full wake-up); spawns its task again when it
    /// is no longer idle (or ended).
    fn poll(&mut self, lot: &Arc<Lot<T, S>>, idx: u32) {
        self.full(lot, idx, Carried::None);
    }

    /// The full wake-up of entry `idx`, whose first read is `carried`.
    fn full(&mut self, lot: &Arc<Lot<T, S>>, idx: u32, carried: Carried) {
        let gen = self.wake.last_gen(idx);
        let Some(d) = self.entry_at(idx).and_then(|e| e.d.take()) else {
            return;
        };
        self.full_with(lot, idx, gen, Driver::thaw(d, lot), carried);
    }

    /// The full wake-up of entry `idx` with its driver `d`, thawed: `d` goes back into the
    /// entry frozen while it stays idle, or leaves the lot.
    /// On a lot thread (a yard with an epoll) it is lent, to be polled without the yard's
    /// lock by this thread or a helper ([`run_lent`]); a lot task's is polled here.
    fn full_with(&mut self, lot: &Arc<Lot<T, S>>, idx: u32, gen: u32, d: Driver<T, S>, c: Carried) {
        if self.registry.is_some() {
            lot.wake.unschedule(idx, FULL);
            self.lending.push(Lent {
                idx,
                gen,
                d,
                carried: c,
            });
            return;
        }
        self.poll_now(lot, idx, gen, d, c);
    }

    /// The full wake-up of entry `idx` polled here, under the yard's lock.
    fn poll_now(
        &mut self,
        lot: &Arc<Lot<T, S>>,
        idx: u32,
        gen: u32,
        mut d: Driver<T, S>,
        c: Carried,
    ) {
        lot.wake.unschedule(idx, FULL);
        let waker = entry_waker(lot.id, idx, gen, false);
        let mut cx = Context::from_waker(&waker);
        match d.poll(&mut cx, Timer::Parked, c) {
            // A lot task's transport wakes the waker of the read that found nothing: the
            // socket's, so that its next bytes get a quick wake-up.
            Poll::Pending if self.registry.is_none() && !self.full_queued(lot, idx) => {
                self.quick_with(lot, idx, gen, d, now());
            }
            Poll::Pending => self.put_back(lot, idx, gen, d, now()),
            Poll::Ready(exit) => self.release(lot, idx, d, exit),
        }
    }

    /// A wake-up of entry `idx` by its socket or its deadline alone (see
    /// `Driver::poll_quick`): the core answers a heartbeat or fires the fallback heartbeat
    /// without the full wake-up; anything else runs the full one, with what was read.
    /// Skipped when a full wake-up is queued already (it reads and fires too). On a lot
    /// thread the socket is read on the frozen form first ([`frozen_wake`]): the
    /// connection is thawed only for what that does not take.
    ///
    /// `now` is the caller's clock reading, taken after what woke the entry happened (a lot
    /// thread reads one per `epoll_wait` return and serves its whole batch with it; see
    /// [`run_thread`]): the heartbeat read is recorded at it, and a deadline fires only if
    /// due at it (one due later is in the heap: never early).
    fn quick(&mut self, lot: &Arc<Lot<T, S>>, idx: u32, now: Instant) {
        if idx as usize >= self.slots.len() {
            return;
        }
        let gen = self.wake.last_gen(idx);
        if self.full_queued(lot, idx) {
            return;
        }
        let bare = self.registry.is_some();
        let Some(e) = self.entry_at(idx) else {
            return;
        };
        let Some(d) = e.d.take() else {
            // Lent: its wake-up when it is back.
            self.early.push((idx, gen));
            return;
        };
        if !bare {
            return self.quick_with(lot, idx, gen, Driver::thaw(d, lot), now);
        }
        // A lot thread's bare socket: read on the frozen form first.
        let stamp = Stamp::at(now);
        let (d, next) = frozen_wake::<T, S>(d, now, stamp);
        match next {
            Frozen::Parked(_reads) => {
                #[cfg(test)]
                lot.frozen.fetch_add(_reads, Relaxed);
                e.d = Some(d);
                self.queue(idx, gen, stamp);
            }
            Frozen::Quick => self.quick_with(lot, idx, gen, Driver::thaw(d, lot), now),
            Frozen::Full(c) => self.full_with(lot, idx, gen, Driver::thaw(d, lot), c),
        }
    }

    /// Clears entry `idx`'s socket wake-up and says whether a full wake-up is queued (a
    /// quick one is skipped then).
    fn full_queued(&self, lot: &Arc<Lot<T, S>>, idx: u32) -> bool {
        // A lot task's transport registers the socket's waker; a lot thread's bare socket
        // registers none: its epoll reports the bytes.
        if self.registry.is_none() {
            lot.wake.unschedule(idx, SOCKET);
        }
        lot.wake.scheduled(idx)
    }

    /// The quick wake-up of entry `idx` with its driver `d`, thawed.
    fn quick_with(
        &mut self,
        lot: &Arc<Lot<T, S>>,
        idx: u32,
        gen: u32,
        mut d: Driver<T, S>,
        now: Instant,
    ) {
        let waker = if self.registry.is_none() {
            entry_waker(lot.id, idx, gen, true)
        } else {
            Waker::noop().clone()
        };
        let mut cx = Context::from_waker(&waker);
        match d.poll_quick(&mut cx, &mut self.spare, now) {
            Quick::Parked => {
                #[cfg(test)]
                lot.quick.fetch_add(1, Relaxed);
                self.put_back(lot, idx, gen, d, now);
            }
            Quick::Full(carried) => self.full_with(lot, idx, gen, d, carried),
        }
    }

    /// Entry `idx`'s driver, still idle after a wake-up, goes back into it frozen and its
    /// deadline is queued; one that has no compact form leaves the lot (not reached:
    /// `may_park` asks `Driver::can_freeze`). `now`: the wake-up's clock reading.
    fn put_back(
        &mut self,
        lot: &Arc<Lot<T, S>>,
        idx: u32,
        gen: u32,
        d: Driver<T, S>,
        now: Instant,
    ) {
        let frozen = match d.freeze() {
            Ok(f) => f,
            Err(d) => return self.release(lot, idx, d, Exit::Unpark),
        };
        match self.entry(idx, gen) {
            Some(e) => e.d = Some(frozen),
            None => return self.release(lot, idx, Driver::thaw(frozen, lot), Exit::Unpark),
        }
        self.queue(idx, gen, Stamp::at(now));
    }

    /// Queues entry `idx`'s deadline (`Driver::armed`) in the heap when it moved (see
    /// [`requeue`]).
    fn queue(&mut self, idx: u32, gen: u32, now: Stamp) {
        let Some(e) = self.entry(idx, gen) else {
            return;
        };
        let Some(a) = e.d.as_ref().map(|d| d.armed) else {
            return;
        };
        if !a.is_none() && (e.queued_at.is_none() || requeue(e.queued_at, a, now)) {
            e.queued_at = a;
            self.push_deadline(a, idx);
        }
    }

    /// Entry `idx` leaves the lot: its task is spawned again (on a lot thread: its socket
    /// leaves the lot's epoll and, unless the connection is finished, goes back into the
    /// reactor first).
    fn release(&mut self, lot: &Arc<Lot<T, S>>, idx: u32, d: Driver<T, S>, exit: Exit) {
        if let Some(slot) = self.slots.get_mut(idx as usize) {
            if slot.entry.take().is_some() {
                self.free.push(idx);
                self.len -= 1;
                lot.parked.fetch_sub(1, Relaxed);
                #[cfg(test)]
                lot.unparks.fetch_add(1, Relaxed);
            }
        }
        self.leave(lot, d, exit);
    }

    /// A lent wake-up of entry `idx` done (`r`, see [`run_lent`]): still idle, its driver is
    /// frozen back into the entry and its deadline queued (one that passed meanwhile fires
    /// at the next look at the heap); otherwise it leaves the lot. Woken meanwhile — by its
    /// socket (`early`) or a handle (its `FULL` bit, its place on the ready list passed
    /// over) — it goes on the ready list again.
    fn returned(
        &mut self,
        lot: &Arc<Lot<T, S>>,
        (idx, gen, d, r): (u32, u32, Driver<T, S>, Poll<Exit>),
        now: Instant,
    ) {
        let early = self.early.contains(&(idx, gen));
        if early {
            self.early.retain(|&e| e != (idx, gen));
        }
        let exit = match r {
            Poll::Ready(exit) => exit,
            Poll::Pending if self.entry(idx, gen).is_some_and(|e| e.d.is_none()) => {
                self.put_back(lot, idx, gen, d, now);
                if let Some(e) = self.entry(idx, gen).and_then(|e| e.d.as_mut()) {
                    if early {
                        T::parked_readable(&mut e.io);
                    }
                    if early || lot.wake.scheduled(idx) {
                        #[cfg(test)]
                        lot.woken_lent.fetch_add(1, Relaxed);
                        lock(&lot.wake.ready).push_back((idx, gen, false));
                        lot.wake.notify();
                    }
                }
                return;
            }
            // Not reached: a lent entry keeps its slot until it is back.
            Poll::Pending => return self.leave(lot, d, Exit::Unpark),
        };
        self.release(lot, idx, d, exit);
    }

    /// A driver out of its slot goes to its task (see [`release`](Self::release)).
    fn leave(&mut self, lot: &Arc<Lot<T, S>>, mut d: Driver<T, S>, exit: Exit) {
        let finished = matches!(exit, Exit::Done);
        if let Some(r) = &self.registry {
            // `detach` of a detached transport answers its descriptor again.
            if let Some(fd) = d.io.detach() {
                let _ = r.deregister(&mut mio::unix::SourceFd(&fd));
            }
            if !finished {
                d.io.attach();
                if let Some(th) = &lot.threaded {
                    let mut relay = lock(&th.relay);
                    relay.queued.push(Resume { d, finished });
                    if !relay.running {
                        relay.running = true;
                        drop(relay);
                        tokio::spawn(relay_task(lot.spawn, th.relay.clone()));
                    }
                    return;
                }
            }
        }
        (lot.spawn)(Resume { d, finished });
    }

    /// Between two polls of a lot thread's pass: every [`POLLS_BETWEEN_DEADLINES`] polls,
    /// the deadlines that came due meanwhile are fired. A pass can be thousands of
    /// heartbeats long when the machine is saturated (under 256 loaders a lot thread is
    /// given a share of a core, not a core): the deadlines must not wait for its end. The
    /// pass's clock reading `t` is read again then (the quick wake-ups that follow use it).
    fn between(&mut self, lot: &Arc<Lot<T, S>>, polled: &mut usize, t: &mut Instant) {
        *polled += 1;
        if *polled % POLLS_BETWEEN_DEADLINES == 0 {
            *t = now();
            // Bounded: what they lend is run by the caller before it grows (`run_thread`).
            self.due(lot, *t, LENT_AT_ONCE);
        }
    }

    /// Queues a place in the heap, its room grown by an eighth when full (see [`more_room`]).
    fn push_deadline(&mut self, at: Stamp, idx: u32) {
        if let Some(more) = more_room(self.deadlines.len(), self.deadlines.capacity()) {
            self.deadlines.reserve_exact(more);
        }
        self.deadlines.push(Reverse(Place { at, idx }));
    }

    /// Drops the heap's stale places at its top (the entry left, or was queued again
    /// elsewhere), so the lot's sleep is armed for a deadline that is still wanted; gives
    /// the heap's room back once it is less than three quarters used ([`less_room`]).
    fn clean(&mut self) {
        while let Some((t, idx)) = self.deadlines.peek().map(|p| p.0.get()) {
            if self.entry_at(idx).is_some_and(|e| e.queued_at == t) {
                break;
            }
            self.deadlines.pop();
        }
        if let Some(keep) = less_room(self.deadlines.len(), self.deadlines.capacity()) {
            self.deadlines.shrink_to(keep);
        }
    }

    /// Pops the deadlines due at `now`: an entry whose deadline is due is polled (the
    /// state machine fires it); one whose deadline moved later is queued again at it.
    /// Returns the entries polled. `at`: the caller's clock reading (the entries' wake-ups
    /// are served with it).
    fn due(&mut self, lot: &Arc<Lot<T, S>>, at: Instant, mut room: usize) -> usize {
        let now = Stamp::at(at);
        let mut polled = 0;
        while room > 0 {
            match self.deadlines.peek() {
                Some(p) if p.0.get().0 <= now => {}
                _ => break,
            }
            let Some((t, idx)) = self.deadlines.pop().map(|p| p.0.get()) else {
                break;
            };
            let Some(e) = self.entry_at(idx) else {
                continue;
            };
            if e.queued_at != t {
                continue;
            }
            e.queued_at = Stamp::NONE;
            let a = e.d.as_ref().map_or(Stamp::NONE, |d| d.armed);
            if a.is_none() {
                continue;
            }
            if a <= now {
                self.quick(lot, idx, at);
                polled += 1;
                room -= 1;
            } else {
                e.queued_at = a;
                self.push_deadline(a, idx);
            }
        }
        polled
    }
}

/// Places a lot's slab and heap keep however few entries there are (1 KiB of slots, 1 KiB
/// of heap), and the least they grow by.
const ROOM_KEPT: usize = 64;

/// How many places to add to a full table of the lot (`len == cap`): an eighth more (at
/// least [`ROOM_KEPT`]), not the double a `Vec` or `BinaryHeap` grows to by itself (issue
/// 17: a table that doubled kept up to half its places empty; with [`less_room`], the
/// slab and heap cost 37 B per idle connection at 19,000 in `idle_alloc` with 16 B slots and
/// places, 55 B doubled, 21 B with 8 B slots and 12 B places). Growing
/// by an eighth copies each place about eight times over its life instead of once or twice
/// (a slab or heap of a million places is 16 MB: a few ms per 125,000 connections parked),
/// and leaves at most an eighth empty. `None` while there is room.
fn more_room(len: usize, cap: usize) -> Option<usize> {
    (len == cap).then(|| (len / 8).max(ROOM_KEPT))
}

/// The room a table of the lot less than three quarters used shrinks to (an eighth more
/// than its places, at least [`ROOM_KEPT`]); `None` while it is used more. The heap's
/// places peak while many connections park at once (each queued at its first deadline,
/// then again at the next: ~1.6 places a connection at 19,000 parking within seconds,
/// ~1.1 once idle) and its room would stay at the peak.
fn less_room(len: usize, cap: usize) -> Option<usize> {
    (cap > ROOM_KEPT && len < cap - cap / 4).then(|| (len + len / 8).max(ROOM_KEPT))
}

/// Whether an entry queued at `q` whose deadline is now `a` is queued again at `a` (the
/// rule of the driver's `arm_timer`): when `a` is earlier, or later and the old place would
/// soon be reached for nothing (within `REARM_SLACK`, or in less than half the new wait).
/// An idle server answers its client's heartbeat in a wake-up and its deadline moves from
/// about now + h/8 to now + 9h/8: queued again, and the old place is dropped unvisited
/// (`Yard::clean`). Traffic, which moves the deadline a little later every wake-up, queues
/// it again about twice per interval, not once per message.
///
/// On stamps (nanoseconds), as the heap keeps them: no conversion per wake-up.
fn requeue(q: Stamp, a: Stamp, now: Stamp) -> bool {
    if a < q {
        return true;
    }
    let since = |t: Stamp| t.0.saturating_sub(now.0).max(0);
    let early = since(q);
    a > q && (early <= super::REARM_SLACK.as_nanos() as i64 || early < since(a) / 2)
}

/// The lot's task: takes parked connections, polls the woken and the due, sleeps until the
/// earliest deadline; ends when the lot is empty.
async fn run<T: ParkIo, S: Sink + Send + 'static>(lot: Arc<Lot<T, S>>) {
    let mut yard = Yard::new(lot.wake, None);
    let sleep =
        tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
    tokio::pin!(sleep);
    poll_fn(|cx| pass(&lot, &mut yard, cx, sleep.as_mut())).await;
}

fn pass<T: ParkIo, S: Sink + Send + 'static>(
    lot: &Arc<Lot<T, S>>,
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
            yard.take(lot, d);
            room = room.saturating_sub(1);
        }
        while room > 0 {
            let Some((idx, gen, socket)) = lock(&lot.wake.ready).pop_front() else {
                break;
            };
            if yard.entry(idx, gen).is_some() {
                if socket {
                    yard.quick(lot, idx, now());
                } else {
                    yard.poll(lot, idx);
                }
                room -= 1;
            }
        }
        yard.clean();
        if room == 0 {
            // More may be waiting: run again after the worker polled I/O and timers.
            super::steps::yield_deferred(cx);
            return Poll::Pending;
        }
        if let Some(t) = yard.deadlines.peek().and_then(|p| p.0.get().0.get()) {
            let t = tokio::time::Instant::from_std(t);
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

/// Lent wake-ups a lot thread runs at a time (see `run_thread`).
const LENT_AT_ONCE: usize = 32;

/// Ready entries a thread with helpers takes from the list at a time (the rest are left
/// to its helpers); one without helpers takes them all.
const TAKEN_AT_ONCE: usize = 16;

/// A lot thread: the lot's pass in a loop, sleeping in its own `epoll_wait` until the
/// earliest deadline, a parked socket's bytes or a waker. Outside tokio's run queue, so a
/// deadline is not queued behind busy tasks; with the runtime's context entered, so an
/// unparked connection is registered with its reactor and spawned on it. Ends (giving its
/// epoll back to the lot) when the lot has been empty for [`THREAD_LINGER`].
///
/// Its yard is behind a lock it shares with its helpers ([`helper`]), which take handles'
/// wakes (sends, closes) off the ready list when more than one waits. The thread alone
/// waits on the epoll and the deadlines: a burst of idle heartbeats wakes one thread,
/// answered in one batch (a lot per worker woke each lot for its share of the burst: 2.9
/// times the wake-ups and 7-20 % more CPU per heartbeat on two workers), while sends to
/// parked clients are written by as many threads as before (one lot thread alone made
/// them wait 3-24 ms at the median at ~30,000 sends/s, against 1-2 ms). Quick wake-ups
/// run under the lock (a few µs each); full ones are lent out of their entries and polled
/// without it ([`run_lent`]), so a send on one thread does not hold up another.
fn run_thread<T: ParkIo, S: Sink + Send + 'static>(lot: Arc<Lot<T, S>>) {
    let Some(th) = lot.threaded.as_ref() else {
        return;
    };
    let _runtime = th.runtime.enter();
    let taken = lock(&th.poll).take();
    let Some(mut poll) = taken else {
        // Only one thread runs a lot at a time (`Incoming::running`): not reached.
        lock(&lot.incoming).running = false;
        return;
    };
    let registry = match poll.registry().try_clone() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot clone a lot's epoll");
            *lock(&th.poll) = Some(poll);
            let mut i = lock(&lot.incoming);
            i.running = false;
            for d in std::mem::take(&mut i.drivers) {
                (lot.spawn)(Resume { d, finished: false });
            }
            return;
        }
    };
    let yard = Arc::new(Mutex::new(Yard::new(lot.wake, Some(registry))));
    let mut helpers = Helpers::start(&lot, &yard, th.helpers);
    let take_at_once = if helpers.threads.is_empty() {
        usize::MAX
    } else {
        TAKEN_AT_ONCE
    };
    let mut events = mio::Events::with_capacity(1024);
    let mut woken: Vec<(u32, u32)> = Vec::new();
    let mut batch = Vec::new();
    // Since when the lot has been empty: the thread waits [`THREAD_LINGER`] for the next
    // connection to park before it ends, so a server whose one connection parks and
    // unparks by turns does not start a thread per message.
    let mut empty_since: Option<Instant> = None;
    // Lent wake-ups and their results, [`LENT_AT_ONCE`] at most (kept: no allocation per
    // pass, and none between the entries of a burst of parks).
    let (mut lent, mut done) = (Vec::new(), Vec::new());
    loop {
        // One clock reading serves this pass (refreshed every `POLLS_BETWEEN_DEADLINES`
        // polls, `Yard::between`): taken after `epoll_wait` returned, it is no earlier than
        // the bytes of any socket it reported, so a heartbeat is recorded at or after its
        // arrival, and a deadline due later than it waits in the heap (never early). It
        // read the clock twice per heartbeat (its quick wake-up and its requeue) besides.
        let mut t = now();
        let mut y = lock(&yard);
        let incoming = {
            let mut i = lock(&lot.incoming);
            if i.drivers.is_empty() && y.len == 0 {
                if t.saturating_duration_since(*empty_since.get_or_insert(t)) >= THREAD_LINGER {
                    // The helpers end first (none holds an entry: the yard is empty); a
                    // connection that parked meanwhile keeps the thread going.
                    drop(i);
                    drop(y);
                    helpers.stop(lot.wake);
                    let mut i = lock(&lot.incoming);
                    if i.drivers.is_empty() && lock(&yard).len == 0 {
                        *lock(&th.poll) = Some(poll);
                        i.running = false;
                        return;
                    }
                    drop(i);
                    helpers = Helpers::start(&lot, &yard, th.helpers);
                    empty_since = None;
                    continue;
                }
            } else {
                empty_since = None;
            }
            std::mem::take(&mut i.drivers)
        };
        super::trim::parked(incoming.len());
        // Lent wake-ups are run [`LENT_AT_ONCE`] at a time (each is a driver and a read's
        // bytes, ~1 KiB: a few thousand connections parking at once would hold MBs).
        macro_rules! run_lent_if_many {
            () => {
                if y.lending.len() >= LENT_AT_ONCE {
                    std::mem::swap(&mut lent, &mut y.lending);
                    drop(y);
                    run_lent(&lot, &yard, &mut lent, &mut done);
                    y = lock(&yard);
                }
            };
        }
        // Deadlines first: dead-after must not wait behind heartbeats to answer.
        while y.due(&lot, t, LENT_AT_ONCE) == LENT_AT_ONCE {
            run_lent_if_many!();
        }
        let mut polled = 0usize;
        for d in incoming {
            y.take(&lot, d);
            y.between(&lot, &mut polled, &mut t);
            run_lent_if_many!();
        }
        for (idx, gen) in woken.drain(..) {
            if y.entry(idx, gen).is_some() {
                y.quick(&lot, idx, t);
                y.between(&lot, &mut polled, &mut t);
                run_lent_if_many!();
            }
        }
        {
            // One lock per batch: what is woken while this batch runs waits for the next
            // (or for a helper).
            let mut r = lock(&lot.wake.ready);
            let n = r.len().min(take_at_once);
            batch.extend(r.drain(..n));
        }
        for (idx, gen, _) in batch.drain(..) {
            if y.entry(idx, gen).is_some() {
                y.poll(&lot, idx);
                y.between(&lot, &mut polled, &mut t);
                run_lent_if_many!();
            }
        }
        std::mem::swap(&mut lent, &mut y.lending);
        drop(y);
        run_lent(&lot, &yard, &mut lent, &mut done);
        let mut y = lock(&yard);
        y.clean();
        let timeout = if y.len == 0 {
            // Empty: wait for a connection to park (its waker) until the linger runs out,
            // then end at the top of the loop.
            let t = now();
            let since = *empty_since.get_or_insert(t);
            Some(THREAD_LINGER.saturating_sub(t.saturating_duration_since(since)))
        } else if lock(&lot.wake.ready).is_empty() {
            y.deadlines
                .peek()
                .and_then(|p| p.0.get().0.get())
                .map(|t| t.saturating_duration_since(now()))
        } else {
            Some(Duration::ZERO)
        };
        drop(y);
        // After a burst of parks, the heap's holes go back to the kernel (`trim.rs`).
        let timeout = match super::trim::tick() {
            Some(d) => Some(timeout.map_or(d, |t| t.min(d))),
            None => timeout,
        };
        // mio rounds the timeout up to whole milliseconds: never early.
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "a lot thread's epoll failed");
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let mut y = lock(&yard);
        // The entries this return reported are loaded together, not one cache miss at a
        // time as each is reached (see [`prefetch`]).
        for (idx, _) in events.iter().filter_map(|ev| entry_of(ev.token())) {
            if let Some(e) = y.slots.get(idx as usize).and_then(|s| s.entry.as_deref()) {
                prefetch(e);
            }
        }
        for (idx, gen) in events.iter().filter_map(|ev| entry_of(ev.token())) {
            let Some(e) = y.entry(idx, gen) else {
                continue;
            };
            if let Some(d) = e.d.as_mut() {
                // A quick wake-up (skipped if a full one is queued meanwhile: it reads too).
                T::parked_readable(&mut d.io);
                // Its thaw reads the connection's `Shared` (the counters): that load is
                // started now, while the rest of this batch is taken and polled.
                prefetch(Arc::as_ptr(&d.shared));
                woken.push((idx, gen));
            } else {
                // Lent: its wake-up when it is back.
                y.early.push((idx, gen));
            }
        }
    }
}

/// Starts loading the cache lines of the value at `p` ahead of its use: a hint, on x86-64
/// only. A heartbeat on a lot thread takes a cache miss at each of its connection's
/// entry (the frozen driver, 3 lines, first read by the epoll loop, then moved out by
/// `Driver::thaw`) and `Shared` (its counters, read by the thaw: three quarters of the
/// thaw's time in a 19k hold, one load), each waited for in turn; the kernel's work for the
/// other heartbeats of a burst evicts them in between. Prefetched when the epoll reports
/// the socket, a burst's misses overlap instead.
#[inline]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = p as usize & !63;
        let end = p as usize + std::mem::size_of::<T>();
        for line in (start..end).step_by(64) {
            // SAFETY: SSE, which the instruction needs, is in every x86-64 CPU; a prefetch
            // reads nothing into the program and does not fault, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Polls lent full wake-ups (`lent`, swapped with the yard's `lending`) without the
/// yard's lock, as the lot would (`Yard::full_with`: the entry's waker, `Timer::Parked`),
/// and gives them back under it ([`Yard::returned`]); `done` is room for the results. Both
/// are the caller's, kept between calls (at most [`LENT_AT_ONCE`] places).
#[allow(clippy::type_complexity)]
fn run_lent<T: ParkIo, S: Sink + Send + 'static>(
    lot: &Arc<Lot<T, S>>,
    yard: &Mutex<Yard<T, S>>,
    lent: &mut Vec<Lent<T, S>>,
    done: &mut Vec<(u32, u32, Driver<T, S>, Poll<Exit>)>,
) {
    if lent.is_empty() {
        return;
    }
    for Lent {
        idx,
        gen,
        mut d,
        carried,
    } in lent.drain(..)
    {
        let waker = entry_waker(lot.id, idx, gen, false);
        let mut cx = Context::from_waker(&waker);
        let r = d.poll(&mut cx, Timer::Parked, carried);
        done.push((idx, gen, d, r));
    }
    let t = now();
    let mut y = lock(yard);
    for r in done.drain(..) {
        y.returned(lot, r, t);
    }
}

/// A lot thread's helpers (see [`run_thread`]), ended with it.
struct Helpers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Helpers {
    fn start<T: ParkIo, S: Sink + Send + 'static>(
        lot: &Arc<Lot<T, S>>,
        yard: &Arc<Mutex<Yard<T, S>>>,
        n: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .filter_map(|_| {
                let (lot, yard, stop) = (lot.clone(), yard.clone(), stop.clone());
                std::thread::Builder::new()
                    .name("tether-lot-help".into())
                    .spawn(move || helper(lot, yard, stop))
                    .map_err(|e| tracing::warn!(error = %e, "cannot start a lot helper"))
                    .ok()
            })
            .collect();
        Helpers { stop, threads }
    }

    /// Stops and joins the helpers. The flag is set before the ready list's lock is taken,
    /// so a helper between its look at the flag and its wait (which it starts with the lock
    /// held) is waiting by the time `notify_all` runs.
    fn stop(&mut self, wake: &LotWake) {
        self.stop.store(true, Release);
        drop(lock(&wake.ready));
        wake.helpers.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A lot thread's helper: takes handles' wakes off the ready list ([`TAKEN_AT_ONCE`] at a
/// time) when the thread has more than one waiting (`LotWake::wake` gets it going), runs
/// their full wake-ups as the thread would ([`run_lent`]), and sleeps on the list
/// otherwise. It never waits on the epoll or the deadlines.
fn helper<T: ParkIo, S: Sink + Send + 'static>(
    lot: Arc<Lot<T, S>>,
    yard: Arc<Mutex<Yard<T, S>>>,
    stop: Arc<AtomicBool>,
) {
    let Some(th) = lot.threaded.as_ref() else {
        return;
    };
    let _runtime = th.runtime.enter();
    let (mut batch, mut lent, mut done) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        {
            let mut r = lock(&lot.wake.ready);
            loop {
                if stop.load(Acquire) {
                    return;
                }
                if !r.is_empty() {
                    let n = r.len().min(TAKEN_AT_ONCE);
                    batch.extend(r.drain(..n));
                    break;
                }
                lot.wake.sleeping.fetch_add(1, Relaxed);
                r = lot.wake.helpers.wait(r).unwrap_or_else(|e| e.into_inner());
                lot.wake.sleeping.fetch_sub(1, Relaxed);
            }
        }
        let mut y = lock(&yard);
        for (idx, gen, _) in batch.drain(..) {
            if y.entry(idx, gen).is_some() {
                y.poll(&lot, idx);
            }
        }
        std::mem::swap(&mut lent, &mut y.lending);
        drop(y);
        #[cfg(test)]
        lot.helped.fetch_add(lent.len(), Relaxed);
        run_lent(&lot, &yard, &mut lent, &mut done);
    }
}

/// What a wake-up taken on the frozen form ([`frozen_wake`]) left.
#[allow(clippy::large_enum_variant)]
enum Frozen {
    /// Still parked and frozen, its deadline (in `Parked::armed`) not due; how many reads
    /// of heartbeats it took.
    Parked(usize),
    /// Thaw it for the quick wake-up (`Driver::poll_quick`): what it read is taken, and a
    /// deadline is due (or the parked form cannot read).
    Quick,
    /// Thaw it for the full wake-up, whose first read is this.
    Full(Carried),
}

/// A lot thread's wake-up of a parked connection, taken on its frozen form
/// ([`FrozenConn::parked_heartbeats`](tether_proto::conn::FrozenConn::parked_heartbeats)):
/// its socket read in place and whole heartbeats answered without the thaw, the decoder
/// or the freeze (issue 17: 3 % less CPU per liveness message at 19,000 idle clients,
/// side by side with the thawed path; BENCHMARKS.md, seventeenth pass). What
/// `Driver::poll_quick` does with the same reads, to the byte: each read takes the
/// partial-frame budget's room first, as there; the counters go to `Shared` as its
/// `stats.update` publishes them; the answer is written at once. Anything else — another
/// frame, part of one, the end, an error, a heartbeat the liveness engine reports on (a
/// recovery, a flood), an answer not all written, a deadline due — thaws it for the quick
/// or full wake-up, with what was read. `stamp` is `now` as a [`Stamp`] (read once for the
/// wake-up and its requeue).
fn frozen_wake<T: ParkIo, S>(
    mut p: Parked<T::Parked, S>,
    now: Instant,
    stamp: Stamp,
) -> (Parked<T::Parked, S>, Frozen) {
    use tether_proto::conn::FrozenStep;
    let origin = Stamp::origin();
    let mut taken = 0;
    let mut buf = [0u8; PAUSED_READ];
    loop {
        if taken == READS_PER_WAKE {
            // Heartbeats by the kilobyte: the flood rule, in the full wake-up.
            return (p, Frozen::Full(Carried::None));
        }
        let budget = p.shared.budgets().map(|b| &b.frames);
        let reserved = match budget {
            Some(b) => match super::frames::FrameRoom::reserve_idle(b) {
                Some(n) => n,
                // No room: the quick wake-up waits for some without reading.
                None => return (p, Frozen::Quick),
            },
            None => 0,
        };
        let give_back = |n| {
            if let Some(b) = budget {
                b.give(n);
            }
        };
        let n = match T::parked_read(&mut p.io, &mut buf) {
            Some(Poll::Ready(Ok(n))) if n > 0 => n,
            r => {
                give_back(reserved);
                match r {
                    None => return (p, Frozen::Quick),
                    Some(Poll::Pending) => break,
                    Some(Poll::Ready(Err(e))) => return (p, Frozen::Full(Carried::Error(e))),
                    Some(Poll::Ready(Ok(_))) => return (p, Frozen::Full(Carried::Eof)),
                }
            }
        };
        let mut counters = p.shared.stats.counters();
        let io = &mut p.io;
        let mut wrote = 0;
        let (conn, step) = p
            .conn
            .parked_heartbeats(origin, now, &buf[..n], &mut counters, |b| {
                wrote = T::parked_write(io, b).unwrap_or(0);
                wrote
            });
        p.conn = conn;
        if step == FrozenStep::NotHandled {
            // The reservation goes with the bytes to the full wake-up.
            return (p, Frozen::Full(Carried::Bytes(buf, n, reserved)));
        }
        give_back(reserved);
        taken += 1;
        p.shared
            .stats
            .publish_offset(&counters, p.conn.last_rx_offset());
        if wrote > 0 {
            p.last_write = stamp;
        }
        if step == FrozenStep::Unsent {
            // The rest is the thawed connection's to write (or its error to meet).
            return (p, Frozen::Full(Carried::None));
        }
        if n < buf.len() {
            // A short read drained the socket until the next edge (`parked_read` would
            // answer `Pending` without a call): no second reservation for nothing.
            break;
        }
    }
    // Parked: no close linger, only the state machine's deadline.
    p.armed = p
        .conn
        .poll_timeout_offset(origin)
        .map_or(Stamp::NONE, Stamp::offset);
    if !p.armed.is_none() && p.armed <= stamp {
        return (p, Frozen::Quick);
    }
    (p, Frozen::Parked(taken))
}

/// What a quick wake-up (`Driver::poll_quick`) left (on the stack, see [`Carried`]).
#[allow(clippy::large_enum_variant)]
enum Quick {
    /// Still parked (its deadline in `Driver::armed`).
    Parked,
    /// It needs the full wake-up, whose first read is this.
    Full(Carried),
}

impl<T: Transport, S: Sink> Driver<T, S> {
    /// A parked connection's wake-up by its socket or its deadline alone (nothing from its
    /// handles: a handle's send, close or command wakes the entry's waker, which runs the
    /// full wake-up). The core decides ([`Conn::parked_input`](tether_proto::Conn),
    /// `parked_timeout`): a client's heartbeat is answered and its deadline moved, the
    /// fallback heartbeat sent, and the connection stays parked, without the handles' lock
    /// or the sink (each read takes its partial-frame reservation first, handed on with the
    /// bytes when the full wake-up gets them). Anything else — a message, a partial frame, CLOSE, AUTH,
    /// the end of the stream, an event for the application, dead-after, a write that does
    /// not finish — goes to the full wake-up with what was read already.
    ///
    /// `spare` is lent to the state machine as its transmit buffer for the wake-up
    /// ([`Conn::swap_transmit_buffer`](tether_proto::Conn::swap_transmit_buffer)) and comes
    /// back with the write (or unused): the answer is encoded without an allocation. A
    /// wake-up that goes on to the full one leaves it with the connection (the next quick
    /// wake-up's answer allocates again, once).
    ///
    /// `now`: the lot's clock reading for this wake-up (see `Yard::quick`).
    fn poll_quick(&mut self, cx: &mut Context<'_>, spare: &mut BytesMut, now: Instant) -> Quick {
        if spare.capacity() > SPARE_KEPT {
            *spare = BytesMut::new();
        }
        self.conn.swap_transmit_buffer(spare);
        let q = self.poll_quick_lent(cx, spare, now);
        if matches!(q, Quick::Parked) && spare.capacity() == 0 {
            // Lent and unused (nothing answered): taken back.
            self.conn.swap_transmit_buffer(spare);
        }
        q
    }

    fn poll_quick_lent(
        &mut self,
        cx: &mut Context<'_>,
        spare: &mut BytesMut,
        now: Instant,
    ) -> Quick {
        use std::mem::MaybeUninit;
        use tether_proto::conn::ParkedStep;
        use tokio::io::ReadBuf;
        let mut reads = 0;
        loop {
            if reads == READS_PER_WAKE {
                // Heartbeats by the kilobyte: the flood rule, in the full wake-up.
                return Quick::Full(Carried::None);
            }
            reads += 1;
            // The partial-frame budget's room for this read, taken before it as the full
            // wake-up does: with none left, the full wake-up waits for room without reading.
            let Some(reserved) = self.reserve_frame_room(cx) else {
                return Quick::Full(Carried::None);
            };
            let mut buf = [MaybeUninit::<u8>::uninit(); PAUSED_READ];
            let mut rb = ReadBuf::uninit(&mut buf);
            let polled = Pin::new(&mut self.io).poll_read(cx, &mut rb);
            if let Poll::Ready(Ok(())) = &polled {
                let data = rb.filled();
                if !data.is_empty() {
                    let step = self.conn.parked_input(now, data);
                    if step == ParkedStep::NotLiveness {
                        // The reservation goes with the bytes to the full wake-up.
                        let mut b = [0u8; PAUSED_READ];
                        b[..data.len()].copy_from_slice(data);
                        return Quick::Full(Carried::Bytes(b, data.len(), reserved));
                    }
                    self.settle_frame_room(reserved);
                    match step {
                        ParkedStep::Answered if self.write_quick(cx, now, spare) => continue,
                        _ => return Quick::Full(Carried::None),
                    }
                }
            }
            self.settle_frame_room(reserved);
            match polled {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Quick::Full(Carried::Error(e)),
                Poll::Ready(Ok(())) => return Quick::Full(Carried::Eof),
            }
        }
        if self.conn.poll_timeout().is_some_and(|d| d <= now) {
            match self.conn.parked_timeout(now) {
                ParkedStep::Answered if self.write_quick(cx, now, spare) => {}
                _ => return Quick::Full(Carried::None),
            }
        }
        self.shared.stats.update(&self.conn);
        // Parked: no close linger, only the state machine's deadline.
        self.armed = self.conn.poll_timeout().map_or(Stamp::NONE, Stamp::at);
        Quick::Parked
    }

    /// Writes what a quick wake-up queued (a heartbeat); false when it did not all go out
    /// (the full wake-up takes over: it writes the rest, or meets the error).
    /// The transmit buffer, once written, goes back to `spare` (see `poll_quick`).
    fn write_quick(&mut self, cx: &mut Context<'_>, now: Instant, spare: &mut BytesMut) -> bool {
        while self.conn.pending_transmit_len() > 0 {
            match Pin::new(&mut self.io).poll_write(cx, self.conn.pending_transmit()) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.conn.transmitted_into(n, spare);
                    self.last_write = Stamp::at(now);
                }
                _ => return false,
            }
        }
        true
    }
}

/// Spawns the connections a lot thread unparked, from a worker (see [`Relay`]).
async fn relay_task<T: Transport, S: Sink + Send + 'static>(
    spawn: fn(Resume<T, S>),
    relay: Arc<Mutex<Relay<T, S>>>,
) {
    loop {
        let batch = {
            let mut r = lock(&relay);
            if r.queued.is_empty() {
                r.running = false;
                return;
            }
            std::mem::take(&mut r.queued)
        };
        for r in batch {
            spawn(r);
        }
    }
}

#[cfg(test)]
mod wake_tests {
    //! The entry waker's number and its slot states, without a lot's task (the lot's own
    //! rules are in `park_tests.rs`).

    use super::*;

    fn ready(w: &LotWake) -> Vec<(u32, u32, bool)> {
        lock(&w.ready).drain(..).collect()
    }

    #[test]
    fn the_slab_and_heap_grow_by_an_eighth_and_give_room_back_when_a_quarter_empty() {
        let mut heap = Heap::new();
        for i in 0..100_000u32 {
            if let Some(more) = more_room(heap.len(), heap.capacity()) {
                heap.reserve_exact(more);
            }
            heap.push(Reverse(i));
            let (len, cap) = (heap.len(), heap.capacity());
            assert!(
                cap >= len && cap <= len + len / 8 + ROOM_KEPT,
                "{len} in {cap}"
            );
        }
        assert_eq!(less_room(100_000, heap.capacity()), None);
        // Most connections left (or the places of a burst of parking were dropped).
        let keep = less_room(20_000, 120_000).expect("a sixth used");
        assert_eq!(keep, 22_500);
        assert_eq!(less_room(60_000, 120_000), Some(67_500));
        assert_eq!(
            less_room(90_000, 120_000),
            None,
            "three quarters used: kept"
        );
        assert_eq!(less_room(0, ROOM_KEPT), None, "the least room is kept");
        assert_eq!(less_room(0, 4 * ROOM_KEPT), Some(ROOM_KEPT));
        // Shrunk, it grows again from there (no shrink and grow back at once).
        assert_eq!(more_room(keep, keep), Some(keep / 8));
        assert_eq!(more_room(1, 64), None);
    }

    /// The requeue rule on stamps: earlier always; later only when the old place would be
    /// reached soon for nothing (within the slack, or before half the new wait).
    #[test]
    fn requeue_on_stamps_follows_the_timer_rule() {
        let ms = |m: i64| Stamp(1_000_000_000 + m * 1_000_000);
        let now = ms(0);
        let slack = super::super::REARM_SLACK.as_millis() as i64;
        assert!(requeue(ms(500), ms(400), now), "earlier");
        assert!(!requeue(ms(500), ms(500), now), "unchanged");
        // An answered heartbeat (h = 30 s): from now + h/8 to now + 9h/8.
        assert!(requeue(ms(3_750), ms(33_750), now));
        // A little later, the old place far: kept (it is reached and moves on then).
        assert!(!requeue(ms(20_000), ms(20_100), now));
        // The old place within the slack: queued again.
        assert!(requeue(ms(slack), ms(slack + 1), now));
        assert!(!requeue(ms(slack + 1), ms(slack + 2), now));
        // An old place already past (a stale reading): as near as can be.
        assert!(requeue(ms(-5), ms(20_000), now));
    }

    #[test]
    fn an_epoll_token_gives_back_its_entry_and_the_waker_none() {
        for (idx, gen) in [(0, 0), (7, 3), (u32::MAX - 1, u32::MAX), (u32::MAX, 1)] {
            assert_eq!(entry_of(token(idx, gen)), Some((idx, gen)));
        }
        assert_eq!(entry_of(WAKE_TOKEN), None);
    }

    #[test]
    fn heap_places_are_12_bytes_ordered_by_deadline_then_slot() {
        assert_eq!(std::mem::size_of::<Reverse<Place>>(), 12);
        let p = |t: i64, idx: u32| Reverse(Place { at: Stamp(t), idx });
        let mut heap: Deadlines = [p(5, 1), p(-3, 9), p(5, 0), p(i64::MAX, 2), p(7, 3)]
            .into_iter()
            .collect();
        let mut order = Vec::new();
        while let Some(Reverse(q)) = heap.pop() {
            order.push((q.get().0 .0, q.get().1));
        }
        assert_eq!(order, [(-3, 9), (5, 0), (5, 1), (7, 3), (i64::MAX, 2)]);
    }

    #[test]
    fn segmented_places_are_distinct_and_in_their_segment() {
        let mut last = None;
        for i in (0..5000u32).chain([u32::MAX - 1, u32::MAX]) {
            let (k, o) = Segmented::<u8, 27>::place(i);
            assert!(o < 64 << k, "{i}: {k} {o}");
            if let Some((lk, lo)) = last {
                if i > 0 && i < 5000 {
                    assert!((k, o) == (lk, lo + 1) || (k, o) == (lk + 1, 0), "{i}");
                }
            }
            last = Some((k, o));
        }
        assert_eq!(Segmented::<u8, 27>::place(u32::MAX).0, 26);
        assert_eq!(
            Segmented::<u8, 23>::place(MAX_SLOTS as u32 - 1).0,
            22,
            "the slot states hold every slot a waker can name"
        );
    }

    #[test]
    fn an_entry_waker_queues_its_entry_once_per_burst_and_a_stale_one_nothing() {
        let (w, id) = LotWake::take(None).expect("a lot id");
        assert!(w.arm(70, 1));
        let waker = entry_waker(id, 70, 1, false);
        let copy = waker.clone();
        assert!(waker.will_wake(&copy));
        waker.wake_by_ref();
        copy.wake_by_ref();
        entry_waker(id, 70, 1, true).wake();
        entry_waker(id, 70, 1, true).wake();
        assert_eq!(ready(w), [(70, 1, false), (70, 1, true)], "one place each");
        assert!(w.scheduled(70));
        // Polled: the next wake queues it again.
        w.unschedule(70, FULL);
        assert!(!w.scheduled(70));
        copy.wake_by_ref();
        assert_eq!(ready(w), [(70, 1, false)]);

        // The slot holds a later entry: the old waker wakes nothing and leaves the new
        // entry's flag alone (a flag it set would swallow the new entry's wakes).
        assert!(w.arm(70, 2));
        copy.wake_by_ref();
        entry_waker(id, 70, 1, true).wake();
        assert_eq!(ready(w), []);
        assert!(!w.scheduled(70));
        entry_waker(id, 70, 2, false).wake();
        assert_eq!(ready(w), [(70, 2, false)]);
        // Slots never used, beyond the allocated states, beyond every lot: nothing.
        entry_waker(id, 71, 1, false).wake();
        entry_waker(id, (MAX_SLOTS - 1) as u32, 1, false).wake();
        entry_waker(MAX_LOTS - 1, 70, 2, false).wake();
        assert_eq!(ready(w), []);

        // Generations wrap in the state's 30 bits; the waker compares their low 15.
        assert!(w.arm(3, GEN_MASK));
        entry_waker(id, 3, GEN_MASK, false).wake();
        assert_eq!(ready(w), [(3, GEN_MASK, false)]);
        assert!(w.arm(3, 1));
        entry_waker(id, 3, GEN_MASK, false).wake();
        assert_eq!(ready(w), []);

        // The lot is dropped: its state goes to the next lot, slot generations kept
        // (asserted before giving it back: another test's lot may take it at once).
        assert_eq!(w.last_gen(70), 2);
        assert_eq!(w.last_gen(3), 1);
        w.give_back(id);
        copy.wake_by_ref();
        drop(waker);
        drop(copy);
    }
}
