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
#[derive(Debug)]
pub struct Liveness {
    cfg: LivenessConfig,
    last_rx: Instant,
    last_tx: Instant,
    last_app: Instant,
    last_ping: Instant,
    suspect: bool,
    dead: bool,
    idle_fired: bool,
    outstanding_ping: Option<(u64, Instant)>,
    next_nonce: u64,
    srtt: Option<Duration>,
    /// Arrival instants of the last `FLOOD_LIMIT` heartbeats (a ring; no heap).
    hb_ring: [Instant; FLOOD_LIMIT],
    /// Next slot to write; once the ring is full, the oldest arrival.
    hb_next: usize,
    /// Slots filled so far (up to `FLOOD_LIMIT`).
    hb_filled: usize,
    events: VecDeque<LivenessEvent>,
    heartbeats_sent: u64,
    heartbeats_received: u64,
}

impl Liveness {
    /// A fresh engine; every clock starts at `now`.
    pub fn new(now: Instant, cfg: LivenessConfig) -> Self {
        Liveness {
            cfg,
            last_rx: now,
            last_tx: now,
            last_app: now,
            last_ping: now,
            suspect: false,
            dead: false,
            idle_fired: false,
            outstanding_ping: None,
            next_nonce: 1,
            srtt: None,
            hb_ring: [now; FLOOD_LIMIT],
            hb_next: 0,
            hb_filled: 0,
            events: VecDeque::new(),
            heartbeats_sent: 0,
            heartbeats_received: 0,
        }
    }

    /// (Re)starts the engine with `cfg` at `now`, as when a handshake completes: every clock
    /// but `last_rx` restarts at `now`, and `last_rx` moves up to `now` (the handshake
    /// counted as traffic). What was received before stays recorded in `last_rx` only.
    pub fn start(&mut self, now: Instant, cfg: LivenessConfig) {
        let last_rx = self.last_rx.max(now);
        let heartbeats_received = self.heartbeats_received;
        *self = Liveness::new(now, cfg);
        self.last_rx = last_rx;
        self.heartbeats_received = heartbeats_received;
    }

    /// The configuration in force.
    pub fn config(&self) -> &LivenessConfig {
        &self.cfg
    }

    /// Any byte arrived. Counts as liveness; clears suspicion.
    pub fn on_receive(&mut self, now: Instant) {
        if self.suspect {
            self.suspect = false;
            self.events.push_back(LivenessEvent::Recovered {
                silent_for: now.saturating_duration_since(self.last_rx),
            });
        }
        if now > self.last_rx {
            self.last_rx = now;
        }
    }

    /// A heartbeat frame arrived (call after [`on_receive`](Self::on_receive)).
    pub fn on_heartbeat_received(&mut self, now: Instant) {
        self.heartbeats_received += 1;
        // Coalesce: once half an interval has passed since our last send, send ours now, in
        // the same wake-up as the peer's arrival, instead of waking again for it (never less
        // than h/2 after our previous send, PROTOCOL.md §7 rule 1). With a timer at h this is
        // "ours is due within h/2"; a side that answers the peer's heartbeats answers every
        // one the peer sends at its interval, and its own timer (at h + h/8) never fires.
        let half = self.cfg.heartbeat_interval / 2;
        if !self.dead && now >= self.last_tx + half {
            self.last_tx = now;
            self.heartbeats_sent += 1;
            self.events.push_back(LivenessEvent::SendHeartbeat);
        }
        let Some(h) = self.cfg.enforce_peer_heartbeat else {
            return;
        };
        let window = h * 4;
        // Sliding window: a flood is the (FLOOD_LIMIT + 1)-th heartbeat arriving less than
        // `window` after the oldest of the previous FLOOD_LIMIT.
        if self.hb_filled == FLOOD_LIMIT
            && now.saturating_duration_since(self.hb_ring[self.hb_next]) < window
        {
            self.events.push_back(LivenessEvent::HeartbeatFlood {
                count: FLOOD_LIMIT as u32 + 1,
                window,
            });
            self.hb_filled = 0;
            self.hb_next = 0;
            return;
        }
        self.hb_ring[self.hb_next] = now;
        self.hb_next = (self.hb_next + 1) % FLOOD_LIMIT;
        self.hb_filled = (self.hb_filled + 1).min(FLOOD_LIMIT);
    }

    /// A frame (of any kind) was queued for sending: postpones the next heartbeat.
    pub fn on_send(&mut self, now: Instant) {
        if now > self.last_tx {
            self.last_tx = now;
        }
    }

    /// Application data moved (either direction): postpones the idle timeout.
    pub fn on_app_data(&mut self, now: Instant) {
        if now > self.last_app {
            self.last_app = now;
        }
    }

    /// A PONG arrived. Unknown nonces are ignored.
    pub fn on_pong(&mut self, now: Instant, nonce: u64) {
        let Some((n, sent)) = self.outstanding_ping else {
            return;
        };
        if n != nonce {
            return;
        }
        self.outstanding_ping = None;
        let sample = now.saturating_duration_since(sent);
        let smoothed = match self.srtt {
            None => sample,
            Some(s) => (s * 7 + sample) / 8,
        };
        self.srtt = Some(smoothed);
        self.events
            .push_back(LivenessEvent::Rtt { sample, smoothed });
    }

    /// Smoothed RTT, once a PONG has been seen.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// When anything was last received.
    pub fn last_rx(&self) -> Instant {
        self.last_rx
    }

    /// When anything was last sent.
    pub fn last_tx(&self) -> Instant {
        self.last_tx
    }

    /// How long nothing has been received, as of `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_rx)
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
        self.heartbeats_sent
    }

    /// Heartbeats reported received.
    pub fn heartbeats_received(&self) -> u64 {
        self.heartbeats_received
    }

    /// When `timer` next fires, or `None` when it is off.
    pub fn deadline(&self, timer: Timer) -> Option<Instant> {
        if self.dead {
            return None;
        }
        match timer {
            Timer::Heartbeat => Some(self.last_tx + self.cfg.own_heartbeat_after()),
            Timer::Dead => Some(self.last_rx + self.cfg.dead_after),
            Timer::Suspect => match (self.cfg.suspect_after, self.suspect) {
                (Some(s), false) => Some(self.last_rx + s),
                _ => None,
            },
            Timer::Idle => match (self.cfg.idle_timeout, self.idle_fired) {
                (Some(i), false) => Some(self.last_app + i),
                _ => None,
            },
            Timer::Ping => self.cfg.ping_interval.map(|p| self.last_ping + p),
        }
    }

    /// The earliest deadline of any timer; `None` once the peer is dead.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::ALL.iter().filter_map(|t| self.deadline(*t)).min()
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
                idle_for: now.saturating_duration_since(self.last_app),
            });
        }
        if self.deadline(Timer::Ping).is_some_and(|d| now >= d) {
            let nonce = self.next_nonce;
            self.next_nonce = self.next_nonce.wrapping_add(1);
            self.outstanding_ping = Some((nonce, now));
            self.last_ping = now;
            self.last_tx = now;
            self.events.push_back(LivenessEvent::SendPing(nonce));
        }
        if self.deadline(Timer::Heartbeat).is_some_and(|d| now >= d) {
            self.last_tx = now;
            self.heartbeats_sent += 1;
            self.events.push_back(LivenessEvent::SendHeartbeat);
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<LivenessEvent> {
        let ev = self.events.pop_front();
        if ev.is_none() && self.events.capacity() > 0 {
            // Release the queue: an idle connection holds no event buffer (every heartbeat
            // passes through it, so it would otherwise stay allocated for good).
            self.events = VecDeque::new();
        }
        ev
    }
}
