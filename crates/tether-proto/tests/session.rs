//! Sessions under random transport cuts: two endpoints exchange message streams while the
//! transport is cut at random byte offsets (mid-frame, mid-ACK, mid-handshake) and resumed,
//! many times. Every message is delivered exactly once and in order on both sides — or, when
//! a side forgets the session, `SessionLost` names exactly the range that may be missing.
#![allow(clippy::disallowed_methods)] // one real Instant as the virtual clock's origin

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use tether_proto::codec::{Hello, SessionGrant};
use tether_proto::session::{Session, SessionConfig};
use tether_proto::{CloseCode, Conn, ConnConfig, ConnEvent, LivenessConfig, TransportError};

const H: Duration = Duration::from_secs(5);
const D: Duration = Duration::from_secs(15);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// One side's application: the messages it wants to send (numbered), what it received, and
/// the bookkeeping needed to check `SessionLost`.
#[derive(Default)]
struct App {
    to_send: VecDeque<(u64, Bytes)>,
    next_index: u64,
    total: u64,
    /// Message indices received, in order.
    received: Vec<u64>,
    /// seq → message index for the current session of this side (what it pushed).
    pushed: Vec<u64>,
    /// Message indices the peer may have missed (named by SessionLost on our session).
    maybe_lost: Vec<u64>,
    /// Sequence number of the last message received.
    last_seq: u64,
}

impl App {
    fn new(total: u64) -> Self {
        App {
            total,
            ..Default::default()
        }
    }

    fn message(&mut self, rng: &mut Rng) -> Option<(u64, Bytes)> {
        if self.next_index >= self.total {
            return None;
        }
        let i = self.next_index;
        self.next_index += 1;
        // One message in 16 is large enough to be queued for transmission by reference
        // (a chunk of its own, cut anywhere by `transfer`), the rest are copied into the
        // transmit buffer.
        let pad = if rng.below(16) == 0 {
            tether_proto::conn::SHARE_PAYLOAD_FROM + rng.below(20_000) as usize
        } else {
            rng.below(300) as usize
        };
        let mut v = i.to_be_bytes().to_vec();
        v.resize(8 + pad, (i % 251) as u8);
        Some((i, Bytes::from(v)))
    }

    /// Hands queued messages to the connection while it takes them.
    fn feed(&mut self, conn: &mut Conn, now: Instant, rng: &mut Rng) {
        if !conn.is_established() {
            return;
        }
        for _ in 0..rng.below(8) {
            if self.to_send.is_empty() {
                if let Some(m) = self.message(rng) {
                    self.to_send.push_back(m);
                }
            }
            let Some((i, m)) = self.to_send.front().cloned() else {
                return;
            };
            if !conn.can_send(m.len()) {
                return;
            }
            conn.send_bytes(now, &m).unwrap();
            self.to_send.pop_front();
            self.pushed.push(i);
            assert_eq!(conn.session().unwrap().last_seq(), self.pushed.len() as u64);
        }
    }

    fn record(&mut self, payload: &Bytes, seq: Option<u64>) {
        // Messages carry their session sequence numbers: consecutive within a session (a
        // new session starts again at 1), so an application can deduplicate on them.
        let seq = seq.expect("session messages carry their sequence number");
        assert!(
            seq == self.last_seq + 1 || seq == 1,
            "seq {seq} after {}",
            self.last_seq
        );
        self.last_seq = seq;
        let i = u64::from_be_bytes(payload[..8].try_into().unwrap());
        assert!(
            payload[8..].iter().all(|&b| b == (i % 251) as u8),
            "message {i}: payload corrupted"
        );
        self.received.push(i);
    }

    /// Our session was lost: the messages in `range` (by seq) may be missing at the peer;
    /// everything we pushed after them never existed for the new session.
    fn lost(&mut self, range: Option<std::ops::RangeInclusive<u64>>) {
        if let Some(r) = range {
            for seq in r {
                self.maybe_lost.push(self.pushed[(seq - 1) as usize]);
            }
        }
        self.pushed.clear();
    }
}

/// Checks what `receiver` got from `sender`: strictly increasing (no duplicate, no reorder),
/// and every message the sender created is there unless it is named as maybe lost.
fn check(sender: &App, receiver: &App) {
    for w in receiver.received.windows(2) {
        assert!(
            w[0] < w[1],
            "duplicate or reordered: {} then {}",
            w[0],
            w[1]
        );
    }
    let got: std::collections::HashSet<u64> = receiver.received.iter().copied().collect();
    let lost: std::collections::HashSet<u64> = sender.maybe_lost.iter().copied().collect();
    for i in 0..sender.next_index {
        assert!(
            got.contains(&i) || lost.contains(&i),
            "message {i} neither delivered nor named in SessionLost (delivered {} of {})",
            got.len(),
            sender.next_index
        );
    }
}

