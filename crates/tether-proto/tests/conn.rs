//! The sans-IO connection state machine with a virtual clock: a client and a server `Conn`
//! wired to each other in memory (bytes pumped between them), plus raw byte peers for the
//! handshake's error paths.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tether_proto::codec::{self, Credential, Decoder, Frame, Hello, Welcome};
use tether_proto::conn::{RefreshError, SendError};
use tether_proto::{
    CloseCode, Conn, ConnConfig, ConnEvent, Disconnect, DisconnectReason, LivenessConfig,
};

/// The origin of virtual time. Read from the clock once per test; every later instant is
/// this plus a `Duration`.
#[allow(clippy::disallowed_methods)]
fn base() -> Instant {
    Instant::now()
}

const NS: Duration = Duration::from_nanos(1);
const H: Duration = Duration::from_secs(2);
const D: Duration = Duration::from_secs(6);
const HANDSHAKE: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn hello(id: &str) -> Hello {
    Hello {
        client_id: id.into(),
        requested_heartbeat: ms(1500),
        want_session: false,
        resume: None,
        credential: None,
    }
}

fn cfg() -> ConnConfig {
    ConnConfig {
        max_frame_len: 64 * 1024,
        handshake_timeout: HANDSHAKE,
        ..ConnConfig::default()
    }
}

fn server_liveness() -> LivenessConfig {
    let mut l = LivenessConfig::new(H, D);
    l.enforce_peer_heartbeat = Some(H);
    l
}

fn events(c: &mut Conn) -> Vec<ConnEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// Takes everything `c` wants to send.
fn take_out(c: &mut Conn) -> Vec<u8> {
    let v = c.transmit_chunks().collect::<Vec<_>>().concat();
    c.transmitted(v.len());
    v
}

/// Decodes a byte string (without preamble) into frames.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    Decoder::new(u32::MAX)
        .decode(bytes, |f| {
            out.push(f);
            true
        })
        .expect("valid frames");
    out
}

fn closed(evs: &[ConnEvent]) -> Option<&Disconnect> {
    evs.iter().find_map(|e| match e {
        ConnEvent::Closed(d) => Some(d),
        _ => None,
    })
}

fn preamble() -> Vec<u8> {
    let mut b = BytesMut::new();
    codec::encode_preamble(&mut b);
    b.to_vec()
}

fn enc(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    codec::encode(f, &mut b);
    b.to_vec()
}

/// A client and a server wired to each other with zero latency. Every byte written by one
/// is handed to the other at the same instant.
struct Pair {
    t0: Instant,
    now: Instant,
    client: Conn,
    server: Conn,
    client_events: Vec<(Duration, ConnEvent)>,
    server_events: Vec<(Duration, ConnEvent)>,
    /// Frames each side sent after the preamble: (instant, from_client, bytes)
    wire: Vec<(Duration, bool, Vec<u8>)>,
    /// Stop delivering bytes in one direction (blackhole).
    cut_client_to_server: bool,
    cut_server_to_client: bool,
    accept: Option<LivenessConfig>,
    /// The server accepts with this credential ttl (`accept_authenticated`) when set.
    server_ttl: Option<Option<Duration>>,
    /// How the server answers AUTH.
    auth_answer: AuthAnswer,
    /// The client answers `RefreshCredential` with this credential when set.
    refresh_with: Option<&'static [u8]>,
}

/// How a test server answers an AUTH.
#[derive(Debug, Clone, Copy)]
enum AuthAnswer {
    /// AUTH_OK with this ttl.
    Ok(Option<Duration>),
    /// CLOSE(credential-expired).
    Refuse,
    /// Not at all (the application is still deciding).
    Later,
}

impl Pair {
    fn new() -> Pair {
        let t0 = base();
        Pair {
            server_ttl: None,
            auth_answer: AuthAnswer::Later,
            refresh_with: None,
            t0,
            now: t0,
            client: Conn::client(t0, cfg(), &hello("c1"), LivenessConfig::new(H, D), None),
            server: Conn::server(t0, cfg()),
            client_events: Vec::new(),
            server_events: Vec::new(),
            wire: Vec::new(),
            cut_client_to_server: false,
            cut_server_to_client: false,
            accept: Some(server_liveness()),
        }
    }

    fn established() -> Pair {
        let mut p = Pair::new();
        p.pump();
        assert!(p.client.is_established() && p.server.is_established());
        p.client_events.clear();
        p.server_events.clear();
        p.wire.clear();
        p
    }

    /// Moves bytes and events until nothing changes.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            let c = take_out(&mut self.client);
            if !c.is_empty() {
                moved = true;
                self.wire.push((self.now - self.t0, true, c.clone()));
                if !self.cut_client_to_server {
                    self.server.handle_input(self.now, &c);
                }
            }
            let s = take_out(&mut self.server);
            if !s.is_empty() {
                moved = true;
                self.wire.push((self.now - self.t0, false, s.clone()));
                if !self.cut_server_to_client {
                    self.client.handle_input(self.now, &s);
                }
            }
            for ev in events(&mut self.server) {
                moved = true;
                match &ev {
                    ConnEvent::Hello(_) => match (self.accept.clone(), self.server_ttl) {
                        (Some(l), None) => self.server.accept(self.now, l, None),
                        (Some(l), Some(ttl)) => {
                            self.server.accept_authenticated(self.now, l, None, ttl)
                        }
                        (None, _) => self.server.refuse(self.now, CloseCode::SERVER_FULL, "full"),
                    },
                    ConnEvent::Auth(_) => match self.auth_answer {
                        AuthAnswer::Ok(ttl) => self.server.auth_ok(self.now, ttl),
                        AuthAnswer::Refuse => self.server.auth_refused(self.now, "not you"),
                        AuthAnswer::Later => {}
                    },
                    _ => {}
                }
                self.server_events.push((self.now - self.t0, ev));
            }
            for ev in events(&mut self.client) {
                moved = true;
                if let (ConnEvent::RefreshCredential { .. }, Some(c)) = (&ev, self.refresh_with) {
                    self.client
                        .refresh_credential(self.now, Credential::from(c))
                        .expect("refresh");
                }
                self.client_events.push((self.now - self.t0, ev));
            }
            if !moved {
                return;
            }
        }
    }

    /// Advances virtual time to the earliest deadline (or `limit`), fires it, pumps.
    fn step_until(&mut self, limit: Instant) -> bool {
        let next = [self.client.poll_timeout(), self.server.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(t) if t <= limit => {
                self.now = t;
                for c in [&mut self.client, &mut self.server] {
                    if c.poll_timeout().is_some_and(|d| t >= d) {
                        c.handle_timeout(t);
                    }
                }
                self.pump();
                true
            }
            _ => {
                self.now = limit;
                false
            }
        }
    }

    fn run_until(&mut self, limit: Instant) {
        while self.step_until(limit) {}
    }
}

// ---------------------------------------------------------------------------------------
// Handshake

