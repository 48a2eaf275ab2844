//! Server and client over real loopback: presence accuracy, refusals, reconnects.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{fast_policy, raw_connect, raw_hello, Blackhole};
use tether::{
    Client, ClientConfig, ClientEvent, CloseCode, ConnectError, Connection, DisconnectReason,
    Server, ServerConfig, ServerEvent,
};
use tether_proto::backoff::{Backoff, BackoffConfig};
use tether_proto::presence::{PresenceKind, PresenceState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Measures how late this process's timers fire (a busy machine starves the runtime): a
/// task sleeps 5 ms again and again and keeps the largest overshoot.
struct LagProbe {
    max_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LagProbe {
    fn start() -> LagProbe {
        let max_us = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let m = max_us.clone();
        let task = tokio::spawn(async move {
            loop {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(5)).await;
                let late = t.elapsed().saturating_sub(Duration::from_millis(5));
                m.fetch_max(
                    late.as_micros() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        });
        LagProbe { max_us, task }
    }

    fn max(&self) -> Duration {
        Duration::from_micros(self.max_us.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw client that sends heartbeats (and reads everything) until told to close with FIN.
struct RawCloser {
    close: tokio::sync::oneshot::Sender<()>,
}

impl RawCloser {
    fn start(s: TcpStream, h_ms: u64) -> RawCloser {
        let (close, mut closed) = tokio::sync::oneshot::channel();
        let (mut r, mut w) = s.into_split();
        tokio::spawn(async move {
            let mut b = [0u8; 256];
            while let Ok(n) = r.read(&mut b).await {
                if n == 0 {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(h_ms));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if w.write_all(&[0, 0, 0, 0]).await.is_err() {
                            return;
                        }
                    }
                    _ = &mut closed => {
                        let _ = w.shutdown().await;
                        // Keep the write half until the read half saw the server's FIN.
                        std::future::pending::<()>().await;
                    }
                }
            }
        });
        RawCloser { close }
    }

    fn close(self) {
        let _ = self.close.send(());
    }
}

async fn server(h: u64, d: u64) -> Server {
    // A generous handshake deadline: a busy machine may take longer than half a second to
    // read a HELLO when a thousand clients connect at once.
    let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(h, d))
        .handshake_timeout(Duration::from_secs(5));
    Server::bind(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_accuracy_1000_clients() {
    // Long enough that a busy machine's scheduling delays (2,000 connections in one debug
    // process) stay well inside dead_after, short enough for a test.
    let (h, d) = (500u64, 2500u64);
    let mut srv = server(h, d).await;
    let addr = srv.local_addr();
    let hole = Blackhole::start(addr).await;
    let policy = fast_policy(h, d);
    // Connect 50 at a time: the sooner everyone is connected, the less time a busy machine
    // has to starve a client past dead_after before the test even starts.
    let mut healthy = Vec::new();
    let mut silenced = Vec::new();
    let mut closers = Vec::new();
    for batch in (0..1000).collect::<Vec<usize>>().chunks(50) {
        let mut tasks = Vec::new();
        for &i in batch {
            let id = format!("c{i:04}");
            let (policy, via) = (policy.clone(), if i < 100 { hole.addr } else { addr });
            tasks.push(tokio::spawn(async move {
                if (100..200).contains(&i) {
                    Err(raw_connect(via, &id).await)
                } else {
                    Ok(Connection::connect(via, &id, &policy).await.unwrap())
                }
            }));
        }
        for (&i, t) in batch.iter().zip(tasks) {
            match t.await.unwrap() {
                Ok(c) if i < 100 => silenced.push(c),
                Ok(c) => healthy.push(c),
                Err(raw) => closers.push(RawCloser::start(raw, h)),
            }
        }
    }
    // Drain connect events.
    let mut connected = 0;
    while connected < 1000 {
        if let Some(ServerEvent::Connected { .. }) = srv.next_event().await {
            connected += 1;
        }
    }
    // Raw clients heartbeat at the agreed interval (a silent one would be declared dead if
    // connecting 1000 clients took longer than dead_after on a busy machine); none is Offline.
    let c = srv.presence_counts();
    let offline: Vec<String> = srv
        .clients()
        .into_iter()
        .filter(|c| !c.state.is_connected())
        .take(5)
        .map(|c| format!("{} {:?}", c.id, c.state))
        .collect();
    assert_eq!(c.online + c.suspect, 1000, "{c:?}: {offline:?}");
    let mut presence = srv.subscribe();

    // 100 vanish without FIN; 100 close cleanly (FIN).
    let lag = LagProbe::start();
    hole.set(true);
    let t0 = Instant::now();
    for c in closers.drain(..) {
        c.close();
    }
    let silenced_ids: HashSet<String> = (0..100).map(|i| format!("c{i:04}")).collect();
    let closer_ids: HashSet<String> = (100..200).map(|i| format!("c{i:04}")).collect();
    let mut offline_silenced = HashSet::new();
    let mut offline_closed = HashSet::new();
    let dd = Duration::from_millis(d);
    let deadline = tokio::time::Instant::now() + dd * 3;
    while offline_silenced.len() < 100 || offline_closed.len() < 100 {
        let ch = tokio::time::timeout_at(deadline, presence.recv())
            .await
            .expect("timed out waiting for Offline")
            .unwrap();
        match ch.to {
            PresenceState::Offline {
                reason, silent_for, ..
            } => {
                if silenced_ids.contains(&ch.id) {
                    assert_eq!(reason, DisconnectReason::HeartbeatTimeout, "{}", ch.id);
                    // Never before dead_after; after it by at most a quarter of it, plus how
                    // late this process's timers run on a busy machine (measured alongside).
                    let late = dd / 4 + lag.max();
                    assert!(
                        silent_for >= dd && silent_for <= dd + late,
                        "{}: silent_for {silent_for:?}, timers up to {:?} late",
                        ch.id,
                        lag.max()
                    );
                    let detected = ch.at.saturating_duration_since(t0);
                    assert!(
                        detected <= dd + late,
                        "{} detected after {detected:?}, timers up to {:?} late",
                        ch.id,
                        lag.max()
                    );
                    offline_silenced.insert(ch.id);
                } else if closer_ids.contains(&ch.id) {
                    assert_eq!(reason, DisconnectReason::PeerClosed, "{}", ch.id);
                    offline_closed.insert(ch.id);
                } else {
                    panic!("healthy client {} went offline: {reason:?}", ch.id);
                }
            }
            PresenceState::Resuming { .. } => panic!("no sessions here, {} resuming", ch.id),
            PresenceState::Online | PresenceState::Suspect => {
                assert!(!closer_ids.contains(&ch.id));
            }
        }
    }
    // Watch a little longer: none of the 800 healthy clients ever leaves Online/Suspect.
    let quiet_until = tokio::time::Instant::now() + dd;
    while let Ok(Ok(ch)) = tokio::time::timeout_at(quiet_until, presence.recv()).await {
        assert!(
            matches!(ch.to, PresenceState::Online | PresenceState::Suspect),
            "{} changed to {:?}",
            ch.id,
            ch.to
        );
    }
    let counts = srv.presence_counts();
    assert_eq!(counts.online + counts.suspect, 800, "{counts:?}");
    assert_eq!(counts.offline, 200, "{counts:?}");
    for c in &healthy {
        assert!(c.disconnected().is_none());
    }
    // The silenced clients noticed too.
    for c in &silenced {
        let dis = tokio::time::timeout(dd, c.closed())
            .await
            .expect("client side did not notice");
        assert_eq!(dis.reason, DisconnectReason::HeartbeatTimeout);
    }
    let m = srv.metrics();
    assert_eq!(
        m.disconnects
            .iter()
            .find(|(l, _)| *l == "heartbeat-timeout")
            .unwrap()
            .1,
        100
    );
    assert_eq!(
        m.disconnects
            .iter()
            .find(|(l, _)| *l == "peer-closed")
            .unwrap()
            .1,
        100
    );
}

#[tokio::test]
async fn refusals_and_misbehaving_peers_do_not_disturb_others() {
    let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(200, 1000))
        .handshake_timeout(Duration::from_millis(300))
        .max_connections(3)
        .max_frame_len(1024);
    let srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    let p = fast_policy(200, 1000);
    let mut good = Connection::connect(addr, "good", &p).await.unwrap();

    // Bad ids: the client refuses to send them; a raw HELLO gets a refusal with bad-hello,
    // for control characters, bidi overrides (U+202E) and line separators (U+2028) alike.
    match Connection::connect(addr, "bad\nid", &p).await {
        Err(ConnectError::InvalidClientId { id, .. }) => assert_eq!(id, "bad\nid"),
        other => panic!("expected a local refusal, got {other:?}"),
    }
    for bad in ["bad\nid", "bob\u{202E}ecila", "a\u{2028}b", "ali\u{200B}ce"] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&raw_hello(bad)).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..5], b"TTHR\x01", "{bad:?}");
        assert_eq!(buf[9], 0x12, "REFUSE frame for {bad:?}");
        assert_eq!(
            u16::from_be_bytes([buf[10], buf[11]]),
            CloseCode::BAD_HELLO.0,
            "{bad:?}"
        );
    }

    // Silent peer: closed at the handshake deadline with a HANDSHAKE_TIMEOUT refusal.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(&buf[..5], b"TTHR\x01");
    assert_eq!(buf[9], 0x12, "REFUSE frame");
    assert_eq!(
        u16::from_be_bytes([buf[10], buf[11]]),
        CloseCode::HANDSHAKE_TIMEOUT.0
    );
    drop(silent);

    // Garbage: no reply, closed at once.
    let mut g = TcpStream::connect(addr).await.unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), g.read_to_end(&mut buf))
        .await
        .unwrap()
        .ok();
    assert!(buf.is_empty(), "garbage must get no answer, got {buf:?}");
    drop(g);

    // Oversize frame after a good handshake: CLOSE with protocol-error, then EOF, without the
    // server reading the announced body.
    let mut o = raw_connect(addr, "big").await;
    o.write_all(&(64u32 << 20).to_be_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), o.read_to_end(&mut buf))
        .await
        .unwrap()
        .ok();
    assert!(
        buf.len() > 7 && buf[4] == 0x04,
        "expected CLOSE frame, got {buf:?}"
    );
    assert_eq!(
        u16::from_be_bytes([buf[5], buf[6]]),
        CloseCode::PROTOCOL_ERROR.0
    );
    drop(o);
    // Every offender's connection is gone again; only the good one is open.
    let t = Instant::now();
    while srv.metrics().connections != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "offenders still open: {:?}",
            srv.metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Over max connections: 3 allowed; good + two more fill it, the fourth is refused.
    let _b = Connection::connect(addr, "b", &p).await.unwrap();
    let _c = Connection::connect(addr, "c", &p).await.unwrap();
    match Connection::connect(addr, "d", &p).await {
        Err(ConnectError::Refused { code, .. }) => assert_eq!(code, CloseCode::SERVER_FULL),
        other => panic!("expected server-full, got {other:?}"),
    }

    // The good client was served throughout.
    let h = srv.handle();
    h.send("good", Bytes::from_static(b"still here"))
        .await
        .unwrap();
    assert_eq!(&good.recv().await.unwrap()[..], b"still here");
    assert!(good.disconnected().is_none());
}

