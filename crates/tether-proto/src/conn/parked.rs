//! A parked connection's liveness-only wake-ups (issue 17): the decision a driver's lot
//! asks the core for before it runs a full wake-up.
//!
//! An idle server connection wakes for its client's heartbeat (every interval) and for its
//! own fallback heartbeat; neither touches anything but the liveness engine and the
//! transmit buffer. A driver that holds such a connection outside a task of its own (the
//! tokio driver's lot) asks the core whether what woke it is that and nothing more:
//!
//! ```text
//!  bytes read ──▶ parked_input ──▶ Answered      liveness updated, the answer (if any)
//!  deadline   ──▶ parked_timeout ─┘              queued: write it, stay parked
//!                                ├─▶ NeedsDriver  handled, but there is more to do (an event
//!                                │                for the application, the end): full wake-up
//!                                └─▶ NotLiveness  (input only) untouched: hand the same bytes
//!                                                 to the full wake-up, none lost
//! ```
//!
//! Both run the very code a full wake-up runs ([`Conn::handle_input`],
//! [`Conn::handle_timeout`]); what they add is the check that the outcome needs nothing of
//! the driver but a write. So the replies, deadlines and counters are those of the full
//! path by construction, and the tests below hold them to it.

use std::time::Instant;

use crate::codec::HEADER_LEN;

use super::Conn;

/// What a parked connection's wake-up made of its input or deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkedStep {
    /// Handled: liveness updated and counted; what the connection answers (a heartbeat, an
    /// ACK) is in the transmit queue. Nothing else waits: once that is written the
    /// connection is quiescent again.
    Answered,
    /// Handled, and the connection has more to do than a write: an event for the
    /// application (a recovery, the end), or it closed. The driver runs a full wake-up.
    NeedsDriver,
    /// Not handled (input only): more than whole heartbeats, or the connection was not
    /// quiescent. Nothing was consumed: the driver hands the same bytes to a full wake-up.
    NotLiveness,
}

/// True when `data` is whole HEARTBEAT frames and nothing else (a heartbeat is a length
/// header of 0).
pub(super) fn only_heartbeats(data: &[u8]) -> bool {
    !data.is_empty() && data.len() % HEADER_LEN == 0 && data.iter().all(|b| *b == 0)
}

impl Conn {
    /// Bytes read for a parked connection (see the module docs): handled here when they are
    /// whole heartbeats and the connection was quiescent ([`Conn::is_quiescent`]), left
    /// untouched otherwise ([`ParkedStep::NotLiveness`]).
    pub fn parked_input(&mut self, now: Instant, data: &[u8]) -> ParkedStep {
        if !self.is_quiescent() || !only_heartbeats(data) {
            return ParkedStep::NotLiveness;
        }
        self.handle_input(now, data);
        self.parked_outcome()
    }

    /// A parked connection's deadline is due (or may be: harmless when nothing is):
    /// [`Conn::handle_timeout`], and whether what it did needs more than a write. The
    /// fallback heartbeat is [`ParkedStep::Answered`]; dead-after, an idle timeout, a
    /// suspicion or an expired credential are [`ParkedStep::NeedsDriver`] (the end, or the
    /// event, goes through the driver's one path).
    pub fn parked_timeout(&mut self, now: Instant) -> ParkedStep {
        if !self.is_quiescent() {
            return ParkedStep::NeedsDriver;
        }
        self.handle_timeout(now);
        self.parked_outcome()
    }