#[test]
fn handshake_in_memory_then_messages_both_ways() {
    let mut p = Pair::new();
    // The client queued its preamble and HELLO at construction.
    let first = p.client.transmit_chunks().collect::<Vec<_>>().concat();
    assert_eq!(&first[..5], b"TTHR\x01");
    assert_eq!(frames(&first[5..]), vec![Frame::Hello(hello("c1"))]);
    assert!(!p.client.is_established());
    assert_eq!(
        p.client.send(p.t0, b"too early"),
        Err(SendError::NotEstablished)
    );
    p.pump();
    let welcome = Welcome {
        heartbeat: H,
        dead_after: D,
        session: None,
        credential_ttl: None,
    };
    assert_eq!(
        p.server_events,
        vec![
            (Duration::ZERO, ConnEvent::Hello(hello("c1"))),
            (Duration::ZERO, ConnEvent::Established(welcome.clone()))
        ]
    );
    assert_eq!(
        p.client_events,
        vec![(Duration::ZERO, ConnEvent::Established(welcome))]
    );
    // The server's answer on the wire: preamble + WELCOME.
    let (_, from_client, bytes) = &p.wire[1];
    assert!(!from_client);
    assert_eq!(&bytes[..5], b"TTHR\x01");
    // The client adopted the server's h and d, keeping nothing of its own request.
    let l = p.client.liveness().unwrap().config();
    assert_eq!((l.heartbeat_interval, l.dead_after), (H, D));

    p.client.send(p.now, b"ping from client").unwrap();
    p.server.send(p.now, b"").unwrap(); // an empty message is a DATA frame, not a heartbeat
    p.pump();
    assert_eq!(
        p.server_events[2].1,
        ConnEvent::Message {
            payload: bytes::Bytes::from_static(b"ping from client"),
            seq: None
        }
    );
    assert_eq!(
        p.client_events[1].1,
        ConnEvent::Message {
            payload: bytes::Bytes::new(),
            seq: None
        }
    );
    assert_eq!(p.server.stats().messages_in, 1);
    assert_eq!(p.client.stats().messages_out, 1);
}

#[test]
fn handshake_split_into_single_bytes() {
    let t0 = base();
    let mut client = Conn::client(t0, cfg(), &hello("slow"), LivenessConfig::new(H, D), None);
    let mut server = Conn::server(t0, cfg());
    let bytes = take_out(&mut client);
    for b in &bytes {
        assert!(events(&mut server).is_empty());
        server.handle_input(t0, std::slice::from_ref(b));
    }
    assert_eq!(events(&mut server), vec![ConnEvent::Hello(hello("slow"))]);
    server.accept(t0, server_liveness(), None);
    for b in take_out(&mut server) {
        client.handle_input(t0, &[b]);
    }
    assert!(client.is_established());
}

#[test]
fn refusal_reaches_the_client_with_code_and_text() {
    let mut p = Pair::new();
    p.accept = None;
    p.pump();
    let refused = DisconnectReason::Refused {
        code: CloseCode::SERVER_FULL,
        text: "full".into(),
    };
    assert_eq!(
        closed(&events_of(&p.client_events)).unwrap().reason,
        refused
    );
    assert_eq!(
        closed(&events_of(&p.server_events)).unwrap().reason,
        refused
    );
    assert!(p.client.is_closed() && p.server.is_closed());
    let (_, _, bytes) = &p.wire[1];
    assert_eq!(
        frames(&bytes[5..]),
        vec![Frame::Refuse {
            code: CloseCode::SERVER_FULL,
            text: "full".into()
        }]
    );
}

fn events_of(v: &[(Duration, ConnEvent)]) -> Vec<ConnEvent> {
    v.iter().map(|(_, e)| e.clone()).collect()
}

#[test]
fn server_handshake_timeout_refuses_with_handshake_timeout() {
    let t0 = base();
    let mut server = Conn::server(t0, cfg());
    // A partial preamble does not extend the deadline.
    server.handle_input(t0 + ms(10), b"TT");
    assert_eq!(server.poll_timeout(), Some(t0 + HANDSHAKE));
    server.handle_timeout(t0 + HANDSHAKE - NS);
    assert!(events(&mut server).is_empty());
    assert!(server.pending_transmit().is_empty());
    server.handle_timeout(t0 + HANDSHAKE);
    let evs = events(&mut server);
    let d = closed(&evs).expect("closed");
    assert!(matches!(&d.reason, DisconnectReason::ProtocolError(t) if t.contains("handshake")));
    assert_eq!(d.silent_for, HANDSHAKE - ms(10));
    let out = take_out(&mut server);
    assert_eq!(&out[..5], b"TTHR\x01");
    assert!(matches!(
        frames(&out[5..]).as_slice(),
        [Frame::Refuse {
            code: CloseCode::HANDSHAKE_TIMEOUT,
            ..
        }]
    ));
    assert_eq!(server.poll_timeout(), None);
}

#[test]
fn server_waiting_for_the_application_decision_also_times_out() {
    let t0 = base();
    let mut client = Conn::client(t0, cfg(), &hello("c"), LivenessConfig::new(H, D), None);
    let mut server = Conn::server(t0, cfg());
    server.handle_input(t0, &take_out(&mut client));
    assert!(matches!(events(&mut server)[..], [ConnEvent::Hello(_)]));
    server.handle_timeout(t0 + HANDSHAKE);
    assert!(closed(&events(&mut server)).is_some());
    let out = take_out(&mut server);
    assert!(matches!(
        frames(&out[5..]).as_slice(),
        [Frame::Refuse {
            code: CloseCode::HANDSHAKE_TIMEOUT,
            ..
        }]
    ));
    // A late decision does nothing.
    server.accept(t0 + HANDSHAKE, server_liveness(), None);
    assert!(server.pending_transmit().is_empty());
    assert!(!server.is_established());
}

#[test]
fn client_handshake_timeout_without_welcome() {
    let t0 = base();
    let mut client = Conn::client(t0, cfg(), &hello("c"), LivenessConfig::new(H, D), None);
    take_out(&mut client);
    // The server's preamble alone is not a welcome.
    client.handle_input(t0 + ms(5), b"TTHR\x01");
    assert_eq!(client.poll_timeout(), Some(t0 + HANDSHAKE));
    client.handle_timeout(t0 + HANDSHAKE - NS);
    assert!(events(&mut client).is_empty());
    client.handle_timeout(t0 + HANDSHAKE);
    let evs = events(&mut client);
    assert!(matches!(
        &closed(&evs).unwrap().reason,
        DisconnectReason::ProtocolError(t) if t.contains("handshake timeout")
    ));
    assert!(
        client.pending_transmit().is_empty(),
        "nothing sent on timeout"
    );
}

#[test]
fn bad_magic_gets_no_reply() {
    let t0 = base();
    let mut server = Conn::server(t0, cfg());
    server.handle_input(t0, b"GET / HTTP/1.1\r\n\r\n");
    let evs = events(&mut server);
    assert_eq!(
        closed(&evs).unwrap().reason,
        DisconnectReason::ProtocolError("not a tether client (it sent an HTTP request)".into())
    );
    assert!(server.pending_transmit().is_empty());
    assert!(server.is_closed());

    // Same on the client side: a server that is not tether gets nothing more.
    let mut client = Conn::client(t0, cfg(), &hello("c"), LivenessConfig::new(H, D), None);
    take_out(&mut client);
    client.handle_input(t0, b"SSH-2.0-OpenSSH\r\n");
    assert_eq!(
        closed(&events(&mut client)).unwrap().reason,
        DisconnectReason::ProtocolError("not a tether server (it answered like SSH)".into())
    );
    assert!(client.pending_transmit().is_empty());
    // An HTTP server answering the HELLO: said in words, not as bytes.
    for (answer, words) in [
        (
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            "not a tether server (it answered like HTTP)",
        ),
        (
            b"hey!\n",
            "not a tether server (its first bytes were \"hey!\", not \"TTHR\")",
        ),
        (
            b"\x00\x01\x02\x03\x04",
            "not a tether server (its first bytes were [00, 01, 02, 03], not \"TTHR\")",
        ),
    ] {
        let mut client = Conn::client(t0, cfg(), &hello("c"), LivenessConfig::new(H, D), None);
        take_out(&mut client);
        // Byte by byte: the verdict does not depend on how the bytes arrive.
        for b in answer {
            client.handle_input(t0, std::slice::from_ref(b));
        }
        assert_eq!(
            closed(&events(&mut client)).unwrap().reason,
            DisconnectReason::ProtocolError(words.into())
        );
    }
}