fn liveness() -> LivenessConfig {
    LivenessConfig::new(H, D)
}

fn conn_cfg(session: SessionConfig) -> ConnConfig {
    ConnConfig {
        max_frame_len: 64 * 1024,
        handshake_timeout: Duration::from_secs(10),
        session,
    }
}

/// Moves up to `budget` bytes from `from` to `to` in random chunks; returns bytes moved.
fn transfer(from: &mut Conn, to: &mut Conn, now: Instant, budget: usize, rng: &mut Rng) -> usize {
    let pending = from.pending_transmit().len();
    if pending == 0 || budget == 0 {
        return 0;
    }
    let n = pending.min(budget).min(1 + rng.below(4096) as usize);
    let chunk = from.pending_transmit()[..n].to_vec();
    from.transmitted(n);
    to.handle_input(now, &chunk);
    n
}

/// Runs one scenario; `cuts` is how many times the transport breaks.
fn scenario(seed: u64, cuts: usize, per_side: u64, forget_prob: u64, cfg: SessionConfig) {
    let mut rng = Rng(seed);
    let t0 = Instant::now();
    let mut now = t0;
    let mut client_app = App::new(per_side);
    let mut server_app = App::new(per_side);
    let mut client_session: Option<Session> = None;
    let mut held: Option<Session> = None;
    let mut next_id = 1u64;
    let mut round = 0usize;
    loop {
        round += 1;
        assert!(round < cuts + 200, "no progress after {round} rounds");
        let last = round > cuts;
        let hello = Hello {
            client_id: "c".into(),
            requested_heartbeat: H,
            want_session: true,
            resume: None,
            credential: None,
        };
        let mut client = Conn::client(
            now,
            conn_cfg(cfg),
            &hello,
            liveness(),
            client_session.take(),
        );
        let mut server = Conn::server(now, conn_cfg(cfg));
        // Sometimes the server forgets the held session (linger expired, restart).
        if held.is_some() && rng.below(100) < forget_prob {
            let s = held.take().unwrap();
            server_app.lost(s.unacked_range());
        }
        // Bytes this connection carries before it breaks (unbounded on the last one).
        let mut budget = if last {
            usize::MAX
        } else {
            rng.below(6000) as usize
        };
        let mut alive = true;
        let mut steps = 0u64;
        while alive {
            steps += 1;
            if steps >= 200_000 {
                panic!(
                    "connection made no progress: client {:?} app next {} queued {} pushed {}; server {:?} app next {} queued {} pushed {}; est c={} s={}",
                    client.session().map(|s| (s.last_seq(), s.acked(), s.last_received(), s.replay_len())),
                    client_app.next_index, client_app.to_send.len(), client_app.pushed.len(),
                    server.session().map(|s| (s.last_seq(), s.acked(), s.last_received(), s.replay_len())),
                    server_app.next_index, server_app.to_send.len(), server_app.pushed.len(),
                    client.is_established(), server.is_established()
                );
            }
            now += Duration::from_millis(1);
            client_app.feed(&mut client, now, &mut rng);
            server_app.feed(&mut server, now, &mut rng);
            let moved_a = transfer(&mut client, &mut server, now, budget, &mut rng);
            budget = budget.saturating_sub(moved_a);
            let moved_b = transfer(&mut server, &mut client, now, budget, &mut rng);
            budget = budget.saturating_sub(moved_b);
            for c in [&mut client, &mut server] {
                if c.poll_timeout().is_some_and(|d| now >= d) {
                    c.handle_timeout(now);
                }
            }
            while let Some(ev) = server.poll_event() {
                match ev {
                    ConnEvent::Hello(h) => {
                        let decision = match (&h.resume, held.take()) {
                            (Some(r), Some(s))
                                if s.id() == r.session_id && s.token_matches(&r.token) =>
                            {
                                let grant = SessionGrant {
                                    session_id: s.id(),
                                    token: *s.token(),
                                    resumed: true,
                                    last_received: s.last_received(),
                                    linger: Duration::from_secs(30),
                                };
                                Some((grant, s))
                            }
                            (Some(_), other) => {
                                held = other;
                                None
                            }
                            (None, other) => {
                                if let Some(s) = other {
                                    server_app.lost(s.unacked_range());
                                }
                                let token = [next_id as u8; 16];
                                let grant = SessionGrant {
                                    session_id: next_id,
                                    token,
                                    resumed: false,
                                    last_received: 0,
                                    linger: Duration::from_secs(30),
                                };
                                let s = Session::new(next_id, token, cfg);
                                next_id += 1;
                                Some((grant, s))
                            }
                        };
                        match decision {
                            Some(d) => server.accept(now, liveness(), Some(d)),
                            None => {
                                server.refuse(now, CloseCode::SESSION_UNKNOWN, "unknown session")
                            }
                        }
                    }
                    ConnEvent::Message { payload: m, seq } => server_app.record(&m, seq),
                    ConnEvent::Closed(_) => alive = false,
                    _ => {}
                }
            }
            while let Some(ev) = client.poll_event() {
                match ev {
                    ConnEvent::Message { payload: m, seq } => client_app.record(&m, seq),
                    ConnEvent::SessionLost { unacked } => client_app.lost(unacked),
                    ConnEvent::Established(w) if !w.session.as_ref().is_some_and(|s| s.resumed) => {
                        client_app.pushed.clear();
                    }
                    ConnEvent::Closed(_) => alive = false,
                    _ => {}
                }
            }
            let idle = client.pending_transmit().is_empty()
                && server.pending_transmit().is_empty()
                && client_app.to_send.is_empty()
                && server_app.to_send.is_empty()
                && client_app.next_index == per_side
                && server_app.next_index == per_side;
            if !last && (budget == 0 || (idle && steps > 100)) {
                // The transport breaks: both sides see a reset (no FIN, no CLOSE).
                client.handle_transport_error(now, TransportError::Reset);
                server.handle_transport_error(now, TransportError::Reset);
                alive = false;
            }
            if last
                && client_app.next_index == per_side
                && server_app.next_index == per_side
                && client_app.to_send.is_empty()
                && server_app.to_send.is_empty()
                && client.pending_transmit().is_empty()
                && server.pending_transmit().is_empty()
                && client.session().is_some_and(|s| s.replay_len() == 0)
                && server.session().is_some_and(|s| s.replay_len() == 0)
            {
                check(&client_app, &server_app);
                check(&server_app, &client_app);
                return;
            }
        }
        // An orderly end (refusal, close): what was written still arrives, then FIN.
        if !client.is_closed() {
            let rest = client_pending_flush(&mut server, &mut client, now);
            for ev in rest {
                match ev {
                    ConnEvent::Message { payload: m, seq } => client_app.record(&m, seq),
                    ConnEvent::SessionLost { unacked } => client_app.lost(unacked),
                    _ => {}
                }
            }
        }
        client_session = client.take_session();
        if let Some(s) = server.take_session() {
            held = Some(s);
        }
    }
}