    fn parked_outcome(&self) -> ParkedStep {
        if self.is_established()
            && self.events.is_empty()
            && self.decoder.buffered() == 0
            && self.queued.is_none()
        {
            ParkedStep::Answered
        } else {
            ParkedStep::NeedsDriver
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::codec::{self, Frame, Hello, PREAMBLE_LEN};
    use crate::conn::{ConnConfig, ConnEvent, Role};
    use crate::liveness::LivenessConfig;
    use crate::reason::DisconnectReason;

    const HB: [u8; 4] = [0; 4];

    /// The tests' origin (the core itself never reads the clock: every call is given `now`).
    #[allow(clippy::disallowed_methods)]
    fn base() -> Instant {
        Instant::now()
    }

    fn server_cfg(h: Duration, dead: Duration, enforce: bool) -> Arc<LivenessConfig> {
        let mut c = LivenessConfig::new(h, dead);
        c.answer_peer_heartbeat = true;
        if enforce {
            c.enforce_peer_heartbeat = Some(h);
        }
        Arc::new(c)
    }

    /// An established, quiescent server connection.
    fn established(t0: Instant, cfg: Arc<LivenessConfig>) -> Conn {
        let mut c = Conn::server(t0, ConnConfig::default());
        let mut hello = bytes::BytesMut::new();
        codec::encode_preamble(&mut hello);
        let h = Hello {
            client_id: "c".into(),
            requested_heartbeat: Duration::ZERO,
            want_session: false,
            resume: None,
            credential: None,
        };
        codec::encode(&Frame::Hello(h), &mut hello);
        assert!(hello.len() > PREAMBLE_LEN);
        c.handle_input(t0, &hello);
        assert!(matches!(c.poll_event(), Some(ConnEvent::Hello(_))));
        c.accept(t0, cfg, None);
        while c.poll_event().is_some() {}
        let n = c.pending_transmit_len();
        c.transmitted(n);
        assert!(c.is_quiescent());
        c
    }

    fn take_out(c: &mut Conn) -> Vec<u8> {
        let v = c.pending_transmit().to_vec();
        c.transmitted(v.len());
        v
    }

    fn events(c: &mut Conn) -> Vec<ConnEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    /// A small deterministic generator (xorshift): the property tests need no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Random heartbeat sequences (1-3 frames a read, random gaps, deadlines fired when
    /// due) through the parked path and through the full one: the same replies, deadlines,
    /// counters and events at every step, and the parked path never leaves one behind.
    #[test]
    fn parked_path_matches_the_full_connection() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let t0 = base();
            let h = Duration::from_millis(1000 + rng.next() % 4000);
            let cfg = server_cfg(h, h * 3, seed % 2 == 0);
            let mut parked = established(t0, cfg.clone());
            let mut full = established(t0, cfg);
            let mut now = t0;
            for _ in 0..60 {
                // Mostly around the interval, sometimes a flood, sometimes past dead-after.
                let gap = match rng.next() % 10 {
                    0 => rng.next() % 50,
                    1 => h.as_millis() as u64 * 4,
                    _ => h.as_millis() as u64 / 2 + rng.next() % h.as_millis() as u64,
                };
                let next = now + Duration::from_millis(gap);
                // Deadlines due before the next read, in order.
                while let Some(d) = full.poll_timeout().filter(|d| *d <= next) {
                    assert_eq!(parked.poll_timeout(), Some(d), "seed {seed}");
                    now = d;
                    full.handle_timeout(now);
                    let step = parked.parked_timeout(now);
                    assert_eq!(take_out(&mut parked), take_out(&mut full), "seed {seed}");
                    let (pe, fe) = (events(&mut parked), events(&mut full));
                    assert_eq!(pe, fe, "seed {seed}");
                    assert_eq!(
                        step == ParkedStep::Answered,
                        fe.is_empty() && !full.is_closed()
                    );
                    if full.is_closed() {
                        break;
                    }
                }
                if full.is_closed() {
                    assert!(parked.is_closed());
                    break;
                }
                now = next;
                let k = 1 + (rng.next() % 3) as usize;
                let data: Vec<u8> = HB.repeat(k);
                full.handle_input(now, &data);
                let step = parked.parked_input(now, &data);
                assert_ne!(step, ParkedStep::NotLiveness, "seed {seed}");
                assert_eq!(take_out(&mut parked), take_out(&mut full), "seed {seed}");
                let (pe, fe) = (events(&mut parked), events(&mut full));
                assert_eq!(
                    step == ParkedStep::Answered,
                    fe.is_empty() && !full.is_closed()
                );
                assert_eq!(pe, fe, "seed {seed}");
                assert_eq!(parked.poll_timeout(), full.poll_timeout(), "seed {seed}");
                assert_eq!(parked.stats(), full.stats(), "seed {seed}");
                assert_eq!(parked.last_rx(), full.last_rx(), "seed {seed}");
                if full.is_closed() {
                    break;
                }
            }
            assert_eq!(parked.stats(), full.stats(), "seed {seed}");
            assert_eq!(parked.is_closed(), full.is_closed(), "seed {seed}");
        }
    }