#[test]
fn unsupported_version_is_refused() {
    let t0 = base();
    let mut server = Conn::server(t0, cfg());
    server.handle_input(t0, b"TTHR\x02anything after is ignored");
    let evs = events(&mut server);
    assert!(matches!(
        &closed(&evs).unwrap().reason,
        DisconnectReason::Refused {
            code: CloseCode::UNSUPPORTED_VERSION,
            ..
        }
    ));
    let out = take_out(&mut server);
    assert_eq!(
        &out[..5],
        b"TTHR\x01",
        "the refusal says which version we speak"
    );
    assert!(matches!(
        frames(&out[5..]).as_slice(),
        [Frame::Refuse {
            code: CloseCode::UNSUPPORTED_VERSION,
            ..
        }]
    ));

    // A client that gets a v2 preamble back closes without answering.
    let mut client = Conn::client(t0, cfg(), &hello("c"), LivenessConfig::new(H, D), None);
    take_out(&mut client);
    client.handle_input(t0, b"TTHR\x02");
    assert!(matches!(
        &closed(&events(&mut client)).unwrap().reason,
        DisconnectReason::ProtocolError(t) if t.contains("version")
    ));
    assert!(client.pending_transmit().is_empty());
}

#[test]
fn client_gets_data_before_welcome_is_a_protocol_error() {
    let t0 = base();
    let mut client = Conn::client(t0, cfg(), &hello("c"), LivenessConfig::new(H, D), None);
    take_out(&mut client);
    let mut bytes = preamble();
    bytes.extend(enc(&Frame::Data(bytes::Bytes::from_static(b"x"))));
    client.handle_input(t0, &bytes);
    assert!(matches!(
        &closed(&events(&mut client)).unwrap().reason,
        DisconnectReason::ProtocolError(t) if t.contains("WELCOME")
    ));
    assert!(!client.is_established());
}

#[test]
fn server_gets_frames_before_hello_or_before_welcome_is_a_protocol_error() {
    let t0 = base();
    // Heartbeat instead of HELLO.
    let mut server = Conn::server(t0, cfg());
    let mut bytes = preamble();
    bytes.extend(enc(&Frame::Heartbeat));
    server.handle_input(t0, &bytes);
    assert!(matches!(
        &closed(&events(&mut server)).unwrap().reason,
        DisconnectReason::ProtocolError(t) if t.contains("HELLO")
    ));
    // The server closes the handshake without a CLOSE frame (not established).
    assert!(server.pending_transmit().is_empty());

    // DATA right behind the HELLO, before the server's WELCOME.
    let mut server = Conn::server(t0, cfg());
    let mut client = Conn::client(t0, cfg(), &hello("c"), LivenessConfig::new(H, D), None);
    let mut bytes = take_out(&mut client);
    bytes.extend(enc(&Frame::Data(bytes::Bytes::from_static(b"eager"))));
    server.handle_input(t0, &bytes);
    let evs = events(&mut server);
    assert!(matches!(evs[0], ConnEvent::Hello(_)));
    assert!(matches!(
        &closed(&evs).unwrap().reason,
        DisconnectReason::ProtocolError(t) if t.contains("before WELCOME")
    ));
}

#[test]
fn probe_request_is_handed_to_the_driver() {
    let t0 = base();
    let mut server = Conn::server(t0, cfg());
    let mut bytes = preamble();
    bytes.extend(enc(&Frame::Probe(bytes::Bytes::from_static(b"\x01params"))));
    server.handle_input(t0, &bytes);
    assert_eq!(
        events(&mut server),
        vec![ConnEvent::Probe(bytes::Bytes::from_static(b"\x01params"))]
    );
    assert_eq!(server.poll_timeout(), None);
}

// ---------------------------------------------------------------------------------------
// Liveness through the Conn

#[test]
fn established_heartbeat_goes_out_exactly_h_after_the_last_send() {
    let mut p = Pair::established();
    let t0 = p.t0;
    // Client: last sent its HELLO at t0, established at t0. Server: sent WELCOME at t0.
    p.client.handle_timeout(t0 + H - NS);
    assert!(p.client.pending_transmit().is_empty());
    p.client.handle_timeout(t0 + H);
    assert_eq!(p.client.pending_transmit(), &[0, 0, 0, 0]);
    assert_eq!(p.client.stats().heartbeats_out, 1);
    take_out(&mut p.client);
    // A message at t0 + H + 500 ms postpones the next heartbeat to t0 + 2H + 500 ms.
    p.client.send(t0 + H + ms(500), b"m").unwrap();
    take_out(&mut p.client);
    assert_eq!(p.client.poll_timeout(), Some(t0 + 2 * H + ms(500)));
    p.client.handle_timeout(t0 + 2 * H + ms(500) - NS);
    assert!(p.client.pending_transmit().is_empty());
    p.client.handle_timeout(t0 + 2 * H + ms(500));
    assert_eq!(p.client.pending_transmit(), &[0, 0, 0, 0]);
}

#[test]
fn answering_a_ping_postpones_the_heartbeat() {
    let mut p = Pair::established();
    let t0 = p.t0;
    p.client.handle_input(t0 + ms(700), &enc(&Frame::Ping(42)));
    assert_eq!(frames(&take_out(&mut p.client)), vec![Frame::Pong(42)]);
    assert_eq!(p.client.poll_timeout(), Some(t0 + H + ms(700)));
}

#[test]
fn dead_exactly_d_after_the_last_byte_on_both_sides() {
    let mut p = Pair::established();
    let t0 = p.t0;
    // Exchange normally for 3 d, then a blackhole in both directions.
    p.run_until(t0 + 3 * D);
    let cut = p.now;
    p.cut_client_to_server = true;
    p.cut_server_to_client = true;
    let c_last = p.client.last_rx();
    let s_last = p.server.last_rx();
    p.run_until(cut + 2 * D);
    let c_closed: Vec<_> = p
        .client_events
        .iter()
        .filter(|(_, e)| matches!(e, ConnEvent::Closed(_)))
        .collect();
    let s_closed: Vec<_> = p
        .server_events
        .iter()
        .filter(|(_, e)| matches!(e, ConnEvent::Closed(_)))
        .collect();
    let hb = |silent_for| {
        ConnEvent::Closed(Disconnect {
            reason: DisconnectReason::HeartbeatTimeout,
            silent_for,
        })
    };
    assert_eq!(c_closed, vec![&(c_last + D - t0, hb(D))]);
    assert_eq!(s_closed, vec![&(s_last + D - t0, hb(D))]);
    // The CLOSE frame is still written (it may reach a peer that is only half gone).
    let (_, _, last_from_client) = p.wire.iter().rev().find(|(_, c, _)| *c).unwrap();
    assert!(matches!(
        frames(last_from_client).last(),
        Some(Frame::Close {
            code: CloseCode::HEARTBEAT_TIMEOUT,
            ..
        })
    ));
}

#[test]
fn dead_not_one_nanosecond_early() {
    let mut p = Pair::established();
    let t0 = p.t0;
    p.cut_client_to_server = true;
    p.cut_server_to_client = true;
    // Server heard the client last at t0 (HELLO).
    p.run_until(t0 + D - NS);
    assert!(!p.server.is_closed() && !p.client.is_closed());
    p.run_until(t0 + D);
    assert!(p.server.is_closed() && p.client.is_closed());
}

