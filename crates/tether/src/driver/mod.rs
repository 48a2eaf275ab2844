//! The per-connection task: drives a [`Conn`] over a [`Transport`].
//!
//! One task and one reusable `Sleep` per connection — while it has work: a server connection
//! with a lot (plain TCP, `park.rs`) that a wake-up leaves idle ends its task and waits in
//! the lot, which polls it with the same steps when its socket, a handle or a deadline
//! wakes it, and gives it a task again when it has more to do. A wake-up runs small steps,
//! each its own method in `steps.rs` (quinn's `ConnectionDriver` is the model):
//!
//! ```text
//!  take_commands   outbox → state machine (up to the transmit high-water mark), close or
//!                  refuse commands, decide whether reading is paused
//!  drive_read      socket → state machine, up to 64 KiB a read on the stack, at most 64 KiB
//!                  or 4 reads a wake-up; paused (a full inbox or server backlog), 512 B
//!                  reads that stop at the first message: heartbeats and ACKs are still
//!                  read and answered, messages wait in the state machine; stopped, it peeks
//!                  so a silent peer is still declared dead
//!  drive_timer     fire what is due (heartbeat, dead-after, ACK delay, handshake deadline)
//!  process_events  state machine → sink (HELLO decisions, messages, presence, the end)
//!  drive_write     state machine → socket, one vectored write of the queued chunks (large
//!                  message payloads are written from the sender's `Bytes`, not copied)
//!  drive_close     orderly close: FIN after the CLOSE frame, bounded linger for the peer's
//!                  FIN, RST when the peer or the path failed (or the linger ran out)
//!  arm_timer       re-arm the sleep when the deadline moved earlier, or so much later that
//!                  the armed sleep would soon fire for nothing
//! ```
//!
//! Loop-backs within one wake-up: the handshake just completed (what the application queued
//! before or during it goes out now, not a timer later), the sleep already fired, the
//! socket took the whole transmit buffer while the outbox still holds messages, or messages
//! held by a pause find the backlog has room after all.
//!
//! A connection that used its whole read budget yields through tokio's deferred wake-up
//! (`yield_now`), not by waking itself: a self-woken task goes straight back into its
//! worker's local run queue, ahead of every task in the global queue, and under a
//! saturating load the connections woken by a timer or a heartbeat waited there for
//! seconds (the detection bench, BENCHMARKS.md). Deferred, it runs again after the worker
//! has polled the I/O driver and the timers and run what they woke.

mod budget;
mod frames;
mod park;
mod shared;
mod stats;
mod steps;
#[cfg(test)]
mod tests;
mod trim;

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_proto::codec::{Credential, Hello, SessionGrant};
use tether_proto::conn::FrozenConn;
use tether_proto::session::Session;
use tether_proto::{CloseCode, Conn, ConnEvent, Disconnect, DisconnectReason, LivenessConfig};

#[cfg(test)]
pub(crate) use park::parked_sizes;
pub(crate) use park::Lot;
pub(crate) use shared::{Budgets, Command, Limits, Offer, Settings, Shared};

use crate::auth::AuthDecision;
pub use stats::StatsSnapshot;

use crate::transport::ParkIo;
// The probe responder names the transport through the driver.
pub(crate) use crate::transport::Transport;

/// Bytes read per `read` call, on the stack.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per wake-up before yielding to other tasks.
const READS_PER_WAKE: usize = 4;
/// Bytes read at a time while reading is paused: enough for the liveness frames that arrive
/// in an interval, and the most payload a paused connection holds (the server's backlog may
/// pass its bound by at most this much per connection).
pub(crate) const PAUSED_READ: usize = 512;
/// Bytes read per wake-up before yielding to other tasks.
// 64 KiB: a busy connection decodes at most ~64 KiB per wake-up before yielding, so
// hundreds of busy connections cannot starve idle ones of their timers (heartbeats,
// dead-after) for long. In one read of 64 KiB when that much waits (it was four reads of
// 16 KiB: a quarter of the `recv` calls for a bulk stream of large frames; the tunnel
// spent 5.8-6.0 s of CPU for 2.25 GiB instead of 6.7-8.0 s in two noisy alternations,
// issue 17 target 5, `benches/tunnel.rs`).
const READ_BUDGET: usize = 64 * 1024;
/// Stop moving messages from the outbox into the state machine above this many queued bytes.
pub(crate) const TRANSMIT_HIGH_WATER: usize = 256 * 1024;
/// A sleep armed for a deadline that has since moved later is re-armed when it would fire
/// within this long (a wake-up for nothing, see `arm_timer`).
pub(crate) const REARM_SLACK: Duration = Duration::from_millis(50);
/// How long an orderly close may take to flush and see the peer's FIN.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long an abandoned connection's CLOSE may take to leave ([`Command::Abandon`]).
pub(crate) const HANDOVER_LINGER: Duration = Duration::from_millis(100);

