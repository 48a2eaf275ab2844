//! The state a connection's task shares with the handles that talk to it: the outbox (to
//! send), the inbox (received, for standalone connections), a command (close, refuse) and
//! how the connection ended.
//!
//! One short `Mutex` per connection, taken once per wake-up by the task and once per call by
//! a handle. Lock order: a server's client shard, then this lock (never the other way round);
//! nothing else is locked while it is held, except a budget's waiter list and the waiters'
//! `Notify` (see [`Watch`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use sync_wrapper::SyncWrapper;
use tether_proto::{CloseCode, Disconnect};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use super::budget::Budget;
use super::stats::Stats;

/// Bounds on what a connection buffers for the application.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Bytes queued to send and not yet written. Standalone connections and clients: `send`
    /// waits beyond this. Server connections: passing it closes the client (slow consumer).
    pub(crate) outbox_bytes: usize,
    /// Messages received but not yet taken by `recv`, in bytes, before reading pauses.
    pub(crate) inbox_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            outbox_bytes: 1 << 20,
            inbox_bytes: 4 << 20,
        }
    }
}

/// The server-wide budgets every server connection draws on (see [`Budget`]).
#[derive(Debug)]
pub(crate) struct Budgets {
    /// Received messages not yet taken from `Server::next_event`. Above it connections stop
    /// taking messages (TCP back-pressure; liveness frames are still read, see `drive_read`)
    /// until the application has taken half of it.
    pub(crate) backlog: Budget,
    /// Partially received frames (decoder buffers). A connection that needs more pauses.
    pub(crate) frames: Budget,
    /// Bytes queued for clients and not yet written. A send that does not fit is refused.
    pub(crate) unsent: Budget,
}

impl Budgets {
    pub(crate) fn new(backlog: usize, frames: usize, unsent: usize) -> Self {
        Budgets {
            backlog: Budget::new(backlog, backlog / 2),
            frames: Budget::new(frames, frames - frames / 8),
            unsent: Budget::new(unsent, unsent - unsent / 8),
        }
    }
}

/// What a handle asks the task to do besides sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Close in order once the messages queued before it went out.
    Close(CloseCode, String),
    /// Close at once; queued messages stay in the outbox (for whoever takes it).
    CloseNow(CloseCode, String),
    /// Close at once and leave: queued messages stay in the outbox, the CLOSE frame gets
    /// `HANDOVER_LINGER` to go out, and the peer's FIN is not waited for (the connection's
    /// session was taken over by another server: its peer is most likely gone).
    Abandon(CloseCode, String),
    /// Refuse a connection still in the handshake (no effect once established), without
    /// waiting for the peer's FIN.
    Refuse(CloseCode, String),
}

/// The result of [`Shared::offer`] (server connections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued; with a session, the sequence number it will carry (see [`Queues::seq_base`]).
    Queued(Option<u64>),
    /// Queuing would pass the client's bound: the connection is being closed (slow consumer).
    SlowConsumer,
    /// Queuing would pass the client's bound (asked not to close it).
    Full,
    /// Queuing would pass the client's bound, and its connection already ended (the bytes
    /// would go to a held session's backlog).
    Backlogged,
    /// The server-wide budget of unsent bytes is exhausted.
    ServerFull,
    /// The connection ended.
    Ended(Disconnect),
}

/// The task's waker; everything else lives in [`Queues`], boxed and only while it holds
/// something (see the module docs).
///
/// The queues' fields are reached through `Deref`/`DerefMut` (`inner.outbox`): reading an
/// absent box reads an empty one, writing creates it, and the lock's guard releases it again
/// when everything in it is empty — an idle connection holds no queue (issue 17).
#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) driver: Option<Waker>,
    /// The queues, while any holds something.
    queues: Option<Box<Queues>>,
}

