//! The liveness engine: heartbeats, dead-peer detection, suspicion, idle timeout and RTT.
//!
//! A pure state machine (DESIGN.md §3–4). It never reads the clock: every input carries
//! `now`, and [`Liveness::poll_timeout`] says when it next needs [`Liveness::handle_timeout`].
//! Receiving a byte only records `last_rx = now`; nothing is rescheduled. When a deadline
//! fires the engine re-checks the recorded times and acts or reschedules lazily, so a
//! spurious or early `handle_timeout` is harmless.
//!
//! ```text
//!   last_tx ──h──▶ send HEARTBEAT          (only if nothing was sent for h; h + h/8 for a
//!                                           side that answers the peer's heartbeats)
//!   peer HB ─────▶ send HEARTBEAT          (at once, if nothing was sent for h/2)
//!   last_rx ──s──▶ Suspect                 (s = suspect_after, optional)
//!   last_rx ──d──▶ PeerDead                (never earlier than d)
//!   last_app ─i──▶ IdleTimeout             (application data only, optional)
//!   last_ping ─p─▶ send PING(nonce)        (RTT, optional)
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Heartbeats tolerated within any window of 4 agreed intervals (twice the agreed rate).
const FLOOD_LIMIT: usize = 8;

/// Settings for one connection's liveness engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_interval: Duration,
    /// Declare the peer dead after this long without receiving anything.
    pub dead_after: Duration,
    /// Report the peer as suspect after this long without receiving anything. `None` disables.
    pub suspect_after: Option<Duration>,
    /// Close after this long without application data in either direction. `None` disables.
    pub idle_timeout: Option<Duration>,
    /// Send a PING this often to measure RTT. `None` disables.
    pub ping_interval: Option<Duration>,
    /// Close with a policy violation when the peer sends heartbeats much more often than once
    /// per this interval (more than 8 in any window of 4 intervals). `None` disables.
    pub enforce_peer_heartbeat: Option<Duration>,
    /// Answer the peer's heartbeats, MQTT's PINGRESP way (the server's side, whose peer
    /// heartbeats at the interval it dictated): a peer heartbeat that arrives at least h/2
    /// after our last send is answered at once, and our own heartbeat timer becomes a
    /// fallback at `h + h/8` after the last send (see [`answer_grace`]). While the peer
    /// heartbeats, its heartbeat arrives before the fallback and this side wakes once per
    /// interval (the read that answers) instead of twice (its timer, then the read).
    /// Default: false (the timer runs at h; the peer's heartbeat is answered only when ours is
    /// due within h/2).
    pub answer_peer_heartbeat: bool,
}

/// How much later than h the fallback heartbeat of an answering side
/// ([`LivenessConfig::answer_peer_heartbeat`]) goes out: h/8.
///
/// Large enough that a peer heartbeating every h (its timer a little late, the path a
/// little slow) is answered before the fallback fires — one wake-up per interval; small
/// enough that the peer's detector keeps its margin: a policy's `d ≥ 2h + max(h/2, 100 ms)`
/// still covers two fallback gaps (`2 × 1.125 h`) plus a quarter interval (at least 50 ms)
/// for the round trip.
pub fn answer_grace(heartbeat_interval: Duration) -> Duration {
    heartbeat_interval / 8
}

impl LivenessConfig {
    /// A config with the given heartbeat interval and dead-after, everything optional off.
    pub fn new(heartbeat_interval: Duration, dead_after: Duration) -> Self {
        LivenessConfig {
            heartbeat_interval,
            dead_after,
            suspect_after: None,
            idle_timeout: None,
            ping_interval: None,
            enforce_peer_heartbeat: None,
            answer_peer_heartbeat: false,
        }
    }

    /// How long after the last send this side's own heartbeat goes out: h, or `h + h/8`
    /// when it answers the peer's heartbeats (a fallback).
    pub fn own_heartbeat_after(&self) -> Duration {
        if self.answer_peer_heartbeat {
            self.heartbeat_interval + answer_grace(self.heartbeat_interval)
        } else {
            self.heartbeat_interval
        }
    }
}

/// The engine's timers. Deadlines are derived from recorded times, never stored as futures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Send a heartbeat (`last_tx + heartbeat_interval`; `+ h/8` for a side that answers the
    /// peer's heartbeats).
    Heartbeat,
    /// Declare the peer dead (`last_rx + dead_after`).
    Dead,
    /// Report the peer suspect (`last_rx + suspect_after`).
    Suspect,
    /// Close for lack of application data (`last_app + idle_timeout`).
    Idle,
    /// Send an RTT probe (`last_ping + ping_interval`).
    Ping,
}

impl Timer {
    /// Every timer kind.
    pub const ALL: [Timer; 5] = [
        Timer::Heartbeat,
        Timer::Dead,
        Timer::Suspect,
        Timer::Idle,
        Timer::Ping,
    ];
}