/// The application's answer to a HELLO.
pub(crate) enum Decision {
    /// Accept with these liveness settings, this session (new or resumed), and a credential
    /// that runs out after this long (`None`: it does not expire).
    Accept(
        Arc<LivenessConfig>,
        Option<Box<(SessionGrant, Session)>>,
        Option<Duration>,
    ),
    /// Refuse with this code and text.
    Refuse(CloseCode, String),
    /// Not decided yet: the answer comes through [`Shared::resolve`] (the handshake deadline
    /// still runs).
    Pending,
}

/// The application's answer to an in-band credential refresh (AUTH).
pub(crate) enum RefreshAnswer {
    /// AUTH_OK: the new credential runs out after this long (`None`: it does not expire).
    Ok(Option<Duration>),
    /// CLOSE(credential-expired) with this text.
    Refuse(String),
    /// Not decided yet: the answer comes through [`Shared::resolve`] (the old credential's
    /// expiry still runs).
    Pending,
}

/// A decision made off the connection's task, handed to it through [`Shared::resolve`].
#[derive(Debug)]
pub(crate) enum Resolved {
    /// Server: the authorizer's verdict on the HELLO ([`Decision::Pending`]).
    Hello(AuthDecision),
    /// Server: the authorizer's verdict on an AUTH ([`RefreshAnswer::Pending`]).
    Refresh(AuthDecision),
    /// Client: a fresh credential to send in an AUTH frame.
    Credential(Credential),
    /// Server: the session source's fetch for the HELLO is done (what it found, if
    /// anything, is installed as a held session already).
    SessionFetched,
}

/// What the sink makes of a [`Resolved`] verdict.
pub(crate) enum Resolution {
    /// The answer to the HELLO.
    Hello(Decision),
    /// The answer to the AUTH.
    Refresh(RefreshAnswer),
}

/// Where a connection's events go.
pub(crate) trait Sink {
    /// Server side: a client said hello. Default: refuse.
    fn hello(&mut self, _shared: &Arc<Shared>, _now: Instant, _hello: &Hello) -> Decision {
        Decision::Refuse(CloseCode::REFUSED, "not accepting".into())
    }
    /// Server side: the client refreshed its credential (AUTH). Default: refuse (close with
    /// credential-expired).
    fn refresh(
        &mut self,
        _shared: &Arc<Shared>,
        _now: Instant,
        _credential: &Credential,
    ) -> RefreshAnswer {
        RefreshAnswer::Refuse("this server does not accept credential refreshes".into())
    }
    /// Server side: a deferred verdict arrived. Default: refuse.
    fn resolved(&mut self, _shared: &Arc<Shared>, _now: Instant, r: Resolved) -> Resolution {
        match r {
            Resolved::Refresh(_) => Resolution::Refresh(RefreshAnswer::Refuse("refused".into())),
            _ => Resolution::Hello(Decision::Refuse(CloseCode::REFUSED, "not accepting".into())),
        }
    }
    /// Any other event. `Message`s for a standalone connection go to the inbox.
    fn event(&mut self, shared: &Arc<Shared>, ev: ConnEvent);
    /// The events of one wake-up have all been delivered (a sink that batches flushes here).
    fn flush(&mut self, _shared: &Shared) {}
}

pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// How a driven connection ended.
pub(crate) struct Ended<T, S> {
    /// Why, and how long the peer had been silent.
    pub(crate) disconnect: Disconnect,
    /// The transport, when the state machine handed it off (a probe request).
    pub(crate) handed_off: Option<T>,
    /// The session that ran on the connection, for the next connection.
    pub(crate) session: Option<Session>,
    /// Whether the handshake completed.
    pub(crate) established: bool,
    /// The sink, with whatever it collected.
    pub(crate) sink: S,
    /// The state the handles shared with the connection (the sink does not keep a copy).
    pub(crate) shared: Arc<Shared>,
}

/// One connection's task state: the transport, the state machine, the sink, and what the
/// steps remember between wake-ups.
///
/// The state machine is inline: a task holds it in its own cell, and a lot's wake-up thaws a
/// parked connection onto the stack without allocating. Parked, a lot keeps the driver's
/// compact form instead ([`Parked`], see [`Driver::freeze`]).
struct Driver<T, S> {
    io: T,
    conn: Conn,
    shared: Arc<Shared>,
    sink: S,
    /// The instant the sleep is armed for (parked: the lot's deadline for it).
    armed: Stamp,
    read_done: bool,
    write_failed: bool,
    /// The end: how it ended and since when the close runs (boxed, created at the end:
    /// a driver that parks has none).
    ending: Option<Box<Ending>>,
    /// Close without waiting for the peer's FIN (a refused connection that sent nothing
    /// more: evicted from the handshake, or refused at shutdown).
    no_linger: bool,
    /// Abandoned (`Command::Abandon`): the close lingers `HANDOVER_LINGER`, not
    /// `CLOSE_LINGER`.
    abandoned: bool,
    shut_down: bool,
    last_write: Stamp,
    established: bool,
    /// This connection's share of the server's partial-frame budget.
    frames: frames::FrameRoom,
    /// Transmit-buffer bytes last published to the shared state.
    transmit_published: usize,
    /// Reading is paused for this pass (a full inbox or server backlog): messages wait in the
    /// state machine. Set at the start of every pass (`poll`).
    paused: bool,
    /// This connection's place in the server backlog's queue of waiters.
    backlog_ticket: budget::Ticket,
    /// Where the connection goes when a wake-up leaves it idle (`None`: it keeps its task).
    lot: Option<Arc<Lot<T, S>>>,
    /// This wake-up is the lot's (`Timer::Parked`): reads are `PAUSED_READ` bytes, so a
    /// parked connection that receives more than a few reads' worth goes back to a task.
    /// Set at the start of every pass (`poll`).
    in_lot: bool,
}

/// A parked connection's driver, as its lot entry keeps it between two wake-ups (issue 17):
/// only what a parked connection can hold, its state machine frozen ([`FrozenConn`], 120 B
/// instead of a 360 B `Conn`). Every other field of the [`Driver`] has a value that parking
/// implies ([`Driver::can_freeze`]): no end, no failed read or write, no close under way,
/// established, no partial-frame budget (the frozen decoder holds no buffer), the transmit
/// bytes published, the lot the one that holds it; `paused` and `in_lot` are set at the
/// start of every pass. The state machine's counters are not kept twice: they are the ones
/// published in `Shared::stats` (which `can_freeze` checks), given back to
/// [`FrozenConn::thaw`]. The transport is in its parked form too ([`ParkIo`]: a plain-TCP
/// socket on a lot thread is its descriptor and a flag, in one word). [`Driver::thaw`]
/// rebuilds it all.
/// It holds state, it decides nothing.
struct Parked<P, S> {
    io: P,
    conn: FrozenConn,
    shared: Arc<Shared>,
    sink: S,
    /// The lot's deadline for it (`Driver::armed`).
    armed: Stamp,
    last_write: Stamp,
}

/// How a connection ends (see `Driver::ending`).
#[derive(Default)]
struct Ending {
    /// How it ended (the state machine's `Closed` event).
    result: Option<Disconnect>,
    /// When the orderly close began (none: not yet).
    closing_since: Stamp,
}

impl Default for Stamp {
    fn default() -> Self {
        Stamp::NONE
    }
}