#[test]
fn twenty_dead_afters_idle_with_heartbeats_stays_up() {
    let mut p = Pair::established();
    let t0 = p.t0;
    p.run_until(t0 + 20 * D);
    assert!(p.client.is_established() && p.server.is_established());
    assert!(
        p.client_events.is_empty() && p.server_events.is_empty(),
        "client {:?} server {:?}",
        p.client_events,
        p.server_events
    );
    // Only heartbeats crossed the wire, one per h per side.
    for (at, _, bytes) in &p.wire {
        assert_eq!(bytes, &[0, 0, 0, 0], "at {at:?}");
    }
    assert_eq!(p.client.stats().heartbeats_out, 60);
    assert_eq!(p.server.stats().heartbeats_out, 60);
    assert_eq!(p.server.stats().heartbeats_in, 60);
}

#[test]
fn one_way_blackhole_is_detected_by_the_side_that_stops_hearing() {
    let mut p = Pair::established();
    let t0 = p.t0;
    p.run_until(t0 + D);
    // Server → client is cut; the client keeps hearing nothing, the server keeps hearing
    // the client's heartbeats.
    p.cut_server_to_client = true;
    let c_last = p.client.last_rx();
    p.run_until(t0 + 4 * D);
    let d = closed(&events_of(&p.client_events)).unwrap().clone();
    assert_eq!(d.reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(d.silent_for, D);
    assert_eq!(p.client_events.last().unwrap().0, c_last + D - t0);
    // The client's CLOSE still reaches the server.
    assert!(matches!(
        &closed(&events_of(&p.server_events)).unwrap().reason,
        DisconnectReason::PeerClose {
            code: CloseCode::HEARTBEAT_TIMEOUT,
            ..
        }
    ));
}

#[test]
fn idle_timeout_closes_despite_heartbeats_and_tells_the_peer() {
    let mut p = Pair::new();
    let t0 = p.t0;
    let mut l = server_liveness();
    l.idle_timeout = Some(5 * H);
    p.accept = Some(l);
    p.pump();
    p.client.send(t0 + ms(1500), b"app").unwrap();
    p.now = t0 + ms(1500);
    p.pump();
    p.run_until(t0 + 20 * H);
    let s = closed(&events_of(&p.server_events)).unwrap().clone();
    assert_eq!(s.reason, DisconnectReason::IdleTimeout);
    // Idle timer counted from the message (received at 1.5 s), not from any heartbeat.
    let at = p
        .server_events
        .iter()
        .find(|(_, e)| matches!(e, ConnEvent::Closed(_)))
        .unwrap()
        .0;
    assert_eq!(at, ms(1500) + 5 * H);
    assert!(p.server.stats().heartbeats_in > 0);
    assert!(matches!(
        &closed(&events_of(&p.client_events)).unwrap().reason,
        DisconnectReason::PeerClose {
            code: CloseCode::IDLE_TIMEOUT,
            ..
        }
    ));
}

#[test]
fn suspect_and_recovered_reach_the_application() {
    let mut p = Pair::new();
    let mut l = server_liveness();
    l.suspect_after = Some(H + ms(500));
    p.accept = Some(l);
    p.pump();
    p.server_events.clear();
    let t0 = p.t0;
    p.cut_client_to_server = true;
    p.run_until(t0 + H + ms(500));
    assert_eq!(
        events_of(&p.server_events),
        vec![ConnEvent::Suspect {
            silent_for: H + ms(500)
        }]
    );
    // The peer's bytes arrive again, the first ones only part of a frame: the application
    // hears that the peer is back at once, and before the message those bytes carry.
    p.client.send(t0 + 2 * H, b"back").unwrap();
    let bytes = take_out(&mut p.client);
    p.server.handle_input(t0 + 2 * H, &bytes[..3]);
    assert_eq!(
        events(&mut p.server),
        vec![ConnEvent::Recovered { silent_for: 2 * H }]
    );
    p.server.handle_input(t0 + 2 * H, &bytes[3..]);
    assert_eq!(
        events(&mut p.server),
        vec![ConnEvent::Message {
            payload: bytes::Bytes::from_static(b"back"),
            seq: None
        }]
    );
}

#[test]
fn recovered_comes_before_the_message_that_ends_the_silence() {
    let (mut p, t0) = suspected_pair();
    p.server.handle_timeout(t0 + H + ms(500));
    assert!(matches!(
        events(&mut p.server).last(),
        Some(ConnEvent::Suspect { .. })
    ));
    p.client.send(t0 + 2 * H, b"back").unwrap();
    p.server.handle_input(t0 + 2 * H, &take_out(&mut p.client));
    assert_eq!(
        events(&mut p.server),
        vec![
            ConnEvent::Recovered { silent_for: 2 * H },
            ConnEvent::Message {
                payload: bytes::Bytes::from_static(b"back"),
                seq: None
            }
        ]
    );
}

#[test]
fn rtt_from_ping_pong_through_the_conn() {
    let t0 = base();
    let mut l = LivenessConfig::new(H, D);
    l.ping_interval = Some(ms(500));
    let mut client = Conn::client(t0, cfg(), &hello("c"), l, None);
    let mut server = Conn::server(t0, cfg());
    server.handle_input(t0, &take_out(&mut client));
    events(&mut server);
    server.accept(t0, server_liveness(), None);
    client.handle_input(t0, &take_out(&mut server));
    events(&mut client);
    assert_eq!(client.poll_timeout(), Some(t0 + ms(500)));
    client.handle_timeout(t0 + ms(500));
    let ping = take_out(&mut client);
    assert_eq!(frames(&ping), vec![Frame::Ping(1)]);
    server.handle_input(t0 + ms(520), &ping);
    let pong = take_out(&mut server);
    client.handle_input(t0 + ms(540), &pong);
    assert_eq!(
        events(&mut client),
        vec![ConnEvent::Rtt {
            sample: ms(40),
            smoothed: ms(40)
        }]
    );
    assert_eq!(client.srtt(), Some(ms(40)));
}

#[test]
fn heartbeat_flood_closes_with_policy_violation() {
    let mut p = Pair::established();
    let t0 = p.t0;
    // A client that heartbeats every 10 ms instead of every 2 s.
    let mut flood = Vec::new();
    for _ in 0..9 {
        flood.extend(enc(&Frame::Heartbeat));
    }
    for (i, chunk) in flood.chunks(4).enumerate() {
        p.server.handle_input(t0 + ms(10) * (i as u32 + 1), chunk);
    }
    let evs = events(&mut p.server);
    assert_eq!(
        closed(&evs).unwrap().reason,
        DisconnectReason::PolicyViolation
    );
    let out = take_out(&mut p.server);
    assert!(matches!(
        frames(&out).as_slice(),
        [Frame::Close {
            code: CloseCode::POLICY_VIOLATION,
            ..
        }]
    ));
    p.client.handle_input(t0 + ms(100), &out);
    assert!(matches!(
        &closed(&events(&mut p.client)).unwrap().reason,
        DisconnectReason::PeerClose {
            code: CloseCode::POLICY_VIOLATION,
            ..
        }
    ));
}

// ---------------------------------------------------------------------------------------
// Close and errors after the handshake

#[test]
fn close_frame_is_peer_close_and_local_close() {
    let mut p = Pair::established();
    p.client.close(p.now, CloseCode(4321), "bye");
    p.pump();
    assert_eq!(
        events_of(&p.client_events),
        vec![ConnEvent::Closed(Disconnect {
            reason: DisconnectReason::LocalClose,
            silent_for: Duration::ZERO
        })]
    );
    assert_eq!(
        events_of(&p.server_events),
        vec![ConnEvent::Closed(Disconnect {
            reason: DisconnectReason::PeerClose {
                code: CloseCode(4321),
                text: "bye".into()
            },
            silent_for: Duration::ZERO
        })]
    );
    assert_eq!(p.client.send(p.now, b"x"), Err(SendError::Closed));
    assert_eq!(p.client.poll_timeout(), None);
    // Closing twice sends one CLOSE.
    p.client.close(p.now, CloseCode::NORMAL, "again");
    assert!(p.client.pending_transmit().is_empty());
}

#[test]
fn replaced_code_is_replaced_on_both_sides() {
    let mut p = Pair::established();
    p.server
        .close(p.now, CloseCode::REPLACED, "newer connection");
    p.pump();
    assert_eq!(
        closed(&events_of(&p.server_events)).unwrap().reason,
        DisconnectReason::Replaced
    );
    assert_eq!(
        closed(&events_of(&p.client_events)).unwrap().reason,
        DisconnectReason::Replaced
    );
}

#[test]
fn messages_in_the_same_read_as_close_are_delivered_first() {
    let mut p = Pair::established();
    p.client.send(p.now, b"last words").unwrap();
    p.client.close(p.now, CloseCode::NORMAL, "");
    let bytes = take_out(&mut p.client);
    let mut tail = bytes.clone();
    tail.extend(enc(&Frame::Data(bytes::Bytes::from_static(b"after close"))));
    p.server.handle_input(p.now, &tail);
    let evs = events(&mut p.server);
    assert_eq!(
        evs[0],
        ConnEvent::Message {
            payload: bytes::Bytes::from_static(b"last words"),
            seq: None
        }
    );
    assert!(matches!(evs[1], ConnEvent::Closed(_)));
    assert_eq!(evs.len(), 2, "nothing after Closed");
}

#[test]
fn transport_events_map_to_reasons() {
    use tether_proto::TransportError;
    let cases = [
        (Some(TransportError::Reset), DisconnectReason::PeerReset),
        (
            Some(TransportError::TimedOut { unacked: true }),
            DisconnectReason::UserTimeout,
        ),
        (
            Some(TransportError::TimedOut { unacked: false }),
            DisconnectReason::KeepaliveTimeout,
        ),
        (
            Some(TransportError::Other("boom".into())),
            DisconnectReason::Io("boom".into()),
        ),
        (None, DisconnectReason::PeerClosed),
    ];
    for (err, want) in cases {
        let mut p = Pair::established();
        let at = p.t0 + ms(1234);
        match err {
            Some(e) => p.server.handle_transport_error(at, e),
            None => p.server.handle_eof(at),
        }
        assert_eq!(
            closed(&events(&mut p.server)).unwrap(),
            &Disconnect {
                reason: want,
                silent_for: ms(1234)
            }
        );
        assert!(p.server.pending_transmit().is_empty());
    }
}

#[test]
fn oversize_frame_is_a_protocol_error_without_allocation() {
    let mut p = Pair::established();
    // Announce 64 KiB + 1 (the limit is 64 KiB).
    let header = (64u32 * 1024 + 1).to_be_bytes();
    p.server.handle_input(p.now, &header);
    let evs = events(&mut p.server);
    assert!(matches!(
        &closed(&evs).unwrap().reason,
        DisconnectReason::ProtocolError(t) if t.contains("exceeds")
    ));
    assert!(p.server.buffer_capacity() < 1024);
    assert!(matches!(
        frames(&take_out(&mut p.server)).as_slice(),
        [Frame::Close {
            code: CloseCode::PROTOCOL_ERROR,
            ..
        }]
    ));
}

#[test]
fn unknown_type_is_an_error_and_extensions_are_ignored() {
    let mut p = Pair::established();
    p.server.handle_input(p.now, &[0, 0, 0, 3, 0x80, 1, 2]);
    p.server.handle_input(p.now, &[0, 0, 0, 1, 0xff]);
    assert!(events(&mut p.server).is_empty());
    assert!(p.server.is_established());
    p.server.handle_input(p.now, &[0, 0, 0, 1, 0x7f]);
    assert!(matches!(
        &closed(&events(&mut p.server)).unwrap().reason,
        DisconnectReason::ProtocolError(t) if t.contains("0x7f")
    ));
}

#[test]
fn session_frames_without_a_session_and_handshake_frames_after_it_are_errors() {
    for f in [
        Frame::SeqData {
            seq: 1,
            payload: bytes::Bytes::from_static(b"x"),
        },
        Frame::Ack(1),
        Frame::Hello(hello("again")),
        Frame::Welcome(Welcome {
            heartbeat: H,
            dead_after: D,
            session: None,
            credential_ttl: None,
        }),
    ] {
        let mut p = Pair::established();
        p.server.handle_input(p.now, &enc(&f));
        assert!(
            matches!(
                &closed(&events(&mut p.server)).unwrap().reason,
                DisconnectReason::ProtocolError(_)
            ),
            "{f:?}"
        );
    }
}

#[test]
fn send_rejects_messages_longer_than_the_maximum_frame() {
    let mut p = Pair::established();
    let max = 64 * 1024 - 1;
    assert!(p.client.send(p.now, &vec![0; max]).is_ok());
    assert_eq!(
        p.client.send(p.now, &vec![0; max + 1]),
        Err(SendError::TooLong { len: max + 1, max })
    );
    p.pump();
    assert_eq!(p.server.stats().messages_in, 1);
}

#[test]
fn idle_connection_holds_no_buffers() {
    let mut p = Pair::established();
    p.client.send(p.now, &[7; 10_000]).unwrap();
    let bytes = take_out(&mut p.client);
    // Deliver in two halves: the decoder holds the first half, then releases it.
    p.server.handle_input(p.now, &bytes[..5000]);
    assert!(p.server.buffer_capacity() >= 5000);
    p.server.handle_input(p.now, &bytes[5000..]);
    assert_eq!(p.server.buffer_capacity(), 0);
    assert_eq!(p.client.buffer_capacity(), 0);
}

#[test]
fn note_alive_postpones_death() {
    let mut p = Pair::established();
    let t0 = p.t0;
    p.server.note_alive(t0 + D - ms(1));
    p.server.handle_timeout(t0 + D);
    assert!(p.server.is_established());
    // The heartbeat due since t0 + H went out at t0 + D; death moved to t0 + 2D - 1 ms.
    assert_eq!(p.server.poll_timeout(), Some(t0 + D + H));
    p.server.handle_timeout(t0 + 2 * D - ms(1) - NS);
    assert!(p.server.is_established());
    p.server.handle_timeout(t0 + 2 * D - ms(1));
    assert!(p.server.is_closed());
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// docs/PROTOCOL.md §11, byte for byte and instant for instant.
#[test]
fn protocol_document_worked_example() {
    let t0 = base();
    let s = Duration::from_secs;
    let demo = Hello {
        client_id: "demo".into(),
        requested_heartbeat: s(10),
        want_session: false,
        resume: None,
        credential: None,
    };
    let live = LivenessConfig::new(s(10), s(30));
    let mut client = Conn::client(t0, ConnConfig::default(), &demo, live.clone(), None);
    let mut server = Conn::server(t0, ConnConfig::default());

    let c_hello = take_out(&mut client);
    assert_eq!(
        c_hello,
        hex("54 54 48 52 01  00 00 00 0b 10 00 00 00 27 10 04 64 65 6d 6f")
    );
    server.handle_input(t0, &c_hello);
    assert_eq!(events(&mut server), vec![ConnEvent::Hello(demo)]);
    server.accept(t0, live, None);
    let s_welcome = take_out(&mut server);
    assert_eq!(
        s_welcome,
        hex("54 54 48 52 01  00 00 00 0a 11 00 00 00 27 10 00 00 75 30")
    );
    client.handle_input(t0, &s_welcome);
    assert!(client.is_established());

    client.send(t0 + s(1), b"hello").unwrap();
    let data = take_out(&mut client);
    assert_eq!(data, hex("00 00 00 06 01 68 65 6c 6c 6f"));
    server.handle_input(t0 + s(1), &data);

    // Nothing is due before 10 s on either side.
    assert_eq!(server.poll_timeout(), Some(t0 + s(10)));
    assert_eq!(client.poll_timeout(), Some(t0 + s(11)));
    server.handle_timeout(t0 + s(10));
    let hb = take_out(&mut server);
    assert_eq!(hb, hex("00 00 00 00"));
    client.handle_input(t0 + s(10), &hb);
    client.handle_timeout(t0 + s(11));
    let hb = take_out(&mut client);
    assert_eq!(hb, hex("00 00 00 00"));
    server.handle_input(t0 + s(11), &hb);

    client.close(t0 + s(12), CloseCode::NORMAL, "bye");
    let close = take_out(&mut client);
    assert_eq!(close, hex("00 00 00 06 04 00 00 62 79 65"));
    server.handle_input(t0 + s(12), &close);
    assert!(events(&mut server).contains(&ConnEvent::Closed(Disconnect {
        reason: DisconnectReason::PeerClose {
            code: CloseCode::NORMAL,
            text: "bye".into()
        },
        silent_for: Duration::ZERO
    })));
}

/// docs/PROTOCOL.md §11, last paragraph: silent client declared dead at 1 s + d.
#[test]
fn protocol_document_worked_example_dead_client() {
    let t0 = base();
    let s = Duration::from_secs;
    let live = LivenessConfig::new(s(10), s(30));
    let mut client = Conn::client(
        t0,
        ConnConfig::default(),
        &hello("demo"),
        live.clone(),
        None,
    );
    let mut server = Conn::server(t0, ConnConfig::default());
    server.handle_input(t0, &take_out(&mut client));
    events(&mut server);
    server.accept(t0, live, None);
    client.handle_input(t0, &take_out(&mut server));
    client.send(t0 + s(1), b"hello").unwrap();
    server.handle_input(t0 + s(1), &take_out(&mut client));
    let mut t = t0;
    while !server.is_closed() {
        t = server.poll_timeout().unwrap();
        server.handle_timeout(t);
    }
    assert_eq!(t, t0 + s(31));
    let out = take_out(&mut server);
    let close = &out[out.len() - 4 - 37..];
    assert_eq!(&close[..7], &hex("00 00 00 25 04 00 03")[..]);
    assert_eq!(&close[7..], b"nothing received within dead_after");
}

proptest::proptest! {
    /// Any byte counts as liveness, even when it completes no frame: a message trickling in
    /// at random chunk sizes with gaps below d never gets the server to declare the client
    /// dead, and once the bytes stop, death comes at exactly the last byte + d.
    #[test]
    fn trickling_bytes_keep_the_peer_alive_then_silence_kills_at_exactly_d(
        steps in proptest::collection::vec((1usize..400, 0.0f64..1.0), 1..60),
    ) {
        let mut p = Pair::established();
        let t0 = p.t0;
        p.client.send(t0, &[0x42; 20_000]).unwrap();
        let bytes = take_out(&mut p.client);
        let mut at = 0;
        let mut now = t0;
        for (len, frac) in steps {
            if at >= bytes.len() { break; }
            let next = now + (D - NS).mul_f64(frac);
            // Run the server's timers up to (not including) the arrival.
            while let Some(dl) = p.server.poll_timeout() {
                if dl >= next { break; }
                p.server.handle_timeout(dl);
            }
            now = next;
            let end = (at + len).min(bytes.len());
            p.server.handle_input(now, &bytes[at..end]);
            at = end;
            proptest::prop_assert!(!p.server.is_closed(), "closed at {:?}", now - t0);
        }
        let last = now;
        let mut closed_at = None;
        while let Some(dl) = p.server.poll_timeout() {
            p.server.handle_timeout(dl);
            if p.server.is_closed() { closed_at = Some(dl); }
        }
        proptest::prop_assert_eq!(closed_at, Some(last + D));
        let evs = events(&mut p.server);
        let d = closed(&evs).unwrap();
        proptest::prop_assert_eq!(&d.reason, &DisconnectReason::HeartbeatTimeout);
        proptest::prop_assert_eq!(d.silent_for, D);
    }
}

// ---------------------------------------------------------------------------------------
// Credentials: expiry and in-band refresh (AUTH / AUTH_OK)

/// A pair whose client says hello with a credential and whose server accepts it with `ttl`.
fn credential_pair(ttl: Option<Duration>) -> Pair {
    let t0 = base();
    let mut h = hello("alice");
    h.credential = Some(Credential::from(&b"token-1"[..]));
    let mut p = Pair::new();
    p.t0 = t0;
    p.now = t0;
    p.client = Conn::client(t0, cfg(), &h, LivenessConfig::new(H, D), None);
    p.server = Conn::server(t0, cfg());
    p.server_ttl = Some(ttl);
    p.pump();
    assert!(p.client.is_established() && p.server.is_established());
    p
}

fn welcome_of(evs: &[(Duration, ConnEvent)]) -> Welcome {
    evs.iter()
        .find_map(|(_, e)| match e {
            ConnEvent::Established(w) => Some(w.clone()),
            _ => None,
        })
        .expect("established")
}

fn at(evs: &[(Duration, ConnEvent)], pred: impl Fn(&ConnEvent) -> bool) -> Vec<Duration> {
    evs.iter()
        .filter(|(_, e)| pred(e))
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn without_a_refresh_the_server_closes_exactly_at_expiry_and_the_client_is_asked_at_90_percent() {
    let ttl = Duration::from_secs(10);
    let mut p = credential_pair(Some(ttl));
    let t0 = p.t0;
    // Both sides see the ttl: the WELCOME carries it, the server armed it.
    assert_eq!(welcome_of(&p.client_events).credential_ttl, Some(ttl));
    assert_eq!(welcome_of(&p.server_events).credential_ttl, Some(ttl));
    assert_eq!(p.server.credential_expires_at(), Some(t0 + ttl));
    assert_eq!(p.client.credential_expires_at(), Some(t0 + ttl));
    // One nanosecond before expiry the connection is up (heartbeats keep it alive).
    p.run_until(t0 + ttl - NS);
    assert!(p.server.is_established() && p.client.is_established());
    // The client was asked for a new credential at exactly 9 s, once, with 1 s left.
    let asked: Vec<(Duration, ConnEvent)> = p
        .client_events
        .iter()
        .filter(|(_, e)| matches!(e, ConnEvent::RefreshCredential { .. }))
        .cloned()
        .collect();
    assert_eq!(
        asked,
        vec![(
            Duration::from_secs(9),
            ConnEvent::RefreshCredential {
                expires_in: Duration::from_secs(1)
            }
        )]
    );
    // At expiry: CLOSE(7), reason credential-expired on both sides, at that instant.
    p.run_until(t0 + ttl);
    let s = closed(&events_of(&p.server_events)).cloned().unwrap();
    assert_eq!(s.reason, DisconnectReason::CredentialExpired);
    assert_eq!(s.reason.label(), "credential-expired");
    assert_eq!(
        at(&p.server_events, |e| matches!(e, ConnEvent::Closed(_))),
        vec![ttl]
    );
    // The client sees the server's CLOSE(7) as a peer close with that code.
    assert_eq!(
        closed(&events_of(&p.client_events)).unwrap().reason,
        DisconnectReason::PeerClose {
            code: CloseCode::CREDENTIAL_EXPIRED,
            text: "credential expired without a refresh".into()
        }
    );
    let close = p
        .wire
        .iter()
        .rev()
        .find(|(_, from_client, _)| !from_client)
        .unwrap();
    assert_eq!(close.0, ttl);
    assert!(matches!(
        frames(&close.2)[..],
        [Frame::Close {
            code: CloseCode::CREDENTIAL_EXPIRED,
            ..
        }]
    ));
}

#[test]
fn refreshing_at_90_percent_keeps_the_connection_up_and_restarts_the_expiry() {
    let ttl = Duration::from_secs(10);
    let mut p = credential_pair(Some(ttl));
    let t0 = p.t0;
    p.refresh_with = Some(b"token-2");
    p.auth_answer = AuthAnswer::Ok(Some(ttl));
    p.run_until(t0 + Duration::from_secs(100));
    assert!(p.server.is_established() && p.client.is_established());
    // The client refreshed at 9 s, then every 9 s after each AUTH_OK: 9, 18, …, 99.
    let refreshes = at(&p.server_events, |e| matches!(e, ConnEvent::Auth(_)));
    let expected: Vec<Duration> = (1..=11).map(|k| Duration::from_secs(9 * k)).collect();
    assert_eq!(refreshes, expected);
    assert_eq!(
        at(&p.client_events, |e| matches!(
            e,
            ConnEvent::CredentialRefreshed { ttl: t } if *t == ttl
        )),
        expected
    );
    // The server holds the new credential's bytes and the new expiry.
    assert!(p
        .server_events
        .iter()
        .any(|(_, e)| matches!(e, ConnEvent::Auth(c) if c.as_bytes() == b"token-2")));
    assert_eq!(
        p.server.credential_expires_at(),
        Some(t0 + Duration::from_secs(99) + ttl)
    );
    // On the wire: AUTH "token-2", then AUTH_OK(10 000 ms), as the document shows.
    let auth_wire: Vec<Frame> = p
        .wire
        .iter()
        .filter(|(t, _, _)| *t == Duration::from_secs(9))
        .flat_map(|(_, _, b)| frames(b))
        .collect();
    assert_eq!(
        auth_wire,
        vec![
            Frame::Auth(Credential::from(&b"token-2"[..])),
            Frame::AuthOk(ttl)
        ]
    );
}

#[test]
fn a_refresh_answered_late_still_ends_at_the_old_expiry() {
    let ttl = Duration::from_secs(10);
    let mut p = credential_pair(Some(ttl));
    let t0 = p.t0;
    p.refresh_with = Some(b"token-2");
    p.auth_answer = AuthAnswer::Later;
    p.run_until(t0 + ttl - NS);
    assert!(p.server.is_established());
    // The refresh is still being decided at expiry: the old credential's end applies.
    p.run_until(t0 + ttl);
    assert_eq!(
        closed(&events_of(&p.server_events)).unwrap().reason,
        DisconnectReason::CredentialExpired
    );
    // An answer after the end does nothing.
    p.server.auth_ok(t0 + ttl, Some(ttl));
    assert!(p.server.pending_transmit().is_empty());
}

#[test]
fn a_refused_refresh_closes_with_credential_expired_and_the_servers_text() {
    let mut p = credential_pair(Some(Duration::from_secs(10)));
    p.auth_answer = AuthAnswer::Refuse;
    p.client
        .refresh_credential(p.now, Credential::from(&b"someone-else"[..]))
        .unwrap();
    p.pump();
    assert_eq!(
        closed(&events_of(&p.server_events)).unwrap().reason,
        DisconnectReason::CredentialExpired
    );
    let close = p.wire.iter().rev().find(|(_, c, _)| !c).unwrap();
    assert_eq!(
        frames(&close.2),
        vec![Frame::Close {
            code: CloseCode::CREDENTIAL_EXPIRED,
            text: "not you".into()
        }]
    );
    assert_eq!(
        closed(&events_of(&p.client_events)).unwrap().reason,
        DisconnectReason::PeerClose {
            code: CloseCode::CREDENTIAL_EXPIRED,
            text: "not you".into()
        }
    );
}

#[test]
fn a_credential_that_does_not_expire_is_sent_as_zero_and_arms_nothing() {
    let mut p = credential_pair(None);
    let t0 = p.t0;
    assert_eq!(
        welcome_of(&p.client_events).credential_ttl,
        Some(Duration::ZERO)
    );
    assert_eq!(p.server.credential_expires_at(), None);
    assert_eq!(p.client.credential_expires_at(), None);
    p.run_until(t0 + Duration::from_secs(3600));
    assert!(p.server.is_established() && p.client.is_established());
    assert!(p
        .client_events
        .iter()
        .all(|(_, e)| !matches!(e, ConnEvent::RefreshCredential { .. })));
    // AUTH_OK(0) to a refresh: still no expiry.
    p.auth_answer = AuthAnswer::Ok(None);
    p.client
        .refresh_credential(p.now, Credential::from(&b"t"[..]))
        .unwrap();
    p.pump();
    assert!(p.client_events.iter().any(|(_, e)| matches!(
        e,
        ConnEvent::CredentialRefreshed { ttl } if ttl.is_zero()
    )));
    assert_eq!(p.server.credential_expires_at(), None);
}

#[test]
fn an_expiry_without_a_credential_in_the_hello_closes_but_the_welcome_carries_no_ttl() {
    // A client-certificate principal expires too; such a client cannot refresh in band.
    let mut p = Pair::new();
    let t0 = p.t0;
    p.server_ttl = Some(Some(Duration::from_secs(5)));
    p.pump();
    assert_eq!(welcome_of(&p.client_events).credential_ttl, None);
    assert_eq!(p.client.credential_expires_at(), None);
    assert_eq!(
        p.client
            .refresh_credential(p.now, Credential::from(&b"t"[..])),
        Err(RefreshError::NoCredential)
    );
    p.run_until(t0 + Duration::from_secs(5));
    assert_eq!(
        at(&p.server_events, |e| matches!(
            e,
            ConnEvent::Closed(Disconnect {
                reason: DisconnectReason::CredentialExpired,
                ..
            })
        )),
        vec![Duration::from_secs(5)]
    );
}

#[test]
fn a_sub_millisecond_ttl_is_one_millisecond_on_both_sides() {
    let mut p = credential_pair(Some(Duration::from_micros(10)));
    assert_eq!(
        welcome_of(&p.client_events).credential_ttl,
        Some(Duration::from_millis(1))
    );
    assert_eq!(
        p.server.credential_expires_at(),
        Some(p.t0 + Duration::from_millis(1))
    );
    let t0 = p.t0;
    p.run_until(t0 + Duration::from_millis(1));
    assert!(p.server.is_closed());
}

#[test]
fn auth_misuse_is_a_protocol_error() {
    // AUTH when the HELLO carried no credential.
    let mut p = Pair::established();
    p.server
        .handle_input(p.now, &enc(&Frame::Auth(Credential::from(&b"t"[..]))));
    assert!(matches!(
        &closed(&events(&mut p.server)).unwrap().reason,
        DisconnectReason::ProtocolError(w) if w.contains("no credential")
    ));
    // A second AUTH before the first was answered.
    let mut p = credential_pair(Some(Duration::from_secs(10)));
    let auth = enc(&Frame::Auth(Credential::from(&b"t"[..])));
    p.server.handle_input(p.now, &auth);
    assert!(matches!(events(&mut p.server)[..], [ConnEvent::Auth(_)]));
    p.server.handle_input(p.now, &auth);
    assert!(matches!(
        &closed(&events(&mut p.server)).unwrap().reason,
        DisconnectReason::ProtocolError(w) if w.contains("previous AUTH")
    ));
    // AUTH_OK at a client that sent no AUTH; AUTH at a client; AUTH_OK at a server.
    let mut p = credential_pair(Some(Duration::from_secs(10)));
    p.client.handle_input(p.now, &enc(&Frame::AuthOk(ms(5))));
    assert!(matches!(
        &closed(&events(&mut p.client)).unwrap().reason,
        DisconnectReason::ProtocolError(w) if w.contains("without an AUTH")
    ));
    let mut p = credential_pair(Some(Duration::from_secs(10)));
    p.client.handle_input(p.now, &auth);
    assert!(matches!(
        &closed(&events(&mut p.client)).unwrap().reason,
        DisconnectReason::ProtocolError(_)
    ));
    let mut p = credential_pair(Some(Duration::from_secs(10)));
    p.server.handle_input(p.now, &enc(&Frame::AuthOk(ms(5))));
    assert!(matches!(
        &closed(&events(&mut p.server)).unwrap().reason,
        DisconnectReason::ProtocolError(_)
    ));
    // AUTH before WELCOME (the server is still deciding on the HELLO).
    let t0 = base();
    let mut server = Conn::server(t0, cfg());
    let mut h = hello("a");
    h.credential = Some(Credential::from(&b"t"[..]));
    let mut bytes = preamble();
    bytes.extend(enc(&Frame::Hello(h)));
    bytes.extend(&auth);
    server.handle_input(t0, &bytes);
    assert!(matches!(
        &closed(&events(&mut server)).unwrap().reason,
        DisconnectReason::ProtocolError(w) if w.contains("AUTH sent before WELCOME")
    ));
}

#[test]
fn refresh_credential_says_why_it_cannot_send() {
    let t0 = base();
    let mut h = hello("a");
    h.credential = Some(Credential::from(&b"t"[..]));
    let mut c = Conn::client(t0, cfg(), &h, LivenessConfig::new(H, D), None);
    assert_eq!(
        c.refresh_credential(t0, Credential::from(&b"t"[..])),
        Err(RefreshError::NotEstablished)
    );
    let mut p = credential_pair(Some(Duration::from_secs(10)));
    assert_eq!(
        p.server
            .refresh_credential(p.now, Credential::from(&b"t"[..])),
        Err(RefreshError::NotClient)
    );
    assert!(matches!(
        p.client
            .refresh_credential(p.now, Credential::from(Vec::new())),
        Err(RefreshError::Length(_))
    ));
    assert!(matches!(
        p.client
            .refresh_credential(p.now, Credential::from(vec![b'x'; 8193])),
        Err(RefreshError::Length(_))
    ));
    p.client
        .refresh_credential(p.now, Credential::from(&b"t"[..]))
        .unwrap();
    assert_eq!(
        p.client
            .refresh_credential(p.now, Credential::from(&b"t"[..])),
        Err(RefreshError::InFlight)
    );
    // The AUTH counted as a send: the next heartbeat is H after it.
    let sent_at = p.now + ms(300);
    let mut p = credential_pair(Some(Duration::from_secs(10)));
    p.client
        .refresh_credential(sent_at, Credential::from(&b"t"[..]))
        .unwrap();
    assert_eq!(p.client.poll_timeout(), Some(sent_at + H));
}

/// `handle_input_deliver` hands each message over as it is decoded (nothing waits in the
/// event queue), and the idle timeout is postponed by the read as with `handle_input`.
#[test]
fn handle_input_deliver_hands_messages_over_as_they_are_decoded() {
    let mut p = Pair::established();
    let t0 = p.t0;
    for m in [&b"one"[..], b"two", b"three"] {
        p.client.send(t0 + ms(10), m).unwrap();
    }
    let bytes = take_out(&mut p.client);
    let mut got = Vec::new();
    p.server
        .handle_input_deliver(t0 + ms(10), &bytes, &mut |payload, seq| {
            got.push((payload, seq))
        });
    assert_eq!(
        got,
        vec![
            (bytes::Bytes::from_static(b"one"), None),
            (bytes::Bytes::from_static(b"two"), None),
            (bytes::Bytes::from_static(b"three"), None),
        ]
    );
    assert_eq!(events(&mut p.server), vec![]);
    assert_eq!(p.server.stats().messages_in, 3);
}

/// Order is kept: an event queued before the messages (here `Recovered`, which the bytes
/// themselves cause) holds them in the queue, behind it, for `poll_event`.
#[test]
fn handle_input_deliver_keeps_messages_behind_an_earlier_event() {
    let (mut p, t0) = suspected_pair();
    assert!(matches!(
        events(&mut p.server).last(),
        Some(ConnEvent::Suspect { .. })
    ));
    p.client.send(t0 + 2 * H, b"back").unwrap();
    p.client.send(t0 + 2 * H, b"again").unwrap();
    let mut got = Vec::new();
    p.server
        .handle_input_deliver(t0 + 2 * H, &take_out(&mut p.client), &mut |payload, seq| {
            got.push((payload, seq))
        });
    assert!(got.is_empty(), "handed over ahead of Recovered: {got:?}");
    assert_eq!(
        events(&mut p.server),
        vec![
            ConnEvent::Recovered { silent_for: 2 * H },
            ConnEvent::Message {
                payload: bytes::Bytes::from_static(b"back"),
                seq: None
            },
            ConnEvent::Message {
                payload: bytes::Bytes::from_static(b"again"),
                seq: None
            }
        ]
    );
}

/// A large message payload is queued by reference (not copied into the transmit buffer)
/// and reaches the wire right behind its header, in order with the frames around it, however
/// the driver's writes cut the chunks.
#[test]
fn large_payloads_are_queued_by_reference_and_leave_in_order() {
    let mut p = Pair::established();
    let now = p.now;
    let big = bytes::Bytes::from(vec![7u8; tether_proto::conn::SHARE_PAYLOAD_FROM + 1000]);
    p.client.send(now, b"small before").unwrap();
    p.client.send_bytes(now, &big).unwrap();
    p.client.send(now, b"small after").unwrap();
    // Only the frames and headers were copied: the payload is the caller's `Bytes`.
    assert!(
        p.client.buffer_capacity() < 4096,
        "transmit buffer holds {} bytes",
        p.client.buffer_capacity()
    );
    let mut expected = BytesMut::new();
    codec::encode_data(b"small before", &mut expected);
    codec::encode_data(&big, &mut expected);
    codec::encode_data(b"small after", &mut expected);
    assert_eq!(p.client.pending_transmit_len(), expected.len());
    let chunks: Vec<&[u8]> = p.client.transmit_chunks().collect();
    assert_eq!(chunks.len(), 3, "frames + header, payload, later frames");
    assert_eq!(
        chunks[1].as_ptr(),
        big.as_ptr(),
        "the payload is not copied"
    );
    // Written in pieces that end inside and across chunks, as vectored writes do.
    let mut wire = Vec::new();
    for n in [5, 20, 3000, 20_000, 1, usize::MAX] {
        let all = p.client.transmit_chunks().collect::<Vec<_>>().concat();
        let n = n.min(all.len());
        assert_eq!(p.client.pending_transmit_len(), all.len());
        wire.extend_from_slice(&all[..n]);
        p.client.transmitted(n);
    }
    assert_eq!(wire, &expected[..]);
    assert!(p.client.pending_transmit().is_empty());
    assert_eq!(p.client.pending_transmit_len(), 0);
    assert_eq!(
        p.client.buffer_capacity(),
        0,
        "the buffer is released once written"
    );
    p.server.handle_input(now, &wire);
    let got: Vec<Vec<u8>> = events(&mut p.server)
        .into_iter()
        .filter_map(|e| match e {
            ConnEvent::Message { payload, .. } => Some(payload.to_vec()),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        vec![
            b"small before".to_vec(),
            big.to_vec(),
            b"small after".to_vec()
        ]
    );
}

/// An established pair whose server suspects its client (suspect-after h + 500 ms, reached),
/// and the pair's start.
fn suspected_pair() -> (Pair, Instant) {
    let mut p = Pair::new();
    let mut l = server_liveness();
    l.suspect_after = Some(H + ms(500));
    p.accept = Some(l);
    p.pump();
    let t0 = p.t0;
    p.server.handle_timeout(t0 + H + ms(500));
    (p, t0)
}