/// What the engine wants done or wants the application to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LivenessEvent {
    /// Send a heartbeat (empty frame) now. The engine already counted it as sent.
    SendHeartbeat,
    /// Send PING with this nonce now. The engine already counted it as sent.
    SendPing(u64),
    /// Nothing was received for `dead_after`.
    PeerDead {
        /// How long nothing had been received.
        silent_for: Duration,
    },
    /// Nothing was received for `suspect_after`.
    Suspect {
        /// How long nothing had been received.
        silent_for: Duration,
    },
    /// Bytes arrived from a peer that was suspect.
    Recovered {
        /// How long the peer had been silent.
        silent_for: Duration,
    },
    /// No application data for `idle_timeout`.
    IdleTimeout {
        /// How long no application data had moved.
        idle_for: Duration,
    },
    /// A PONG answered our PING.
    Rtt {
        /// This sample.
        sample: Duration,
        /// Smoothed RTT (RFC 6298 weights).
        smoothed: Duration,
    },
    /// The peer sends heartbeats far more often than agreed.
    HeartbeatFlood {
        /// Heartbeats counted in the window.
        count: u32,
        /// The window.
        window: Duration,
    },
}

/// The liveness state machine for one connection.
///
/// Compact, because every idle connection of a server keeps one (issue 17): the
/// configuration is shared (`Arc`, one per server), the recorded times are nanosecond
/// offsets from one epoch (`u64`, exact, 584 years of range) instead of `Instant`s, the
/// flood ring keeps millisecond offsets (`u32`, rounded down: never a false flood) from a
/// base that moves forward when 49.7 days of `u32` milliseconds run out, and RTT state
/// exists only when pings are configured.
#[derive(Debug)]
pub struct Liveness {
    cfg: Arc<LivenessConfig>,
    /// The origin of every recorded time below.
    epoch: Instant,
    /// Nanoseconds after `epoch`.
    last_rx: u64,
    last_tx: u64,
    last_app: u64,
    /// Arrival times of the last `FLOOD_LIMIT` heartbeats (a ring; no heap), in milliseconds
    /// after `epoch + ring_base * RING_STEP_MS`, rounded down.
    hb_ring: [u32; FLOOD_LIMIT],
    /// Where the ring's offsets count from, in units of `RING_STEP_MS` after `epoch`.
    ring_base: u32,
    /// Next slot to write; once the ring is full, the oldest arrival.
    hb_next: u8,
    /// Slots filled so far (up to `FLOOD_LIMIT`).
    hb_filled: u8,
    suspect: bool,
    dead: bool,
    idle_fired: bool,
    /// RTT probing (boxed: only with `ping_interval`).
    rtt: Option<Box<Rtt>>,
    /// A `SendHeartbeat` at the front of the queue, kept as a flag when the queue was empty
    /// (set only then, so the order of events is the queue's): every heartbeat answered or
    /// sent passed through the queue, which allocated and freed it each time (issue 17).
    heartbeat_due: bool,
    events: VecDeque<LivenessEvent>,
    /// Counted in 32 bits, saturating (4 billion heartbeats: centuries at any interval a
    /// policy allows; 8 bytes less in every connection).
    heartbeats_sent: u32,
    heartbeats_received: u32,
}

/// A [`Liveness`] with nothing to report, kept compactly (issue 17: a parked connection's
/// engine, see `conn::FrozenConn`): the same recorded times, flood ring, flags and received
/// heartbeats, with the epoch as an 8-byte offset from an origin the holder keeps (not a
/// 16-byte `Instant`) and no event queue (it is empty). [`Liveness::freeze`] /
/// [`FrozenLiveness::thaw`] give back an engine that decides exactly as the one frozen. It
/// answers for its deadlines ([`poll_timeout`](FrozenLiveness::poll_timeout), the same
/// rule as the live engine's) and its last arrival; a read is decided on the engine thawed
/// (`conn::FrozenConn::parked_heartbeats` thaws it on the stack), never on this form.
///
/// 88 B (96 B before): the heartbeats sent are not kept, since a connection publishes them
/// (`ConnStats::heartbeats_out`) and its holder hands them back to
/// [`thaw`](FrozenLiveness::thaw); and the ring's base, its fill and the flags share one
/// word (`Liveness::packed`).
#[derive(Debug)]
pub struct FrozenLiveness {
    cfg: Arc<LivenessConfig>,
    /// The engine's epoch, in nanoseconds after the origin given to `freeze`.
    epoch: i64,
    last_rx: u64,
    last_tx: u64,
    last_app: u64,
    hb_ring: [u32; FLOOD_LIMIT],
    /// `ring_base << 8 | flags << 4 | fill` (see [`Liveness::packed`]).
    packed: u32,
    rtt: Option<Box<Rtt>>,
    /// Not the heartbeats sent: the holder's (see above).
    heartbeats_received: u32,
}