    /// Reads taken on the frozen form (`FrozenConn::parked_heartbeats`) leave the connection
    /// as the full path does, field for field (its `Debug`: the decoder's bulk-stream state
    /// and the read flags too, which the world tests in `tests/frozen.rs` cannot observe),
    /// with the same bytes out; a read it does not take (a flood) goes on through
    /// `parked_input` as before. Half the seeds begin with a large message, so the
    /// heartbeats count a bulk stream down.
    #[test]
    fn a_read_taken_frozen_leaves_what_the_full_path_leaves() {
        use crate::conn::FrozenStep;
        let mut taken = 0;
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let t0 = base();
            // Either side of the connections' epoch.
            let origin = t0 + Duration::from_secs(rng.next() % 20);
            let h = Duration::from_millis(1000 + rng.next() % 4000);
            let cfg = server_cfg(h, h * 3, seed % 2 == 0);
            let mut full = established(t0, cfg.clone());
            let mut other = established(t0, cfg);
            if seed % 4 < 2 {
                let mut big = bytes::BytesMut::new();
                let payload = bytes::Bytes::from(vec![7u8; codec::LARGE_FRAME]);
                codec::encode(&Frame::Data(payload), &mut big);
                for c in [&mut full, &mut other] {
                    c.handle_input(t0, &big);
                    assert_eq!(events(c).len(), 1, "the message");
                }
            }
            let mut now = t0;
            for _ in 0..40 {
                let gap = match rng.next() % 8 {
                    0 => rng.next() % 50,
                    _ => h.as_millis() as u64 / 4 + rng.next() % h.as_millis() as u64,
                };
                now += Duration::from_millis(gap);
                // What is due first, the same way on both.
                for c in [&mut full, &mut other] {
                    if c.poll_timeout().is_some_and(|d| d <= now) {
                        c.handle_timeout(now);
                    }
                }
                let (fo, oo) = (take_out(&mut full), take_out(&mut other));
                assert_eq!(fo, oo, "seed {seed}");
                if full.is_closed() {
                    break;
                }
                let data = HB.repeat(1 + (rng.next() % 3) as usize);
                full.handle_input(now, &data);
                let counters = other.stats();
                let frozen = other.freeze(origin).expect("quiescent");
                let mut counters = counters;
                let mut out = Vec::new();
                let (frozen, step) =
                    frozen.parked_heartbeats(origin, now, &data, &mut counters, |b| {
                        out.extend_from_slice(b);
                        b.len()
                    });
                other = frozen.thaw(origin, &counters);
                if step == FrozenStep::NotHandled {
                    assert_ne!(other.parked_input(now, &data), ParkedStep::NotLiveness);
                } else {
                    assert_eq!(step, FrozenStep::Parked, "written in full");
                    taken += 1;
                }
                out.extend(take_out(&mut other));
                assert_eq!(out, take_out(&mut full), "seed {seed}");
                assert_eq!(events(&mut other), events(&mut full), "seed {seed}");
                assert_eq!(format!("{other:?}"), format!("{full:?}"), "seed {seed}");
                if full.is_closed() {
                    break;
                }
            }
        }
        assert!(taken > 500, "only {taken} reads taken frozen");
    }

    #[test]
    fn a_heartbeat_is_answered_and_counted() {
        let t0 = base();
        let h = Duration::from_secs(2);
        let mut c = established(t0, server_cfg(h, h * 3, true));
        let before = c.stats();
        let t = t0 + h;
        assert_eq!(c.parked_input(t, &HB), ParkedStep::Answered);
        assert_eq!(take_out(&mut c), HB.to_vec());
        assert_eq!(c.stats().heartbeats_in, 1);
        assert_eq!(c.stats().heartbeats_out, 1);
        assert_eq!(c.stats().bytes_in, before.bytes_in + 4);
        assert_eq!(c.last_rx(), t);
        assert!(c.is_quiescent());
        // Dead-after runs from the heartbeat.
        assert_eq!(c.poll_timeout(), Some(t + h + h / 8));
    }

    /// A driver's lent transmit buffer carries the answer and comes back with the write,
    /// its allocation the same (no allocation per heartbeat); the connection keeps none.
    /// Unused, it is taken back by the same swap; nothing is swapped while bytes wait.
    #[test]
    fn a_lent_transmit_buffer_carries_the_answer_and_comes_back() {
        let t0 = base();
        let h = Duration::from_secs(2);
        let mut c = established(t0, server_cfg(h, h * 3, true));
        let mut spare = bytes::BytesMut::with_capacity(64);
        let start = spare.as_ptr() as usize;
        // Within the lent allocation (a partial write advances a buffer's start).
        let lent = |p: *const u8| (start..start + 64).contains(&(p as usize));
        let out0 = c.stats().bytes_out;
        for i in 1..=3u32 {
            assert!(c.swap_transmit_buffer(&mut spare));
            assert_eq!(spare.capacity(), 0);
            let t = t0 + h * i;
            assert_eq!(c.parked_input(t, &HB), ParkedStep::Answered);
            assert_eq!(c.pending_transmit(), &HB[..]);
            assert!(
                lent(c.pending_transmit().as_ptr()),
                "encoded into the lent buffer"
            );
            // A partial write keeps the rest; the last one gives the buffer back.
            c.transmitted_into(1, &mut spare);
            assert_eq!(spare.capacity(), 0);
            assert_eq!(c.pending_transmit(), &HB[1..]);
            c.transmitted_into(3, &mut spare);
            assert!(lent(spare.as_ptr()));
            assert_eq!(spare.len(), 0);
            assert!(spare.capacity() >= 4);
            assert_eq!(c.pending_transmit_len(), 0);
            assert_eq!(c.stats().bytes_out, out0 + 4 * u64::from(i));
            assert!(c.is_quiescent());
        }
        // Lent and unused: the same swap takes it back.
        assert!(c.swap_transmit_buffer(&mut spare));
        assert_eq!(spare.capacity(), 0);
        assert!(c.swap_transmit_buffer(&mut spare));
        assert!(lent(spare.as_ptr()));
        // Bytes waiting: nothing swapped, nothing lost.
        assert_eq!(c.parked_input(t0 + h * 4, &HB), ParkedStep::Answered);
        assert!(!c.swap_transmit_buffer(&mut spare));
        assert!(lent(spare.as_ptr()));
        assert_eq!(take_out(&mut c), HB.to_vec());
        // A plain `transmitted` releases the buffer, as ever: an idle connection holds none.
        assert!(c.swap_transmit_buffer(&mut spare));
        assert_eq!(c.parked_input(t0 + h * 5, &HB), ParkedStep::Answered);
        c.transmitted(4);
        assert!(c.swap_transmit_buffer(&mut spare));
        assert_eq!(spare.capacity(), 0);
    }

    /// Anything but whole heartbeats is left untouched, for the full path.
    #[test]
    fn other_input_is_not_consumed() {
        let t0 = base();
        let h = Duration::from_secs(2);
        let mut data = bytes::BytesMut::new();
        codec::encode(&Frame::Data(bytes::Bytes::from_static(b"x")), &mut data);
        let mut close = bytes::BytesMut::new();
        codec::encode(
            &Frame::Close {
                code: crate::CloseCode::NORMAL,
                text: "bye".into(),
            },
            &mut close,
        );
        let mut hb_then_data = HB.to_vec();
        hb_then_data.extend_from_slice(&data);
        let inputs: [&[u8]; 6] = [
            &data,
            &close,
            &hb_then_data,
            &HB[..2],          // a partial frame
            &[0, 0, 0, 1, 99], // an unknown frame type
            &[],
        ];
        for input in inputs {
            let mut c = established(t0, server_cfg(h, h * 3, false));
            let before = (c.stats(), c.last_rx(), c.poll_timeout());
            assert_eq!(c.parked_input(t0 + h, input), ParkedStep::NotLiveness);
            assert_eq!((c.stats(), c.last_rx(), c.poll_timeout()), before);
            assert!(c.is_quiescent());
            // ... and the full path takes the same bytes as if nothing happened.
            c.handle_input(t0 + h, input);
            assert_eq!(c.stats().bytes_in, before.0.bytes_in + input.len() as u64);
        }
    }

    /// The fallback heartbeat is answered in the parked path; dead-after is not (the end
    /// goes through the driver), with the reason and the silence of the full path.
    #[test]
    fn fallback_heartbeat_answered_dead_after_needs_the_driver() {
        let t0 = base();
        let h = Duration::from_secs(2);
        let mut c = established(t0, server_cfg(h, h * 3, false));
        let d = c.poll_timeout().expect("armed");
        assert_eq!(d, t0 + h + h / 8);
        assert_eq!(c.parked_timeout(d), ParkedStep::Answered);
        assert_eq!(take_out(&mut c), HB.to_vec());
        assert_eq!(c.stats().heartbeats_out, 1);
        // Nothing received since t0: dead at t0 + 3h.
        let mut now = d;
        while let Some(d) = c.poll_timeout() {
            now = d;
            if c.parked_timeout(now) == ParkedStep::NeedsDriver {
                break;
            }
            take_out(&mut c);
        }
        assert_eq!(now, t0 + h * 3);
        assert!(c.is_closed());
        let ev = events(&mut c);
        assert_eq!(ev.len(), 1);
        let ConnEvent::Closed(dis) = &ev[0] else {
            panic!("expected the end, got {ev:?}");
        };
        assert_eq!(dis.reason, DisconnectReason::HeartbeatTimeout);
        assert_eq!(dis.silent_for, h * 3);
    }

    /// A heartbeat flood closes through the driver (policy violation), as in full.
    #[test]
    fn a_flood_needs_the_driver() {
        let t0 = base();
        let h = Duration::from_secs(2);
        let mut c = established(t0, server_cfg(h, h * 3, true));
        let mut step = ParkedStep::Answered;
        for i in 0..20u64 {
            step = c.parked_input(t0 + Duration::from_millis(10 * (i + 1)), &HB);
            take_out(&mut c);
            if step != ParkedStep::Answered {
                break;
            }
        }
        assert_eq!(step, ParkedStep::NeedsDriver);
        assert!(c.is_closed());
        assert!(matches!(
            events(&mut c).last(),
            Some(ConnEvent::Closed(d)) if d.reason == DisconnectReason::PolicyViolation
        ));
        assert_eq!(c.role(), Role::Server);
    }
}
