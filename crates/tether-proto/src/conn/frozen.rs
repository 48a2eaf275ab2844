//! A quiescent connection in a compact form (issue 17): what a server keeps for each parked
//! connection between two wake-ups.
//!
//! A quiescent connection ([`Conn::is_quiescent`]: established, nothing to transmit, no frame
//! received in part, no event waiting) holds mostly nothing: empty buffers and queues, flags
//! that only the handshake or a read in progress sets. [`Conn::freeze`] keeps what is live —
//! the shared configuration, the liveness engine's recorded times, flood ring, flags and
//! received heartbeats ([`FrozenLiveness`]: its epoch an 8-byte offset, no event queue), the
//! session and credential boxes (pointers), the decoder's bulk-stream state and the few
//! flags that can differ — and [`FrozenConn::thaw`] rebuilds the `Conn`:
//!
//! ```text
//!  Conn (360 B)                                     FrozenConn (120 B)
//!  cfg, role, flags ───────────────────────────────▶ cfg, flags
//!  liveness (144 B: epoch Instant, event queue) ───▶ FrozenLiveness (88 B: epoch offset)
//!  session, cred (boxes) ──────────────────────────▶ session, cred (the same boxes)
//!  decoder (empty) ────────────────────────────────▶ its bulk-stream state (4 B)
//!  counters (40 B), heartbeats sent (liveness) ────▶ not kept: the holder's (`thaw` takes them)
//!  out, queued, events, frame head (all empty),
//!  handshake-only fields (local, peer_resume)     ─▶ rebuilt empty by `thaw`
//! ```
//!
//! The counters ([`Conn::stats`], the liveness engine's heartbeats sent among them) are not
//! kept (48 B of every parked connection, issue 17): a driver publishes them after every
//! wake-up anyway (tether's per-connection stats, which its handles read), so it hands them
//! back to [`FrozenConn::thaw`] from there.
//!
//! One read is taken on the frozen form, the commonest wake-up of an idle server
//! connection: whole heartbeats the liveness engine has nothing to say about but, perhaps,
//! an answer ([`FrozenConn::parked_heartbeats`]). It is the one engine still: the liveness
//! engine is thawed on the stack (no allocation) and the read goes through its own
//! `on_receive` and `on_heartbeat_received`, the decoder's bulk-stream state through the
//! decoder; anything else (a recovery, a flood, more than heartbeats) is left untouched
//! for the thawed connection. For everything else the driver thaws it (no allocation: the
//! empty buffers and queues are not allocated) and runs the parked path
//! ([`Conn::parked_input`], [`Conn::parked_timeout`]) or the full one, then freezes it again
//! if it is still quiescent. The tests (`tests/frozen.rs`, and `parked.rs`'s) hold a
//! connection frozen and thawed at every quiescent point, and woken on its frozen form, to
//! a connection never frozen: the same bytes, events, deadlines and counters, and the same
//! fields.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use crate::codec::{self, Decoder, HEADER_LEN};
use crate::liveness::{FrozenLiveness, LivenessEvent};
use crate::session::Session;

use super::{credential, parked, Conn, ConnConfig, ConnStats, Counters, Role, State};

/// A quiescent [`Conn`] in its compact form (see the module docs). Made by
/// [`Conn::freeze`]; [`thaw`](Self::thaw) gives back the connection.
#[derive(Debug)]
pub struct FrozenConn {
    cfg: Arc<ConnConfig>,
    liveness: FrozenLiveness,
    session: Option<Box<Session>>,
    cred: Option<Box<credential::CredentialState>>,
    /// The decoder's state between frames ([`Decoder::idle_state`]).
    bulk: u32,
    /// `CLIENT | CLOSE_RECEIVED | HEARTBEAT_IN_READ | APP_DATA_IN_READ | WANT_SESSION`, and
    /// in bits 5-6 how many bytes of an answered heartbeat did not go out
    /// ([`FrozenStep::Unsent`]; [`thaw`](FrozenConn::thaw) queues them).
    flags: u8,
}

/// What [`FrozenConn::parked_heartbeats`] made of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrozenStep {
    /// Not taken, nothing changed: more than whole heartbeats, or a read the liveness
    /// engine reports on (a suspect peer's recovery, a flood). Thaw the connection and
    /// hand it the same bytes ([`Conn::parked_input`] or the full path).
    NotHandled,
    /// Taken: counted, arrival recorded, the answer (when one was due) written in full.
    /// Still frozen and quiescent; its deadline is [`FrozenConn::poll_timeout`].
    Parked,
    /// Taken, but the answer did not all go out: the rest is kept, and
    /// [`thaw`](FrozenConn::thaw) puts it in the transmit queue. Thaw now and let a full
    /// wake-up write it (or meet the error).
    Unsent,
}

/// A HEARTBEAT frame: a length header of 0.
const HEARTBEAT: [u8; HEADER_LEN] = [0; HEADER_LEN];