impl<T, S> Driver<T, S> {
    /// The end's record, created on first use.
    fn ending(&mut self) -> &mut Ending {
        self.ending.get_or_insert_with(Box::default)
    }

    /// When the orderly close began, if it has.
    fn closing_since(&self) -> Option<Instant> {
        self.ending.as_ref().and_then(|e| e.closing_since.get())
    }
}

/// An optional instant in 8 bytes instead of 16 (issue 17: every parked driver keeps two):
/// signed nanoseconds from a process-wide origin, exact both ways (±292 years);
/// `i64::MIN` is none.
/// Ordered as the instants are (the lot's deadline heap keeps stamps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp(i64);

impl Stamp {
    const NONE: Stamp = Stamp(i64::MIN);

    /// The stats' origin (`stats::base`): one process-wide origin, so a parked
    /// connection's last arrival, an offset from it, is published as it is.
    fn origin() -> Instant {
        stats::base()
    }

    fn at(t: Instant) -> Stamp {
        // Never `i64::MIN` (none): at most `-i64::MAX`.
        Stamp(tether_proto::offset::offset(Stamp::origin(), t))
    }

    /// The stamp of an instant `off` ns after the origin (as `offset` gives it; never none).
    fn offset(off: i64) -> Stamp {
        Stamp(off.max(-i64::MAX))
    }

    fn get(self) -> Option<Instant> {
        (self != Stamp::NONE).then(|| tether_proto::offset::instant(Stamp::origin(), self.0))
    }

    fn is_none(self) -> bool {
        self == Stamp::NONE
    }
}

/// Where a wake-up keeps the connection's next deadline.
pub(super) enum Timer<'a> {
    /// Its task's sleep.
    Sleep(Pin<&'a mut tokio::time::Sleep>),
    /// Parked: in `Driver::armed`, for the lot's heap.
    Parked,
}

/// What a parked connection's quick wake-up (`park.rs`) read before it found the
/// connection needs its full wake-up: handed to that wake-up as its first read, so nothing
/// read is lost. On the stack for one call (boxed, it would allocate for every message a
/// parked connection receives).
#[allow(clippy::large_enum_variant)]
pub(super) enum Carried {
    /// Nothing.
    None,
    /// These bytes (at most [`PAUSED_READ`]), untouched by the state machine, and the
    /// partial-frame budget reserved for the read that got them (taken before it, as every
    /// read of a server connection does).
    Bytes([u8; PAUSED_READ], usize, usize),
    /// The end of the stream.
    Eof,
    /// A failed read.
    Error(std::io::Error),
}

/// How a wake-up ended, when not `Pending`.
pub(super) enum Exit {
    /// The connection is finished.
    Done,
    /// Idle: the task ends and the connection moves to its lot.
    Park,
    /// Parked and no longer idle: it needs its task again.
    Unpark,
}

/// A connection's driver, ready to run in a task: new from the accept path, or unparked by
/// the lot. See [`resume`].
pub(crate) struct Resume<T, S> {
    d: Driver<T, S>,
    /// Finished while parked: the task only reports the end.
    finished: bool,
}

impl<T: Transport, S: Sink> Resume<T, S> {
    /// The end of a connection that finished while parked, reported at once by whoever
    /// holds it (no task needed); `Err` gives back one that has work for a task.
    // `Err` is the driver given back as it came (boxing it would allocate).
    #[allow(clippy::result_large_err)]
    pub(crate) fn into_ended(self) -> Result<Ended<T, S>, Self> {
        if self.finished {
            Ok(self.d.end())
        } else {
            Err(self)
        }
    }
}

impl<T, S> Driver<T, S> {
    /// Whether the driver has its compact form ([`Parked`]): it has a lot, its state machine
    /// can be frozen ([`Conn::can_freeze`]) and every field the compact form drops has the
    /// value [`thaw`](Self::thaw) gives it back, the counters included (published exactly:
    /// a connection past 2^32 - 1 heartbeats, whose published counts saturate, keeps its
    /// task). What decides whether an idle connection parks (`may_park`), so a parked
    /// connection always freezes.
    fn can_freeze(&self) -> bool {
        self.fields_parkable() && self.conn.can_freeze()
    }