/// Queues, their byte counts, rare state and the end of a connection: what an idle
/// connection without a session does not hold (issue 17: `resolved` and `seq_base` moved here
/// from `Inner`, 24 B per connection; the byte counts, 24 B more, which are all zero while
/// the connection is idle).
#[derive(Debug, Default)]
pub(crate) struct Queues {
    /// Bytes in `outbox`.
    pub(crate) outbox_bytes: usize,
    /// Server connections: bytes the state machine holds for the peer (transmit buffer,
    /// unacknowledged session messages) as of the task's last pass (set with
    /// [`Inner::set_transmit`]).
    pub(crate) transmit_bytes: usize,
    /// What this connection counts against the server's unsent budget
    /// (`outbox_bytes + transmit_bytes`, kept in step by [`Shared::recharge`]).
    charged: usize,
    pub(crate) outbox: VecDeque<Bytes>,
    pub(crate) command: Option<Command>,
    pub(crate) inbox: VecDeque<Bytes>,
    pub(crate) inbox_bytes: usize,
    pub(crate) recv: Option<Waker>,
    pub(crate) done: Option<Disconnect>,
    /// Commit-before-ACK: the highest received number the application committed and the
    /// task has not applied yet (0: none).
    pub(crate) commit_to: u64,
    /// A decision made off the task ([`Shared::resolve`]), for the task to apply.
    /// (Wrapped: the decision is `Send` but not `Sync`, and an absent box reads as a shared
    /// empty one; it is only ever reached through `&mut`.)
    pub(crate) resolved: SyncWrapper<Option<Box<super::Resolved>>>,
    /// With a session: the sequence number the outbox's front message will get when it moves
    /// into the state machine. The outbox is FIFO and every message moved gets the next
    /// number, so the message at outbox index `i` will carry `seq_base + i`: a sender learns
    /// its message's number when it queues it. Set by the server when a session attaches
    /// (`None`: no session), advanced by the driver as messages move (same lock).
    pub(crate) seq_base: Option<u64>,
    /// Notified when the outbox gets room and when the connection ends: there while a
    /// [`Watch`] holds it (a sender waiting for room or for the end), dropped by the lock's
    /// guard once none does (issue 17: 32 B per connection when `Shared` held a `Notify`).
    changed: Option<Arc<Notify>>,
}

/// What an absent [`Queues`] box reads as.
static NO_QUEUES: Queues = Queues {
    outbox_bytes: 0,
    transmit_bytes: 0,
    charged: 0,
    outbox: VecDeque::new(),
    command: None,
    inbox: VecDeque::new(),
    inbox_bytes: 0,
    recv: None,
    done: None,
    commit_to: 0,
    resolved: SyncWrapper::new(None),
    seq_base: None,
    changed: None,
};

impl Queues {
    /// Nothing queued, nothing allocated, nothing to report.
    fn is_empty(&mut self) -> bool {
        self.outbox.capacity() == 0
            && self.outbox_bytes == 0
            && self.transmit_bytes == 0
            && self.charged == 0
            && self.inbox.capacity() == 0
            && self.command.is_none()
            && self.inbox_bytes == 0
            && self.recv.is_none()
            && self.done.is_none()
            && self.commit_to == 0
            && self.resolved.get_mut().is_none()
            && self.seq_base.is_none()
            && self.changed.is_none()
    }
}

impl std::ops::Deref for Inner {
    type Target = Queues;
    fn deref(&self) -> &Queues {
        self.queues.as_deref().unwrap_or(&NO_QUEUES)
    }
}

impl std::ops::DerefMut for Inner {
    fn deref_mut(&mut self) -> &mut Queues {
        self.queues.get_or_insert_with(Box::default)
    }
}

impl Inner {
    /// Takes the commit not applied yet (0: none) without creating the queues' box.
    pub(crate) fn take_commit(&mut self) -> u64 {
        self.queues
            .as_mut()
            .map_or(0, |q| std::mem::take(&mut q.commit_to))
    }

    /// Takes the decision made off the task, without creating the queues' box.
    pub(crate) fn take_resolved(&mut self) -> Option<Box<super::Resolved>> {
        self.queues
            .as_mut()
            .and_then(|q| q.resolved.get_mut().take())
    }

    /// Server connections: sets what the state machine holds for the peer (see
    /// [`Queues::transmit_bytes`]); a zero creates no box.
    pub(crate) fn set_transmit(&mut self, n: usize) {
        if n != self.transmit_bytes {
            self.transmit_bytes = n;
        }
    }