const SUSPECT: u8 = 1;
const DEAD: u8 = 2;
const IDLE_FIRED: u8 = 4;

/// The ring bases a frozen engine keeps (24 bits of `RING_STEP_MS` units: 558 years after
/// the handshake; the recorded times' own range is 584 years).
const FROZEN_RING_BASES: u32 = 1 << 24;

impl Liveness {
    /// Whether [`freeze`](Self::freeze) would succeed: nothing to report (no event waits,
    /// not even a heartbeat to send), and its ring's state fits the frozen form's word
    /// (`packed`: always, short of 558 years after the handshake).
    pub fn can_freeze(&self) -> bool {
        !self.heartbeat_due
            && self.events.is_empty()
            && self.ring_base < FROZEN_RING_BASES
            && (usize::from(self.hb_filled) == FLOOD_LIMIT || self.hb_next == self.hb_filled)
    }

    /// The ring's base, its fill and the flags in one word: `ring_base << 8 | flags << 4 |
    /// fill`. The fill is one number for the two ring positions: until the ring is full,
    /// the next slot to write is the count of slots filled (both start at 0, move up
    /// together and are reset together), so the fill is that count (0..8), and once full
    /// it is 8 + the next slot (the oldest arrival, 8..16). `can_freeze` checks both fit.
    fn packed(&self) -> u32 {
        let fill = if usize::from(self.hb_filled) == FLOOD_LIMIT {
            FLOOD_LIMIT as u32 + u32::from(self.hb_next)
        } else {
            u32::from(self.hb_filled)
        };
        let flags = (u8::from(self.suspect) * SUSPECT)
            | (u8::from(self.dead) * DEAD)
            | (u8::from(self.idle_fired) * IDLE_FIRED);
        (self.ring_base << 8) | (u32::from(flags) << 4) | fill
    }

    /// The engine in its compact form, when it has nothing to report
    /// ([`can_freeze`](Self::can_freeze)); `Err` gives it back otherwise. `origin` is any
    /// instant the holder keeps: [`FrozenLiveness::thaw`] must be given the same one.
    // `Err` is the value given back as it came (boxing it would allocate).
    #[allow(clippy::result_large_err)]
    pub fn freeze(self, origin: Instant) -> Result<FrozenLiveness, Liveness> {
        if !self.can_freeze() {
            return Err(self);
        }
        Ok(self.frozen(origin))
    }

    /// [`freeze`](Self::freeze) for a caller that asked [`can_freeze`](Self::can_freeze)
    /// already (`Conn::freeze`, whose own check includes it).
    pub(crate) fn frozen(self, origin: Instant) -> FrozenLiveness {
        let epoch = crate::offset::offset(origin, self.epoch);
        self.frozen_at(epoch)
    }

    /// [`frozen`](Self::frozen), its epoch given as the offset `frozen` would compute: the
    /// one of the frozen form this engine was thawed from
    /// ([`FrozenLiveness::epoch_offset`]), since nothing but [`start`](Self::start) moves
    /// an epoch and a thawed engine on its way back is not started.
    pub(crate) fn frozen_at(self, epoch: i64) -> FrozenLiveness {
        debug_assert!(self.can_freeze(), "frozen with something to report");
        FrozenLiveness {
            epoch,
            packed: self.packed(),
            cfg: self.cfg,
            last_rx: self.last_rx,
            last_tx: self.last_tx,
            last_app: self.last_app,
            hb_ring: self.hb_ring,
            rtt: self.rtt,
            heartbeats_received: self.heartbeats_received,
        }
    }
}

impl FrozenLiveness {
    /// When anything was last received ([`Liveness::last_rx`]; `origin`: the one given to
    /// [`Liveness::freeze`]).
    pub fn last_rx(&self, origin: Instant) -> Instant {
        crate::offset::instant(origin, self.epoch) + Duration::from_nanos(self.last_rx)
    }

    /// The earliest deadline of any timer, as the engine frozen says
    /// ([`Liveness::poll_timeout`], the same rule); `None` once the peer is dead.
    /// `origin`: the one given to [`Liveness::freeze`].
    pub fn poll_timeout(&self, origin: Instant) -> Option<Instant> {
        self.times()
            .poll_timeout(crate::offset::instant(origin, self.epoch))
    }

    /// [`last_rx`](Self::last_rx) in nanoseconds after the origin given to
    /// [`Liveness::freeze`] (saturating).
    pub fn last_rx_offset(&self) -> i64 {
        self.epoch.saturating_add_unsigned(self.last_rx)
    }