    /// [`can_freeze`](Self::can_freeze) but for the state machine's own answer, which
    /// [`Conn::freeze`] gives again (asked once per freeze, not twice).
    fn fields_parkable(&self) -> bool {
        self.lot.is_some()
            && self.ending.is_none()
            && !self.read_done
            && !self.write_failed
            && !self.shut_down
            && !self.no_linger
            && !self.abandoned
            && self.established
            && (self.shared.budgets().is_none()
                || self.transmit_published == steps::held_for_peer(&self.conn))
            && self.shared.stats.holds(&self.conn.stats())
    }
}

impl<T: ParkIo, S> Driver<T, S> {
    /// The driver in its compact form, as a lot keeps it between two wake-ups; `Err` gives
    /// it back when it has none ([`can_freeze`](Self::can_freeze); not reached from the
    /// lot: `may_park` asks it). Allocates nothing (but a lot task's `Tcp`, which stays in
    /// the reactor, is boxed: see `transport::ParkedTcp`).
    ///
    /// What the connection holds of the partial-frame budget goes back: the frozen decoder
    /// holds no buffer ([`Conn::freeze`] releases it), and the first read after the thaw
    /// reserves what it needs, as every read does. Its place in the backlog's queue of
    /// waiters is forgotten, as when a connection moves between its task and the lot
    /// (`resume`, `Lot::park`): a wake-up that waits for the backlog queues the entry's
    /// waker again.
    // `Err` is the driver given back as it came (boxing it would allocate).
    #[allow(clippy::result_large_err)]
    fn freeze(self) -> Result<Parked<T::Parked, S>, Self> {
        if !self.fields_parkable() {
            return Err(self);
        }
        let Driver {
            io,
            conn,
            shared,
            sink,
            armed,
            read_done: _,
            write_failed: _,
            ending: _,
            no_linger: _,
            abandoned: _,
            shut_down: _,
            last_write,
            established: _,
            mut frames,
            transmit_published: _,
            paused: _,
            backlog_ticket: _,
            lot,
            in_lot: _,
        } = self;
        // The state machine's own answer (`Conn::can_freeze`): when it cannot freeze, the
        // driver comes back as it was but for its backlog place.
        let conn = match conn.freeze(Stamp::origin()) {
            Ok(c) => c,
            Err(conn) => {
                let mut d = Driver::parked_parts(io, conn, shared, sink, armed, last_write, lot);
                d.frames = frames;
                return Err(d);
            }
        };
        if let Some(b) = shared.budgets() {
            frames.release(&b.frames);
        }
        Ok(Parked {
            io: io.park(),
            conn,
            shared,
            sink,
            armed,
            last_write,
        })
    }

    /// The driver of a parked connection, for a wake-up of `lot`, which holds it: its state
    /// machine thawed ([`FrozenConn::thaw`]) and the fields [`freeze`](Self::freeze)
    /// dropped at the values parking implies. Allocates nothing.
    fn thaw(p: Parked<T::Parked, S>, lot: &Arc<Lot<T, S>>) -> Self {
        let conn = p.conn.thaw(Stamp::origin(), &p.shared.stats.counters());
        Driver::parked_parts(
            T::unpark(p.io),
            conn,
            p.shared,
            p.sink,
            p.armed,
            p.last_write,
            Some(lot.clone()),
        )
    }
}

impl<T, S> Driver<T, S> {
    /// A driver whose other fields have the values [`can_freeze`](Self::can_freeze) asks
    /// for (the one list of them).
    fn parked_parts(
        io: T,
        conn: Conn,
        shared: Arc<Shared>,
        sink: S,
        armed: Stamp,
        last_write: Stamp,
        lot: Option<Arc<Lot<T, S>>>,
    ) -> Self {
        let transmit_published = steps::held_for_peer(&conn);
        Driver {
            io,
            conn,
            shared,
            sink,
            armed,
            read_done: false,
            write_failed: false,
            ending: None,
            no_linger: false,
            abandoned: false,
            shut_down: false,
            last_write,
            established: true,
            frames: frames::FrameRoom::default(),
            transmit_published,
            paused: false,
            backlog_ticket: 0,
            lot,
            in_lot: false,
        }
    }
}