#[tokio::test]
async fn reconnect_replaces_old_connection() {
    let mut srv = server(200, 1000).await;
    let addr = srv.local_addr();
    let p = fast_policy(200, 1000);
    let mut first = Connection::connect(addr, "phone", &p).await.unwrap();
    let _second = Connection::connect(addr, "phone", &p).await.unwrap();
    let d = first.recv().await.unwrap_err();
    assert_eq!(d.reason, DisconnectReason::Replaced);
    // Server events: two connects, one Replaced disconnect; presence stays Online.
    let mut saw_replaced = false;
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(2), srv.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            ServerEvent::Disconnected { disconnect, .. } => {
                assert_eq!(disconnect.reason, DisconnectReason::Replaced);
                saw_replaced = true;
            }
            ServerEvent::Connected { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(saw_replaced);
    let info = srv.client("phone").unwrap();
    assert_eq!(info.state.kind(), PresenceKind::Online);
    assert_eq!(info.connects, 2);
}

#[tokio::test]
async fn client_reconnects_with_seeded_jitter_after_server_restart() {
    let (h, d) = (200u64, 1000u64);
    let srv = server(h, d).await;
    let addr = srv.local_addr();
    let backoff = BackoffConfig {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(400),
        max_attempts: None,
    };
    let mut cfg = ClientConfig::new(addr, "roamer");
    cfg.connect.policy = fast_policy(h, d);
    cfg.backoff = backoff;
    cfg.seed = Some(42);
    let mut client = Client::start(cfg);
    assert!(matches!(
        client.next_event().await.unwrap(),
        ClientEvent::Connected { .. }
    ));

    // Kill the server: graceful shutdown sends CLOSE(going-away) and stops listening.
    srv.shutdown(Duration::from_secs(1)).await;
    drop(srv);
    match client.next_event().await.unwrap() {
        ClientEvent::Disconnected { disconnect } => {
            assert_eq!(
                disconnect.reason,
                DisconnectReason::PeerClose {
                    code: CloseCode::GOING_AWAY,
                    text: "server shutting down".into()
                }
            )
        }
        other => panic!("{other:?}"),
    }
    // While the server is down, the delays follow the seeded full-jitter sequence exactly.
    let mut expect = Backoff::new(backoff, 42);
    let mut attempts = 0;
    let restart_after = 3;
    let mut srv2 = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), client.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            ClientEvent::Reconnecting { attempt, delay } => {
                attempts += 1;
                assert_eq!(attempt, attempts);
                assert_eq!(Some(delay), expect.next_delay(), "attempt {attempt}");
                assert!(delay <= backoff.ceiling(attempt - 1));
                if attempts == restart_after {
                    let cfg = ServerConfig::new(addr).policy(fast_policy(h, d));
                    srv2 = Some(Server::bind(cfg).await.unwrap());
                }
            }
            ClientEvent::SessionLost { unacked } => {
                // The restarted server does not know the old session; nothing was in flight.
                assert!(srv2.is_some());
                assert_eq!(unacked, None);
            }
            ClientEvent::Disconnected { disconnect } if srv2.is_some() => {
                assert!(
                    matches!(
                        disconnect.reason,
                        DisconnectReason::Refused {
                            code: CloseCode::SESSION_UNKNOWN,
                            ..
                        }
                    ),
                    "{disconnect:?}"
                );
            }
            ClientEvent::Disconnected { disconnect } => {
                // Nothing listens while the server is down: the connect is refused.
                assert_eq!(disconnect.reason, DisconnectReason::ConnectRefused);
            }
            ClientEvent::Connected { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(attempts, restart_after);
    let srv2 = srv2.unwrap();
    let info = srv2
        .client("roamer")
        .expect("presence knows the client again");
    assert_eq!(info.state, PresenceState::Online);
    // And the link works.
    srv2.send("roamer", Bytes::from_static(b"welcome back"))
        .await
        .unwrap();
    match client.next_event().await.unwrap() {
        ClientEvent::Message(m) => assert_eq!(&m[..], b"welcome back"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_version_gets_refusal() {
    let srv = server(200, 1000).await;
    let mut s = TcpStream::connect(srv.local_addr()).await.unwrap();
    let mut hello = raw_hello("v9");
    hello[4] = 9;
    s.write_all(&hello).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .ok();
    assert_eq!(buf[9], 0x12, "REFUSE");
    assert_eq!(
        u16::from_be_bytes([buf[10], buf[11]]),
        CloseCode::UNSUPPORTED_VERSION.0
    );
}

#[tokio::test]
async fn a_slow_application_pauses_reading_without_false_deaths() {
    let (h, d) = (100u64, 500u64);
    let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(h, d))
        .max_queued_bytes(800);
    let mut srv = Server::bind(cfg).await.unwrap();
    let c = Connection::connect(srv.local_addr(), "firehose", &fast_policy(h, d))
        .await
        .unwrap();
    assert!(matches!(
        srv.next_event().await,
        Some(ServerEvent::Connected { .. })
    ));
    let sender = tokio::spawn(async move {
        for i in 0u32..20_000 {
            c.send(Bytes::copy_from_slice(&i.to_be_bytes()))
                .await
                .unwrap();
        }
        c
    });
    // The application does not read for 6 × dead_after.
    tokio::time::sleep(Duration::from_millis(6 * d)).await;
    let queued = srv.queued_bytes();
    // Bounded: the limit (200 messages of 4 bytes) plus at most one wake-up's worth of reads
    // (64 KiB of 9-byte frames carrying 4 bytes each).
    assert!(queued <= 800 + (65_536 / 9 + 1) * 4, "queued {queued}");
    assert!(
        queued >= 800,
        "reading should have filled the backlog first: {queued}"
    );
    // Nobody was declared dead while the application was the bottleneck.
    assert_eq!(srv.presence_counts().offline, 0);
    let mut next = 0u32;
    while next < 20_000 {
        match tokio::time::timeout(Duration::from_secs(5), srv.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            ServerEvent::Message { msg, .. } => {
                assert_eq!(u32::from_be_bytes(msg[..4].try_into().unwrap()), next);
                next += 1;
            }
            ServerEvent::Disconnected { disconnect, .. } => panic!("disconnected: {disconnect:?}"),
            _ => {}
        }
    }
    let c = sender.await.unwrap();
    assert!(c.disconnected().is_none(), "{:?}", c.disconnected());
}

/// Issue 17 (CPU per message): the events of one connection carry its client id without a
/// copy per event — `Connected` and every `Message` share one allocation with the server's
/// record (a `String` per message was a third of the server's `malloc` time).
#[tokio::test]
async fn message_events_share_the_client_id_instead_of_copying_it() {
    let mut server = server(1000, 5000).await;
    let conn = Connection::connect(server.local_addr(), "phone-7", &fast_policy(1000, 5000))
        .await
        .expect("connect");
    for m in [&b"a"[..], b"b"] {
        conn.send(Bytes::copy_from_slice(m)).await.expect("send");
    }
    // Where each event's id bytes are: one block, the server's, for every event.
    let mut ids: Vec<*const u8> = Vec::new();
    while ids.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), server.next_event())
            .await
            .expect("events")
        {
            Some(ServerEvent::Connected { client_id, .. })
            | Some(ServerEvent::Message { client_id, .. }) => {
                assert_eq!(client_id, "phone-7");
                ids.push(client_id.as_str().as_ptr());
            }
            Some(_) => {}
            None => panic!("server ended"),
        }
    }
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "each event copied the id"
    );
}