const CLIENT: u8 = 1;
const CLOSE_RECEIVED: u8 = 2;
const HEARTBEAT_IN_READ: u8 = 4;
const APP_DATA_IN_READ: u8 = 8;
const WANT_SESSION: u8 = 16;
/// Where the count of an answer's bytes not written sits in `flags` (2 bits: 0-3).
const UNSENT_SHIFT: u8 = 5;

impl Conn {
    /// Whether [`freeze`](Self::freeze) would succeed: quiescent
    /// ([`is_quiescent`](Self::is_quiescent)), past the handshake, and its liveness engine
    /// has nothing to report. A driver that keeps only frozen connections while they wait
    /// asks this before it parks one.
    pub fn can_freeze(&self) -> bool {
        self.is_quiescent()
            && self.decoder.idle_state().is_some()
            && self.was_established
            && !self.handshaking
            && !self.handed_off
            && self.local.is_none()
            && self.liveness.can_freeze()
    }

    /// The connection in its compact form, when it can be
    /// ([`can_freeze`](Self::can_freeze)); `Err` gives it back unchanged otherwise.
    /// `origin` is any instant the holder keeps (a driver's process-wide origin):
    /// [`FrozenConn::thaw`] must be given the same one.
    ///
    /// Empty buffers' capacity is released (an idle connection holds none anyway).
    // `Err` is the value given back as it came (boxing it would allocate).
    #[allow(clippy::result_large_err)]
    pub fn freeze(self, origin: Instant) -> Result<FrozenConn, Conn> {
        let Some(bulk) = self.decoder.idle_state().filter(|_| self.can_freeze()) else {
            return Err(self);
        };
        let Conn {
            role,
            cfg,
            state: _,
            decoder: _,
            out: _,
            queued: _,
            events: _,
            liveness,
            was_established: _,
            handshaking: _,
            local: _,
            close_received,
            handed_off: _,
            heartbeat_in_this_read,
            app_data_in_this_read,
            frame_head: _,
            frame_head_got: _,
            session,
            want_session,
            peer_resume: _,
            cred,
            stats: _,
        } = self;
        // `can_freeze` above asked the engine too.
        let liveness = liveness.frozen(origin);
        // Dropped: `out`, `queued`, `events` and the decoder are empty; `frame_head` is not
        // read while `frame_head_got` is 0 (it is whenever the decoder holds nothing);
        // `peer_resume` is read only by `accept`, before the handshake completes; the
        // counters are the holder's to give back to `thaw`.
        let flag = |b: bool, f: u8| if b { f } else { 0 };
        let flags = flag(role == Role::Client, CLIENT)
            | flag(close_received, CLOSE_RECEIVED)
            | flag(heartbeat_in_this_read, HEARTBEAT_IN_READ)
            | flag(app_data_in_this_read, APP_DATA_IN_READ)
            | flag(want_session, WANT_SESSION);
        Ok(FrozenConn {
            cfg,
            liveness,
            session,
            cred,
            bulk,
            flags,
        })
    }
}

impl FrozenConn {
    /// The connection again, equal in behaviour to the one frozen (`origin`: the one given
    /// to [`Conn::freeze`]; `counters`: what its [`Conn::stats`] said when it was frozen,
    /// which the frozen form does not keep — `heartbeats_out` is the liveness engine's own
    /// count, given back to it). Allocates nothing (but the few bytes of an answer that did
    /// not all go out, [`FrozenStep::Unsent`], which it queues to transmit).
    pub fn thaw(self, origin: Instant, counters: &ConnStats) -> Conn {
        let has = |f: u8| self.flags & f != 0;
        Conn {
            role: if has(CLIENT) {
                Role::Client
            } else {
                Role::Server
            },
            decoder: Decoder::resumed(self.cfg.max_frame_len, self.bulk),
            state: State::Established,
            out: match usize::from(self.flags >> UNSENT_SHIFT) {
                0 => BytesMut::new(),
                n => BytesMut::from(&HEARTBEAT[HEADER_LEN - n..]),
            },
            queued: None,
            events: std::collections::VecDeque::new(),
            liveness: self.liveness.thaw(origin, counters.heartbeats_out),
            was_established: true,
            handshaking: false,
            local: None,
            close_received: has(CLOSE_RECEIVED),
            handed_off: false,
            heartbeat_in_this_read: has(HEARTBEAT_IN_READ),
            app_data_in_this_read: has(APP_DATA_IN_READ),
            frame_head: [0; codec::HEADER_LEN],
            frame_head_got: 0,
            want_session: has(WANT_SESSION),
            peer_resume: 0,
            session: self.session,
            cred: self.cred,
            stats: Counters {
                messages_in: counters.messages_in,
                messages_out: counters.messages_out,
                bytes_in: counters.bytes_in,
                bytes_out: counters.bytes_out,
                heartbeats_in: counters.heartbeats_in,
            },
            cfg: self.cfg,
        }
    }
}

impl FrozenConn {
    fn role(&self) -> Role {
        if self.flags & CLIENT != 0 {
            Role::Client
        } else {
            Role::Server
        }
    }

