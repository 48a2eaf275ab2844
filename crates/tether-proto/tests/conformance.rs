//! Runs the shared conformance vectors (`conformance/frames.json`, `conformance/exchanges.json`,
//! format in `conformance/README.md`) against the reference core: every frame through the
//! [`Decoder`] (whole and byte by byte) and back through the encoder, and every scripted
//! exchange through a [`Conn`] on a virtual clock, checking each byte sent and each event to
//! the millisecond.
//!
//! Vectors that need a feature the core does not implement yet (`requires`) are printed as
//! `SKIP` and not counted as passed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::{json, Map, Value};
use tether_proto::codec::{
    self, Credential, DecodeError, Decoder, Frame, Hello, SessionGrant, TOKEN_LEN,
};
use tether_proto::conn::{SendError, TransportError};
use tether_proto::session::{Session, SessionConfig};
use tether_proto::{CloseCode, Conn, ConnConfig, ConnEvent, DisconnectReason, LivenessConfig};

/// Optional features the reference core implements (see conformance/README.md), for frames
/// (the codec) and for exchanges (the connection state machine).
const FRAMES_SUPPORT: &[&str] = &["coalesce", "auth"];
const EXCHANGES_SUPPORT: &[&str] = &[
    "coalesce",
    "answer",
    "token-rotation",
    "auth",
    "ack-on-close",
    "policy-violation",
];

fn vectors(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../conformance")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn unsupported(v: &Value, supported: &[&str]) -> Vec<String> {
    v.get("requires")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .filter(|f| !supported.contains(f))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn u64_str(v: &Value, key: &str) -> u64 {
    v[key]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn token(v: &Value) -> [u8; TOKEN_LEN] {
    unhex(v["token"].as_str().expect("token"))
        .try_into()
        .expect("16-byte token")
}

/// A frame as the vectors describe it.
fn frame_json(f: &Frame) -> Value {
    match f {
        Frame::Heartbeat => json!({"type": "HEARTBEAT"}),
        Frame::Data(p) => json!({"type": "DATA", "payload": hex(p)}),
        Frame::SeqData { seq, payload } => {
            json!({"type": "SEQ_DATA", "seq": seq.to_string(), "payload": hex(payload)})
        }
        Frame::Ping(n) => json!({"type": "PING", "nonce": n.to_string()}),
        Frame::Pong(n) => json!({"type": "PONG", "nonce": n.to_string()}),
        Frame::Ack(n) => json!({"type": "ACK", "seq": n.to_string()}),
        Frame::Close { code, text } => json!({"type": "CLOSE", "code": code.0, "text": text}),
        Frame::Refuse { code, text } => json!({"type": "REFUSE", "code": code.0, "text": text}),
        Frame::Hello(h) => {
            let mut flags = 0;
            if h.want_session {
                flags |= codec::HELLO_SESSION;
            }
            if h.resume.is_some() {
                flags |= codec::HELLO_RESUME;
            }
            if h.credential.is_some() {
                flags |= codec::HELLO_CREDENTIAL;
            }
            let mut o = json!({
                "type": "HELLO",
                "flags": flags,
                "want_session": h.want_session,
                "heartbeat_ms": h.requested_heartbeat.as_millis() as u64,
                "client_id": h.client_id,
            });
            if let Some(r) = &h.resume {
                o["resume"] = json!({
                    "session_id": r.session_id.to_string(),
                    "token": hex(&r.token),
                    "last_received": r.last_received.to_string(),
                });
            }
            if let Some(c) = &h.credential {
                o["credential"] = json!(hex(c.as_bytes()));
            }
            o
        }
        Frame::Welcome(w) => {
            let mut flags = 0;
            if let Some(s) = &w.session {
                flags |= codec::WELCOME_SESSION;
                if s.resumed {
                    flags |= codec::WELCOME_RESUMED;
                }
            }
            if w.credential_ttl.is_some() {
                flags |= codec::WELCOME_CREDENTIAL_TTL;
            }
            let mut o = json!({
                "type": "WELCOME",
                "flags": flags,
                "heartbeat_ms": w.heartbeat.as_millis() as u64,
                "dead_after_ms": w.dead_after.as_millis() as u64,
            });
            if let Some(s) = &w.session {
                o["session"] = grant_json(s);
            }
            if let Some(t) = w.credential_ttl {
                o["credential_ttl_ms"] = json!(t.as_millis() as u64);
            }
            o
        }
        Frame::Auth(c) => json!({"type": "AUTH", "credential": hex(c.as_bytes())}),
        Frame::AuthOk(t) => json!({"type": "AUTH_OK", "credential_ttl_ms": t.as_millis() as u64}),
        Frame::Probe(b) => json!({"type": "PROBE", "body": hex(b)}),
        Frame::Extension(t) => json!({"type": "EXTENSION", "ext_type": t}),
    }
}

fn grant_json(s: &SessionGrant) -> Value {
    json!({
        "session_id": s.session_id.to_string(),
        "token": hex(&s.token),
        "last_received": s.last_received.to_string(),
        "linger_ms": s.linger.as_millis() as u64,
        "resumed": s.resumed,
    })
}

/// Every key of `want` is in `got` with the same value (`retry` is a reconnect decision,
/// which the core does not make: not compared).
fn subset(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => w
            .iter()
            .filter(|(k, _)| k.as_str() != "retry")
            .all(|(k, v)| g.get(k).is_some_and(|gv| subset(v, gv))),
        (w, g) => w == g,
    }
}

fn error_class(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::Oversize { .. } => "oversize",
        DecodeError::UnknownType(_) => "unknown-type",
        _ => "malformed",
    }
}