    /// Takes the pending command without creating the queues' box.
    pub(crate) fn take_command(&mut self) -> Option<Command> {
        self.queues.as_mut().and_then(|q| q.command.take())
    }

    /// Wakes the senders waiting for room or for the end (see [`Watch`]); nothing to do
    /// when none waits.
    pub(crate) fn notify_changed(&self) {
        if let Some(n) = self.queues.as_ref().and_then(|q| q.changed.as_ref()) {
            n.notify_waiters();
        }
    }

    /// Releases the waiters' `Notify` once no [`Watch`] holds it, and the queues' box once
    /// it holds nothing.
    fn release_queues(&mut self) {
        let Some(q) = self.queues.as_mut() else {
            return;
        };
        // Only this lock's holders clone it (`Shared::watch`): counted 1, no watch is left.
        if q.changed
            .as_ref()
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            q.changed = None;
        }
        if q.is_empty() {
            self.queues = None;
        }
    }
}

/// The lock on a connection's [`Inner`]; releases the queues' box on unlock once empty.
pub(crate) struct Guard<'a>(MutexGuard<'a, Inner>);

impl std::ops::Deref for Guard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.0
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.release_queues();
    }
}

/// What a connection's state is built with and never changes: the same for every connection
/// of a server, which shares one (issue 17: 24 bytes per connection moved out of [`Shared`]).
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) limits: Limits,
    /// Outlives single connections (a reconnecting client's outbox): a connection's end does
    /// not mark it done; its owner does with [`Shared::finish`].
    pub(crate) persistent: bool,
    /// Server connections: the server-wide budgets.
    pub(crate) budgets: Option<Arc<Budgets>>,
}

impl Settings {
    /// A server's connections' settings, shared by all of them.
    pub(crate) fn server(limits: Limits, budgets: Arc<Budgets>) -> Arc<Self> {
        Arc::new(Settings {
            limits,
            persistent: false,
            budgets: Some(budgets),
        })
    }
}

/// A registration for a connection's next change (room in its outbox, its end), taken
/// before checking for it: [`Watch::notified`] is woken by every change after the watch was
/// taken, so create the `Notified` first, then check, then wait on it.
///
/// The `Notify` lives in the connection's [`Queues`] only while a watch holds it: an idle
/// connection, which nobody waits on, keeps none (issue 17).
pub(crate) struct Watch<'a> {
    /// Declared first: dropped before `_release` takes the lock, so the last watch gone
    /// leaves the queues' reference alone, which the lock's guard then drops.
    notify: Arc<Notify>,
    _release: Release<'a>,
}

impl Watch<'_> {
    /// Completes at the first change after the watch was taken (see [`Notify::notified`]:
    /// woken by `notify_waiters` calls made after it was created, polled or not).
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }
}

/// Takes the lock once a [`Watch`] let go of its `Notify`, so the guard can drop the queues'
/// reference (and the queues) when it was the last.
struct Release<'a>(&'a Shared);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        drop(self.0.lock());
    }
}

/// State shared by a connection task and the handles that talk to it.
///
/// One per connection, parked or not (issue 17): 104 B outside tests (its lock and waker 32
/// B, its counters 64 B, its settings 8 B), 120 B with the `Arc`'s counts, a 128 B chunk
/// (192 B while it kept a `Notify` and its queues' byte counts itself).
#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    pub(crate) stats: Stats,
    settings: Arc<Settings>,
}

// A field that makes every connection's `Shared` bigger fails the build (tests' layout, with
// two more counters, is bounded by `server::accept::sizes`).
#[cfg(all(not(test), target_os = "linux", target_pointer_width = "64"))]
const _: () = assert!(std::mem::size_of::<Shared>() <= 104);

impl Shared {
    /// A connection's state built with `settings` (a server's, shared by its connections).
    pub(crate) fn with(settings: &Arc<Settings>) -> Arc<Self> {
        Arc::new(Shared {
            inner: Mutex::default(),
            stats: Stats::default(),
            settings: settings.clone(),
        })
    }