/// A new connection's driver, parked by `lot` whenever a wake-up leaves it idle (and its
/// transport can park; `None`: never parked).
pub(crate) fn start<T: Transport, S: Sink + Send + 'static>(
    io: T,
    conn: Conn,
    shared: Arc<Shared>,
    sink: S,
    lot: Option<Arc<Lot<T, S>>>,
) -> Resume<T, S> {
    // A transport that cannot park never gets a lot: `may_park` need not ask it again.
    let lot = lot.filter(|_| io.parkable());
    Resume {
        // A parked connection's fields, but not established yet and nothing published.
        d: Driver {
            established: false,
            transmit_published: 0,
            ..Driver::parked_parts(io, conn, shared, sink, Stamp::NONE, Stamp::NONE, lot)
        },
        finished: false,
    }
}

/// Runs a connection's task: until it ends (`Some`), or until a wake-up leaves it idle and
/// it moves to its lot (`None`; the lot spawns this again, with the same state, when the
/// connection has work).
pub(crate) fn resume<T: ParkIo, S: Sink + Send + 'static>(
    r: Resume<T, S>,
) -> impl std::future::Future<Output = Option<Ended<T, S>>> + Send {
    let Resume { mut d, finished } = r;
    // The lot kept the deadline for its heap; this task's sleep is armed afresh. A place in
    // the backlog's queue holds the lot's waker: queue this task's own (a stale place wakes
    // nobody who waits).
    d.armed = Stamp::NONE;
    d.backlog_ticket = 0;
    async move {
        if !finished {
            let sleep = tokio::time::sleep_until(
                tokio::time::Instant::now() + Duration::from_secs(86400 * 365),
            );
            tokio::pin!(sleep);
            let exit = poll_fn(|cx| d.poll(cx, Timer::Sleep(sleep.as_mut()), Carried::None)).await;
            if let (Exit::Park, Some(lot)) = (&exit, d.lot.clone()) {
                d.armed = Stamp::NONE;
                d.backlog_ticket = 0;
                lot.park(d);
                return None;
            }
        }
        Some(d.end())
    }
}

/// Runs one connection to its end.
///
/// Every idle connection keeps this future alive, so it is kept small: the arguments are
/// moved into the `Driver` before the future exists (an async fn would keep them in the
/// future twice, once as arguments and once in the body). The state machine is inline: one
/// allocation (the task's) instead of the task and a box.
pub(crate) fn drive<T: Transport, S: Sink + Send + 'static>(
    io: T,
    conn: Conn,
    shared: Arc<Shared>,
    sink: S,
) -> impl std::future::Future<Output = Ended<T, S>> + Send {
    let mut d = start(io, conn, shared, sink, None).d;
    async move {
        let sleep = tokio::time::sleep_until(
            tokio::time::Instant::now() + Duration::from_secs(86400 * 365),
        );
        tokio::pin!(sleep);
        // Without a lot a wake-up never ends in `Park`.
        poll_fn(|cx| d.poll(cx, Timer::Sleep(sleep.as_mut()), Carried::None)).await;
        d.end()
    }
}

impl<T: Transport, S: Sink> Driver<T, S> {
    /// Gives back what the connection held of the server's budgets and reports the end.
    fn end(mut self) -> Ended<T, S> {
        if let Some(b) = self.shared.budgets() {
            self.frames.release(&b.frames);
        }
        {
            let mut inner = self.shared.lock();
            inner.set_transmit(0);
            self.shared.recharge(&mut inner);
        }
        let d = self
            .ending
            .take()
            .and_then(|e| e.result)
            .unwrap_or(Disconnect {
                reason: DisconnectReason::LocalClose,
                silent_for: Duration::ZERO,
            });
        if !self.shared.is_persistent() {
            self.shared.finish(d.clone());
        }
        let handed_off = self.conn.is_handed_off();
        Ended {
            disconnect: d,
            session: self.conn.take_session(),
            established: self.established,
            handed_off: handed_off.then_some(self.io),
            sink: self.sink,
            shared: self.shared,
        }
    }
}