fn decode_all(max: u32, bytes: &[u8], chunk: usize) -> Result<Vec<Frame>, DecodeError> {
    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        d.decode(piece, |f| {
            out.push(f);
            true
        })?;
    }
    assert_eq!(d.buffered(), 0, "bytes left over");
    Ok(out)
}

#[test]
fn frames() {
    let doc = vectors("frames.json");
    let (mut passed, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for v in doc["frames"].as_array().expect("frames") {
        let name = text(v, "name");
        let missing = unsupported(v, FRAMES_SUPPORT);
        if !missing.is_empty() {
            println!("SKIP frame {name}: requires {}", missing.join(", "));
            skipped += 1;
            continue;
        }
        let bytes = unhex(v["hex"].as_str().expect("hex"));
        let max = v["max_frame_len"].as_u64().unwrap_or(1 << 20) as u32;
        let result = if let Some(err) = v.get("error").and_then(Value::as_str) {
            check_bad_frame(&bytes, max, err)
        } else {
            check_good_frame(&bytes, max, &v["frame"], v["canonical"] != json!(false))
        };
        match result {
            Ok(()) => passed += 1,
            Err(e) => failures.push(format!("frame {name}: {e}")),
        }
    }
    println!(
        "conformance frames: {passed} passed, {skipped} skipped, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn check_good_frame(bytes: &[u8], max: u32, want: &Value, canonical: bool) -> Result<(), String> {
    for chunk in [bytes.len(), 1] {
        let got = decode_all(max, bytes, chunk).map_err(|e| format!("decode error {e}"))?;
        if got.len() != 1 {
            return Err(format!("{} frames decoded", got.len()));
        }
        let j = frame_json(&got[0]);
        if !subset(want, &j) {
            return Err(format!("decoded {j}, want {want}"));
        }
        if canonical {
            let mut out = BytesMut::new();
            codec::encode(&got[0], &mut out);
            if out[..] != *bytes {
                return Err(format!("re-encoded as {}", hex(&out)));
            }
        }
    }
    Ok(())
}

fn check_bad_frame(bytes: &[u8], max: u32, want: &str) -> Result<(), String> {
    // An oversize frame must be refused on its 4-byte prefix alone.
    let input = if want == "oversize" {
        &bytes[..4]
    } else {
        bytes
    };
    for chunk in [input.len(), 1] {
        match decode_all(max, input, chunk) {
            Ok(f) => return Err(format!("decoded {f:?}, want error {want}")),
            Err(e) if error_class(&e) == want => {}
            Err(e) => return Err(format!("error {e} ({}), want {want}", error_class(&e))),
        }
    }
    Ok(())
}

#[test]
fn exchanges() {
    let doc = vectors("exchanges.json");
    let (mut passed, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for x in doc["exchanges"].as_array().expect("exchanges") {
        let name = text(x, "name");
        let missing = unsupported(x, EXCHANGES_SUPPORT);
        if !missing.is_empty() {
            println!("SKIP exchange {name}: requires {}", missing.join(", "));
            skipped += 1;
            continue;
        }
        match Runner::new(x).and_then(|r| r.run(x)) {
            Ok(()) => passed += 1,
            Err(e) => failures.push(format!("exchange {name}: {e}")),
        }
    }
    println!(
        "conformance exchanges: {passed} passed, {skipped} skipped, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Drives one exchange on a virtual clock.
struct Runner {
    base: Instant,
    now: Instant,
    client: bool,
    conn_cfg: ConnConfig,
    hello: Option<Hello>,
    conn: Conn,
    /// Bytes written, with the instant they were produced, since the last `send` check.
    out: Vec<(Duration, Vec<u8>)>,
    /// Events in the vectors' vocabulary, with the instant they were emitted.
    events: std::collections::VecDeque<(Duration, Value)>,
}

impl Runner {
    #[allow(clippy::disallowed_methods)] // one real Instant as the virtual clock's origin
    fn new(x: &Value) -> Result<Runner, String> {
        let c = &x["config"];
        let base = Instant::now();
        let conn_cfg = ConnConfig {
            max_frame_len: num(c, "max_frame_len") as u32,
            handshake_timeout: Duration::from_millis(num(c, "handshake_timeout_ms")),
            session: SessionConfig {
                max_replay_bytes: num(c, "max_replay_bytes") as usize,
                max_replay_messages: num(c, "max_replay_messages") as usize,
                ack_every: num(c, "ack_every") as u32,
                ack_delay: Duration::from_millis(num(c, "ack_delay_ms")),
            },
        };
        let client = x["role"] == "client";
        let (conn, hello) = if client {
            let hello = Hello {
                client_id: text(c, "client_id"),
                requested_heartbeat: Duration::from_millis(num(c, "heartbeat_ms")),
                want_session: c["session"] == json!(true),
                resume: None,
                credential: c
                    .get("credential")
                    .and_then(Value::as_str)
                    .map(|h| Credential::from(unhex(h))),
            };
            let conn = Conn::client(base, conn_cfg.clone(), &hello, local(), None);
            (conn, Some(hello))
        } else {
            (Conn::server(base, conn_cfg.clone()), None)
        };
        let mut r = Runner {
            base,
            now: base,
            client,
            conn_cfg,
            hello,
            conn,
            out: Vec::new(),
            events: Default::default(),
        };
        r.collect();
        Ok(r)
    }

    fn at(&self) -> Duration {
        self.now - self.base
    }

    fn collect(&mut self) {
        let bytes = self.conn.transmit_chunks().collect::<Vec<_>>().concat();
        self.conn.transmitted(bytes.len());
        if !bytes.is_empty() {
            self.out.push((self.at(), bytes));
        }
        while let Some(ev) = self.conn.poll_event() {
            if let Some(j) = event_json(&ev) {
                self.events.push_back((self.at(), j));
            }
        }
    }

    /// Moves the clock to `t`, firing every deadline on the way at its exact instant.
    fn advance(&mut self, t: Duration) -> Result<(), String> {
        let target = self.base + t;
        if target < self.now {
            return Err("steps go back in time".into());
        }
        for _ in 0..100_000 {
            match self.conn.poll_timeout() {
                Some(d) if d <= target => {
                    self.now = self.now.max(d);
                    self.conn.handle_timeout(self.now);
                    self.collect();
                }
                _ => {
                    self.now = target;
                    return Ok(());
                }
            }
        }
        Err("timers do not settle".into())
    }

    fn run(mut self, x: &Value) -> Result<(), String> {
        for (i, step) in x["steps"].as_array().expect("steps").iter().enumerate() {
            let t = Duration::from_millis(num(step, "at_ms"));
            self.advance(t)?;
            self.step(step, t)
                .map_err(|e| format!("step {i} at {} ms: {e}", t.as_millis()))?;
        }
        if let Some((at, b)) = self.out.first() {
            return Err(format!(
                "unexpected bytes at {} ms after the last step: {}",
                at.as_millis(),
                hex(b)
            ));
        }
        if let Some((at, ev)) = self.events.front() {
            return Err(format!(
                "unexpected event at {} ms after the last step: {ev}",
                at.as_millis()
            ));
        }
        Ok(())
    }

    fn step(&mut self, step: &Value, t: Duration) -> Result<(), String> {
        let now = self.now;
        if let Some(h) = step.get("recv").and_then(Value::as_str) {
            self.conn.handle_input(now, &unhex(h));
        } else if step.get("recv_eof").is_some() {
            self.conn.handle_eof(now);
        } else if step.get("recv_reset").is_some() {
            self.conn.handle_transport_error(now, TransportError::Reset);
        } else if let Some(h) = step.get("send").and_then(Value::as_str) {
            let (last, got) = self.take_out();
            if got != unhex(h) {
                return Err(format!("sent {}, want {h}", hex(&got)));
            }
            if !got.is_empty() && last != t {
                return Err(format!("sent at {} ms", last.as_millis()));
            }
        } else if let Some(want) = step.get("send_frames").and_then(Value::as_array) {
            let (last, got) = self.take_out();
            if last != t {
                return Err(format!("sent at {} ms", last.as_millis()));
            }
            let frames = frames_of(&got)?;
            if frames.len() != want.len() || !want.iter().zip(&frames).all(|(w, g)| subset(w, g)) {
                return Err(format!(
                    "sent {}, want {}",
                    Value::Array(frames),
                    Value::Array(want.clone())
                ));
            }
        } else if let Some(want) = step.get("event") {
            let Some((at, got)) = self.events.pop_front() else {
                return Err(format!("no event, want {want}"));
            };
            if !subset(want, &got) {
                return Err(format!("event {got}, want {want}"));
            }
            if at != t {
                return Err(format!("event {got} at {} ms", at.as_millis()));
            }
        } else if let Some(app) = step.get("app") {
            self.app(app)?;
        } else {
            return Err(format!("unknown step {step}"));
        }
        self.collect();
        Ok(())
    }

    fn take_out(&mut self) -> (Duration, Vec<u8>) {
        let last = self.out.last().map(|(t, _)| *t).unwrap_or_default();
        let bytes = self.out.drain(..).flat_map(|(_, b)| b).collect();
        (last, bytes)
    }

    fn app(&mut self, app: &Value) -> Result<(), String> {
        let now = self.now;
        match app["op"].as_str().unwrap_or_default() {
            "send" => {
                let payload = unhex(app["payload"].as_str().unwrap_or_default());
                let got = match self.conn.send(now, &payload) {
                    Ok(()) => "ok",
                    Err(SendError::Full) => "full",
                    Err(SendError::NotEstablished) => "not-established",
                    Err(SendError::Closed) => "closed",
                    Err(SendError::TooLong { .. }) => "too-long",
                    Err(e) => return Err(format!("send: {e}")),
                };
                let want = app["result"].as_str().unwrap_or("ok");
                if got != want {
                    return Err(format!("send result {got}, want {want}"));
                }
            }
            "close" => {
                let code = CloseCode(num(app, "code") as u16);
                self.conn.close(now, code, &text(app, "text"));
            }
            "auth" if self.client => {
                let c = Credential::from(unhex(app["credential"].as_str().unwrap_or_default()));
                self.conn
                    .refresh_credential(now, c)
                    .map_err(|e| format!("auth: {e}"))?;
            }
            "reconnect" if self.client => {
                let session = self.conn.take_session();
                let hello = self.hello.clone().expect("client hello");
                self.conn = Conn::client(now, self.conn_cfg.clone(), &hello, local(), session);
            }
            "accept" if !self.client => {
                let h = Duration::from_millis(num(app, "heartbeat_ms"));
                let mut cfg =
                    LivenessConfig::new(h, Duration::from_millis(num(app, "dead_after_ms")));
                if app["enforce_heartbeat"] == json!(true) {
                    cfg.enforce_peer_heartbeat = Some(h);
                }
                cfg.answer_peer_heartbeat = app["answer_heartbeats"] == json!(true);
                let session = if let Some(s) = app.get("session") {
                    let grant = SessionGrant {
                        session_id: u64_str(s, "session_id"),
                        token: token(s),
                        resumed: false,
                        last_received: 0,
                        linger: Duration::from_millis(num(s, "linger_ms")),
                    };
                    let session =
                        Session::new(grant.session_id, grant.token, self.conn_cfg.session);
                    Some((grant, session))
                } else {
                    app.get("resume").map(|held| self.held_session(held))
                };
                self.conn.accept(now, cfg, session);
            }
            "refuse" if !self.client => {
                let code = CloseCode(num(app, "code") as u16);
                self.conn.refuse(now, code, &text(app, "text"));
            }
            op => return Err(format!("unknown app op {op}")),
        }
        Ok(())
    }

    /// A session the server holds: `sent` messages pushed and transmitted, `acked` of them
    /// acknowledged, `received` messages of the client's received.
    fn held_session(&self, held: &Value) -> (SessionGrant, Session) {
        let id = u64_str(held, "session_id");
        let mut s = Session::new(id, token(held), self.conn_cfg.session);
        for m in held["sent"].as_array().expect("sent") {
            s.push(unhex(m.as_str().expect("hex")).into())
                .expect("room in the held session");
        }
        while s.next_to_send().is_some() {}
        s.on_ack(num(held, "acked")).expect("acked <= sent");
        for seq in 1..=num(held, "received") {
            s.on_data(self.now, seq);
        }
        let _ = s.poll_ack(self.now, true);
        let grant = SessionGrant {
            session_id: id,
            token: *s.token(),
            resumed: true,
            last_received: s.last_received(),
            linger: Duration::from_millis(num(held, "linger_ms")),
        };
        (grant, s)
    }
}

/// The client's local liveness options; heartbeat and dead-after come from the WELCOME.
fn local() -> LivenessConfig {
    LivenessConfig::new(Duration::from_secs(1), Duration::from_secs(3))
}

fn frames_of(bytes: &[u8]) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    if rest.starts_with(b"TTHR") && rest.len() >= 5 {
        out.push(json!({"type": "PREAMBLE", "version": rest[4]}));
        rest = &rest[5..];
    }
    for f in decode_all(u32::MAX, rest, rest.len())
        .map_err(|e| format!("cannot decode what was sent: {e}"))?
    {
        out.push(frame_json(&f));
    }
    Ok(out)
}

fn event_json(ev: &ConnEvent) -> Option<Value> {
    Some(match ev {
        ConnEvent::Hello(h) => json!({
            "type": "hello",
            "client_id": h.client_id,
            "want_session": h.want_session,
            "resume": h.resume.as_ref().map(|r| json!({
                "session_id": r.session_id.to_string(),
                "token": hex(&r.token),
                "last_received": r.last_received.to_string(),
            })),
        }),
        ConnEvent::Established(w) => {
            let mut o = json!({
                "type": "established",
                "heartbeat_ms": w.heartbeat.as_millis() as u64,
                "dead_after_ms": w.dead_after.as_millis() as u64,
                "session": w.session.as_ref().map(grant_json),
            });
            if let Some(t) = w.credential_ttl {
                o["credential_ttl_ms"] = json!(t.as_millis() as u64);
            }
            o
        }
        ConnEvent::Message { payload, .. } => json!({"type": "message", "payload": hex(payload)}),
        ConnEvent::Resumed { replayed } => json!({"type": "resumed", "replayed": replayed}),
        ConnEvent::RefreshCredential { .. } => json!({"type": "auth-due"}),
        ConnEvent::CredentialRefreshed { ttl } => {
            json!({"type": "auth-ok", "credential_ttl_ms": ttl.as_millis() as u64})
        }
        ConnEvent::Auth(c) => json!({"type": "auth", "credential": hex(c.as_bytes())}),
        ConnEvent::SessionLost { unacked } => json!({
            "type": "session-lost",
            "unacked": unacked.as_ref().map(|r| json!([r.start().to_string(), r.end().to_string()])),
        }),
        ConnEvent::Closed(d) => {
            let mut o = Map::new();
            o.insert("type".into(), json!("closed"));
            o.insert("reason".into(), json!(d.reason.label()));
            o.insert(
                "silent_for_ms".into(),
                json!(d.silent_for.as_millis() as u64),
            );
            match &d.reason {
                DisconnectReason::Refused { code, text }
                | DisconnectReason::PeerClose { code, text } => {
                    o.insert("code".into(), json!(code.0));
                    o.insert("text".into(), json!(text));
                }
                DisconnectReason::Replaced => {
                    o.insert("code".into(), json!(CloseCode::REPLACED.0));
                }
                _ => {}
            }
            Value::Object(o)
        }
        _ => return None,
    })
}