    /// The epoch, in nanoseconds after the origin given to [`Liveness::freeze`].
    pub(crate) fn epoch_offset(&self) -> i64 {
        self.epoch
    }

    /// What the deadlines are derived from.
    fn times(&self) -> Times<'_> {
        let flags = ((self.packed >> 4) & 0xf) as u8;
        Times {
            cfg: &self.cfg,
            last_rx: self.last_rx,
            last_tx: self.last_tx,
            last_app: self.last_app,
            last_ping: self.rtt.as_ref().map(|r| r.last_ping),
            suspect: flags & SUSPECT != 0,
            dead: flags & DEAD != 0,
            idle_fired: flags & IDLE_FIRED != 0,
        }
    }

    /// [`poll_timeout`](Self::poll_timeout) in nanoseconds after the origin given to
    /// [`Liveness::freeze`] (as [`offset`](crate::offset::offset) gives an instant): no
    /// `Instant` made and read back (a parked connection's every wake-up asks). Saturates
    /// at `i64::MAX`.
    pub fn poll_timeout_offset(&self) -> Option<i64> {
        let off = self.times().poll_timeout_off()?;
        Some(self.epoch.saturating_add_unsigned(off))
    }

    /// The engine again, as it was frozen (`origin`: the one given to
    /// [`Liveness::freeze`]; `heartbeats_sent`: what its
    /// [`heartbeats_sent`](Liveness::heartbeats_sent) said when it was frozen, which the
    /// frozen form does not keep). Allocates nothing.
    pub fn thaw(self, origin: Instant, heartbeats_sent: u64) -> Liveness {
        let fill = (self.packed & 0xf) as u8;
        let flags = ((self.packed >> 4) & 0xf) as u8;
        let (hb_filled, hb_next) = if usize::from(fill) >= FLOOD_LIMIT {
            (FLOOD_LIMIT as u8, fill - FLOOD_LIMIT as u8)
        } else {
            (fill, fill)
        };
        Liveness {
            epoch: crate::offset::instant(origin, self.epoch),
            cfg: self.cfg,
            last_rx: self.last_rx,
            last_tx: self.last_tx,
            last_app: self.last_app,
            hb_ring: self.hb_ring,
            ring_base: self.packed >> 8,
            hb_next,
            hb_filled,
            suspect: flags & SUSPECT != 0,
            dead: flags & DEAD != 0,
            idle_fired: flags & IDLE_FIRED != 0,
            rtt: self.rtt,
            heartbeat_due: false,
            events: VecDeque::new(),
            // The engine's count saturates at `u32::MAX`, and so does this.
            heartbeats_sent: u32::try_from(heartbeats_sent).unwrap_or(u32::MAX),
            heartbeats_received: self.heartbeats_received,
        }
    }
}

/// What an engine's deadlines are derived from, in either form ([`Liveness`],
/// [`FrozenLiveness`]): one rule for both.
struct Times<'a> {
    cfg: &'a LivenessConfig,
    last_rx: u64,
    last_tx: u64,
    last_app: u64,
    /// `None` without RTT probing.
    last_ping: Option<u64>,
    suspect: bool,
    dead: bool,
    idle_fired: bool,
}

impl Times<'_> {
    fn deadline(&self, epoch: Instant, timer: Timer) -> Option<Instant> {
        self.deadline_off(timer).map(|off| at(epoch, off))
    }

    /// When `timer` next fires, as an offset from the epoch (saturating): the one rule, which
    /// [`deadline`](Self::deadline) and [`poll_timeout`](Self::poll_timeout) both read.
    fn deadline_off(&self, timer: Timer) -> Option<u64> {
        if self.dead {
            return None;
        }
        let after = |off: u64, d: Duration| off.saturating_add(nanos(d));
        let c = self.cfg;
        match timer {
            Timer::Heartbeat => Some(after(self.last_tx, c.own_heartbeat_after())),
            Timer::Dead => Some(after(self.last_rx, c.dead_after)),
            Timer::Suspect => match (c.suspect_after, self.suspect) {
                (Some(s), false) => Some(after(self.last_rx, s)),
                _ => None,
            },
            Timer::Idle => match (c.idle_timeout, self.idle_fired) {
                (Some(i), false) => Some(after(self.last_app, i)),
                _ => None,
            },
            Timer::Ping => match (c.ping_interval, self.last_ping) {
                (Some(p), Some(l)) => Some(after(l, p)),
                _ => None,
            },
        }
    }

    /// The earliest of the timers' deadlines, found among the offsets (one conversion to an
    /// `Instant`, not one per timer: this runs on every wake-up of every parked connection).
    fn poll_timeout(&self, epoch: Instant) -> Option<Instant> {
        self.poll_timeout_off().map(|off| at(epoch, off))
    }

    /// The earliest of the timers' deadlines as an offset from the epoch.
    fn poll_timeout_off(&self) -> Option<u64> {
        Timer::ALL
            .iter()
            .filter_map(|t| self.deadline_off(*t))
            .min()
    }
}