/// Delivers everything `server` still has for `client`, then end of stream; returns the
/// client's events.
fn client_pending_flush(server: &mut Conn, client: &mut Conn, now: Instant) -> Vec<ConnEvent> {
    let bytes = server.transmit_chunks().collect::<Vec<_>>().concat();
    server.transmitted(bytes.len());
    client.handle_input(now, &bytes);
    client.handle_eof(now);
    std::iter::from_fn(|| client.poll_event()).collect()
}

#[test]
fn regression_single_message() {
    let cfg = SessionConfig {
        ack_every: 1,
        max_replay_messages: 1,
        ..Default::default()
    };
    scenario(8342803724232722969, 9, 1, 0, cfg);
}

#[test]
fn many_cuts_exactly_once_in_order() {
    for seed in 0..20 {
        scenario(seed, 30, 2000, 0, SessionConfig::default());
    }
}

#[test]
fn tiny_replay_buffer_backpressure_loses_nothing() {
    let cfg = SessionConfig {
        max_replay_bytes: 600,
        max_replay_messages: 5,
        ack_every: 3,
        ..Default::default()
    };
    for seed in 100..110 {
        scenario(seed, 20, 500, 0, cfg);
    }
}

#[test]
fn forgotten_sessions_name_exactly_what_may_be_lost() {
    for seed in 200..220 {
        scenario(seed, 25, 1000, 30, SessionConfig::default());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn random_cuts(seed in any::<u64>(), cuts in 0usize..40, per_side in 1u64..800, forget in 0u64..40,
                   ack_every in 1u32..64, max_msgs in 1usize..64) {
        let cfg = SessionConfig { ack_every, max_replay_messages: max_msgs, ..Default::default() };
        scenario(seed, cuts, per_side, forget, cfg);
    }
}