    fn build(limits: Limits, persistent: bool, budgets: Option<Arc<Budgets>>) -> Arc<Self> {
        Shared::with(&Arc::new(Settings {
            limits,
            persistent,
            budgets,
        }))
    }

    /// A standalone connection's state.
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Shared::build(limits, false, None)
    }

    /// A server connection's state with settings of its own (a server's connections share
    /// theirs: [`Shared::with`]).
    #[cfg(test)]
    pub(crate) fn server(limits: Limits, budgets: Arc<Budgets>) -> Arc<Self> {
        Shared::build(limits, false, Some(budgets))
    }

    /// A state that outlives single connections (see [`Settings::persistent`]).
    pub(crate) fn persistent(limits: Limits) -> Arc<Self> {
        Shared::build(limits, true, None)
    }

    /// Bounds on what this connection buffers.
    pub(crate) fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// See [`Settings::persistent`].
    pub(crate) fn is_persistent(&self) -> bool {
        self.settings.persistent
    }

    /// Server connections: the server-wide budgets.
    pub(crate) fn budgets(&self) -> Option<&Arc<Budgets>> {
        self.settings.budgets.as_ref()
    }

    pub(crate) fn lock(&self) -> Guard<'_> {
        // A poisoned lock means a panic elsewhere while holding it; the data is still usable
        // (queues and flags only), so keep going rather than cascade the panic.
        Guard(self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The queues' box exists (issue 17: an idle connection holds none).
    #[cfg(test)]
    pub(crate) fn holds_queues(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queues
            .is_some()
    }

    /// The size of the queues' box (`server::accept::sizes`).
    #[cfg(test)]
    pub(crate) const QUEUES_SIZE: usize = std::mem::size_of::<Queues>();

    /// Registers for this connection's next change (see [`Watch`]).
    pub(crate) fn watch(&self) -> Watch<'_> {
        let mut inner = self.lock();
        let notify = inner
            .changed
            .get_or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        drop(inner);
        Watch {
            notify,
            _release: Release(self),
        }
    }

    /// Brings this connection's share of the server's unsent budget in line with what it
    /// holds (server connections; nothing to do for others). Call after changing
    /// `outbox_bytes` or `transmit_bytes`.
    pub(crate) fn recharge(&self, inner: &mut Inner) {
        let Some(b) = self.budgets() else {
            return;
        };
        let now = inner.outbox_bytes + inner.transmit_bytes;
        if now != inner.charged {
            b.unsent.adjust(inner.charged, now);
            inner.charged = now;
        }
    }

    /// Marks the owner finished: senders fail with `d` from now on.
    pub(crate) fn finish(&self, d: Disconnect) {
        let mut inner = self.lock();
        inner.done.get_or_insert(d);
        if let Some(w) = inner.recv.take() {
            w.wake();
        }
        inner.notify_changed();
    }

    /// Messages still queued (never handed to a connection), oldest first.
    pub(crate) fn take_outbox(&self) -> Vec<Bytes> {
        let mut inner = self.lock();
        let v: Vec<Bytes> = if inner.outbox.capacity() == 0 {
            Vec::new()
        } else {
            inner.outbox_bytes = 0;
            std::mem::take(&mut inner.outbox).into()
        };
        self.recharge(&mut inner);
        inner.notify_changed();
        v
    }

    /// Puts messages at the front of the outbox (they were queued before the others).
    pub(crate) fn requeue_front(&self, msgs: Vec<Bytes>) {
        let mut inner = self.lock();
        for m in msgs.into_iter().rev() {
            inner.outbox_bytes += m.len();
            inner.outbox.push_front(m);
        }
        self.recharge(&mut inner);
        wake_driver(&mut inner);
    }

    /// Queues a message, waiting while the outbox is full. Fails once the connection ended.
    pub(crate) async fn send(&self, msg: Bytes) -> Result<(), Disconnect> {
        // First without a notification: the usual case (room in the outbox) costs one lock.
        let mut msg = match self.push_if_room(msg) {
            Ok(r) => return r,
            Err(m) => m,
        };
        loop {
            // Registered before the next attempt, so room made in between wakes us.
            let watch = self.watch();
            let notified = watch.notified();
            msg = match self.push_if_room(msg) {
                Ok(r) => return r,
                Err(m) => m,
            };
            notified.await;
        }
    }

    /// Queues `msg` if the outbox has room (or is empty); gives it back otherwise.
    fn push_if_room(&self, msg: Bytes) -> Result<Result<(), Disconnect>, Bytes> {
        let mut inner = self.lock();
        if let Some(d) = &inner.done {
            return Ok(Err(d.clone()));
        }
        if inner.outbox_bytes == 0 || inner.outbox_bytes + msg.len() <= self.limits().outbox_bytes {
            push(&mut inner, msg);
            return Ok(Ok(()));
        }
        Err(msg)
    }

    /// Queues a message without waiting; `false` when the outbox is full or the connection
    /// ended.
    pub(crate) fn try_send(&self, msg: Bytes) -> bool {
        let mut inner = self.lock();
        if inner.done.is_some()
            || inner.outbox_bytes + msg.len() > self.limits().outbox_bytes.max(msg.len())
        {
            return false;
        }
        push(&mut inner, msg);
        true
    }

    /// Server connections: queues a message without ever waiting. A client whose unsent
    /// bytes (outbox, transmit buffer, unacknowledged session messages) would pass its bound is closed as a slow consumer
    /// when `close_slow` (else [`Offer::Full`]); the message is not queued. With `after_end`,
    /// a connection that already ended still takes the message (its owner moves the outbox
    /// to the client's held session).
    pub(crate) fn offer(&self, msg: Bytes, after_end: bool, close_slow: bool) -> Offer {
        let mut inner = self.lock();
        let ended = inner.done.is_some();
        if let Some(d) = &inner.done {
            if !after_end {
                return Offer::Ended(d.clone());
            }
        }
        let unsent = inner.outbox_bytes + inner.transmit_bytes;
        if unsent > 0 && unsent + msg.len() > self.limits().outbox_bytes {
            if ended {
                return Offer::Backlogged;
            }
            if !close_slow {
                return Offer::Full;
            }
            if !matches!(inner.command, Some(Command::CloseNow(..))) {
                inner.command = Some(Command::CloseNow(
                    CloseCode::SLOW_CONSUMER,
                    format!(
                        "more than {} bytes queued and not read",
                        self.limits().outbox_bytes
                    ),
                ));
                wake_driver(&mut inner);
            }
            return Offer::SlowConsumer;
        }
        if let Some(b) = self.budgets() {
            if !b.unsent.try_take(msg.len()) {
                return Offer::ServerFull;
            }
            inner.charged += msg.len();
        }
        let seq = inner.seq_base.map(|b| b + inner.outbox.len() as u64);
        inner.outbox_bytes += msg.len();
        inner.outbox.push_back(msg);
        wake_driver(&mut inner);
        Offer::Queued(seq)
    }

    /// Server connections: the sequence number the next message queued will carry (`None`
    /// without a session). Called when a session attaches, before any sender can reach the
    /// connection.
    pub(crate) fn set_seq_base(&self, base: Option<u64>) {
        self.lock().seq_base = base;
    }

    /// Server connections: the number the next message queued will carry (`None` without a
    /// session).
    pub(crate) fn next_seq(&self) -> Option<u64> {
        let inner = self.lock();
        inner.seq_base.map(|b| b + inner.outbox.len() as u64)
    }

    /// Commit-before-ACK: the application committed the received messages up to `seq`.
    pub(crate) fn commit(&self, seq: u64) {
        let mut inner = self.lock();
        if inner.done.is_some() || seq <= inner.commit_to {
            return;
        }
        inner.commit_to = seq;
        wake_driver(&mut inner);
    }

    /// The commit not applied by the task yet (0: none), taken.
    pub(crate) fn take_commit(&self) -> u64 {
        self.lock().take_commit()
    }

    /// Asks the task to close the connection in order (after what is queued).
    pub(crate) fn close(&self, code: CloseCode, text: &str) {
        self.command(Command::Close(code, text.to_owned()));
    }

    /// Asks the task for `cmd` (a later command replaces an earlier one, except that an
    /// immediate close is never downgraded).
    pub(crate) fn command(&self, cmd: Command) {
        let mut inner = self.lock();
        if inner.done.is_some()
            || matches!(
                inner.command,
                Some(Command::CloseNow(..) | Command::Abandon(..))
            )
        {
            return;
        }
        if matches!(inner.command, Some(Command::Close(..))) && matches!(cmd, Command::Refuse(..)) {
            return;
        }
        inner.command = Some(cmd);
        wake_driver(&mut inner);
    }

    /// Hands the task a decision made elsewhere (an authorizer's verdict, a fresh
    /// credential). A later one replaces an earlier one not yet applied.
    pub(crate) fn resolve(&self, r: super::Resolved) {
        let mut inner = self.lock();
        if inner.done.is_some() {
            return;
        }
        *inner.resolved.get_mut() = Some(Box::new(r));
        wake_driver(&mut inner);
    }

    /// Ready with the pending command once a handle asked to close or refuse (registers the
    /// task's waker like the driver does): lets a task that is not driving yet — a server
    /// connection in its TLS handshake — be evicted or shut down.
    pub(crate) fn poll_command(&self, cx: &mut Context<'_>) -> Poll<Command> {
        let mut inner = self.lock();
        if let Some(c) = &inner.command {
            return Poll::Ready(c.clone());
        }
        match &inner.driver {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inner.driver = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The disconnect, once the connection ended.
    pub(crate) fn done(&self) -> Option<Disconnect> {
        self.lock().done.clone()
    }

    /// Waits until the connection (or the persistent owner) has ended.
    pub(crate) async fn closed(&self) -> Disconnect {
        loop {
            let watch = self.watch();
            let n = watch.notified();
            if let Some(d) = self.done() {
                return d;
            }
            n.await;
        }
    }

    /// Pushes received messages into a standalone connection's inbox.
    pub(crate) fn push_inbox(&self, msgs: &mut Vec<Bytes>) {
        let bytes: usize = msgs.iter().map(Bytes::len).sum();
        let mut inner = self.lock();
        inner.inbox_bytes += bytes;
        if inner.inbox.is_empty() {
            // The batch becomes the inbox as it is (a `VecDeque` from a `Vec` keeps the
            // buffer): no message is moved again.
            inner.inbox = std::collections::VecDeque::from(std::mem::take(msgs));
        } else {
            inner.inbox.extend(msgs.drain(..));
        }
        if let Some(w) = inner.recv.take() {
            w.wake();
        }
    }

    /// Takes every message in the inbox at once into `batch` (empty when called) and returns
    /// the first, or the disconnect once the inbox is empty and closed: a receiver hands the
    /// rest out without the lock. `held` is what the previous batch weighed (all taken by
    /// now): a batch counts against the inbox bound until its receiver comes back for more,
    /// so reading pauses on what the application holds, inbox and batch together.
    pub(crate) fn poll_recv_batch(
        &self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<Bytes>,
        held: &mut usize,
    ) -> Poll<Result<Bytes, Disconnect>> {
        let mut inner = self.lock();
        let was_paused = inner.inbox_bytes > self.limits().inbox_bytes;
        inner.inbox_bytes -= std::mem::take(held);
        if was_paused && inner.inbox_bytes <= self.limits().inbox_bytes {
            wake_driver(&mut inner);
        }
        std::mem::swap(batch, &mut inner.inbox);
        if let Some(m) = batch.pop_front() {
            *held = inner.inbox_bytes;
            return Poll::Ready(Ok(m));
        }
        // Nothing was waiting: the inbox keeps its (empty) queue.
        std::mem::swap(batch, &mut inner.inbox);
        if let Some(d) = &inner.done {
            return Poll::Ready(Err(d.clone()));
        }
        match &inner.recv {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inner.recv = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let charged = self.lock().charged;
        if let Some(b) = self.budgets() {
            b.unsent.give(charged);
        }
    }
}

fn push(inner: &mut Inner, msg: Bytes) {
    inner.outbox_bytes += msg.len();
    inner.outbox.push_back(msg);
    wake_driver(inner);
}

fn wake_driver(inner: &mut Inner) {
    if let Some(w) = inner.driver.take() {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: an idle connection holds no queue. The box appears with the first message
    /// or command and goes when the last is taken (reading an absent box allocates nothing).
    #[test]
    fn queues_exist_only_while_they_hold_something() {
        let s = Shared::new(Limits::default());
        assert!(!s.holds_queues());
        // Reads through the guard see empty queues without creating them.
        {
            let inner = s.lock();
            assert!(inner.outbox.is_empty() && inner.command.is_none() && inner.done.is_none());
        }
        assert!(!s.holds_queues());
        assert!(s.try_send(Bytes::from_static(b"m")));
        assert!(s.holds_queues());
        {
            let mut inner = s.lock();
            let m = inner.outbox.pop_front();
            assert_eq!(m.as_deref(), Some(&b"m"[..]));
            inner.outbox_bytes = 0;
            // Still allocated: the queue's capacity stays until the driver lets it go.
            assert!(inner.outbox.capacity() > 0);
            inner.outbox = VecDeque::new();
        }
        assert!(!s.holds_queues());
        s.close(CloseCode::NORMAL, "bye");
        assert!(s.holds_queues());
        assert!(matches!(s.lock().take_command(), Some(Command::Close(..))));
        assert!(!s.holds_queues());
        // Taking a command that is not there creates nothing.
        assert!(s.lock().take_command().is_none());
        assert!(!s.holds_queues());
        // The end is kept (senders fail with it).
        s.finish(Disconnect {
            reason: tether_proto::DisconnectReason::LocalClose,
            silent_for: std::time::Duration::ZERO,
        });
        assert!(s.holds_queues());
        assert!(s.done().is_some());
        assert!(!s.try_send(Bytes::from_static(b"late")));
    }

    /// A spawned waiter's result; fails (rather than hangs) when its wake-up was lost.
    async fn woken<T>(t: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(10), t)
            .await
            .expect("a waiter not woken")
            .expect("the waiter")
    }

    fn watched(s: &Shared) -> bool {
        s.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queues
            .as_ref()
            .is_some_and(|q| q.changed.is_some())
    }

    /// Issue 17: the waiters' `Notify` lives in the queues only while someone waits. A
    /// sender waiting for room wakes when the outbox is taken, one waiting for the end when
    /// the connection ends; a wait given up leaves nothing behind.
    #[tokio::test]
    async fn waiting_senders_wake_and_leave_nothing_behind() {
        let s = Shared::new(Limits {
            outbox_bytes: 4,
            inbox_bytes: 4,
        });
        assert!(s.try_send(Bytes::from_static(b"full")));
        // A wait given up (polled once, then dropped) leaves no `Notify`.
        tokio::select! {
            biased;
            _ = s.send(Bytes::from_static(b"gone")) => panic!("sent into a full outbox"),
            () = std::future::ready(()) => {}
        }
        assert!(!watched(&s));
        assert_eq!(s.lock().outbox.len(), 1);

        let sender = tokio::spawn({
            let s = s.clone();
            async move { s.send(Bytes::from_static(b"next")).await }
        });
        let ender = tokio::spawn({
            let s = s.clone();
            async move { s.closed().await }
        });
        // A current-thread runtime: both run to their wait before this task goes on.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        assert!(!sender.is_finished() && !ender.is_finished());
        assert!(watched(&s));

        // Room: the outbox taken (as a server does when a client leaves) wakes the sender.
        assert_eq!(s.take_outbox(), vec![Bytes::from_static(b"full")]);
        assert_eq!(woken(sender).await, Ok(()));
        assert_eq!(s.lock().outbox_bytes, 4);
        assert!(!ender.is_finished());
        // Still watched by the one waiting for the end.
        assert!(watched(&s));

        let end = Disconnect {
            reason: tether_proto::DisconnectReason::LocalClose,
            silent_for: std::time::Duration::ZERO,
        };
        s.finish(end.clone());
        assert_eq!(woken(ender).await, end);
        // Every watch gone: the `Notify` went with the last one.
        assert!(!watched(&s));
        // Once ended, a sender fails without waiting (and without a `Notify` left behind).
        assert_eq!(s.send(Bytes::from_static(b"late")).await, Err(end));
        assert!(!watched(&s));
    }
}