/// The ring's base moves in steps of 2^20 ms (about 17.5 minutes).
const RING_STEP_MS: u64 = 1 << 20;

/// RTT probing state (only with [`LivenessConfig::ping_interval`]).
#[derive(Debug)]
struct Rtt {
    /// When the last PING went out (nanoseconds after the epoch).
    last_ping: u64,
    /// The PING awaiting its PONG: (nonce, sent at).
    outstanding: Option<(u64, Instant)>,
    next_nonce: u64,
    srtt: Option<Duration>,
}

/// Nanoseconds from `epoch` to `t` (0 for an instant before it; saturates after 584 years).
fn offset(epoch: Instant, t: Instant) -> u64 {
    nanos(t.saturating_duration_since(epoch))
}

/// The instant `off` nanoseconds after `epoch` (the inverse of [`offset`]).
fn at(epoch: Instant, off: u64) -> Instant {
    epoch + Duration::from_nanos(off)
}

/// `d` in nanoseconds (saturating after 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Liveness {
    /// A fresh engine; every clock starts at `now`. `cfg` may be shared by many engines
    /// (a server passes one `Arc` to all its connections).
    pub fn new(now: Instant, cfg: impl Into<Arc<LivenessConfig>>) -> Self {
        let cfg = cfg.into();
        Liveness {
            rtt: cfg.ping_interval.map(|_| {
                Box::new(Rtt {
                    last_ping: 0,
                    outstanding: None,
                    next_nonce: 1,
                    srtt: None,
                })
            }),
            cfg,
            epoch: now,
            last_rx: 0,
            last_tx: 0,
            last_app: 0,
            hb_ring: [0; FLOOD_LIMIT],
            ring_base: 0,
            hb_next: 0,
            hb_filled: 0,
            suspect: false,
            dead: false,
            idle_fired: false,
            heartbeat_due: false,
            events: VecDeque::new(),
            heartbeats_sent: 0,
            heartbeats_received: 0,
        }
    }

    /// (Re)starts the engine with `cfg` at `now`, as when a handshake completes: every clock
    /// but `last_rx` restarts at `now`, and `last_rx` moves up to `now` (the handshake
    /// counted as traffic). What was received before stays recorded in `last_rx` only.
    pub fn start(&mut self, now: Instant, cfg: impl Into<Arc<LivenessConfig>>) {
        let last_rx = self.last_rx().max(now);
        let heartbeats_received = self.heartbeats_received;
        *self = Liveness::new(now, cfg);
        self.last_rx = self.off(last_rx);
        self.heartbeats_received = heartbeats_received;
    }

    /// Nanoseconds from the epoch to `t` (0 before it; saturates 584 years after it). The
    /// rules read `now` once into this and compare offsets: an idle connection's heartbeat
    /// runs them on every arrival, and each comparison of `Instant`s was a conversion.
    pub(crate) fn off(&self, t: Instant) -> u64 {
        offset(self.epoch, t)
    }

    /// The instant `off` nanoseconds after the epoch.
    fn at(&self, off: u64) -> Instant {
        at(self.epoch, off)
    }

    /// The instant the engine was created or last [started](Self::start): every time it
    /// records is kept as an offset from it.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// The configuration in force.
    pub fn config(&self) -> &LivenessConfig {
        &self.cfg
    }

    /// Any byte arrived. Counts as liveness; clears suspicion.
    pub fn on_receive(&mut self, now: Instant) {
        self.on_receive_at(self.off(now));
    }

    /// [`on_receive`](Self::on_receive) at `t` ([`off`](Self::off) of `now`).
    pub(crate) fn on_receive_at(&mut self, t: u64) {
        if self.suspect {
            self.suspect = false;
            self.events.push_back(LivenessEvent::Recovered {
                silent_for: Duration::from_nanos(t.saturating_sub(self.last_rx)),
            });
        }
        self.last_rx = self.last_rx.max(t);
    }

    /// A heartbeat frame arrived (call after [`on_receive`](Self::on_receive)).
    pub fn on_heartbeat_received(&mut self, now: Instant) {
        self.on_heartbeat_received_at(self.off(now));
    }

    /// [`on_heartbeat_received`](Self::on_heartbeat_received) at `t` ([`off`](Self::off)
    /// of `now`).
    pub(crate) fn on_heartbeat_received_at(&mut self, t: u64) {
        self.heartbeats_received = self.heartbeats_received.saturating_add(1);
        // Coalesce: once half an interval has passed since our last send, send ours now, in
        // the same wake-up as the peer's arrival, instead of waking again for it (never less
        // than h/2 after our previous send, PROTOCOL.md §7 rule 1). With a timer at h this is
        // "ours is due within h/2"; a side that answers the peer's heartbeats answers every
        // one the peer sends at its interval, and its own timer (at h + h/8) never fires.
        let half = self.cfg.heartbeat_interval / 2;
        if !self.dead && t >= self.last_tx.saturating_add(nanos(half)) {
            self.last_tx = t;
            self.heartbeats_sent = self.heartbeats_sent.saturating_add(1);
            self.push_heartbeat();
        }
        let Some(h) = self.cfg.enforce_peer_heartbeat else {
            return;
        };
        let window = h * 4;
        let arrival = self.ring_offset(t);
        // Sliding window: a flood is the (FLOOD_LIMIT + 1)-th heartbeat arriving less than
        // `window` after the oldest of the previous FLOOD_LIMIT. (The ring's times are
        // rounded down to the millisecond: a gap is never measured shorter than it was.)
        if self.ring_floods(t, window) {
            self.events.push_back(LivenessEvent::HeartbeatFlood {
                count: FLOOD_LIMIT as u32 + 1,
                window,
            });
            self.hb_filled = 0;
            self.hb_next = 0;
            return;
        }
        self.hb_ring[self.hb_next as usize] = arrival;
        self.hb_next = ((usize::from(self.hb_next) + 1) % FLOOD_LIMIT) as u8;
        self.hb_filled = (self.hb_filled + 1).min(FLOOD_LIMIT as u8);
    }

    /// `now` as a ring offset (milliseconds after the ring's base, rounded down). When it
    /// does not fit a `u32` (49.7 days after the base), the base moves forward to 2^31 ms
    /// (24.8 days) before `now`; ring entries older than the new base are forgotten (they
    /// are too old to be part of a flood for any interval below 6 days, and forgetting only
    /// makes the rule more lenient).
    fn ring_offset(&mut self, t: u64) -> u32 {
        let ms = t / 1_000_000;
        let base = u64::from(self.ring_base) * RING_STEP_MS;
        if let Ok(rel) = u32::try_from(ms - base.min(ms)) {
            return rel;
        }
        let units = ((ms - (1 << 31)) / RING_STEP_MS).min(u64::from(u32::MAX));
        let shift = units * RING_STEP_MS - base;
        let filled = usize::from(self.hb_filled);
        let all_kept = (0..filled).all(|i| u64::from(self.hb_ring[i]) >= shift);
        if all_kept {
            for e in &mut self.hb_ring[..filled] {
                *e -= shift as u32; // ≤ the entry, checked above
            }
        } else {
            self.hb_filled = 0;
            self.hb_next = 0;
        }
        self.ring_base = units as u32; // clamped to u32::MAX above
        u32::try_from(ms - units * RING_STEP_MS).unwrap_or(u32::MAX)
    }

    /// The time a ring offset stands for, in nanoseconds after the epoch.
    fn ring_time(&self, rel: u32) -> u128 {
        (u128::from(self.ring_base) * u128::from(RING_STEP_MS) + u128::from(rel)) * 1_000_000
    }

    /// A frame (of any kind) was queued for sending: postpones the next heartbeat.
    pub fn on_send(&mut self, now: Instant) {
        self.last_tx = self.last_tx.max(self.off(now));
    }

    /// Application data moved (either direction): postpones the idle timeout.
    pub fn on_app_data(&mut self, now: Instant) {
        self.last_app = self.last_app.max(self.off(now));
    }

    /// An application message was sent: [`on_send`](Self::on_send) and
    /// [`on_app_data`](Self::on_app_data) at once (the clock is read into an offset once; a
    /// driver moving a batch of small messages calls this for each).
    pub fn on_app_send(&mut self, now: Instant) {
        let off = self.off(now);
        self.last_tx = self.last_tx.max(off);
        self.last_app = self.last_app.max(off);
    }

    /// A PONG arrived. Unknown nonces are ignored.
    pub fn on_pong(&mut self, now: Instant, nonce: u64) {
        let Some(rtt) = self.rtt.as_deref_mut() else {
            return;
        };
        let Some((n, sent)) = rtt.outstanding else {
            return;
        };
        if n != nonce {
            return;
        }
        rtt.outstanding = None;
        let sample = now.saturating_duration_since(sent);
        let smoothed = match rtt.srtt {
            None => sample,
            Some(s) => (s * 7 + sample) / 8,
        };
        rtt.srtt = Some(smoothed);
        self.events
            .push_back(LivenessEvent::Rtt { sample, smoothed });
    }

    /// Smoothed RTT, once a PONG has been seen.
    pub fn srtt(&self) -> Option<Duration> {
        self.rtt.as_ref().and_then(|r| r.srtt)
    }

    /// When anything was last received.
    pub fn last_rx(&self) -> Instant {
        self.at(self.last_rx)
    }

    /// When anything was last sent.
    pub fn last_tx(&self) -> Instant {
        self.at(self.last_tx)
    }

    /// How long nothing has been received, as of `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_rx())
    }

    /// True once the peer was declared dead.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// True while the peer is suspect.
    pub fn is_suspect(&self) -> bool {
        self.suspect
    }

    /// Heartbeats this engine asked to send.
    pub fn heartbeats_sent(&self) -> u64 {
        self.heartbeats_sent.into()
    }

    /// Heartbeats reported received.
    pub fn heartbeats_received(&self) -> u64 {
        self.heartbeats_received.into()
    }

    /// When `timer` next fires, or `None` when it is off.
    pub fn deadline(&self, timer: Timer) -> Option<Instant> {
        self.times().deadline(self.epoch, timer)
    }

    /// The earliest deadline of any timer; `None` once the peer is dead.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.times().poll_timeout(self.epoch)
    }

    /// What the deadlines are derived from.
    fn times(&self) -> Times<'_> {
        Times {
            cfg: &self.cfg,
            last_rx: self.last_rx,
            last_tx: self.last_tx,
            last_app: self.last_app,
            last_ping: self.rtt.as_ref().map(|r| r.last_ping),
            suspect: self.suspect,
            dead: self.dead,
            idle_fired: self.idle_fired,
        }
    }

    /// Whether a read of whole heartbeats at `t` ([`on_receive`](Self::on_receive), then
    /// [`on_heartbeat_received`](Self::on_heartbeat_received)) reports nothing but, perhaps,
    /// a heartbeat to send, and leaves the engine able to freeze: the check
    /// `FrozenConn::parked_heartbeats` makes before it takes a read on the frozen form.
    /// Conservative: false for a suspect peer (the read reports a recovery), a read the
    /// flood rule would close on, and a ring whose base would move past what the frozen
    /// form keeps (558 years); also false in the one case the rule would not close after
    /// all (the ring's base moves 49.7 days on and forgets every arrival): the caller then
    /// takes the read the full way, which is always right. `t`: `now` read by
    /// [`off`](Self::off).
    pub(crate) fn heartbeat_is_quiet_at(&self, t: u64) -> bool {
        if self.suspect || self.dead {
            return false;
        }
        let Some(h) = self.cfg.enforce_peer_heartbeat else {
            return true;
        };
        let ms = t / 1_000_000;
        ms < u64::from(FROZEN_RING_BASES) * RING_STEP_MS && !self.ring_floods(t, h * 4)
    }

    /// The flood rule: the ring holds `FLOOD_LIMIT` arrivals and the oldest is less than
    /// `window` before `t` (an offset, see [`off`](Self::off)).
    fn ring_floods(&self, t: u64, window: Duration) -> bool {
        usize::from(self.hb_filled) == FLOOD_LIMIT
            && u128::from(t).saturating_sub(self.ring_time(self.hb_ring[self.hb_next as usize]))
                < window.as_nanos()
    }

    /// Acts on every timer whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        if self.deadline(Timer::Dead).is_some_and(|d| now >= d) {
            self.dead = true;
            self.events.push_back(LivenessEvent::PeerDead {
                silent_for: self.silent_for(now),
            });
            return;
        }
        if self.deadline(Timer::Suspect).is_some_and(|d| now >= d) {
            self.suspect = true;
            self.events.push_back(LivenessEvent::Suspect {
                silent_for: self.silent_for(now),
            });
        }
        if self.deadline(Timer::Idle).is_some_and(|d| now >= d) {
            self.idle_fired = true;
            self.events.push_back(LivenessEvent::IdleTimeout {
                idle_for: now.saturating_duration_since(self.at(self.last_app)),
            });
        }
        if self.deadline(Timer::Ping).is_some_and(|d| now >= d) {
            let at = self.off(now);
            if let Some(r) = self.rtt.as_deref_mut() {
                let nonce = r.next_nonce;
                r.next_nonce = r.next_nonce.wrapping_add(1);
                r.outstanding = Some((nonce, now));
                r.last_ping = at;
                self.last_tx = at;
                self.events.push_back(LivenessEvent::SendPing(nonce));
            }
        }
        if self.deadline(Timer::Heartbeat).is_some_and(|d| now >= d) {
            self.last_tx = self.off(now);
            self.heartbeats_sent = self.heartbeats_sent.saturating_add(1);
            self.push_heartbeat();
        }
    }

    /// Queues a `SendHeartbeat` (see `heartbeat_due`).
    fn push_heartbeat(&mut self) {
        if self.events.is_empty() && !self.heartbeat_due {
            self.heartbeat_due = true;
        } else {
            self.events.push_back(LivenessEvent::SendHeartbeat);
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<LivenessEvent> {
        if self.heartbeat_due {
            self.heartbeat_due = false;
            return Some(LivenessEvent::SendHeartbeat);
        }
        let ev = self.events.pop_front();
        if ev.is_none() && self.events.capacity() > 0 {
            // Release the queue: an idle connection holds no event buffer (every heartbeat
            // passes through it, so it would otherwise stay allocated for good).
            self.events = VecDeque::new();
        }
        ev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' origin (the core itself never reads the clock: every call is given `now`).
    #[allow(clippy::disallowed_methods)]
    fn base() -> Instant {
        Instant::now()
    }

    /// The earliest deadline, found among the offsets, is the earliest of the timers'
    /// deadlines, whatever is configured and whatever has fired; the frozen form says the
    /// same.
    #[test]
    fn poll_timeout_is_the_earliest_timer() {
        let t0 = base();
        let origin = t0 + Duration::from_secs(5);
        let ms = Duration::from_millis;
        let mut cases = 0;
        for bits in 0..64u32 {
            let on = |i: u32| bits >> i & 1 == 1;
            let mut c = LivenessConfig::new(ms(2000), ms(6500));
            c.suspect_after = on(0).then(|| ms(3100));
            c.idle_timeout = on(1).then(|| ms(9000));
            c.ping_interval = on(2).then(|| ms(2700));
            c.answer_peer_heartbeat = on(3);
            let cfg = Arc::new(c);
            for (rx, tx, app) in [(0, 0, 0), (1500, 300, 0), (700, 2600, 5000), (9000, 10, 4)] {
                let mut l = Liveness::new(t0, cfg.clone());
                l.on_receive(t0 + ms(rx));
                l.on_send(t0 + ms(tx));
                l.on_app_data(t0 + ms(app));
                l.suspect = on(4);
                l.idle_fired = on(5);
                let earliest = Timer::ALL.iter().filter_map(|t| l.deadline(*t)).min();
                assert_eq!(l.poll_timeout(), earliest, "{bits:b} {rx} {tx} {app}");
                let sent = l.heartbeats_sent();
                let f = l.freeze(origin).expect("nothing to report");
                assert_eq!(f.poll_timeout(origin), earliest);
                let mut l = f.thaw(origin, sent);
                l.dead = true;
                assert_eq!(l.poll_timeout(), None);
                cases += 1;
            }
        }
        assert_eq!(cases, 256);
    }

    /// The frozen form's packed word gives back every ring state, flag and base the engine
    /// can freeze with (the world tests in `tests/frozen.rs` never move the ring's base: it
    /// takes 49.7 days), and an engine whose base does not fit keeps its live form.
    #[test]
    fn a_frozen_engine_keeps_its_ring_flags_and_base() {
        let origin = base();
        let cfg = Arc::new(LivenessConfig::new(
            Duration::from_secs(1),
            Duration::from_secs(3),
        ));
        let mut cases = 0;
        for filled in 0..=FLOOD_LIMIT as u8 {
            let nexts = if usize::from(filled) == FLOOD_LIMIT {
                0..FLOOD_LIMIT as u8
            } else {
                filled..filled + 1
            };
            for next in nexts {
                for flags in 0..8u8 {
                    for base in [0, 1, 0x12_3456, FROZEN_RING_BASES - 1] {
                        let mut l = Liveness::new(origin, cfg.clone());
                        l.hb_ring = [3, 1, 4, 1, 5, 9, 2, 6];
                        l.hb_filled = filled;
                        l.hb_next = next;
                        l.suspect = flags & SUSPECT != 0;
                        l.dead = flags & DEAD != 0;
                        l.idle_fired = flags & IDLE_FIRED != 0;
                        l.ring_base = base;
                        l.heartbeats_sent = u32::from(flags) * 1000 + u32::from(next);
                        l.heartbeats_received = base;
                        let before = format!("{l:?}");
                        let sent = l.heartbeats_sent();
                        let l = l
                            .freeze(origin)
                            .expect("nothing to report")
                            .thaw(origin, sent);
                        assert_eq!(format!("{l:?}"), before);
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, (8 + 8) * 8 * 4);

        let mut l = Liveness::new(origin, cfg);
        l.ring_base = FROZEN_RING_BASES;
        assert!(!l.can_freeze());
        let l = l.freeze(origin).expect_err("its base does not fit");
        assert_eq!(l.ring_base, FROZEN_RING_BASES);
        // The count sent saturates as the engine's does.
        let mut l = l;
        l.ring_base = 0;
        let l = l.freeze(origin).expect("fits").thaw(origin, u64::MAX);
        assert_eq!(l.heartbeats_sent(), u64::from(u32::MAX));
    }
}
