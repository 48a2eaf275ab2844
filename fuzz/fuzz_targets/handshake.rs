//! Handshake fuzz target: a server `Conn` fed arbitrary bytes in chunks chosen by the input,
//! at advancing virtual instants, accepting every HELLO. Then the same for a client `Conn`.
//! When the first byte is odd, a valid preamble and HELLO (server) or WELCOME (client) go
//! first, so the fuzzer also spends its time on established connections.
//!
//! Checks: no panic; after `Closed` no further events; a closed connection asks for no timer.
#![no_main]

use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_proto::codec::{self, Frame, Hello, Welcome};
use tether_proto::{Conn, ConnConfig, ConnEvent, LivenessConfig};

fn run(mut conn: Conn, prefix: &Frame, data: &[u8], t0: Instant) {
    let chunk = usize::from(data[0] >> 1).max(1);
    let mut input = Vec::new();
    if data[0] & 1 == 1 {
        let mut b = BytesMut::new();
        codec::encode_preamble(&mut b);
        codec::encode(prefix, &mut b);
        input.extend_from_slice(&b);
    }
    input.extend_from_slice(&data[1..]);
    let mut now = t0;
    let mut closed = false;
    let live = LivenessConfig {
        heartbeat_interval: Duration::from_millis(100),
        dead_after: Duration::from_millis(300),
        suspect_after: Some(Duration::from_millis(150)),
        idle_timeout: Some(Duration::from_millis(1000)),
        ping_interval: Some(Duration::from_millis(70)),
        enforce_peer_heartbeat: Some(Duration::from_millis(100)),
        // Both ways of heartbeating: answering the peer's (a server's) and not.
        answer_peer_heartbeat: data.len() % 2 == 0,
    };
    for (i, part) in input.chunks(chunk).enumerate() {
        // Each chunk arrives a little later; the first byte of a chunk sets how much later.
        now += Duration::from_millis(u64::from(part[0] % 64));
        if let Some(t) = conn.poll_timeout() {
            if now >= t {
                conn.handle_timeout(now);
            }
        }
        conn.handle_input(now, part);
        if i % 3 == 0 {
            let _ = conn.send(now, part);
        }
        while let Some(ev) = conn.poll_event() {
            assert!(!closed, "event after Closed: {ev:?}");
            match ev {
                ConnEvent::Hello(_) => conn.accept(now, live.clone(), None),
                ConnEvent::Closed(_) => closed = true,
                _ => {}
            }
        }
        let n = conn.pending_transmit().len();
        conn.transmitted(n);
    }
    if conn.is_closed() {
        assert_eq!(conn.poll_timeout(), None);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let t0 = Instant::now();
    let cfg = ConnConfig {
        max_frame_len: 4096,
        handshake_timeout: Duration::from_millis(500),
        ..ConnConfig::default()
    };
    let hello = Hello {
        client_id: "fuzz".into(),
        requested_heartbeat: Duration::from_millis(100),
        want_session: false,
        resume: None,
        credential: None,
    };
    run(
        Conn::server(t0, cfg.clone()),
        &Frame::Hello(hello.clone()),
        data,
        t0,
    );
    let client = Conn::client(
        t0,
        cfg,
        &hello,
        LivenessConfig::new(Duration::from_millis(100), Duration::from_millis(300)),
        None,
    );
    let welcome = Welcome {
        heartbeat: Duration::from_millis(100),
        dead_after: Duration::from_millis(300),
        session: None,
        credential_ttl: None,
    };
    run(client, &Frame::Welcome(welcome), data, t0);
});