    /// When the connection next needs [`Conn::handle_timeout`]: what the thawed connection's
    /// [`Conn::poll_timeout`] says, by the same rules (`origin`: the one given to
    /// [`Conn::freeze`]).
    pub fn poll_timeout(&self, origin: Instant) -> Option<Instant> {
        let role = self.role();
        super::earliest(
            self.liveness.poll_timeout(origin),
            self.session.as_deref(),
            self.cred.as_deref().and_then(|c| c.deadline(role)),
        )
    }

    /// [`poll_timeout`](Self::poll_timeout) in nanoseconds after `origin` (as
    /// [`offset`](crate::offset::offset) gives an instant; saturating): the liveness
    /// engine's deadline without an `Instant` made and read back (a parked connection's
    /// every wake-up asks), the session's and the credential's converted when they exist.
    pub fn poll_timeout_offset(&self, origin: Instant) -> Option<i64> {
        let live = self.liveness.poll_timeout_offset();
        let role = self.role();
        let rest = match (&self.session, &self.cred) {
            (None, None) => None,
            (s, c) => super::earliest(
                None,
                s.as_deref(),
                c.as_deref().and_then(|c| c.deadline(role)),
            )
            .map(|t| crate::offset::offset(origin, t)),
        };
        [live, rest].into_iter().flatten().min()
    }

    /// [`last_rx`](Self::last_rx) in nanoseconds after the origin given to
    /// [`Conn::freeze`] (as [`offset`](crate::offset::offset) gives it; saturating).
    pub fn last_rx_offset(&self) -> i64 {
        self.liveness.last_rx_offset()
    }

    /// When anything was last received (the liveness engine's record; `origin`: the one
    /// given to [`Conn::freeze`]).
    pub fn last_rx(&self, origin: Instant) -> Instant {
        self.liveness.last_rx(origin)
    }

    /// A parked connection's read, taken on the frozen form when it is whole heartbeats
    /// that the liveness engine reports nothing on but, perhaps, a heartbeat to answer:
    /// what [`Conn::parked_input`] does with the same bytes, without the thaw, the full
    /// decoder and the freeze (issue 17: an idle server's commonest wake-up). `counters`
    /// are the connection's, as [`thaw`](Self::thaw) takes them: the read is counted there
    /// (bytes and heartbeats in; the answer's heartbeat and the bytes written out). An answer goes to `write`, which says how many of its bytes it
    /// wrote; what it did not write is kept ([`FrozenStep::Unsent`]).
    ///
    /// One engine: the liveness engine is thawed on the stack (no allocation) and the
    /// read goes through its own `on_receive` and `on_heartbeat_received`, the decoder's
    /// bulk-stream state through the decoder; the equivalence tests hold the result to
    /// the full path's, byte for byte.
    pub fn parked_heartbeats(
        self,
        origin: Instant,
        now: Instant,
        data: &[u8],
        counters: &mut ConnStats,
        write: impl FnOnce(&[u8]) -> usize,
    ) -> (FrozenConn, FrozenStep) {
        if self.flags >> UNSENT_SHIFT != 0 || !parked::only_heartbeats(data) {
            return (self, FrozenStep::NotHandled);
        }
        let epoch = self.liveness.epoch_offset();
        let mut l = self.liveness.thaw(origin, counters.heartbeats_out);
        let mut step = FrozenStep::NotHandled;
        let (mut bulk, mut flags) = (self.bulk, self.flags);
        // `now` read once into the engine's terms, for its three rules.
        let t = l.off(now);
        if l.heartbeat_is_quiet_at(t) {
            // The decoder, for its bulk-stream state (each small frame counts a bulk stream
            // down) and the count; whole heartbeats decode without error or allocation.
            let mut decoder = Decoder::resumed(self.cfg.max_frame_len, bulk);
            let heartbeats = decoder.decode(data, |_| true).map_or(0, |s| s.heartbeats);
            bulk = decoder.idle_state().unwrap_or(bulk);
            counters.bytes_in += data.len() as u64;
            counters.heartbeats_in += heartbeats as u64;
            l.on_receive_at(t);
            // Heartbeats read together count once towards the flood rule (as in full).
            l.on_heartbeat_received_at(t);
            flags = (flags | HEARTBEAT_IN_READ) & !APP_DATA_IN_READ;
            counters.heartbeats_out = l.heartbeats_sent();
            step = FrozenStep::Parked;
            // `heartbeat_is_quiet_at`: nothing else to report.
            if l.poll_event() == Some(LivenessEvent::SendHeartbeat) {
                let n = write(&HEARTBEAT).min(HEADER_LEN);
                counters.bytes_out += n as u64;
                if n < HEADER_LEN {
                    flags |= ((HEADER_LEN - n) as u8) << UNSENT_SHIFT;
                    step = FrozenStep::Unsent;
                }
            }
            debug_assert!(l.poll_event().is_none(), "a quiet read reported more");
        }
        let frozen = FrozenConn {
            liveness: l.frozen_at(epoch),
            bulk,
            flags,
            ..self
        };
        (frozen, step)
    }
}
